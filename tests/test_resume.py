"""Resume after SIGTERM and after kill -9 continues from the saved step on the same data."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from run_helpers import REPO, audit, child_env, run_cli, tiny_overrides, train_cmd, write_real_shards

pytestmark = pytest.mark.slow

STEPS = 12  # 3 epochs of 4 steps: resumes land mid-epoch and across epoch boundaries
ARGS = [f"trainer.max_steps={STEPS}", "trainer.checkpoint_every_n_steps=3"]


@pytest.fixture(scope="module")
def shards(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_real_shards(shared_data, tmp_path_factory.mktemp("resume") / "shards")


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    """Batch checksums of an uninterrupted run, one row per step."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = run_cli(train_cmd(*tiny_overrides(shards, run_dir, *ARGS)))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = audit(run_dir)
    assert rows["step"].to_list() == list(range(1, STEPS + 1))
    return rows


def _start_and_wait(cmd: list[str], run_dir: Path, min_rows: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tsv = run_dir / "logs" / "batches" / "rank0.tsv"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if tsv.is_file() and len(tsv.read_text().splitlines()) >= min_rows:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"training never reached {min_rows} batches: {proc.communicate()[0][-3000:]}")


def _saved_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def _final_stream(run_dir: Path) -> pl.DataFrame:
    """Per step, the batch of the attempt that survived (a later attempt redoes lost steps)."""
    return audit(run_dir).unique("step", keep="last", maintain_order=True).sort("step")


def test_sigterm_checkpoints_and_resume_continues_the_stream(
    shards: Path, reference: pl.DataFrame, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cmd = train_cmd(*tiny_overrides(shards, run_dir, *ARGS))
    proc = _start_and_wait(cmd, run_dir, min_rows=2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]  # a clean exit, not a crash
    assert "received SIGTERM" in out and "preempted" in out
    stopped_at = _saved_step(run_dir / "checkpoints" / "last.ckpt")
    assert 2 <= stopped_at < STEPS
    assert audit(run_dir)["step"].max() == stopped_at  # saved exactly where it stopped: nothing lost

    done = run_cli(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = audit(run_dir)
    assert rows["step"].to_list() == list(range(1, STEPS + 1))  # each step once: no repeat, no gap
    assert rows["checksum"].to_list() == reference["checksum"].to_list()  # same data, same order
    assert _saved_step(run_dir / "checkpoints" / "last.ckpt") == STEPS
    assert (run_dir / "logs" / "csv" / "attempt_1" / "metrics.csv").is_file()  # attempt 0's log kept


def test_kill_9_loses_at_most_the_steps_since_the_last_checkpoint(
    shards: Path, reference: pl.DataFrame, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cmd = train_cmd(*tiny_overrides(shards, run_dir, *ARGS))
    proc = _start_and_wait(cmd, run_dir, min_rows=5)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    reached = audit(run_dir)["step"].max()
    saved = _saved_step(run_dir / "checkpoints" / "last.ckpt")
    # lost only the steps after the checkpoint (none when the kill lands just after one is written)
    assert saved % 3 == 0 and 0 <= reached - saved <= 3

    done = run_cli(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = audit(run_dir)
    restart = rows["step"].to_list().index(saved + 1, reached)  # second attempt starts after `saved`
    assert rows["step"].to_list()[restart:] == list(range(saved + 1, STEPS + 1))
    assert _final_stream(run_dir)["checksum"].to_list() == reference["checksum"].to_list()
    assert not list((run_dir / "checkpoints").glob(".*.tmp*"))  # a temp the kill left is cleared
