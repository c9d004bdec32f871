"""The hardware decision (lightning_modules.hardware) on every CPU and GPU it can meet, faked here.

The real machine is AVX-512 BF16 or AVX2 depending on the day; the decision and everything that
follows it (attention kernels, fit's precision, fabric's flags, embed's precision) is tested for
both by faking torch's capability report, and for CUDA by faking torch.cuda.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_modules import blocks, hardware
from lightning_modules.blocks import RecursionParallelBlock, attention
from phenoscale.config import ConfigError, load_config
from phenoscale.fitting import choose_device
from phenoscale.launch import LaunchMismatchError, detect_launch

FABRIC = {
    "LT_CLI_USED": "1",
    "LT_DEVICES": "1",
    "LT_NUM_NODES": "1",
    "TORCHELASTIC_RUN_ID": "none",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_WORLD_SIZE": "1",
    "GROUP_RANK": "0",
}


@pytest.fixture
def cpu(monkeypatch):
    """fake(capability, bf16_units): what torch reports about this CPU from now on in the test."""

    def fake(capability: str, bf16_units: bool) -> None:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(hardware, "_cpu_has_bf16_units", lambda: bf16_units)
        hardware._warn_emulated.cache_clear()  # each test sees its own first warning

    return fake


@pytest.fixture
def cuda(monkeypatch):
    """fake(bf16): a visible CUDA GPU with (Ampere+) or without (Turing) native bf16."""

    def fake(bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        hardware._warn_emulated.cache_clear()

    return fake


@pytest.mark.parametrize(
    "capability, units, native",
    [
        ("AVX512", True, True),  # AMD Zen 4 / Intel Cooper Lake+: AVX-512 BF16
        ("AVX512", False, False),  # Skylake-X: AVX-512 without bf16 instructions
        ("AVX2", True, False),  # ATEN_CPU_CAPABILITY=avx2 on a bf16 machine: torch's kernels are AVX2
        ("AVX2", False, False),  # AMD Zen 2/3
        ("DEFAULT", False, False),
    ],
)
def test_cpu_decision_follows_the_capability(cpu, capability, units, native):
    cpu(capability, units)
    choice = hardware.numerics("cpu")
    assert hardware.cpu_has_native_bf16() is native
    assert (choice.train_precision, choice.embed_precision) == (("bf16-mixed", "bf16") if native else ("32-true", "32"))
    assert capability in choice.describe()
    assert hardware.use_cpu_bf16_kernels("cpu", torch.bfloat16) is native
    assert not hardware.use_cpu_bf16_kernels("cpu", torch.float32)


@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_decision(cuda, cpu, bf16):
    cpu("AVX2", False)
    cuda(bf16)
    assert hardware.numerics("cuda").train_precision == ("bf16-mixed" if bf16 else "32-true")
    assert hardware.accelerator_device_type("auto") == hardware.accelerator_device_type("gpu") == "cuda"
    assert not hardware.use_cpu_bf16_kernels("cuda", torch.bfloat16)  # the CPU kernels stay on CPUs
    assert hardware.resolve_train_precision("16-mixed", "cuda") == "16-mixed"


def test_explicit_bf16_without_native_bf16_runs_but_warns_once(cpu):
    cpu("AVX2", False)
    with pytest.warns(RuntimeWarning, match="no native bf16.*emulated") as caught:
        assert hardware.resolve_train_precision("bf16", "cpu") == "bf16-mixed"
        assert hardware.resolve_embed_precision("bf16", "cpu") == "bf16"
        assert hardware.resolve_train_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert hardware.resolve_embed_precision("auto", "cpu") == "32"
    assert hardware.resolve_train_precision("auto", "cpu") == "32-true"


def test_native_bf16_takes_bf16_silently(cpu):
    cpu("AVX512", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hardware.resolve_train_precision("auto", "cpu") == "bf16-mixed"
        assert hardware.resolve_embed_precision("bf16", "cpu") == "bf16"
        assert hardware.resolve_train_precision("32", "cpu") == "32-true"


def test_bad_precisions_are_named(cpu):
    cpu("AVX512", True)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        hardware.resolve_train_precision("16-mixed", "cpu")
    with pytest.raises(ValueError, match="allowed are auto, 64-true"):
        hardware.resolve_train_precision("fp8", "cpu")
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', '32', 'bf16'\)"):
        hardware.resolve_embed_precision("16", "cpu")


def spy_on_attention_kernels(monkeypatch) -> dict[str, int]:
    calls = {"blocked": 0, "matmul": 0, "sdpa": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(blocks, "blocked_attention", counted("blocked", blocks.blocked_attention))
    monkeypatch.setattr(blocks.MatmulAttention, "apply", counted("matmul", blocks.MatmulAttention.apply))
    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", counted("sdpa", F.scaled_dot_product_attention))
    return calls


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("grad", [False, True])
def test_bf16_cpu_attention_kernels_only_where_bf16_is_native(cpu, monkeypatch, native, grad):
    cpu("AVX512" if native else "AVX2", native)
    calls = spy_on_attention_kernels(monkeypatch)
    q, k, v = (torch.randn(2, 2, 40, 16, requires_grad=grad) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v).detach()
    calls["sdpa"] = 0
    with torch.set_grad_enabled(grad):
        out = attention(*(t.bfloat16() for t in (q, k, v)), dropout_p=0.0)
    kernel = "matmul" if grad else "blocked"
    assert calls == {"blocked": 0, "matmul": 0, "sdpa": 0, kernel if native else "sdpa": 1}
    assert out.dtype == torch.bfloat16 and (out.float() - expected).norm() / expected.norm() < 1e-2


def test_no_cpu_kernel_or_cpu_autocast_off_the_cpu(cpu, monkeypatch):
    """A block on another device type (meta: no data, no autocast) never enters the CPU-gated code,
    even on a CPU with native bf16: attention is SDPA and the q/k norms run as modules."""
    cpu("AVX512", True)
    calls = spy_on_attention_kernels(monkeypatch)
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: pytest.fail("CPU autocast toggled for a meta tensor"))
    with torch.device("meta"):
        block = RecursionParallelBlock(64, 4, qk_norm=True).to(torch.bfloat16)
        out = block(torch.empty(2, 50, 64, dtype=torch.bfloat16))
    assert out.device.type == "meta" and out.shape == (2, 50, 64)
    assert calls == {"blocked": 0, "matmul": 0, "sdpa": 1}


def test_fit_takes_the_hardware_precision_and_fabric_flags(cpu, tmp_path):
    cpu("AVX2", False)
    cfg = load_config(None, [f"run.run_dir={tmp_path}", "data.train_shards=x", "trainer.accelerator=cpu"])
    assert cfg.trainer.precision == "auto"
    none = detect_launch({})
    assert choose_device(cfg.trainer, none).precision == "32-true"
    cpu("AVX512", True)
    assert choose_device(cfg.trainer, none).precision == "bf16-mixed"
    # fabric run --precision bf16 --strategy ddp: honoured when the config says auto
    fabric = detect_launch({**FABRIC, "LT_PRECISION": "bf16", "LT_STRATEGY": "ddp", "LT_ACCELERATOR": "cpu"})
    choice = choose_device(cfg.trainer, fabric)
    assert (choice.accelerator, choice.precision, choice.strategy) == ("cpu", "bf16-mixed", "ddp")
    cfg.trainer.precision = "bf16-mixed"  # the same precision, spelled another way, agrees
    assert choose_device(cfg.trainer, fabric).precision == "bf16-mixed"
    cfg.trainer.precision = "32-true"
    with pytest.raises(
        LaunchMismatchError, match="trainer.precision='32-true' but fabric run was given --precision bf16-mixed"
    ):
        choose_device(cfg.trainer, fabric)
    cfg.trainer.precision = "auto"
    cfg.trainer.strategy = "ddp_spawn"
    with pytest.raises(LaunchMismatchError, match="trainer.strategy='ddp_spawn' but fabric run was given"):
        choose_device(cfg.trainer, fabric)
    spawn = detect_launch({**FABRIC, "LT_STRATEGY": "ddp_spawn"})
    with pytest.raises(LaunchMismatchError, match="starts its own processes"):
        choose_device(cfg.trainer, spawn)
    cfg.trainer.strategy = "auto"
    cfg.trainer.precision = "16-mixed"
    with pytest.raises(ConfigError, match="trainer.precision: precision '16-mixed' needs a CUDA GPU"):
        choose_device(cfg.trainer, none)


def test_paper_configs_train_in_bf16_mixed():
    from pathlib import Path

    papers = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))
    assert len(papers) >= 10
    assert {load_config(p).trainer.precision for p in papers} == {"bf16-mixed"}
