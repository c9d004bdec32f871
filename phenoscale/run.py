"""One directory per run: config, checkpoints, logs, embeddings and reports together.

    <run_dir>/config.yaml        resolved config of the latest launch (derived scaling included)
    <run_dir>/checkpoints/       step=<N>.ckpt every N steps and at the end, last.ckpt = newest
    <run_dir>/logs/csv/attempt_<k>/metrics.csv      one attempt per (re)start
    <run_dir>/logs/tensorboard/attempt_<k>/
    <run_dir>/logs/logger_ids.json                   W&B / MLflow run ids (a resume continues them)
    <run_dir>/embeddings/        `phenoscale embed` output
    <run_dir>/reports/           evaluation reports

Keeping everything under one root makes a run movable and makes "restart with the same
run_dir" the whole resume protocol.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from datamodules.atomic import atomic_write

LAST = "last.ckpt"
_STEP_FILE = re.compile(r"step=(\d+)\.ckpt$")


class NonFiniteWeightsError(RuntimeError):
    """Refusing to checkpoint weights that contain NaN/Inf (the previous checkpoint stays)."""


class RunDir:
    """Paths of one run directory; creates nothing until `create()`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.checkpoints = self.root / "checkpoints"
        self.logs = self.root / "logs"
        self.logger_ids = self.logs / "logger_ids.json"
        self.embeddings = self.root / "embeddings"
        self.reports = self.root / "reports"

    def create(self) -> RunDir:
        """Make the layout; drop temp files a killed writer left (never complete, never read)."""
        for path in (self.checkpoints, self.logs, self.embeddings, self.reports):
            path.mkdir(parents=True, exist_ok=True)
        for stale in self.checkpoints.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
        return self

    @property
    def last_checkpoint(self) -> Path | None:
        """checkpoints/last.ckpt if a previous launch left one."""
        path = self.checkpoints / LAST
        return path if path.is_file() else None

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step={step:08d}.ckpt"

    def step_checkpoints(self) -> list[Path]:
        """Step checkpoints, oldest first."""
        found = [(int(m.group(1)), p) for p in self.checkpoints.glob("step=*.ckpt") if (m := _STEP_FILE.search(p.name))]
        return [p for _, p in sorted(found)]

    def next_attempt(self) -> str:
        """Log version for this launch: attempt_<k>, k = launches so far (logs never overwritten)."""
        csv_root = self.logs / "csv"
        k = len(list(csv_root.glob("attempt_*"))) if csv_root.is_dir() else 0
        return f"attempt_{k}"


def _non_finite_tensors(state: Any, prefix: str = "") -> list[str]:
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not torch.isfinite(state).all() else []
    if isinstance(state, dict):
        return [
            name
            for key, value in state.items()
            for name in _non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
        ]
    return []


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp file in the same directory, fsync, then rename over the target.

    Lightning's TorchCheckpointIO writes in place, so a job killed mid-write (preemption,
    `kill -9`, node failure) leaves a truncated last.ckpt and the run cannot resume. A rename
    within a directory is atomic on POSIX: readers see the old file or the new, never half.
    Also refuses weights with NaN/Inf so the last good checkpoint is never replaced by a bad one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        bad = _non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteWeightsError(
                f"not writing {path}: non-finite values in {', '.join(bad[:5])}"
                + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            )
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), fsync=True)


def publish_last(step_file: Path, last: Path) -> None:
    """Point last.ckpt at `step_file` atomically: hard link (no copy) where the FS allows."""
    tmp = last.parent / f".{last.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.link(step_file, tmp)
    except OSError:  # filesystems without hard links: copy instead
        shutil.copyfile(step_file, tmp)
    os.replace(tmp, last)
