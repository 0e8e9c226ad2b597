"""Ray job entrypoint: `python -m deploy.entrypoint [run|tune] CONFIG [...]` (the RayJob in deploy/kuberay, or
`ray job submit --address http://HEAD:8265 -- python -m deploy.entrypoint ...`).

Inside a Ray job RAY_ADDRESS points at the cluster, so the campaign's actors land on the cluster's nodes. The
arguments are those of `cdm run` (the default) or `cdm tune`. The environment fills in what a manifest must not
hold, unless the arguments set it themselves:
- CDM_HOME: the folder relative paths are read from (the image sets it to its copy of the project);
- CDM_TRACKING_URI: `--set tracking.uri=...` (the MLflow server);
- CDM_OPTUNA_STORAGE: `--storage ...` for tune (the Optuna database);
- CDM_OVERRIDES: more `KEY=VALUE` overrides, shell-quoted and space-separated.
The exit status is cdm's, so the job fails when the campaign or study does.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence

from cdm_cli.main import main as cdm_main


def cdm_arguments(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The `cdm` command line for these entrypoint arguments and this environment."""
    args = list(argv)
    command = args.pop(0) if args[:1] in (["run"], ["tune"]) else "run"
    overrides = [f"--set={item}" for item in shlex.split(environ.get("CDM_OVERRIDES", ""))]
    if environ.get("CDM_TRACKING_URI") and not any("tracking.uri=" in a for a in args):
        overrides.append(f"--set=tracking.uri={environ['CDM_TRACKING_URI']}")
    if command == "tune" and environ.get("CDM_OPTUNA_STORAGE") and "--storage" not in args:
        overrides += ["--storage", environ["CDM_OPTUNA_STORAGE"]]
    return [command, *(["--quiet"] if command == "run" else []), *args, *overrides]


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cdm run|tune ARGS` on the cluster this job belongs to."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "RAY_ADDRESS" not in os.environ and "--address" not in args:
        print("deploy.entrypoint: no RAY_ADDRESS; submit with `ray job submit` or pass --address", file=sys.stderr)
        return 2
    home = os.environ.get("CDM_HOME")
    if home:
        if not os.path.isdir(home):
            print(f"deploy.entrypoint: CDM_HOME: {home} is not a folder", file=sys.stderr)
            return 2
        os.chdir(home)
    return cdm_main(cdm_arguments(args, os.environ))


if __name__ == "__main__":
    sys.exit(main())
