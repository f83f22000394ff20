"""Draw a QC contact sheet for an output folder (or URI): a random sample and every QC-flagged kind.

    xray-lung-prep contact-sheet OUTPUT [--path sheet.png]

Each image is a thumbnail with its lung mask outlined and its flag written on it. The job draws one
after every run as OUTPUT/qc/contact_sheet.png; this command draws one for any output, with other
sample sizes or another seed. See pipeline/contact_sheet.py.
"""

from __future__ import annotations

import argparse

from pipeline.cli import HelpFormatter
from pipeline.contact_sheet import make_contact_sheet


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("output", help="the job's output folder or URI")
    p.add_argument("--path", default=None, help="where to write the sheet (default: OUTPUT/qc/contact_sheet.png)")
    p.add_argument("--sample", type=int, default=24, help="randomly chosen images")
    p.add_argument("--per-flag", type=int, default=8, help="images shown for each QC flag")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choice")
    args = p.parse_args(argv)
    print(make_contact_sheet(args.output, path=args.path, sample=args.sample, per_flag=args.per_flag, seed=args.seed))
    return 0
