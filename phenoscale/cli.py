"""`phenoscale …`: one entry point, one module per subcommand under phenoscale/commands/.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Adding a command means adding a module and listing it in COMMANDS; nothing else changes.
Plugins (phenoscale.plugins) are imported before the parser is built.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from phenoscale.plugins import load_plugins

COMMANDS = ["synth", "shards", "fit", "embed", "export", "evaluate", "config", "plan", "demo", "scaling"]


def build_parser() -> argparse.ArgumentParser:
    load_plugins()  # user registrations first: they add families, `shards` layouts and benchmarks
    parser = argparse.ArgumentParser(
        prog="phenoscale",
        description="Train, scale and evaluate foundation models of cell biology (MAE, CA-MAE, WSL).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"phenoscale.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"phenoscale.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
