"""Check an output folder (or URI) against its manifest; exit 1 with one line per problem.

    xray-lung-prep verify OUTPUT

Run it after the job, or after copying an output elsewhere. See pipeline/verify.py for what is checked.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import HelpFormatter
from pipeline.verify import verify


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("output", help="the job's output folder or URI")
    args = p.parse_args(argv)
    problems = verify(args.output)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {args.output} keeps its contract")
    return 0

