"""Loader throughput: 256x256 training crops per second on one worker core, from 6x512x512 uint8
shards, against (1) decoding the same sites from the RxRx1 layout (one 8-bit PNG per channel),
(2) webdataset's own reader (`webdataset.WebDataset`, resampled, same shuffle buffer) over the
same shard files, and (3) phenoscale reading the same shards over HTTP from 127.0.0.1.

The HTTP server runs in its own process and sends files with sendfile(2) (`SendfileHandler`):
the figure is about the client reader, and a real object store does not spend the loader
machine's cores; Python's stock `http.server` copies every 64 KB through user space in Python,
which would take CPU from the loader it shares the machine with (its cost per crop is in
results/loader.json as `server_cpu_ms_per_crop`). Besides wall-clock rates (the targets), the loader
process's CPU time per crop (all its threads: the read-ahead thread too) and the server's are
recorded, which a loaded shared machine disturbs much less than wall time.

Every path cuts the same number of random crops per decoded site (4) with the same crop code and
assembles the same batches; only the way a site reaches memory differs. Sites are 512x512 windows
of the real Phenix field (../shared), scaled to 8 bit, so PNG compression sees real images.
Files are read once before timing, so every path reads from the page cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from benchmarks.harness import Measurement, best_time, wait_for_port
from datamodules import DataConfig, ShardWriter, build_datamodule
from datamodules.shards import decode_npy
from datamodules.transforms import dihedral, fill_random_crops

SITES, CROP, CROPS_PER_SITE, BATCH = 48, 256, 4, 32
STEPS = SITES * CROPS_PER_SITE // BATCH * 8  # each site about 8 times per timed pass: long enough to average
PHENIX = "data/images/pediatric_cancer_atlas_BR00143976_C03_f03"


def real_sites() -> list[np.ndarray]:
    """SITES distinct 6x512x512 uint8 sites: the 4 windows of the real field x 8 orientations, +1 offsets."""
    shared = Path(os.environ.get("PHENOSCALE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    planes = [
        tifffile.imread(shared / PHENIX / f"r03c03f03p01-ch{c}sk1fk1fl1.tiff").astype(np.float32) for c in range(1, 7)
    ]
    field = np.stack([np.clip(p / np.percentile(p, 99.9) * 255, 0, 255).astype(np.uint8) for p in planes])
    windows = [field[:, top : top + 512, left : left + 512] for top in (0, 512) for left in (0, 512)]
    return [np.ascontiguousarray(dihedral(windows[i % 4], (i // 4) % 8)) for i in range(SITES)]


def write_rxrx1_layout(sites: list[np.ndarray], root: Path) -> list[list[Path]]:
    folder = root / "HEPG2-01" / "Plate1"
    folder.mkdir(parents=True)
    files = []
    for i, site in enumerate(sites):
        paths = [folder / f"B{i:02d}_s1_w{c + 1}.png" for c in range(6)]
        for plane, path in zip(site, paths):
            Image.fromarray(plane).save(path)
        files.append(paths)
    return files


def png_batches(files: list[list[Path]], steps: int, seed: int = 0) -> int:
    """The baseline loader: same batches as the shard loader, sites decoded from PNGs."""
    rng = np.random.default_rng(seed)
    sites_per_batch = BATCH // CROPS_PER_SITE
    crops = 0
    for _ in range(steps):
        out = np.empty((BATCH, 6, CROP, CROP), np.uint8)
        for j, index in enumerate(rng.integers(0, len(files), sites_per_batch)):
            image = np.stack([np.asarray(Image.open(p)) for p in files[index]])
            fill_random_crops(image, out[j * CROPS_PER_SITE : (j + 1) * CROPS_PER_SITE], rng)
        batch = torch.from_numpy(out)
        crops += batch.shape[0]
    return crops


def webdataset_batches(pattern: str, steps: int) -> int:
    """The peer: webdataset's resampled shard reader + its shuffle buffer, then the same crops."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    samples = iter(wds.WebDataset(pattern, resampled=True, shardshuffle=False).shuffle(16))
    sites_per_batch = BATCH // CROPS_PER_SITE
    crops = 0
    for _ in range(steps):
        out = np.empty((BATCH, 6, CROP, CROP), np.uint8)
        for j in range(sites_per_batch):
            sample = next(samples)
            json.loads(sample["json"])  # what our reader checks too
            fill_random_crops(decode_npy(sample["npy"]), out[j * CROPS_PER_SITE : (j + 1) * CROPS_PER_SITE], rng)
        crops += torch.from_numpy(out).shape[0]
    return crops


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[tuple[str, int]]:
    """`harness.serve` over `root` on 127.0.0.1 in its own process; yields the base URL and its pid."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # only the standard library in the server process: benchmarks.harness, not this module (torch, numpy)
    code = "import sys; from benchmarks.harness import serve; serve(sys.argv[1], int(sys.argv[2]))"
    server = subprocess.Popen(
        [sys.executable, "-c", code, str(root), str(port)],
        cwd=Path(__file__).parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, server)
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        server.terminate()
        server.wait(10)


def process_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (all threads) or of process `pid`."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run() -> list[Measurement]:
    torch.set_num_threads(1)
    sites = real_sites()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with ShardWriter(root / "shards", max_bytes=16 * 2**20) as writer:
            for i, site in enumerate(sites):
                writer.write(
                    site,
                    dict(
                        key=f"site{i:03d}",
                        experiment="bench",
                        plate="1",
                        well=f"B{i:02d}",
                        site=1,
                        perturbation=f"g{i % 8}",
                        perturbation_type="gene",
                        is_control=False,
                        cell_type="DAOY",
                        channels=["Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"],
                    ),
                )
        files = write_rxrx1_layout(sites, root / "rxrx1")
        png_bytes = sum(p.stat().st_size for site in files for p in site) / SITES
        names = sorted(p.name for p in (root / "shards").glob("*.tar"))
        braces = f"shard-{{000000..{len(names) - 1:06d}}}.tar"

        def loader_seconds(shards: str, server: int | None = None) -> tuple[float, float, float]:
            cfg = DataConfig(
                train_shards=shards,
                crop_size=CROP,
                crops_per_site=CROPS_PER_SITE,
                batch_size=BATCH,
                num_workers=0,
                steps_per_epoch=STEPS,
                shuffle_buffer=16,
            )
            loader = build_datamodule(cfg, seed=0).train_dataloader()
            cpu, server_cpu = process_cpu_seconds(), process_cpu_seconds(server) if server else 0.0
            repeats, warmup = 3, 1
            seconds = best_time(lambda: sum(batch["image"].shape[0] for batch in loader), repeats, warmup)
            passes = repeats + warmup  # each the same epoch of batches
            cpu = (process_cpu_seconds() - cpu) / passes
            server_cpu = (process_cpu_seconds(server) - server_cpu) / passes if server else 0.0
            return seconds, cpu, server_cpu

        shard_seconds, shard_cpu, _ = loader_seconds(str(root / "shards"))
        wds_seconds = best_time(lambda: webdataset_batches(str(root / "shards" / braces), STEPS), repeats=3, warmup=1)
        with http_server(root / "shards") as (base, server):
            http_seconds, http_cpu, server_cpu = loader_seconds(f"{base}/{braces}", server)
        png_steps = max(4, STEPS // 16)  # the baseline is slow: time fewer batches
        png_seconds = best_time(lambda: png_batches(files, png_steps), repeats=2, warmup=1)

    shard_rate = STEPS * BATCH / shard_seconds
    wds_rate, http_rate = STEPS * BATCH / wds_seconds, STEPS * BATCH / http_seconds
    png_rate = png_steps * BATCH / png_seconds
    ratio = shard_rate / png_rate
    extra = {
        "sites": SITES,
        "crops_per_site": CROPS_PER_SITE,
        "batch_size": BATCH,
        "crop": CROP,
        "site": "6x512x512 uint8 (real Phenix field, 8-bit)",
        "npy_mb_per_site": round(sites[0].nbytes / 2**20, 2),
        "png_mb_per_site": round(png_bytes / 2**20, 2),
        "workers": "num_workers=0 (the timing process is the worker)",
    }
    crops = STEPS * BATCH
    cpu = {
        "loader_cpu_ms_per_crop_local": round(shard_cpu / crops * 1e3, 4),
        "loader_cpu_ms_per_crop_http": round(http_cpu / crops * 1e3, 4),
        "server_cpu_ms_per_crop": round(server_cpu / crops * 1e3, 4),
        "http_vs_local_crops_per_loader_cpu_second": round(shard_cpu / http_cpu, 3),
        "server": "own process, sendfile(2) (SendfileHandler)",
        "io_read_ahead_mb": DataConfig.io_read_ahead_mb,
    }
    return [
        Measurement(
            name="train crops/s per worker core (shards, 256px from 6x512x512 uint8, 4 crops/site)",
            value=shard_rate,
            unit="crops/s",
            baseline_name="RxRx1 PNG-per-channel decode, same crops",
            baseline_value=png_rate,
            ratio=ratio,
            target=">= 1000 crops/s per worker core and >= 10x the PNG baseline",
            met=bool(shard_rate >= 1000 and ratio >= 10),
            extra=extra,
        ),
        Measurement.versus(
            "train crops/s per worker core: phenoscale (mmap) vs webdataset.WebDataset, same shards and crops",
            shard_rate,
            "crops/s",
            "webdataset.WebDataset (resampled, shuffle 16) + same crops",
            wds_rate,
            at_least=1.5,
            of="webdataset's reader",
            extra=extra,
        ),
        Measurement.versus(
            "train crops/s per worker core over HTTP from 127.0.0.1 (sendfile server process) vs local",
            http_rate,
            "crops/s",
            "phenoscale, the same shards from local disk",
            shard_rate,
            at_least=0.7,
            of="local",
            extra={**extra, **cpu},
        ),
    ]
