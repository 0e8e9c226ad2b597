"""Optuna: search spaces, objectives that launch campaigns, storage, pruning."""
