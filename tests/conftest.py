"""Shared fixtures: the real data in ../shared and small, fast torch settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_root() -> Path:
    """../shared (or $PHENOSCALE_SHARED): real images, annotations and profiles, read in place."""
    return Path(os.environ.get("PHENOSCALE_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    root = shared_root()
    if not (root / "data").is_dir():  # only tests that read real data ask for it; the rest still run
        pytest.skip(f"needs the real data: {root / 'data'} not found (set PHENOSCALE_SHARED)")
    return root


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic screen from `phenoscale synth`: 30 genes, 2 experiments, 64-px sites (tiny.yaml's
    32-px crops tile each 2 x 2)."""
    from phenoscale.cli import main

    out = tmp_path_factory.mktemp("screen")
    assert (
        main(
            [
                "synth",
                str(out),
                "--genes",
                "30",
                "--image-size",
                "64",
                "--experiments",
                "2",
                "--sites-per-well",
                "1",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="session")
def shared_data(shared: Path) -> Path:
    return shared / "data"
