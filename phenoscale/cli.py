"""`phenoscale …`: one entry point, one module per subcommand under phenoscale/commands/.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Adding a command means adding a module and listing it in COMMANDS; nothing else changes.
Plugins (phenoscale.plugins) are imported before the parser is built.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from phenoscale.output import set_verbosity
from phenoscale.plugins import load_plugins

COMMANDS = ["synth", "shards", "fit", "embed", "export", "evaluate", "config", "plan", "demo", "scaling"]


def build_parser() -> argparse.ArgumentParser:
    load_plugins()  # user registrations first: they add families, `shards` layouts and benchmarks
    parser = argparse.ArgumentParser(
        prog="phenoscale",
        description="Train, scale and evaluate foundation models of cell biology (MAE, CA-MAE, WSL).",
    )
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    loud.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"phenoscale.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"phenoscale.commands.{name}":
                raise
            continue
        p = sub.add_parser(
            name, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_verbosity(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
