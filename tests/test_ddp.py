"""train.py unchanged under torchrun, `fabric run` and two simulated torchrun nodes (gloo, CPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from omegaconf import OmegaConf

from run_helpers import REPO, TINY, audit, child_env, free_port, run_cli, tiny_overrides, write_real_shards

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

STEPS = 4
BIN = Path(sys.executable).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def shards(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_real_shards(shared_data, tmp_path_factory.mktemp("ddp") / "shards")


def script_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train.py", str(TINY), *tiny_overrides(shards, run_dir, f"trainer.max_steps={STEPS}",
                                                   "trainer.log_every_n_steps=2", *extra)]


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
    seen = metrics.drop_nulls("throughput/samples_seen")
    # crops summed over both ranks: 2 ranks x 8 crops x steps
    assert seen["throughput/samples_seen"].to_list() == [2 * 8 * 2.0, 2 * 8 * 4.0]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_torchrun_two_processes(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli([*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
                    *script_args(shards, run_dir)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_two_ranks_trained(run_dir, "torchrun launch, world size 2: 2 devices x 1 nodes",
                             done.stdout + done.stderr)


def test_fabric_run_two_processes(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli([str(BIN / "fabric"), "run", "--accelerator", "cpu", "--devices", "2",
                    "--main-port", str(free_port()), *script_args(shards, run_dir)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_two_ranks_trained(run_dir, "fabric launch, world size 2: 2 devices x 1 nodes",
                             done.stdout + done.stderr)


def test_two_simulated_nodes(shards: Path, tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", str(free_port())
    nodes = [subprocess.Popen(
        [*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
         "--master_port", port, "--nproc_per_node", "1", *script_args(shards, run_dir)],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=300)[0])
        finally:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert_two_ranks_trained(run_dir, "torchrun launch, world size 2: 1 devices x 2 nodes", outputs[0])


def test_devices_mismatch_fails_before_training(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli([*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
                    *script_args(shards, run_dir, "trainer.devices=1")], timeout=300)
    assert done.returncode != 0
    assert "trainer.devices=1 but the torchrun launcher started 2" in done.stderr
    assert not (run_dir / "checkpoints").exists()  # nothing started
