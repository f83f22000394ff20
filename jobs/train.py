"""`xray-lung-prep train` as a script, for `ray job submit --working-dir . -- python jobs/train.py ...`.

The command lives in pipeline/commands/train.py; see `xray-lung-prep train --help`.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
