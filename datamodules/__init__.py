"""datamodules: microscope files -> WebDataset shards -> training and evaluation batches."""
from datamodules.shards import ShardWriter, read_manifest

__all__ = ["ShardWriter", "read_manifest"]
