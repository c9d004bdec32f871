"""MAE decoders: the standard ViT decoder and the channel-agnostic CAMAEDecoder.

Attribute names follow the reference `mae_modules` so public checkpoints load 1:1
(`mask_token`, `pos_embeddings`, `blocks`/`decoders`, `cross_attention.{q,kv,proj}`, ...).
Both take encoder tokens already projected to the decoder width, with the class token first,
and return decoder tokens for every position (class token first).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from lightning_modules.backbones import sincos_2d_embedding
from lightning_modules.blocks import DecoderAttention, attention
from lightning_modules.tokens import gather_tokens

DecoderNorm = partial(nn.LayerNorm, eps=1e-6)


def unshuffle_with_mask_tokens(visible: Tensor, mask_token: Tensor, restore: Tensor) -> Tensor:
    """[CLS, visible tokens] + mask tokens for the hidden ones -> (B, 1 + L, D) in image order."""
    batch, _, dim = visible.shape
    n_hidden = restore.shape[1] + 1 - visible.shape[1]
    patches = torch.cat([visible[:, 1:], mask_token.to(visible.dtype).expand(batch, n_hidden, dim)], dim=1)
    return torch.cat([visible[:, :1], gather_tokens(patches, restore)], dim=1)


@dataclass(frozen=True)
class DecoderBlocks:
    """Width and transformer blocks of an MAE decoder: the settings both decoders take alike."""

    embed_dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    def stack(self) -> nn.Sequential:
        """`depth` timm Blocks of width `embed_dim` (one decoder's, or one channel's, stack)."""
        return nn.Sequential(
            *[
                Block(
                    self.embed_dim,
                    self.num_heads,
                    self.mlp_ratio,
                    qkv_bias=self.qkv_bias,
                    norm_layer=DecoderNorm,
                    attn_layer=DecoderAttention,
                )
                for _ in range(self.depth)
            ]
        )


class MAEDecoder(nn.Module):
    """ViT decoder of the (non channel-agnostic) MAE: pos embed, `depth` blocks, final norm."""

    def __init__(self, num_tokens: int, grid: int, blocks: DecoderBlocks = DecoderBlocks()) -> None:
        super().__init__()
        if num_tokens != grid * grid:
            raise ValueError(f"MAEDecoder expects grid² tokens, got {num_tokens} for grid {grid}")
        embed_dim = self.embed_dim = blocks.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embeddings = nn.Parameter(sincos_2d_embedding(embed_dim, grid), requires_grad=False)
        self.blocks = blocks.stack()
        self.norm = DecoderNorm(embed_dim)

    def forward(self, visible: Tensor, restore: Tensor) -> Tensor:
        x = unshuffle_with_mask_tokens(visible, self.mask_token, restore) + self.pos_embeddings
        return self.norm(self.blocks(x))


class CrossAttention(nn.Module):
    """Multi-head cross-attention (q from queries, k/v from a context): SDPA, or for bf16 CPU
    inference the faster `lightning_modules.blocks.attention`."""

    def __init__(self, embed_dim: int, num_heads: int = 8, qkv_bias: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"cross-attention width {embed_dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.kv = nn.Linear(embed_dim, embed_dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        batch, n_q, dim = queries.shape
        head_dim = dim // self.num_heads
        q = self.q(queries).reshape(batch, n_q, self.num_heads, head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, dropout_p=0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, n_q, dim))


class CAMAEDecoder(nn.Module):
    """Channel-agnostic MAE decoder (the `CAMAEDecoder` of maes_microscopy, OpenPhenom's public code).

    Decoder sin-cos position embedding plus a learned, zero-initialised token per channel tiled
    over that channel's tokens; each channel's tokens cross-attend to all tokens through ONE
    shared cross-attention, then `x + Mlp(out_norm(x))`, then the channel's own stack of blocks.

    Because the cross-attention and MLP are shared and queries never interact, all channels'
    queries go through them in one call (the reference loops over channels and recomputes the
    context keys/values per channel); only the per-channel block stacks run per channel.
    """

    def __init__(
        self,
        num_modalities: int,
        tokens_per_modality: int,
        grid: int,
        blocks: DecoderBlocks = DecoderBlocks(),
        cross_attention_heads: int = 8,
    ) -> None:
        super().__init__()
        if tokens_per_modality != grid * grid:
            raise ValueError(f"tokens_per_modality {tokens_per_modality} != grid² ({grid}²)")
        self.num_modalities = num_modalities
        self.tokens_per_modality = tokens_per_modality
        embed_dim = self.embed_dim = blocks.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # kept for checkpoint compatibility: the class token's (zero) entry of the modality table
        self.placeholder = nn.Parameter(torch.zeros(1, 1, embed_dim), requires_grad=False)
        self.pos_embeddings = nn.Parameter(
            sincos_2d_embedding(embed_dim, grid, repeats=num_modalities), requires_grad=False
        )
        self.modality_tokens = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, 1, embed_dim)) for _ in range(num_modalities)]
        )
        self.cross_attention = CrossAttention(embed_dim, cross_attention_heads)
        self.mlp = Mlp(embed_dim, hidden_features=int(embed_dim * blocks.mlp_ratio))
        self.decoders = nn.ModuleList([blocks.stack() for _ in range(num_modalities)])
        self.context_norm = DecoderNorm(embed_dim)
        self.query_norm = DecoderNorm(embed_dim)
        self.out_norm = DecoderNorm(embed_dim)

    def forward(self, visible: Tensor, restore: Tensor) -> Tensor:
        x = unshuffle_with_mask_tokens(visible, self.mask_token, restore)
        chans = (x.shape[1] - 1) // self.tokens_per_modality
        if chans != self.num_modalities:
            raise ValueError(f"CAMAEDecoder was built for {self.num_modalities} channels, got {chans}")
        channel_table = torch.cat(
            [self.placeholder] + [t.expand(-1, self.tokens_per_modality, -1) for t in self.modality_tokens], dim=1
        )
        x = x + self.pos_embeddings + channel_table
        patches = x[:, 1:]
        mixed = self.cross_attention(self.query_norm(patches), self.context_norm(patches))
        mixed = mixed + self.mlp(self.out_norm(mixed))
        per_channel = mixed.split(self.tokens_per_modality, dim=1)
        decoded = [stack(tokens) for stack, tokens in zip(self.decoders, per_channel)]
        return torch.cat([x[:, :1]] + decoded, dim=1)
