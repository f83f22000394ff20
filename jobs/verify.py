"""`xray-lung-prep verify` as a script, for `ray job submit --working-dir . -- python jobs/verify.py ...`.

The command lives in pipeline/commands/verify.py; see `xray-lung-prep verify --help`.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["verify", *sys.argv[1:]]))
