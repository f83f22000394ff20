"""`python -m pipeline COMMAND ...`: the `xray-lung-prep` command (pipeline/cli.py)."""

import sys

from pipeline.cli import main

sys.exit(main())
