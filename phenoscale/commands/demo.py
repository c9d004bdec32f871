"""Train a tiny MAE, CA-MAE and WSL classifier on the built-in synthetic screen and compare them.

Synthesises the demo screen (planted gene modules, batch effects per experiment and plate),
trains each model within a small CPU budget, embeds every site with the models and with three
references (random-init encoder, per-channel image statistics, the planted truth), and prints
known-relationship recall with and without TVN alignment. Rerunning reuses what is finished.

examples:
  phenoscale demo                               # runs/demo; README.md says how long it took on 2 CPU cores
  phenoscale demo --genes 60 --max-steps 50     # a quick smoke run
  phenoscale demo --models mae --out runs/mae-only
"""

from __future__ import annotations

import argparse
from pathlib import Path

from phenoscale.paths import EXPERIMENT_CONFIGS

HELP = "the end-to-end demo on the built-in synthetic screen: train, embed, evaluate, print the recall table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    parser.add_argument("--genes", type=int, default=200, help="genes in the synthetic screen (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="training steps per model (default: each configs/experiments/demo_<model>.yaml budget)",
    )
    # a family is demo-able when it has a demo config; listing the files keeps `--help` free of torch imports
    models = sorted(path.stem.removeprefix("demo_") for path in EXPERIMENT_CONFIGS.glob("demo_*.yaml"))
    parser.add_argument(
        "--models",
        nargs="+",
        choices=models,
        default=None,
        help="families to train (default: every family with a configs/experiments/demo_<family>.yaml)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides applied to every model")


def run(args: argparse.Namespace) -> int:
    from phenoscale.demo import DemoSettings, demo_models, run_demo
    from phenoscale.demo_report import markdown

    models = tuple(name for name in demo_models() if name in args.models) if args.models else demo_models()
    settings = DemoSettings(
        out=args.out,
        genes=args.genes,
        seed=args.seed,
        max_steps=args.max_steps,
        models=models,
        overrides=list(args.overrides),
    )
    table = run_demo(settings)
    print(markdown(table))
    print(f"report: {args.out / 'report.md'}")
    return 0
