"""`python -m cdm_cli ...` is `cdm ...`."""

import sys

from cdm_cli.main import main

sys.exit(main())
