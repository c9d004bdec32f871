"""timm's ParallelScalingBlock without float32 round trips under autocast; bf16 CPU attention kernels.

Same parameters, same state-dict keys and the same function as timm's block (fp32 results agree to
float rounding); only where bf16 autocast puts its casts changes:

* `x_mlp + mlp_bias` would promote the (tokens x 4D) MLP activation to float32, so GELU would run
  on float32 and `mlp_out_proj` cast it back. Here the bias is added inside `in_proj`'s GEMM (a
  zero bias for q, k, v), and the activation stays in the autocast dtype.
* On CPU, q_norm / k_norm run with autocast off on the bf16 input and float32 weights: computed in
  float32 and rounded once, bit for bit what attention received before, without autocast's upcast
  copy. CUDA's layer_norm takes no such mixed dtypes, so there they run under autocast as usual.
* Attention: on CPUs that multiply bf16 natively (`lightning_modules.hardware`), torch's CPU flash
  kernel does its bf16 products through a GEMM no faster than float32's. There `blocked_attention`
  (inference: one image and QUERY_BLOCK queries at a time, so the scores stay in cache) and
  `MatmulAttention` (training: bf16 matmuls and torch's fused softmax backward, recomputing the
  probabilities as flash does) compute the same softmax(q kᵀ/√d) v with oneDNN's bf16 matmuls.
  Their scores are rounded to bf16 before the softmax (flash keeps them in float32); the
  embedding's error against float32 stays that of flash (tests/test_blocks.py). Everywhere else
  (CUDA, float32, CPUs without native bf16) attention is `F.scaled_dot_product_attention`, which
  picks the flash / memory-efficient kernels on GPUs. Measured speeds: docs/models.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import ParallelScalingBlock
from torch import Tensor, nn

from lightning_modules import hardware
from lightning_modules.config import MLP_BIAS_LAYOUTS, check_one_of


def _norm_without_autocast(norm: nn.Module, x: Tensor) -> Tensor:
    """LayerNorm of a bf16 CPU tensor in its own dtype (float32 math inside, one rounding).

    CPU only: CUDA's layer_norm rejects a bf16 input with float32 weights, so off the CPU (and
    without autocast, and on meta tensors, which have none) the norm runs as it is.
    """
    autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if not autocast or not isinstance(norm, nn.LayerNorm):
        return norm(x)
    with torch.autocast("cpu", enabled=False):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


#: Queries per score block of `blocked_attention`: 256 x 1537 scores x 6 heads stay in L2/L3.
QUERY_BLOCK = 256


def blocked_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v for (B, H, N, D) inputs, returned as a (B, H, N, D) view of (B, N, H, D).

    Same FLOPs as SDPA (two matmuls, counted as such by FlopCounterMode); for inference only
    (no backward through the loop).
    """
    batch, _, tokens, head_dim = q.shape
    out = q.new_empty(batch, tokens, q.shape[1], head_dim)
    scale = head_dim**-0.5
    for b in range(batch):
        keys_t = k[b].transpose(-2, -1).contiguous()
        for start in range(0, tokens, QUERY_BLOCK):
            scores = torch.matmul(q[b, :, start : start + QUERY_BLOCK] * scale, keys_t)
            out[b, start : start + QUERY_BLOCK] = (torch.softmax(scores, dim=-1) @ v[b]).transpose(0, 1)
    return out.transpose(1, 2)


class MatmulAttention(torch.autograd.Function):
    """softmax(q kᵀ / √d) v in the inputs' dtype, saving only q, k, v (flash also recomputes P).

    Backward recomputes the probabilities P and uses torch's fused softmax backward,
    dS = P ⊙ (dP - Σ dP ⊙ P): five matmuls and two elementwise passes, all in bf16 (the scores are
    rounded to bf16 before the softmax, as in torch's unfused SDPA under autocast).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ctx.save_for_backward(q, k, v)  # q unscaled: the scaled copy would live until backward
        return torch.matmul(MatmulAttention.probabilities(q * q.shape[-1] ** -0.5, k), v)

    @staticmethod
    def probabilities(scaled_q: Tensor, k: Tensor) -> Tensor:
        return torch.softmax(torch.matmul(scaled_q, k.transpose(-2, -1)), dim=-1)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        scaled_q = q * scale  # once, for the recomputed probabilities and for k's gradient
        probs = MatmulAttention.probabilities(scaled_q, k)
        grad_v = torch.matmul(probs.transpose(-2, -1), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-2, -1))
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        return torch.matmul(grad_scores, k * scale), torch.matmul(grad_scores.transpose(-2, -1), scaled_q), grad_v


#: Most scores (images x heads x queries x keys) one MatmulAttention call holds in training: 64 MB
#: of bf16 per tensor. The OpenPhenom decoder's are 8.4M at batch 8 and the encoder's 7.1M (one
#: call each); the cross-attention's 18.9M per image go one image per call.
MATMUL_ATTENTION_MAX_SCORES = 32 * 1024 * 1024


def attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """SDPA, except for bf16 without dropout on a CPU with native bf16: `blocked_attention` for
    inference and `MatmulAttention` for training, in chunks of images holding at most
    MATMUL_ATTENTION_MAX_SCORES scores."""
    bf16_cpu = q.dtype == k.dtype == v.dtype and hardware.use_cpu_bf16_kernels(q.device.type, q.dtype)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if bf16_cpu and dropout_p == 0.0:
        if not needs_grad:
            return blocked_attention(q, k, v)
        images_per_call = MATMUL_ATTENTION_MAX_SCORES // (q.shape[1:-1].numel() * k.shape[-2])
        if images_per_call >= q.shape[0]:
            return MatmulAttention.apply(q, k, v)
        if images_per_call > 0:
            return torch.cat(
                [
                    MatmulAttention.apply(
                        q[i : i + images_per_call], k[i : i + images_per_call], v[i : i + images_per_call]
                    )
                    for i in range(0, q.shape[0], images_per_call)
                ]
            )
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


class DecoderAttention(Attention):
    """timm's Attention (same weights and keys) whose product goes through `attention` above."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal or not self.fused_attn or self.gate is not None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        x = attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        return self.proj_drop(self.proj(x))


class RecursionParallelBlock(ParallelScalingBlock):
    """ParallelScalingBlock (MLP and attention in parallel, qk_norm) without float32 detours.

    `mlp_bias_layout` (see `set_mlp_bias_layout`) says where `mlp_bias` goes: "fixed" on the MLP
    features (timm since issue #2653), "legacy" as timm before the fix, which added
    cat(zeros(3D), mlp_bias) to the fused [mlp, q, k, v] projection: the MLP got zeros on its
    first 3D features and the bias shifted, q, k and v the bias's tail. Weights trained one way
    are only right the same way (OpenPhenom: legacy). Same keys and shapes either way.
    """

    mlp_bias_layout: str = "fixed"

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal or not self.fused_attn or self.out_proj is not None:
            if self.mlp_bias_layout != "fixed" and self.mlp_bias is not None:
                raise NotImplementedError(  # timm's own forward knows only the fixed layout
                    f"mlp_bias_layout={self.mlp_bias_layout!r} needs the fused path (no attn_mask, not causal, "
                    "no fused out_proj, TIMM_FUSED_ATTN not 0)"
                )
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        batch, tokens, dim = x.shape
        y = F.linear(self.in_norm(x), self.in_proj.weight, self._in_proj_bias())
        x_mlp, q, k, v = torch.split(y, self.in_split, dim=-1)
        heads = (batch, tokens, self.num_heads, self.head_dim)
        q = _norm_without_autocast(self.q_norm, q.view(heads)).transpose(1, 2)
        k = _norm_without_autocast(self.k_norm, k.view(heads)).transpose(1, 2)
        v = v.view(heads).transpose(1, 2)
        x_attn = attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x_attn = x_attn.transpose(1, 2).reshape(batch, tokens, dim)
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return x + self.drop_path(self.ls(y))

    def _in_proj_bias(self) -> Tensor | None:
        """in_proj's bias: the MLP bias in front and zeros for q, k, v (fixed layout), or zeros
        in front and the MLP bias behind (legacy timm), when qkv_bias is off."""
        if self.mlp_bias is None:  # qkv_bias: timm keeps the MLP bias inside in_proj.bias already
            return self.in_proj.bias
        zeros = self.mlp_bias.new_zeros(sum(self.in_split[1:]))
        if self.mlp_bias_layout == "legacy":
            return torch.cat([zeros, self.mlp_bias])
        return torch.cat([self.mlp_bias, zeros])


def set_mlp_bias_layout(model: nn.Module, layout: str) -> nn.Module:
    """Give every RecursionParallelBlock of `model` the MLP-bias layout its weights were trained with.

    "legacy" on a model without such a block (e.g. a CNN) is an error: the setting would be lost.
    Returns `model`.
    """
    check_one_of("mlp_bias_layout", layout, MLP_BIAS_LAYOUTS)
    blocks = [m for m in model.modules() if isinstance(m, RecursionParallelBlock)]
    if layout != "fixed" and not blocks:
        raise ValueError(
            f"mlp_bias_layout={layout!r} applies to Recursion parallel blocks; {type(model).__name__} has none"
        )
    for block in blocks:
        block.mlp_bias_layout = layout
    return model
