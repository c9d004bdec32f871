"""train.py unchanged under torchrun, `fabric run` and two simulated torchrun nodes (gloo, CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from omegaconf import OmegaConf

from phenoscale.cli import main
from run_helpers import REPO, TINY, audit, child_env, free_port, run_cli, tiny_overrides, write_real_shards

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

STEPS = 4
BIN = Path(sys.executable).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def shards(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_real_shards(shared_data, tmp_path_factory.mktemp("ddp") / "shards")


def script_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train.py",
        str(TINY),
        *tiny_overrides(shards, run_dir, f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=2", *extra),
    ]


def assert_two_ranks_trained(run_dir: Path, launcher_line: str, output: str) -> None:
    assert launcher_line in output, output[-3000:]
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.scaling.effective_batch_size == 8 * 2  # per-device batch x world size 2
    ranks = [audit(run_dir, rank) for rank in (0, 1)]
    for rows in ranks:  # each rank took every step, on a full batch
        assert rows["step"].to_list() == list(range(1, STEPS + 1))
        assert rows["crops"].to_list() == [8] * STEPS
    # different data per rank: the ranks did not train N copies of the same stream
    assert ranks[0]["checksum"].to_list() != ranks[1]["checksum"].to_list()
    metrics = pl.read_csv(run_dir / "logs" / "csv" / "attempt_0" / "metrics.csv")
    seen = metrics.drop_nulls("train/samples")
    # Lightning's ThroughputMonitor counts rank 0's crops (8 a step) and scales rates by the world size
    assert seen["train/samples"].to_list() == [8 * 2.0, 8 * 4.0]
    rates = metrics.drop_nulls("train/samples_per_sec")
    assert rates["train/samples_per_sec"].to_list() == pytest.approx(
        [2 * r for r in rates["train/device/samples_per_sec"].to_list()]
    )
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.fixture(scope="module")
def torchrun_fit(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    done = run_cli(
        [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), *script_args(shards, run_dir)],
        timeout=300,
    )
    return run_dir, done


def test_torchrun_two_processes(torchrun_fit: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, done = torchrun_fit
    assert done.returncode == 0, done.stderr[-3000:]
    assert_two_ranks_trained(run_dir, "torchrun launch, world size 2: 2 devices x 1 nodes", done.stdout + done.stderr)


def test_embed_under_torchrun_equals_one_process(
    shards: Path, torchrun_fit: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    checkpoint = torchrun_fit[0] / "checkpoints" / "last.ckpt"
    two, one = tmp_path / "two.parquet", tmp_path / "one.parquet"
    done = run_cli(
        [
            *TORCHRUN,
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "phenoscale",  # phenoscale/__main__.py
            "embed",
            str(checkpoint),
            str(shards),
            str(two),
            "--num-workers",
            "0",
        ],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["embed", str(checkpoint), str(shards), str(one), "--num-workers", "0"]) == 0
    split, whole = pl.read_parquet(two), pl.read_parquet(one)
    assert split["key"].to_list() == whole["key"].to_list() and split.height == 16  # every site once
    # each rank embedded half the sites into its own part; the merged parts give the one-process means
    np.testing.assert_allclose(split["embedding"].to_numpy(), whole["embedding"].to_numpy(), rtol=1e-6)


def test_fabric_run_two_processes(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli(
        [
            str(BIN / "fabric"),
            "run",
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--main-port",
            str(free_port()),
            *script_args(shards, run_dir),
        ],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_two_ranks_trained(run_dir, "fabric launch, world size 2: 2 devices x 1 nodes", done.stdout + done.stderr)


def test_two_simulated_nodes(shards: Path, tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", str(free_port())
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "--nproc_per_node",
                "1",
                *script_args(shards, run_dir),
            ],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=300)[0])
        finally:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert_two_ranks_trained(run_dir, "torchrun launch, world size 2: 1 devices x 2 nodes", outputs[0])


def _worker_of_rank(launcher_pid: int, rank: int) -> int:
    """PID of the torchrun worker with RANK=rank (children of the agent, read from /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_checkpoint(shards: Path, tmp_path: Path) -> None:
    run_dir, steps = tmp_path / "run", 16
    cmd = [
        *TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        *script_args(shards, run_dir, f"trainer.max_steps={steps}", "trainer.checkpoint_every_n_steps=100"),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tsv = run_dir / "logs" / "batches" / "rank1.tsv"
    try:
        deadline = time.monotonic() + 180
        while not (tsv.is_file() and len(tsv.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        os.kill(_worker_of_rank(proc.pid, 1), signal.SIGTERM)  # only rank 1 is told
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    ends = [audit(run_dir, rank)["step"].max() for rank in (0, 1)]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ends[0] == ends[1] == state["global_step"] < steps  # agreed step, checkpointed there

    done = run_cli(cmd, timeout=300)  # resume under the same launcher
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert audit(run_dir, rank)["step"].to_list() == list(range(1, steps + 1))
