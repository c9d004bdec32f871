"""phenoscale package: the application over datamodules, lightning_modules and evaluation.

`phenoscale.embed_images` (raw images -> embeddings frame) loads on first use, so the CLI starts
without importing torch.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "embed_images":
        from phenoscale.images import embed_images

        return embed_images
    raise AttributeError(f"module 'phenoscale' has no attribute {name!r}")


__all__ = ["embed_images"]
