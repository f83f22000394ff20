"""The subcommands of `xray-lung-prep` (pipeline/cli.py): one module each, with main(argv, prog)."""
