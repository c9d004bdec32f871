"""Shared by the tests: site metadata, real-pixel shards, free ports, CLI subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from lightning.pytorch import Callback

from datamodules import ShardWriter
from real_field import PEDIATRIC_STAINS, pediatric_field

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "experiments" / "tiny.yaml"
GENES = ["NT", "GENE_A", "GENE_B", "GENE_C"]


def site_meta(key: str, channels: list[str], **fields) -> dict:
    """ShardWriter metadata of one site: plausible values for every required key, `fields` replacing them."""
    return {
        "key": key,
        "experiment": "exp1",
        "plate": "P1",
        "well": "C03",
        "site": 1,
        "perturbation": "TP53",
        "perturbation_type": "gene",
        "is_control": False,
        "cell_type": "DAOY",
        "channels": channels,
        **fields,
    }


def write_real_shards(shared_data: Path, out: Path, sites: int = 16, size: int = 64) -> Path:
    """`sites` non-overlapping size x size tiles of the real 6-channel uint16 field as shard sites.

    Real pixels, invented layout: 4 plates-worth of wells, one gene per well, NT as control.
    Small shards (several per directory) so streams resample across files as at scale.
    """
    field = pediatric_field(shared_data)
    per_row = field.shape[2] // size
    with ShardWriter(out, max_bytes=4 * 6 * size * size * 2 + 4096) as writer:
        for i in range(sites):
            r, c = divmod(i, per_row)
            tile = field[:, r * size : (r + 1) * size, c * size : (c + 1) * size]
            gene = GENES[i % len(GENES)]
            writer.write(
                np.ascontiguousarray(tile),
                {
                    "key": f"site{i:04d}",
                    "experiment": f"exp{i % 2}",
                    "plate": f"P{i % 2}",
                    "well": f"W{i:02d}",
                    "site": 1,
                    "perturbation": gene,
                    "perturbation_type": "control" if gene == "NT" else "gene",
                    "is_control": gene == "NT",
                    "cell_type": "DAOY",
                    "channels": PEDIATRIC_STAINS,
                },
            )
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.train_shards={shards}",
        f"run.run_dir={run_dir}",
        "trainer.audit_batches=true",
        "data.num_workers=0",
        *extra,
    ]


def child_env() -> dict[str, str]:
    """Environment for CLI subprocesses: this repo importable, 1 thread each (2 cores shared)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "LT_", "TORCHELASTIC_"))
        and k
        not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_cli(args: list[str], timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `args` (e.g. [python, train.py, ...]) from the repo root; output captured as text."""
    return subprocess.run(args, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), str(TINY), *args]


def fail_on_bad(shard: str, key: str, reason: str) -> None:
    """An `on_bad` for sample readers in tests where no sample may be bad: fails naming it."""
    pytest.fail(f"bad sample {key} in {shard}: {reason}")


def audit(run_dir: Path, rank: int = 0) -> pl.DataFrame:
    """logs/batches/rank<r>.tsv written by BatchAudit: one row per training batch."""
    return pl.read_csv(
        run_dir / "logs" / "batches" / f"rank{rank}.tsv",
        separator="\t",
        has_header=False,
        new_columns=["step", "epoch", "batch", "crops", "checksum"],
    )


class StepRecorder(Callback):
    """A user callback for `trainer.callbacks` tests: one line per step, what the Trainer looked like."""

    def __init__(self, path: str, label: str = "") -> None:
        self.path, self.label = Path(path), label

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self.path.open("a") as out:
            out.write(f"{self.label}\t{trainer.global_step}\t{type(trainer.profiler).__name__}\n")
