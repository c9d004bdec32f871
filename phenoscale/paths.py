"""Where the repository's own files are: imported by commands that must stay light for `--help`."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: configs/experiments: the demo's per-family configs (demo_<family>.yaml) and tiny.yaml
EXPERIMENT_CONFIGS = REPO / "configs" / "experiments"


def demo_config(family: str) -> Path:
    """The demo's config of `family`; a family is demo-able when this file exists."""
    return EXPERIMENT_CONFIGS / f"demo_{family}.yaml"
