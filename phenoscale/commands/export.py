"""Export a checkpoint as a folder anyone can load, optionally pushed to the Hugging Face Hub.

OUT_DIR gets model.safetensors (real safetensors: tensors only, no pickle), config.json (the
ModelConfig, channels, crop size, standardisation, MLP-bias layout, embedding default) and a
model card README.md (training data and recall when the checkpoint lives in a run directory).
`load_pretrained(OUT_DIR)`, `phenoscale embed OUT_DIR ...` and, once pushed,
`load_pretrained("hf://org/repo")` give the checkpoint's embeddings bit for bit.

Examples:
  phenoscale export runs/tiny/checkpoints/last.ckpt exports/tiny
  phenoscale export runs/camae/checkpoints/last.ckpt exports/camae --encoder-only --push my-org/camae-vit-s16
  phenoscale export OpenPhenom/model.safetensors exports/openphenom --channels Brightfield,ER,AGP,Mito,DNA,RNA
"""

from __future__ import annotations

import argparse
import sys

from phenoscale.commands import add_checkpoint, stain_list

HELP = "checkpoint -> model.safetensors + config.json + model card (optionally pushed to the Hub)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser)
    parser.add_argument("out_dir", help="folder to write (created; existing model files are replaced)")
    parser.add_argument(
        "--encoder-only",
        action="store_true",
        help="only what embed() uses (no MAE decoder, no WSL heads): smaller, embeddings only",
    )
    parser.add_argument(
        "--channels", type=stain_list, help="stains in channel order, comma-separated (default: the run's)"
    )
    parser.add_argument(
        "--metrics", help="a `phenoscale evaluate` metrics.json for the card (default: the run's newest)"
    )
    parser.add_argument("--push", metavar="ORG/REPO", help="upload OUT_DIR to this Hugging Face Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")


def run(args: argparse.Namespace) -> int:
    from lightning_modules.hub import push
    from phenoscale.config import ConfigError
    from phenoscale.exporting import export_checkpoint

    try:
        out = export_checkpoint(
            args.checkpoint,
            args.out_dir,
            encoder_only=args.encoder_only,
            channels=args.channels,
            metrics=args.metrics,
            hub_repo=args.push,
        )
        print(f"[phenoscale] exported {args.checkpoint} to {out}")
        if args.push:
            print(f"[phenoscale] pushed: {push(out, args.push, private=args.private)}")
    except (ConfigError, OSError, ValueError) as err:  # OSError: also the Hub's HTTP errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
