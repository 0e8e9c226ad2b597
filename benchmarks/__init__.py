"""Benchmarks: measure and report (JSON + markdown), never assert."""
