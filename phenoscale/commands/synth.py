"""Write a synthetic Cell Painting screen with planted gene modules and batch effects.

Genes are grouped into modules (complexes) sharing a latent MORPHOLOGICAL phenotype (cell and
nucleus size and shape, density, clumping, chromatin/ER texture, stress fibres, nucleoli,
mitochondrial fragmentation and position, Golgi); some modules are anti-correlated, a large
share of genes has no phenotype, every plate carries non-targeting controls and every gene sits
in several experiments. Experiments and plates add biological shifts and optical batch effects
(gain, background, blur, illumination), so alignment on controls matters. Rendered as 6-channel
RxRx-like sites (Hoechst, ConA, Phalloidin, Syto14, MitoTracker, WGA) with shot noise.

Output:
  OUT/shards/synth-*.tar + manifest.parquet   one sample per site (docs/ARCHITECTURE.md)
  OUT/truth/relationships.csv                 entity1,entity2: planted pairs, like CORUM.txt
  OUT/truth/modules.csv                       module,gene
  OUT/truth/phenotypes.parquet                perturbation, module, role, latent (Array f32)
  OUT/screen.json                             every generator setting (written last)

Presets:
  demo    200 genes, 4 experiments (HUVEC, RPE) x 2 plates of 96 wells, 2 sites of 6x128x128
  tiny    24 genes, 2 experiments x 1 plate, 1 site of 6x64x64 (end-to-end tests)
  rxrx1   RxRx1's shape: 1,108 genes, 51 experiments of 4 cell types, 4 x 308 wells, 2 sites
          of 6x512x512 (~125k sites, ~190 GB; shrink with --experiments)

examples:
  phenoscale synth runs/screen                               # the demo screen, seconds
  phenoscale synth runs/corum --modules-from ../shared/data/annotations/CORUM_clusters.tsv
  phenoscale synth /data/rxrx1-synth --preset rxrx1 --experiments 8 --workers 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from datamodules.synthetic import PRESETS, SCREEN_JSON, ScreenConfig, preset, write_screen

HELP = "write a synthetic screen (planted gene modules, batch effects) as shards + ground truth"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options named after a ScreenConfig field (`--image-size` -> image_size) override the preset's value."""
    parser.add_argument("out", type=Path, help="output directory (shards/, truth/, screen.json)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="screen shape (default demo)")
    parser.add_argument("--genes", type=int, help="number of genes (preset: demo 200, tiny 24, rxrx1 1108)")
    parser.add_argument("--image-size", type=int, help="site height = width in pixels (demo 128, rxrx1 512)")
    parser.add_argument("--cell-radius", type=float, help="unperturbed cell radius in pixels (demo 9, rxrx1 20)")
    parser.add_argument("--experiments", type=int, help="number of experiments (demo 4, rxrx1 51)")
    parser.add_argument("--sites-per-well", type=int, help="fields of view per well (default 2)")
    parser.add_argument("--seed", type=int, help="random seed: the same seed writes the same bytes (default 0)")
    parser.add_argument(
        "--modules-from",
        type=lambda text: str(Path(text)),  # ScreenConfig (and screen.json) keep the path as normalised text
        help="complex file 'name<TAB>space-separated genes' (e.g. CORUM_clusters.tsv): "
        "real complexes become the planted modules and the truth",
    )
    parser.add_argument("--dtype", choices=["uint8", "uint16"], help="pixel depth (default uint8, like RxRx1)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="render processes (default: all cores)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a screen already in OUT")


def screen_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The parsed options that name a ScreenConfig field (None: not given, the preset's value stays)."""
    return {f.name: getattr(args, f.name) for f in fields(ScreenConfig) if hasattr(args, f.name)}


def run(args: argparse.Namespace) -> int:
    try:
        cfg = preset(args.preset, **screen_overrides(args))
        write_screen(cfg, args.out, workers=args.workers, overwrite=args.overwrite)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"phenoscale synth: error: {err}", file=sys.stderr)
        return 2
    summary = json.loads((args.out / SCREEN_JSON).read_text())
    counts = summary["counts"]
    print(
        f"wrote {counts['sites']} sites ({counts['genes']} genes, {counts['modules']} modules, "
        f"{counts['relationship_pairs']} planted pairs, {counts['plates']} plates) to {args.out} "
        f"in {summary['seconds']:.1f}s"
    )
    return 0
