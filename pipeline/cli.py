"""The `xray-lung-prep` command: one entry point, a subcommand per job.

    xray-lung-prep preprocess --input samples/xrays --output /tmp/out
    xray-lung-prep --version
    python -m pipeline preprocess ...          # the same, from any folder
    python jobs/preprocess.py ...              # the same, for `ray job submit --working-dir .`

Only the chosen subcommand's module is imported: `train --backend local` runs where neither Ray nor
pydicom is installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

PROG = "xray-lung-prep"
DISTRIBUTION = "xray-lung-prep"
COMMANDS = {  # name -> (module with main(argv, prog), what it does)
    "preprocess": ("pipeline.commands.preprocess", "segment the lungs and write lung-focused Parquet shards"),
    "verify": ("pipeline.commands.verify", "check an output folder or URI against its manifest"),
    "contact-sheet": ("pipeline.commands.contact_sheet", "draw sample and QC-flagged masks of an output as one PNG"),
    "train": ("pipeline.commands.train", "train the lung UNET (Ray Train, or --backend local)"),
    "evaluate": ("pipeline.commands.evaluate", "measure the model through the job on labelled sets"),
    "pack-pairs": ("pipeline.commands.pack_pairs", "pack image/mask pairs into one .npz for a training machine"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every option's default and keeps the docstring's layout."""


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prepares chest X-rays for machine learning at cluster scale.\n\ncommands:\n"
                    + "\n".join(f"  {name:12s} {what}" for name, (_, what) in COMMANDS.items()),
        epilog=f"`{PROG} COMMAND --help` shows a command's options and their defaults.")
    p.add_argument("--version", action="version", version=f"{PROG} {version()}")
    p.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's options")
    ns = p.parse_args(argv)
    module = importlib.import_module(COMMANDS[ns.command][0])
    return module.main(ns.args, prog=f"{PROG} {ns.command}")


if __name__ == "__main__":
    sys.exit(main())
