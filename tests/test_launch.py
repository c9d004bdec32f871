"""Launcher detection from the environment each launcher really sets, and the mismatch errors."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment

from phenoscale.launch import (
    LaunchEnv,
    Launcher,
    LaunchMismatchError,
    cluster_plugins,
    detect_launch,
    launcher_names,
    register_launcher,
    resolve_topology,
)

# what torchrun 2.x exports to each worker (rank 3 of 2 nodes x 2 processes)
TORCHRUN = {
    "TORCHELASTIC_RUN_ID": "none",
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2",
    "ROLE_RANK": "3",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}
# `fabric run --accelerator cpu --devices 2`: LT_* from the fabric CLI, then torchrun's variables
FABRIC = {
    "LT_CLI_USED": "1",
    "LT_ACCELERATOR": "cpu",
    "LT_DEVICES": "2",
    "LT_NUM_NODES": "1",
    "TORCHELASTIC_RUN_ID": "none",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "0",
}
# `sbatch --nodes 3 --ntasks-per-node 4` then `srun python train.py ...` (task 5)
SLURM = {
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "12",
    "SLURM_NTASKS_PER_NODE": "4(x3)",
    "SLURM_NNODES": "3",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NODELIST": "gpu[01-03]",
}


def test_torchrun_multi_node() -> None:
    env = detect_launch(TORCHRUN)
    assert env == LaunchEnv("torchrun", world_size=4, devices=2, num_nodes=2, global_rank=3, local_rank=1, node_rank=1)
    assert resolve_topology("auto", "auto", env) == (2, 2)
    assert resolve_topology("2", "2", env) == (2, 2)


def test_fabric_run_is_told_apart_from_torchrun() -> None:
    env = detect_launch(FABRIC)
    assert (env.launcher, env.world_size, env.devices, env.num_nodes) == ("fabric", 2, 2, 1)
    assert env.accelerator == "cpu"
    assert resolve_topology("auto", "1", env) == (2, 1)


def test_slurm_srun() -> None:
    env = detect_launch(SLURM)
    assert env == LaunchEnv("slurm", world_size=12, devices=4, num_nodes=3, global_rank=5, local_rank=1, node_rank=1)
    assert resolve_topology("auto", "auto", env) == (4, 3)


def test_slurm_interactive_allocation_is_not_a_launch() -> None:
    env = detect_launch({**SLURM, "SLURM_JOB_NAME": "interactive"})
    assert env.launcher == "none" and env.world_size == 1


def test_slurm_ntasks_without_per_node_is_refused() -> None:
    bad = {k: v for k, v in SLURM.items() if k != "SLURM_NTASKS_PER_NODE"}
    with pytest.raises(LaunchMismatchError, match="--ntasks-per-node"):
        detect_launch(bad)


def test_plain_python_is_single_process() -> None:
    env = detect_launch({"PATH": "/usr/bin"})
    assert env == LaunchEnv("none", world_size=1, devices=1, num_nodes=1)
    assert resolve_topology("auto", "auto", env) == (1, 1)
    # without a launcher Lightning may spawn devices itself, but nodes need a launcher
    assert resolve_topology("2", "auto", env) == (2, 1)
    with pytest.raises(LaunchMismatchError, match="no launcher"):
        resolve_topology("auto", "2", env)


def test_devices_mismatch_names_both_numbers() -> None:
    env = detect_launch(TORCHRUN)
    # devices=1 under a 2-process launcher is the "N silent copies" case: must fail loudly
    with pytest.raises(LaunchMismatchError) as info:
        resolve_topology("1", "auto", env)
    message = str(info.value)
    assert "trainer.devices=1" in message and "started 2" in message and "torchrun" in message


def test_num_nodes_mismatch_under_slurm() -> None:
    with pytest.raises(LaunchMismatchError, match=r"trainer.num_nodes=2 .*slurm launcher started 3"):
        resolve_topology("auto", "2", detect_launch(SLURM))


def test_non_integer_devices() -> None:
    with pytest.raises(LaunchMismatchError, match="'auto' or a positive integer"):
        resolve_topology("two", "auto", detect_launch(FABRIC))
    with pytest.raises(LaunchMismatchError, match="'auto' or a positive integer"):
        resolve_topology("0", "auto", detect_launch({}))


def test_exported_rank_does_not_turn_slurm_into_torchrun() -> None:
    # fit exports RANK/WORLD_SIZE under srun for code that reads the torchrun convention
    env = detect_launch({**SLURM, "RANK": "5", "WORLD_SIZE": "12"})
    assert (env.launcher, env.devices, env.num_nodes) == ("slurm", 4, 3)


# a scheduler the package does not know, registered from here as a plugin would: Flux's
# `flux run` exports FLUX_JOB_ID and the task's place (names as in flux-core's task environment)
FLUX = {
    "FLUX_JOB_ID": "f1",
    "FLUX_JOB_SIZE": "6",
    "FLUX_JOB_NNODES": "3",
    "FLUX_TASK_RANK": "4",
    "FLUX_TASK_LOCAL_ID": "0",
}


def _read_flux(environ: Mapping[str, str]) -> LaunchEnv:
    world, nodes = int(environ["FLUX_JOB_SIZE"]), int(environ["FLUX_JOB_NNODES"])
    rank = int(environ["FLUX_TASK_RANK"])
    return LaunchEnv(
        "flux",
        world_size=world,
        devices=world // nodes,
        num_nodes=nodes,
        global_rank=rank,
        local_rank=int(environ["FLUX_TASK_LOCAL_ID"]),
        node_rank=rank // (world // nodes),
    )


register_launcher(
    Launcher(
        "flux",
        detect=lambda environ: "FLUX_JOB_ID" in environ,
        read=_read_flux,
        devices_from="FLUX_JOB_SIZE / FLUX_JOB_NNODES",
        nodes_from="FLUX_JOB_NNODES",
    )
)


def test_a_launcher_registered_outside_the_package_is_detected_and_checked() -> None:
    env = detect_launch(FLUX)
    assert env == LaunchEnv("flux", world_size=6, devices=2, num_nodes=3, global_rank=4, local_rank=0, node_rank=2)
    assert resolve_topology("auto", "auto", env) == (2, 3)
    with pytest.raises(LaunchMismatchError, match=r"flux launcher started 2 \(processes per node, FLUX_JOB_SIZE"):
        resolve_topology("4", "auto", env)
    assert cluster_plugins(env) == []  # no ClusterEnvironment named: Lightning's own detection
    # the built-ins come first, in the documented order, and still win in their own environments
    assert launcher_names()[:3] == ("fabric", "torchrun", "slurm") and "flux" in launcher_names()
    assert detect_launch({**SLURM, **FLUX}).launcher == "slurm"


def test_only_slurm_brings_its_own_cluster_environment() -> None:
    (plugin,) = cluster_plugins(detect_launch(SLURM))
    assert isinstance(plugin, SLURMEnvironment) and not plugin.auto_requeue
    assert cluster_plugins(detect_launch(TORCHRUN)) == [] and cluster_plugins(detect_launch({})) == []


def test_a_taken_launcher_name_or_none_is_refused() -> None:
    with pytest.raises(ValueError, match="launcher 'slurm' is already registered by phenoscale.launch"):
        register_launcher(Launcher("slurm", detect=bool, read=_read_flux, devices_from="", nodes_from=""))
    with pytest.raises(ValueError, match="no launcher started"):
        register_launcher(Launcher("none", detect=bool, read=_read_flux, devices_from="", nodes_from=""))
