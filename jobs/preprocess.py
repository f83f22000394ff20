"""`xray-lung-prep preprocess` as a script, for `ray job submit --working-dir . -- python jobs/preprocess.py ...`.

The command lives in pipeline/commands/preprocess.py; see `xray-lung-prep preprocess --help`.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
