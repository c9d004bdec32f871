"""The CUDA paths, run where there is a GPU (`make gpu-check`); skipped here, with the reason shown.

Every family (MAE, CA-MAE, WSL on a ViT and on a CNN) as a 2-block model: a bf16-mixed and a
16-mixed training step on CUDA against the same step in float32, a Lightning bf16-mixed fit, and a
bf16 embedding pass against float32; `phenoscale.embedding.embed_model` under a one-process NCCL
group against the same pass without one. The tolerances are those of one bf16 (8-bit mantissa) or
fp16 (11-bit) rounding per layer, loose enough for kernel choice, tight enough to catch a layer
that runs in the wrong dtype or a kernel that computes something else.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
import torch.distributed as dist

from phenoscale.embedding import embed_model
from phenoscale.workflow import eval_data_config
from run_helpers import free_port
from tiny_models import TINY_CNN, bare_trainer, real_crops, tiny_module

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs these)"),
]

FAMILIES = {"mae": ("mae", {}), "camae": ("camae", {}), "wsl_vit": ("wsl", {}), "wsl_cnn": ("wsl", TINY_CNN)}
#: relative error of the loss / of the embeddings against float32
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm())


def cuda_module(name: str):
    family, overrides = FAMILIES[name]
    torch.manual_seed(0)
    return tiny_module(family, num_classes=4 if family == "wsl" else 0, **overrides).cuda()


def cuda_batch(shared_data: Path) -> dict[str, torch.Tensor]:
    """8 real uint16 crops, as the loader ships them, with WSL labels (one unlabelled)."""
    return {"image": real_crops(shared_data, 8).cuda(), "label": torch.tensor([0, 1, 2, 3, 0, 1, 2, -1]).cuda()}


def losses_and_grads(module, batch, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's loss and flattened gradient, the masks drawn from the same seed."""
    module.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = module.compute_losses(batch)["loss"]
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return loss.detach().float(), grads.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_mixed_precision_training_step_matches_float32(shared_data, name, dtype):
    module = cuda_module(name)
    batch = cuda_batch(shared_data)
    loss32, grads32 = losses_and_grads(module, batch, None)
    loss, grads = losses_and_grads(module, batch, dtype)
    assert torch.isfinite(loss) and torch.isfinite(grads).all()
    assert relative_error(loss, loss32) < TOLERANCE[dtype]
    assert torch.nn.functional.cosine_similarity(grads, grads32, dim=0) > 0.99


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_lightning_bf16_mixed_fit_on_cuda(shared_data, tmp_path, name):
    module = cuda_module(name).cpu()
    batch = {k: v.cpu() for k, v in cuda_batch(shared_data).items()}
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in batch.items()} for i in range(8)], batch_size=8)
    trainer = bare_trainer(max_steps=3, accelerator="gpu", devices=1, precision="bf16-mixed", default_root_dir=tmp_path)
    trainer.fit(module, loader)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay float32


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_embedding_matches_float32(shared_data, name):
    module = cuda_module(name).eval()
    images = cuda_batch(shared_data)["image"]
    with torch.inference_mode():
        reference = module.embed(images)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = module.embed(images)
    assert bf16.dtype == torch.float32 and bf16.shape == reference.shape
    assert relative_error(bf16, reference) < TOLERANCE[torch.bfloat16]


def test_attention_takes_sdpa_on_cuda(monkeypatch):
    """The CPU bf16 kernels never run on a GPU: attention() is SDPA there (flash / memory-efficient)."""
    from lightning_modules import blocks

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU-only attention kernel ran on CUDA")

    monkeypatch.setattr(blocks, "blocked_attention", refuse)
    monkeypatch.setattr(blocks.MatmulAttention, "apply", refuse)
    q, k, v = (torch.randn(2, 4, 300, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = blocks.attention(q, k, v, dropout_p=0.0)
    out.float().square().sum().backward()
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.detach().float() for t in (q, k, v)))
    assert relative_error(out, expected) < 1e-2


def test_one_process_nccl_embed_equals_the_plain_pass(screen: Path, tmp_path: Path) -> None:  # conftest's screen
    module = cuda_module("camae").eval()
    data = eval_data_config(screen / "shards", crop_size=32, num_workers=0)
    plain = pl.read_parquet(embed_model(module, data, tmp_path / "plain.parquet", precision="bf16"))
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        grouped = pl.read_parquet(embed_model(module, data, tmp_path / "nccl.parquet", precision="bf16"))
    finally:
        dist.destroy_process_group()
    assert grouped["key"].to_list() == plain["key"].to_list()
    a = torch.tensor(grouped["embedding"].to_list())
    b = torch.tensor(plain["embedding"].to_list())
    assert torch.isfinite(a).all() and relative_error(a, b) < 1e-6
