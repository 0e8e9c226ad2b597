"""The `cdm` command line: composes the driver (cdm_dist), the Ray executors (actors), tuning and benchmarks."""

from cdm_cli.main import build_parser, main

__all__ = ["build_parser", "main"]
