"""Print the resolved config: dataclass defaults <- CONFIG <- key=value overrides.

The same merge and checks as `phenoscale fit`, without starting anything: use it to see what a
run will do, or to find the right key (a wrong one lists the keys allowed in its section).
scaling.effective_batch_size and scaling.lr are filled in by `fit` once the launcher is known.

Examples:
  phenoscale config configs/experiments/tiny.yaml
  phenoscale config configs/paper/camae_vit_s16_openphenom.yaml trainer.max_steps=100 data.batch_size=64
  phenoscale config configs/experiments/demo_mae.yaml --section trainer
  phenoscale config configs/paper/camae_vit_s16_openphenom.yaml configs/experiments/tiny.yaml   # layered
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from phenoscale.commands import add_config_items
from phenoscale.config import ConfigError, load_config, split_cli_args, to_yaml

HELP = "print the resolved experiment config (defaults <- CONFIG <- overrides)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_items(parser, required=False)
    parser.add_argument("--section", help="print only this section, e.g. trainer or data")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(*split_cli_args(args.items))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.section:
        node = OmegaConf.select(cfg, args.section)
        if node is None:
            print(f"error: no section {args.section!r}; sections are {', '.join(cfg.keys())}", file=sys.stderr)
            return 2
        print(OmegaConf.to_yaml(node, resolve=True), end="")
    else:
        print(to_yaml(cfg), end="")
    return 0
