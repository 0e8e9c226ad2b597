"""The `cdm` command line (`cdm_cli.main`): composes the driver (cdm_dist), the Ray executors (actors), tuning and
benchmarks. `python -m cdm_cli` runs it too."""
