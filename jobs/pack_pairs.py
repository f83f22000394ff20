"""`xray-lung-prep pack-pairs` as a script, for `ray job submit --working-dir . -- python jobs/pack_pairs.py ...`.

The command lives in pipeline/commands/pack_pairs.py; see `xray-lung-prep pack-pairs --help`.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["pack-pairs", *sys.argv[1:]]))
