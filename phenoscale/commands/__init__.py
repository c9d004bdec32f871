"""Subcommands of `phenoscale`: one module each (HELP, add_arguments, run)."""
