"""Price a training run before it is queued: parameters, counted FLOPs, GPU-hours, data path.

FLOPs per crop are counted (torch FlopCounterMode, forward + backward) on the configured model
built on the meta device; GPU-hours follow from the vendor peak at the MFU you state; the data
path needs crops/s per GPU, loader cores at the loader rate measured by `make bench`, and
storage bandwidth for the stored site format.

examples:
  phenoscale plan configs/paper/camae_vit_s16_openphenom.yaml --gpus 64 --gpu h100 --mfu 0.4 --crops 3.5B
  phenoscale plan --grid configs/scaling/paper.yaml          # the whole paper grid as one table
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "compute plan: parameters, training FLOPs per crop and in total, GPU-hours, loader and storage needs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from phenoscale.plan import GPU_PEAK_FLOPS

    parser.add_argument("config", type=Path, nargs="?", help="experiment YAML (omit with --grid)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--grid", type=Path, default=None, help="plan every model x budget of a scaling grid")
    parser.add_argument(
        "--crops", default=None, help="training crops, e.g. 3.5B (default: trainer.max_steps x effective batch)"
    )
    parser.add_argument("--gpu", default=None, choices=sorted(GPU_PEAK_FLOPS), help="default h100 (grid: its own)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs in the job (default 8; grid: its own)")
    parser.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation to assume (default 0.4)")
    parser.add_argument("--in-chans", type=int, default=6, help="image channels (default 6)")
    parser.add_argument("--num-classes", type=int, default=1139, help="WSL classes (default 1,139: RxRx1 siRNAs)")
    parser.add_argument("--site-side", type=int, default=None, help="stored site side in pixels (default 2048)")
    parser.add_argument("--site-bytes", type=int, default=None, help="bytes per pixel as stored (default 2)")


def run(args: argparse.Namespace) -> int:
    import polars as pl

    from phenoscale.config import ConfigError, load_config
    from phenoscale.grid import cell_layers, cells, load_grid
    from phenoscale.plan import (
        Hardware,
        SiteFormat,
        assumptions,
        crops_of,
        markdown_table,
        measured_loader_rate,
        model_size,
        plan_row,
    )

    grid = load_grid(args.grid) if args.grid else None
    if grid is None and args.config is None:
        raise ConfigError("give an experiment CONFIG or --grid GRID")
    base_hw = grid.hardware if grid else Hardware()
    hw = Hardware(args.gpu or base_hw.gpu, args.gpus or base_hw.gpus, args.mfu or base_hw.mfu)
    base_site = grid.site if grid else SiteFormat()
    site = SiteFormat(
        args.in_chans if not grid else base_site.channels,
        args.site_side or base_site.side,
        args.site_bytes or base_site.bytes_per_pixel,
        base_site.crops_per_site,
    )
    rate, rate_source = measured_loader_rate()

    jobs = []  # (name, cfg, crops)
    if grid is not None:
        seen = {}
        for cell in cells(grid):
            if cell.model.name not in seen:
                seen[cell.model.name] = load_config(cell_layers(grid, cell), list(cell.model.overrides))
            jobs.append((f"{cell.model.name} @ {cell.crops:.3g}", seen[cell.model.name], cell.crops))
    else:
        cfg = load_config(args.config, args.overrides)
        crops = crops_of(args.crops) if args.crops else cfg.trainer.max_steps * cfg.data.batch_size * hw.gpus
        jobs.append((args.config.stem, cfg, crops))

    sizes = {}
    rows = []
    for name, cfg, crops in jobs:
        key = id(cfg)
        if key not in sizes:
            sizes[key] = model_size(cfg.model, cfg.optim, site.channels, args.num_classes)
        params, encoder, flops = sizes[key]
        rows.append(plan_row(name, params, encoder, flops, crops, hw, site, rate))
    print(markdown_table(pl.DataFrame(rows)))
    print(f"\nassumptions: {assumptions(hw, site, rate, rate_source)}")
    return 0
