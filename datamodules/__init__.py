"""datamodules: microscope files -> WebDataset shards -> training and evaluation batches."""

from importlib import import_module
from typing import Any

from datamodules.config import DataConfig
from datamodules.shards import ShardWriter, read_manifest

#: names loaded from their submodule on first use: converter and writer processes (spawned per
#: core) start without torch and Lightning, and `evaluation`, which imports datamodules.atomic,
#: does not pull in the synthetic-screen renderer (docs/synthetic.md)
_LAZY = {
    "ShardDataModule": "datamodules.streaming",
    "StreamEpochCallback": "datamodules.streaming",
    "build_datamodule": "datamodules.streaming",
    "ScreenConfig": "datamodules.synthetic",
    "read_truth": "datamodules.synthetic",
    "write_screen": "datamodules.synthetic",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")


__all__ = ["DataConfig", "ShardWriter", "read_manifest", *_LAZY]
