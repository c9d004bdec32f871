"""Subcommands of `phenoscale`: one module each (HELP, add_arguments, run).

Arguments that several commands take, with the same meaning, are added here so that they read
and parse alike in every command.
"""

from __future__ import annotations

import argparse


def add_config_items(parser: argparse.ArgumentParser, required: bool) -> None:
    """The `CONFIG... KEY=VALUE...` positional (`args.items`, for `phenoscale.config.split_cli_args`)
    of every command that resolves an experiment config."""
    parser.add_argument(
        "items",
        nargs="+" if required else "*",
        metavar="CONFIG|KEY=VALUE",
        help="experiment YAML file(s), merged in order"
        + ("" if required else " (none: the defaults)")
        + ", e.g. configs/experiments/tiny.yaml, then dotlist overrides, e.g. trainer.max_steps=100 optim.lr=3e-4",
    )


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    """The CHECKPOINT positional: anything `lightning_modules.load_pretrained` loads."""
    parser.add_argument("checkpoint", help="phenoscale .ckpt, export folder, OpenPhenom weights or hf://org/repo")


def stain_list(text: str) -> list[str] | None:
    """argparse type of --channels: 'DNA, RNA,AGP' -> ['DNA', 'RNA', 'AGP']; nothing named -> None."""
    return [name.strip() for name in text.split(",") if name.strip()] or None
