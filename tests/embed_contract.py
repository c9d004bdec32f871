"""The `embed()` contract every embedder keeps (docs/ARCHITECTURE.md, Models), as one abstract test.

`evaluation` and `phenoscale embed` know a model only through
`embed(images, pooling=None, block=None) -> float32 (B, D)`. Each embedder's test module subclasses
`EmbedContract` (named without `Test` so that pytest collects only the subclasses), says which
poolings and blocks it offers and whether it claims channel-order invariance, and inherits every
test below. Images are random raw integer pixels, the loaders' format.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pytest
import torch

IN_CHANS = 6
SIDE = 32  # tiny_models' crop size


class EmbedContract:
    """Subclasses set the class attributes and `make_embedder()`."""

    #: pooling -> embedding width for IN_CHANS channels; None (the default pooling) always included
    poolings: ClassVar[dict[str | None, int]]
    #: poolings embed() must refuse with a ValueError naming them
    rejected_poolings: ClassVar[tuple[str, ...]] = ("max",)
    #: block indices embed() accepts (None: the default layer) and indices it must reject
    blocks: ClassVar[tuple[int | None, ...]] = (None,)
    bad_blocks: ClassVar[tuple[int, ...]] = (0,)
    #: True where the embedder claims channel-order invariance of its pooled embedding (CA-MAE)
    channel_order_invariant: ClassVar[bool] = False
    #: width of each channel's slice of a pooling whose output is per channel, concatenated in
    #: channel order (so it permutes with the channels): pooling -> slice width
    per_channel: ClassVar[dict[str | None, int]] = {}

    def make_embedder(self) -> Any:
        raise NotImplementedError

    @pytest.fixture
    def embedder(self) -> Any:
        torch.manual_seed(0)
        model = self.make_embedder()
        return model.eval() if isinstance(model, torch.nn.Module) else model

    @staticmethod
    def images(batch: int = 3, chans: int = IN_CHANS, dtype: torch.dtype = torch.uint16, seed: int = 0) -> torch.Tensor:
        high = torch.iinfo(dtype).max + 1
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, high, (batch, chans, SIDE, SIDE), generator=generator, dtype=torch.int64).to(dtype)

    def test_shape_dtype_and_finite_values(self, embedder: Any) -> None:
        for dtype in (torch.uint8, torch.uint16):
            out = embedder.embed(self.images(dtype=dtype))
            assert out.dtype == torch.float32 and out.shape == (3, self.poolings[None])
            assert torch.isfinite(out).all()
            assert out.std(dim=0).max() > 0  # different images, different embeddings

    def test_deterministic_and_independent_of_the_rest_of_the_batch(self, embedder: Any) -> None:
        images = self.images()
        first = embedder.embed(images)
        assert torch.equal(first, embedder.embed(images))
        alone = torch.cat([embedder.embed(images[i : i + 1]) for i in range(len(images))])
        torch.testing.assert_close(alone, first, rtol=1e-4, atol=1e-5)

    def test_each_pooling_has_its_width_and_unknown_ones_are_rejected(self, embedder: Any) -> None:
        images = self.images()
        outputs = {}
        for pooling, width in self.poolings.items():
            outputs[pooling] = embedder.embed(images, pooling=pooling)
            assert outputs[pooling].shape == (3, width) and outputs[pooling].dtype == torch.float32
        named = [p for p in self.poolings if p is not None]
        for a in named:  # two named poolings of the same width are two different read-outs
            for b in named:
                if a < b and outputs[a].shape == outputs[b].shape:
                    assert not torch.allclose(outputs[a], outputs[b]), (a, b)
        for pooling in self.rejected_poolings:
            with pytest.raises(ValueError, match=re.escape(pooling)):
                embedder.embed(images, pooling=pooling)

    def test_block_choices(self, embedder: Any) -> None:
        images = self.images()
        default = embedder.embed(images)
        by_block = {block: embedder.embed(images, block=block) for block in self.blocks}
        assert all(out.shape == default.shape for out in by_block.values())
        if -1 in by_block:
            assert torch.equal(by_block[-1], default)  # the default layer is the last one
        if 0 in by_block and -1 in by_block and len({b for b in self.blocks if b is not None and b >= 0}) > 1:
            assert not torch.allclose(by_block[0], by_block[-1])  # an earlier block is another layer
        for block in self.bad_blocks:
            with pytest.raises(ValueError):
                embedder.embed(images, block=block)

    def test_channel_order(self, embedder: Any) -> None:
        """Invariant where claimed; per-channel poolings permute with the channels."""
        images = self.images()
        perm = torch.tensor([3, 0, 5, 1, 4, 2])
        if self.channel_order_invariant:
            torch.testing.assert_close(embedder.embed(images[:, perm]), embedder.embed(images), rtol=1e-4, atol=1e-5)
        for pooling, width in self.per_channel.items():
            out = embedder.embed(images, pooling=pooling).reshape(3, IN_CHANS, width)
            permuted = embedder.embed(images[:, perm], pooling=pooling).reshape(3, IN_CHANS, width)
            torch.testing.assert_close(permuted, out[:, perm], rtol=1e-4, atol=1e-5)
        if not self.channel_order_invariant and not self.per_channel:
            pytest.skip("no channel-order property claimed")
