"""Ray job entrypoint: `ray job submit --address http://HEAD:8265 -- python -m deploy.entrypoint CONFIG [...]`.

Inside a Ray job RAY_ADDRESS points at the cluster, so the campaign's actors land on the cluster's nodes. The
arguments are those of `cdm run`; the exit status is its exit status, so the job fails when the campaign does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from cdm_dist.cli import main as cdm_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cdm run ARGS` on the cluster this job belongs to."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "RAY_ADDRESS" not in os.environ and "--address" not in args:
        print("deploy.entrypoint: no RAY_ADDRESS; submit with `ray job submit` or pass --address", file=sys.stderr)
        return 2
    return cdm_main(["run", "--quiet", *args])


if __name__ == "__main__":
    sys.exit(main())
