"""RecursionParallelBlock: timm's ParallelScalingBlock computed with fewer bf16 <-> float32 round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, ParallelScalingBlock

from lightning_modules import blocks, hardware
from lightning_modules.blocks import (
    DecoderAttention,
    MatmulAttention,
    RecursionParallelBlock,
    attention,
    blocked_attention,
)
from tiny_models import TINY_CNN, real_crops, tiny_module


@pytest.fixture(autouse=True)
def bf16_cpu_kernels(monkeypatch):
    """The CPU bf16 kernels run only where bf16 is native (test_hardware.py); their numerics are
    tested here on every CPU, emulated (slowly, on these small shapes) where it is not."""
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)


def block_pair(dim: int = 64, heads: int = 4) -> tuple[ParallelScalingBlock, RecursionParallelBlock]:
    """timm's block with non-trivial weights and ours sharing them (same state dict)."""
    torch.manual_seed(0)
    timm_block = ParallelScalingBlock(dim, heads, qk_norm=True, init_values=1.0)
    with torch.no_grad():
        for param in timm_block.parameters():
            param.add_(0.1 * torch.randn_like(param))
    ours = RecursionParallelBlock(dim, heads, qk_norm=True, init_values=1.0)
    ours.load_state_dict(timm_block.state_dict())
    return timm_block, ours


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().float(), reference.detach().float()
    return float((value - reference).norm() / reference.norm())


def test_same_function_as_timm_block_in_float32_forward_and_backward():
    timm_block, ours = block_pair()
    x = torch.randn(2, 300, 64, requires_grad=True)
    x_ours = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(ours(x_ours), timm_block(x), atol=1e-5, rtol=1e-5)
    timm_block(x).square().sum().backward()
    ours(x_ours).square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x.grad, atol=1e-4, rtol=1e-4)
    for (name, p_ours), p_timm in zip(ours.named_parameters(), timm_block.parameters()):
        torch.testing.assert_close(p_ours.grad, p_timm.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("grad", [False, True])
def test_bf16_autocast_is_as_close_to_float32_as_timm_block(grad):
    """Inference takes blocked_attention, training SDPA; both within timm-under-autocast's error."""
    timm_block, ours = block_pair()
    x = torch.randn(2, 300, 64, requires_grad=grad)
    reference = timm_block(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        timm_error = relative_error(timm_block(x), reference)
        our_error = relative_error(ours(x), reference)
    assert our_error < max(2 * timm_error, 1e-3)


def test_blocked_attention_matches_sdpa_with_a_partial_last_query_block():
    q, k, v = (torch.randn(2, 3, 300, 64) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(blocked_attention(q, k, v), expected, atol=1e-5, rtol=1e-4)
    bf16 = blocked_attention(*(t.bfloat16() for t in (q, k, v)))
    assert bf16.dtype == torch.bfloat16 and relative_error(bf16, expected) < 1e-2


def test_state_dict_keys_are_timm_blocks():
    timm_block, ours = block_pair()
    assert list(ours.state_dict()) == list(timm_block.state_dict())


def test_camae_bf16_embedding_stays_close_to_float32(shared_data):
    """embed() under bf16 autocast runs RecursionParallelBlock with blocked_attention end to end."""
    module = tiny_module("camae").eval()
    with torch.no_grad():
        for block in module.encoder.vit_backbone.blocks:
            block.ls.gamma.fill_(0.5)  # LayerScale 1e-4 would hide the blocks' rounding
    images = real_crops(shared_data, 4)
    reference = module.embed(images)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        bf16 = module.embed(images)
    assert bf16.dtype == torch.float32 and relative_error(bf16, reference) < 5e-3


def test_matmul_attention_gradients_are_exact_and_bf16_close_to_flash():
    """MatmulAttention's own backward against autograd (float64 gradcheck), and in bf16 within
    the error flash attention itself makes against float32."""
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(MatmulAttention.apply, (q, k, v))
    q, k, v = (torch.randn(2, 4, 256, 32, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 4, 256, 32)
    reference = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad_out)
    low = [t.detach().bfloat16().requires_grad_(True) for t in (q, k, v)]
    ours = torch.autograd.grad(attention(*low, dropout_p=0.0), low, grad_out.bfloat16())
    flash = torch.autograd.grad(F.scaled_dot_product_attention(*low), low, grad_out.bfloat16())
    for name, mine, theirs, exact in zip("qkv", ours, flash, reference):
        assert relative_error(mine, exact) < max(2 * relative_error(theirs, exact), 1e-2), name


def test_decoder_attention_is_timm_attention_in_float32():
    torch.manual_seed(0)
    timm_block = Block(64, 4, qkv_bias=True)
    ours = Block(64, 4, qkv_bias=True, attn_layer=DecoderAttention)
    ours.load_state_dict(timm_block.state_dict())
    x = torch.randn(2, 50, 64)
    torch.testing.assert_close(ours(x), timm_block(x), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert relative_error(ours(x.requires_grad_(True)), timm_block(x)) < 2e-2


def test_training_attention_splits_long_sequences_into_image_chunks(monkeypatch):
    """Past the score budget, MatmulAttention runs a few images per call: same values and gradients."""
    q, k, v = (torch.randn(5, 2, 64, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    whole = attention(q, k, v, dropout_p=0.0)
    grads = torch.autograd.grad(whole.float().square().sum(), (q, k, v))
    monkeypatch.setattr(blocks, "MATMUL_ATTENTION_MAX_SCORES", 2 * 2 * 64 * 64)  # two images per call
    chunked = attention(q, k, v, dropout_p=0.0)
    torch.testing.assert_close(chunked, whole)  # bf16 tolerances
    for mine, theirs in zip(torch.autograd.grad(chunked.float().square().sum(), (q, k, v)), grads):
        torch.testing.assert_close(mine, theirs)


def test_legacy_mlp_bias_layout_is_pre_2653_timm():
    """Legacy: cat(zeros(3D), mlp_bias) over the whole [mlp, q, k, v] projection, which timm's own
    block computes when that vector is its qkv_bias-style in_proj bias."""
    _, ours = block_pair()
    blocks.set_mlp_bias_layout(ours, "legacy")
    with_bias = ParallelScalingBlock(64, 4, qkv_bias=True, qk_norm=True, init_values=1.0)
    state = {k: v for k, v in ours.state_dict().items() if k != "mlp_bias"}
    state["in_proj.bias"] = torch.cat([torch.zeros(3 * 64), ours.mlp_bias.detach()])
    with_bias.load_state_dict(state)
    x = torch.randn(2, 50, 64)
    torch.testing.assert_close(ours(x), with_bias(x), atol=1e-5, rtol=1e-5)
    blocks.set_mlp_bias_layout(ours, "fixed")
    assert relative_error(ours(x), with_bias(x)) > 1e-2  # the layouts differ for the same weights


def test_legacy_layout_refuses_timms_unfused_path_and_bad_settings():
    _, ours = block_pair()
    blocks.set_mlp_bias_layout(ours, "legacy")
    ours.fused_attn = False
    with pytest.raises(NotImplementedError, match="needs the fused path"):
        ours(torch.randn(1, 4, 64))
    with pytest.raises(ValueError, match=r"must be one of \('fixed', 'legacy'\), got 'new'"):
        blocks.set_mlp_bias_layout(ours, "new")
    with pytest.raises(ValueError, match="ResNet has none"):
        tiny_module("wsl", num_classes=3, **TINY_CNN, mlp_bias_layout="legacy")
