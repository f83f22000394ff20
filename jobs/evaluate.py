"""`xray-lung-prep evaluate` as a script, for `ray job submit --working-dir . -- python jobs/evaluate.py ...`.

The command lives in pipeline/commands/evaluate.py; see `xray-lung-prep evaluate --help`.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
