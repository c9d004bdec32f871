"""End to end on a tiny synthetic screen: synth -> fit -> embed -> evaluate; run-dir guarantees."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from omegaconf import OmegaConf

import lightning_modules
from lightning_modules.hardware import numerics
from phenoscale.cli import main
from phenoscale.config import ConfigError, load_config
from phenoscale.fitting import fit
from phenoscale.launch import LaunchMismatchError
from phenoscale.run import AtomicCheckpointIO, NonFiniteWeightsError
from run_helpers import TINY


def fit_args(screen: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        str(TINY),
        f"data.train_shards={screen / 'shards'}",
        f"run.run_dir={run_dir}",
        "data.num_workers=0",
        *extra,
    ]


def _tiles(screen: Path, key: str) -> torch.Tensor:
    """The site's 4 non-overlapping 32x32 tiles, read straight from the tar (independent of the loader)."""
    for shard in sorted((screen / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            names = {m.name for m in tar.getmembers()}
            if f"{key}.npy" in names:
                image = np.load(io.BytesIO(tar.extractfile(f"{key}.npy").read()))
                tiles = [image[:, r : r + 32, c : c + 32] for r in (0, 32) for c in (0, 32)]
                return torch.from_numpy(np.stack(tiles))
    raise AssertionError(f"{key} not found in the shards")


@pytest.mark.slow
def test_fit_embed_evaluate_on_a_synthetic_screen(screen: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    truth = screen / "truth"
    assert (
        main(
            fit_args(
                screen,
                run_dir,
                "trainer.max_steps=8",
                "trainer.checkpoint_every_n_steps=4",
                "trainer.evaluate=true",
                f"eval.annotations=[{truth / 'relationships.csv'}]",
                "eval.clusters=null",
                "eval.benchmarks=[recall]",
            )
        )
        == 0
    )

    # the run directory holds config, checkpoints and logs
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.scaling.effective_batch_size == 8 and saved.scaling.lr == pytest.approx(1e-3)
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step=*.ckpt"))
    assert steps == ["step=00000004.ckpt", "step=00000008.ckpt"]
    assert (run_dir / "checkpoints" / "last.ckpt").samefile(run_dir / "checkpoints" / steps[-1])
    metrics = pl.read_csv(run_dir / "logs" / "csv" / "attempt_0" / "metrics.csv")
    assert {"train/loss", "train/device/samples_per_sec", "train/samples"} <= set(metrics.columns)
    assert any(c.startswith("lr-") for c in metrics.columns)
    assert metrics["train/samples"].drop_nulls().to_list() == [16.0, 32.0, 48.0, 64.0]
    online = metrics["eval/recall_relationships"].drop_nulls()  # EFAAR after each of the 2 epochs
    assert online.len() == 2  # the last one is checked against the offline evaluation below
    hparams = OmegaConf.load(run_dir / "logs" / "csv" / "attempt_0" / "hparams.yaml")
    assert hparams.effective_batch_size == 8
    assert list((run_dir / "logs" / "tensorboard" / "attempt_0").glob("events.out.tfevents.*"))

    embeddings = run_dir / "embeddings" / "screen.parquet"
    assert (
        main(
            [
                "embed",
                str(run_dir / "checkpoints" / "last.ckpt"),
                str(screen / "shards"),
                str(embeddings),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    frame = pl.read_parquet(embeddings)
    manifest = pl.read_parquet(screen / "shards" / "manifest.parquet")
    assert frame["key"].to_list() == manifest["key"].to_list()  # every site once, in manifest order
    assert frame["embedding"].dtype == pl.Array(pl.Float32, 32)  # tiny ViT width
    matrix = frame["embedding"].to_numpy()
    assert np.isfinite(matrix).all() and matrix.std(axis=0).min() > 0
    # a site's embedding is the mean of its 4 tile embeddings (recomputed from the tar directly)
    model = lightning_modules.load_pretrained(run_dir / "checkpoints" / "last.ckpt")
    for row in (0, 101):
        with torch.no_grad():
            expected = model.embed(_tiles(screen, frame["key"][row])).mean(0).numpy()
        np.testing.assert_allclose(matrix[row], expected, rtol=1e-4, atol=1e-5)
    # bf16 autocast: the same embeddings to bf16 accuracy
    fast = run_dir / "embeddings" / "screen_bf16.parquet"
    assert (
        main(
            [
                "embed",
                str(run_dir / "checkpoints" / "last.ckpt"),
                str(screen / "shards"),
                str(fast),
                "--num-workers",
                "0",
                "--precision",
                "bf16",
            ]
        )
        == 0
    )
    fast_matrix = pl.read_parquet(fast)["embedding"].to_numpy()
    error = np.linalg.norm(fast_matrix - matrix) / np.linalg.norm(matrix)
    assert 0 < error < 0.02

    report = run_dir / "reports"
    assert (
        main(
            [
                "evaluate",
                str(embeddings),
                "--annotations",
                str(screen / "truth" / "relationships.csv"),
                "--truth",
                str(screen / "truth"),
                "--benchmarks",
                "recall",
                "--clusters",
                "",
                "--out",
                str(report),
            ]
        )
        == 0
    )
    summary = json.loads((report / "metrics.json").read_text())["summary"]
    # the callback after the last epoch scored the same model (last.ckpt) on the same sites with the same
    # defaults (TVN per experiment): online and offline recall are one number
    assert summary["recall_relationships"] == pytest.approx(online[-1], abs=1e-6)
    assert summary["oracle_recall_truth"] > 0.3  # the planted structure is recoverable in principle


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    screen: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    # lr 1e30: the first update blows the weights up, the second step's loss is not finite
    code = main(fit_args(screen, run_dir, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=1", "optim.lr=1e30"))
    assert code == 3
    assert "error: non-finite loss at step 2 (epoch 0, batch 1)" in capsys.readouterr().err
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["last.ckpt", "step=00000001.ckpt"]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2], ids=["slurm_usr1", "submitit_usr2"])
def test_preemption_signal_checkpoints_and_stops_in_process(screen: Path, tmp_path: Path, signum: int) -> None:
    """SLURM's (`--signal=USR1@...`) or submitit's (USR2) preemption warning: checkpoint at the next
    step, stop cleanly."""
    run_dir = tmp_path / "run"
    cfg = load_config(
        TINY,
        [
            f"data.train_shards={screen / 'shards'}",
            f"run.run_dir={run_dir}",
            "data.num_workers=0",
            "trainer.max_steps=40",
            "trainer.checkpoint_every_n_steps=100",
            "trainer.audit_batches=true",
        ],
    )
    audit_file = run_dir / "logs" / "batches" / "rank0.tsv"

    def signal_after_two_steps() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if audit_file.is_file() and len(audit_file.read_text().splitlines()) >= 2:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.02)

    sender = threading.Thread(target=signal_after_two_steps, daemon=True)
    sender.start()
    result = fit(cfg)
    sender.join()
    assert result.preempted and 2 <= result.global_step < 40
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == result.global_step
    assert signal.getsignal(signum) is signal.SIG_DFL  # handlers restored after training


def test_every_checkpoint_finds_its_batches_already_audited(
    screen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill -9 between writing a checkpoint and the audit line of its last batch would leave the
    checkpoint ahead of the audit (seen once in CI); so at each save the audit already holds the step."""
    run_dir = tmp_path / "run"
    audit_file = run_dir / "logs" / "batches" / "rank0.tsv"
    audited_at_save: dict[int, int] = {}
    save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint: dict, path, storage_options=None) -> None:
        rows = audit_file.read_text().splitlines() if audit_file.is_file() else []
        audited_at_save[checkpoint["global_step"]] = int(rows[-1].split("\t")[0]) if rows else 0
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
    code = main(
        fit_args(
            screen, run_dir, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "trainer.audit_batches=true"
        )
    )
    assert code == 0
    assert audited_at_save == {2: 2, 4: 4}


def test_trainer_compile_and_auto_precision(screen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.compile=true fits torch.compile(module) (Lightning unwraps it for checkpoints); the
    compiler itself is stubbed: compiling on CPU takes minutes, the GPU check times the real one.
    trainer.precision=auto trains in the hardware's precision and logs which."""
    compiled = []

    def fake_compile(module: torch.nn.Module) -> torch.nn.Module:
        compiled.append(type(module).__name__)
        return torch._dynamo.eval_frame.OptimizedModule(module, lambda fn: fn)  # a compiler that changes nothing

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = load_config(
        TINY,
        [
            f"data.train_shards={screen / 'shards'}",
            f"run.run_dir={tmp_path / 'run'}",
            "data.num_workers=0",
            "trainer.max_steps=2",
            "trainer.compile=true",
            "trainer.precision=auto",
        ],
    )
    result = fit(cfg)
    assert compiled == ["CAMAEModule"] and result.global_step == 2
    hparams = OmegaConf.load(next((tmp_path / "run" / "logs" / "csv").glob("*/hparams.yaml")))
    assert hparams.precision == numerics("cpu").train_precision
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(key.startswith("_orig_mod.") for key in state["state_dict"])


def test_existing_run_is_never_overwritten(screen: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"previous run")
    cfg = load_config(TINY, [f"data.train_shards={screen / 'shards'}", f"run.run_dir={run_dir}", "run.resume=false"])
    with pytest.raises(ConfigError, match="already holds .*last.ckpt; pass run.resume=true"):
        fit(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"previous run"


def test_missing_shards_is_named_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", str(TINY), f"run.run_dir={tmp_path / 'run'}"]) == 2
    assert "missing mandatory values: data.train_shards" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_embed_precision_is_named_before_the_checkpoint_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "no_such.ckpt"  # loading it would fail with "not found": the precision must fail first
    assert main(["embed", str(missing), str(tmp_path), str(tmp_path / "e.parquet"), "--precision", "fp8"]) == 2
    assert "precision must be one of ('auto', '32', 'bf16'), got 'fp8'" in capsys.readouterr().err


def test_launcher_mismatch_fails_before_anything_starts(screen: Path, tmp_path: Path) -> None:
    # what `torchrun --nproc_per_node 2` exports, with a config that insists on one device
    torchrun = {
        "TORCHELASTIC_RUN_ID": "x",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "0",
    }
    cfg = load_config(
        TINY, [f"data.train_shards={screen / 'shards'}", f"run.run_dir={tmp_path / 'run'}", "trainer.devices=1"]
    )
    with pytest.raises(LaunchMismatchError, match="trainer.devices=1 but the torchrun launcher started 2"):
        fit(cfg, environ=torchrun)
    assert not (tmp_path / "run").exists()


def test_atomic_checkpoint_io_refuses_non_finite_weights(tmp_path: Path) -> None:
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite values in w"):
        io_.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan"), 0.0])}, "global_step": 2}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the good one stays
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp left behind
