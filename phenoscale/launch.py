"""Which launcher started this process, and how many devices and nodes that implies.

The same `train.py` runs under `fabric run`, `torchrun` (single- or multi-node), SLURM `srun`
or plain `python`. Lightning's Trainer trusts the `devices`/`num_nodes` it is given: with a
mismatch it either raises late (after data and model are built) or, with devices=1 under a
launcher that started N processes, silently trains N independent copies. So we read the
launcher's environment first, derive devices and num_nodes from it and compare them with the
config before anything is built.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

LAUNCHERS = ("none", "torchrun", "fabric", "slurm")


class LaunchMismatchError(ValueError):
    """The config asks for a topology the launcher did not start."""


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, as the launcher described it."""

    launcher: str  # one of LAUNCHERS
    world_size: int
    devices: int  # processes per node
    num_nodes: int
    global_rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    accelerator: str | None = None  # `fabric run --accelerator`, when given
    precision: str | None = None  # `fabric run --precision`, when given
    strategy: str | None = None  # `fabric run --strategy`, when given

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], key: str, launcher: str) -> int:
    value = environ.get(key)
    if value is None:
        raise LaunchMismatchError(f"{launcher} launch detected but ${key} is not set")
    match = re.match(r"\s*(\d+)", value)  # SLURM writes e.g. SLURM_NTASKS_PER_NODE="4(x2)"
    if not match:
        raise LaunchMismatchError(f"${key}={value!r} is not an integer ({launcher} launch)")
    return int(match.group(1))


def _torchelastic(environ: Mapping[str, str], launcher: str) -> LaunchEnv:
    world = _int(environ, "WORLD_SIZE", launcher)
    per_node = _int(environ, "LOCAL_WORLD_SIZE", launcher)
    if world % per_node:
        raise LaunchMismatchError(
            f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={per_node}: nodes run "
            "different process counts, which DDP does not support"
        )

    def fabric_option(key: str) -> str | None:
        value = environ.get(key) if launcher == "fabric" else None
        return value if value not in (None, "None", "auto") else None

    return LaunchEnv(
        launcher=launcher,
        world_size=world,
        devices=per_node,
        num_nodes=world // per_node,
        global_rank=_int(environ, "RANK", launcher),
        local_rank=_int(environ, "LOCAL_RANK", launcher),
        node_rank=int(environ.get("GROUP_RANK", "0")),
        accelerator=fabric_option("LT_ACCELERATOR"),
        precision=fabric_option("LT_PRECISION"),
        strategy=fabric_option("LT_STRATEGY"),
    )


def _slurm(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "SLURM_NTASKS", "slurm")
    nodes = _int(environ, "SLURM_NNODES", "slurm") if "SLURM_NNODES" in environ else 1
    if "SLURM_NTASKS_PER_NODE" in environ:
        per_node = _int(environ, "SLURM_NTASKS_PER_NODE", "slurm")
    elif world == 1:
        per_node = 1
    else:
        raise LaunchMismatchError(
            f"SLURM started {world} tasks without --ntasks-per-node; use "
            "`#SBATCH --ntasks-per-node=<devices per node>` so every node runs the same count"
        )
    if per_node * nodes != world:
        raise LaunchMismatchError(
            f"SLURM_NTASKS={world} != SLURM_NTASKS_PER_NODE={per_node} x SLURM_NNODES={nodes}"
        )
    return LaunchEnv(
        launcher="slurm",
        world_size=world,
        devices=per_node,
        num_nodes=nodes,
        global_rank=_int(environ, "SLURM_PROCID", "slurm"),
        local_rank=_int(environ, "SLURM_LOCALID", "slurm"),
        node_rank=_int(environ, "SLURM_NODEID", "slurm") if "SLURM_NODEID" in environ else 0,
    )


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read the launcher from `environ` (default: os.environ).

    torchrun sets TORCHELASTIC_RUN_ID with RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/GROUP_RANK;
    `fabric run` calls torchrun after setting LT_CLI_USED and LT_* (--accelerator, --precision and
    --strategy among them, which a Lightning Trainer would ignore: `phenoscale fit` honours them);
    `srun` sets SLURM_NTASKS and friends (an interactive allocation, job name `bash`/`interactive`,
    is not a launch, as in Lightning's SLURMEnvironment).
    """
    environ = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in environ or ("LOCAL_WORLD_SIZE" in environ and "RANK" in environ):
        return _torchelastic(environ, "fabric" if environ.get("LT_CLI_USED") else "torchrun")
    if "SLURM_NTASKS" in environ and environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return _slurm(environ)
    return LaunchEnv(launcher="none", world_size=1, devices=1, num_nodes=1)


def _check(name: str, configured: str, derived: int, env: LaunchEnv, hint: str) -> int:
    if str(configured) == "auto":
        return derived
    try:
        value = int(configured)
    except ValueError:
        raise LaunchMismatchError(
            f"trainer.{name}={configured!r}: allowed are 'auto' or a positive integer"
        ) from None
    if value != derived:
        raise LaunchMismatchError(
            f"trainer.{name}={value} but the {env.launcher} launcher started {derived} "
            f"({hint}); set trainer.{name}=auto (recommended) or {derived}, or relaunch "
            f"with {value}"
        )
    return value


def resolve_topology(devices: str, num_nodes: str, env: LaunchEnv) -> tuple[int, int]:
    """(devices, num_nodes) for the Trainer: the launcher's, after checking the config agrees.

    Without a launcher, an explicit `devices` > 1 lets Lightning spawn the processes itself
    (its default subprocess launcher); `num_nodes` > 1 then needs a launcher on every node.
    """
    if env.launcher == "none":
        n_dev = 1 if str(devices) == "auto" else _positive("devices", devices)
        n_nodes = 1 if str(num_nodes) == "auto" else _positive("num_nodes", num_nodes)
        if n_nodes > 1:
            raise LaunchMismatchError(
                f"trainer.num_nodes={n_nodes} but no launcher was detected: start one process "
                "group per node with `torchrun --nnodes ...` or `srun` (see docs/runs.md)"
            )
        return n_dev, n_nodes
    hints = {
        "torchrun": ("LOCAL_WORLD_SIZE", "WORLD_SIZE / LOCAL_WORLD_SIZE"),
        "fabric": ("LOCAL_WORLD_SIZE, from --devices", "WORLD_SIZE / LOCAL_WORLD_SIZE, from --num-nodes"),
        "slurm": ("SLURM_NTASKS_PER_NODE", "SLURM_NNODES"),
    }[env.launcher]
    return (
        _check("devices", devices, env.devices, env, f"processes per node, {hints[0]}"),
        _check("num_nodes", num_nodes, env.num_nodes, env, f"nodes, {hints[1]}"),
    )


def _positive(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise LaunchMismatchError(f"trainer.{name}={value!r}: allowed are 'auto' or a positive integer")
    return number
