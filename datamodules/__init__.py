"""datamodules: microscope files -> WebDataset shards -> training and evaluation batches."""
from typing import Any

from datamodules.config import DataConfig
from datamodules.shards import ShardWriter, read_manifest

_STREAMING = ("ShardDataModule", "StreamEpochCallback", "build_datamodule")


def __getattr__(name: str) -> Any:
    """The Lightning-based loaders load on first use, so converter and writer processes (spawned
    per core) start without importing torch and Lightning."""
    if name in _STREAMING:
        from datamodules import streaming

        return getattr(streaming, name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")


__all__ = ["DataConfig", "ShardWriter", "read_manifest", *_STREAMING]
from datamodules.synthetic import ScreenConfig, read_truth, write_screen  # noqa: E402 (docs/synthetic.md)
__all__ += ["ScreenConfig", "read_truth", "write_screen"]
