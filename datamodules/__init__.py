"""datamodules: microscope files -> WebDataset shards -> training and evaluation batches."""
from datamodules.config import DataConfig
from datamodules.shards import ShardWriter, read_manifest
from datamodules.streaming import ShardDataModule, StreamEpochCallback, build_datamodule

__all__ = ["DataConfig", "ShardDataModule", "ShardWriter", "StreamEpochCallback", "build_datamodule", "read_manifest"]
from datamodules.synthetic import ScreenConfig, read_truth, write_screen  # noqa: E402 (docs/synthetic.md)
__all__ += ["ScreenConfig", "read_truth", "write_screen"]
