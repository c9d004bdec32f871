"""The papers' ViT backbones, registered in timm's own model registry.

Importing this module (done by `import lightning_modules`) makes
`timm.create_model("vit_small_patch16_256")` and `timm.create_model("ca_vit_small_patch16_256")`
work like any timm name, so configs name backbones and never import classes. The networks are
timm's `VisionTransformer`, only specialised where the Recursion models differ: a fixed 2-D
sin-cos position embedding, and for the channel-agnostic twin a single-channel patch projection
shared by every channel.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lightning_modules.blocks import RecursionParallelBlock

SINCOS_TEMPERATURE = 10_000.0

#: Width, depth and heads of the papers' ViT sizes.
VIT_SIZES: dict[str, dict[str, int]] = {
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}

#: The Recursion flavour of timm's ViT (maes_microscopy vit.py); callers' kwargs override these.
RECURSION_VIT_DEFAULTS: dict[str, Any] = {
    "img_size": 256,
    "in_chans": 6,
    "num_classes": 0,
    "global_pool": "avg",
    "fc_norm": None,  # with avg pool timm then puts the final norm after pooling ("fc_norm")
    "class_token": True,
    "init_values": 1e-4,
    "block_fn": RecursionParallelBlock,  # timm's ParallelScalingBlock, bf16-friendlier forward
    "qkv_bias": False,
    "qk_norm": True,
}

DEFAULT_MAX_IN_CHANS = 11


def sincos_2d_embedding(dim: int, grid: int, repeats: int = 1, class_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embedding (1, [1 +] repeats*grid², dim).

    D/4 each of sin(h), cos(h), sin(w), cos(w) with frequencies temperature^(-i/(D/4)); the grid is
    tiled `repeats` times (once per channel for channel-agnostic models, which therefore carry no
    channel identity) and the class token gets a zero vector. Matches the reference
    `generate_2d_sincos_pos_embeddings` value for value, so public checkpoints see what they
    were trained with.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs an embed dim divisible by 4, got {dim}")
    quarter = dim // 4
    positions = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")
    freqs = 1.0 / SINCOS_TEMPERATURE ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    h = torch.outer(rows.flatten(), freqs)
    w = torch.outer(cols.flatten(), freqs)
    table = torch.cat([h.sin(), h.cos(), w.sin(), w.cos()], dim=1).repeat(repeats, 1)
    if class_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table[None]


def _fixed_parameter(value: Tensor) -> nn.Parameter:
    """A frozen Parameter (not a buffer): public checkpoints store pos_embed as a parameter."""
    return nn.Parameter(value, requires_grad=False)


class SinCosViT(VisionTransformer):
    """timm VisionTransformer whose position embedding is the fixed 2-D sin-cos grid."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        grid = self.patch_embed.grid_size
        if grid[0] != grid[1]:
            raise ValueError(f"sin-cos ViT needs a square patch grid, got {grid}")
        self.pos_embed = _fixed_parameter(
            sincos_2d_embedding(self.embed_dim, grid[0], class_token=self.cls_token is not None)
        )


class ChannelAgnosticPatchEmbed(PatchEmbed):
    """One Conv2d(1, D, p, p) applied to every channel; tokens ordered channel by channel.

    (B, C, H, W) -> (B, C·h·w, D). Folding channels into the batch runs all channels through one
    convolution call instead of a Python loop over channels.
    """

    def __init__(
        self, img_size: int = 256, patch_size: int = 16, embed_dim: int = 384, bias: bool = True, **_: Any
    ) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=1, embed_dim=embed_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, chans, height, width = x.shape
        if (height, width) != tuple(self.img_size):
            raise ValueError(f"channel-agnostic ViT built for {tuple(self.img_size)} images, got {(height, width)}")
        tokens = self.proj(x.reshape(batch * chans, 1, height, width))  # (B·C, D, h, w)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B·C, h·w, D)
        return tokens.reshape(batch, chans * tokens.shape[1], tokens.shape[2])


class ChannelAgnosticViT(VisionTransformer):
    """Channel-agnostic ViT (CA-MAE encoder): any number and order of channels up to max_in_chans.

    The spatial sin-cos grid is repeated for each of `max_in_chans` channels and sliced to the
    tokens present, so the token set of a channel-permuted image is the same set: pooled
    embeddings are invariant to channel order.
    """

    def __init__(self, max_in_chans: int = DEFAULT_MAX_IN_CHANS, **kwargs: Any) -> None:
        kwargs.pop("in_chans", None)  # the projection sees one channel at a time
        super().__init__(embed_layer=ChannelAgnosticPatchEmbed, in_chans=1, **kwargs)
        self.max_in_chans = max_in_chans
        self.tokens_per_channel = self.patch_embed.num_patches
        self.pos_embed = _fixed_parameter(
            sincos_2d_embedding(
                self.embed_dim,
                self.patch_embed.grid_size[0],
                repeats=max_in_chans,
                class_token=self.cls_token is not None,
            )
        )

    def _pos_embed(self, x: Tensor) -> Tensor:
        chans = x.shape[1] // self.tokens_per_channel
        if chans > self.max_in_chans:
            raise ValueError(f"image has {chans} channels; this model takes at most max_in_chans={self.max_in_chans}")
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed[:, : x.shape[1]])


def _build(
    variant: str, model_cls: type[VisionTransformer], size: str, patch: int, pretrained: bool, **kwargs: Any
) -> VisionTransformer:
    if pretrained:
        raise ValueError(
            f"{variant} has no downloadable weights; load a checkpoint with lightning_modules.load_pretrained"
        )
    args = {**RECURSION_VIT_DEFAULTS, **VIT_SIZES[size], "patch_size": patch, **kwargs}
    return build_model_with_cfg(model_cls, variant, pretrained=False, **args)


def _register(variant: str, model_cls: type[VisionTransformer], size: str, patch: int) -> None:
    def factory(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return _build(variant, model_cls, size, patch, pretrained, **kwargs)

    factory.__name__ = factory.__qualname__ = variant
    default_cfgs[variant] = {  # read by register_model; no weights to download
        "architecture": variant,
        "input_size": (6, 256, 256),
        "num_classes": 0,
        "mean": (0.0,),
        "std": (1.0,),  # self-standardisation happens in the model
    }
    factory.__doc__ = f"Recursion-flavour {model_cls.__name__} {size} / patch {patch} on 256² crops."
    globals()[variant] = register_model(factory)


default_cfgs: dict[str, dict[str, Any]] = {}
RECURSION_BACKBONES: list[str] = []
for _size in VIT_SIZES:
    for _patch in (16, 8):
        for _prefix, _cls in (("", SinCosViT), ("ca_", ChannelAgnosticViT)):
            _name = f"{_prefix}vit_{_size}_patch{_patch}_256"
            _register(_name, _cls, _size, _patch)
            RECURSION_BACKBONES.append(_name)


def constructor_keywords(model_cls: type[nn.Module]) -> set[str] | None:
    """The keyword arguments `model_cls(...)` takes, following `**kwargs` up to the class that
    consumes them (SinCosViT -> VisionTransformer); None when some class takes any keyword."""
    names: set[str] = set()
    for klass in model_cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if klass is nn.Module or not any(p.kind is p.VAR_KEYWORD for p in params):
            return names  # nn.Module's own **kwargs accepts nothing
    return None


def is_channel_agnostic(model: nn.Module) -> bool:
    """True for backbones whose patch embedding is shared across channels."""
    return isinstance(model, ChannelAgnosticViT)
