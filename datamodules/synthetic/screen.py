"""`phenoscale synth`: design a screen, render every site in parallel, write shards + truth.

Sites are rendered by a process pool in chunks, but each site draws from its own random stream
(seeded by the screen seed and the site's index), so the bytes written do not depend on the
number of workers or on scheduling. OUT/screen.json is written last: its presence means the
screen is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datamodules.atomic import write_text_atomic
from datamodules.shards import ShardWriter
from datamodules.synthetic.design import ScreenConfig, ScreenDesign, design_screen
from datamodules.synthetic.render import AXES, CHANNELS, Optics, render_site
from datamodules.synthetic.truth import write_truth

SCREEN_JSON = "screen.json"
_SITE_STREAM = 7  # separates per-site random streams from the design's streams


def _render_chunk(cfg: ScreenConfig, indices: np.ndarray, states: np.ndarray, optics: list[Optics]) -> list[np.ndarray]:
    """Render sites `indices` (module-level so a process pool can pickle it)."""
    dtype = np.dtype(cfg.dtype)
    return [
        render_site(
            state, opt, np.random.default_rng([cfg.seed, _SITE_STREAM, int(i)]), cfg.image_size, cfg.cell_radius, dtype
        )
        for i, state, opt in zip(indices, states, optics)
    ]


def render_sites(design: ScreenDesign, workers: int = 1, chunk: int = 8) -> Iterator[np.ndarray]:
    """Images of every site of `design`, in site order; `workers` > 1 renders in a process pool
    with a bounded number of chunks in flight (memory stays flat on RxRx1-sized screens)."""
    sites = design.sites
    states = sites["state"].to_numpy()
    indices = sites["site_index"].to_numpy()
    optics_of = {p: design.optics_of(p) for p in sites["plate"].unique().to_list()}
    optics = [optics_of[p] for p in sites["plate"].to_list()]
    starts = range(0, sites.height, chunk)
    if workers <= 1:
        for s in starts:
            yield from _render_chunk(
                design.config, indices[s : s + chunk], states[s : s + chunk], optics[s : s + chunk]
            )
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque()
        for s in starts:
            pending.append(
                pool.submit(
                    _render_chunk, design.config, indices[s : s + chunk], states[s : s + chunk], optics[s : s + chunk]
                )
            )
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def write_screen(
    cfg: ScreenConfig,
    out_dir: str | Path,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ScreenDesign:
    """Write OUT/shards/*.tar + manifest.parquet, OUT/truth/ and OUT/screen.json; return the design."""
    out_dir = Path(out_dir)
    if (out_dir / SCREEN_JSON).exists() and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a synthetic screen ({SCREEN_JSON}); pass overwrite=True / --overwrite"
        )
    (out_dir / SCREEN_JSON).unlink(missing_ok=True)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    start = time.perf_counter()
    design = design_screen(cfg)
    write_truth(design, out_dir / "truth")
    meta_columns = [
        "key",
        "experiment",
        "plate",
        "well",
        "site",
        "perturbation",
        "perturbation_type",
        "is_control",
        "cell_type",
    ]
    channels = list(CHANNELS)
    with ShardWriter(
        out_dir / "shards", max_bytes=cfg.shard_max_mb * 2**20, prefix="synth", overwrite=overwrite
    ) as writer:
        images = render_sites(design, workers)
        rows = design.sites.select(meta_columns).iter_rows(named=True)
        # disable=None: no bar when stderr is not a terminal (a batch job's log), like the training bar
        for meta, image in tqdm(
            zip(rows, images),
            total=design.sites.height,
            desc="synth: rendering sites",
            unit="site",
            disable=None if progress else True,
        ):
            writer.write(image, {**meta, "channels": channels})
    seconds = time.perf_counter() - start
    summary = {
        "config": dataclasses.asdict(cfg),
        "axes": list(AXES),
        "channels": channels,
        "anticorrelated_modules": [list(p) for p in design.anticorrelated],
        "counts": {
            "sites": design.sites.height,
            "wells": design.sites.select("plate", "well").unique().height,
            "plates": design.optics.height,
            "experiments": design.sites["experiment"].n_unique(),
            "genes": design.phenotypes.height,
            "modules": design.modules["module"].n_unique(),
            "relationship_pairs": design.relationships.height // 2,
            "control_wells": design.sites.filter("is_control").select("plate", "well").unique().height,
        },
        "workers": workers,
        "seconds": round(seconds, 2),
    }
    write_text_atomic(out_dir / SCREEN_JSON, json.dumps(summary, indent=2))
    return design
