"""Which launcher started this process, and how many devices and nodes that implies.

The same `train.py` runs under `fabric run`, `torchrun` (single- or multi-node), SLURM `srun`
or plain `python`. Lightning's Trainer trusts the `devices`/`num_nodes` it is given: with a
mismatch it either raises late (after data and model are built) or, with devices=1 under a
launcher that started N processes, silently trains N independent copies. So we read the
launcher's environment first, derive devices and num_nodes from it and compare them with the
config before anything is built.

Launchers are registered entries (`register_launcher`): how to recognise one from the
environment and how to read this process's place from it. `detect_launch` tries them in
registration order - the built-in fabric, torchrun, slurm first, then plugins' - and the first
that recognises the environment wins; none recognising it means a plain single process
(docs/ARCHITECTURE.md, "Add a launcher").
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment

from registry import Registry

#: the launcher of a process no registered launcher recognised
NO_LAUNCHER = "none"


class LaunchMismatchError(ValueError):
    """The config asks for a topology the launcher did not start."""


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, as the launcher described it."""

    launcher: str  # a registered launcher's name, or NO_LAUNCHER
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


@dataclass(frozen=True)
class Launcher:
    """One way processes get started: how to recognise it and what it says about the job."""

    name: str
    detect: Callable[[Mapping[str, str]], bool]  # does this environment come from this launcher?
    read: Callable[[Mapping[str, str]], LaunchEnv]  # this process's place; LaunchMismatchError if inconsistent
    # where the launcher states processes per node and node count, for the mismatch messages
    devices_from: str
    nodes_from: str
    # the Lightning ClusterEnvironment the Trainer gets under this launcher (None: Lightning's own detection)
    cluster_environment: Callable[[], Any] | None = None


_LAUNCHERS: Registry[Launcher] = Registry("launcher", origin=lambda launcher: launcher.read.__module__)


def register_launcher(launcher: Launcher) -> Launcher:
    """Add `launcher`, tried after those registered before it; the same one again is a no-op."""
    if launcher.name == NO_LAUNCHER:
        raise ValueError(f"{NO_LAUNCHER!r} is the name of a process no launcher started")
    return _LAUNCHERS.register(launcher.name, launcher)


def get_launcher(name: str) -> Launcher:
    return _LAUNCHERS.get(name)


def launcher_names() -> tuple[str, ...]:
    """Registered launchers in detection order."""
    return _LAUNCHERS.names()


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


def _is_torchelastic(environ: Mapping[str, str]) -> bool:
    return "TORCHELASTIC_RUN_ID" in environ or ("LOCAL_WORLD_SIZE" in environ and "RANK" in environ)


def _slurm_cluster_environment() -> Any:
    # we checkpoint and stop on SIGUSR1/SIGTERM ourselves; Lightning's auto-requeue would
    # write a second (non-atomic) hpc checkpoint and call scontrol behind the user's back
    return SLURMEnvironment(auto_requeue=False)


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
        raise LaunchMismatchError(f"SLURM_NTASKS={world} != SLURM_NTASKS_PER_NODE={per_node} x SLURM_NNODES={nodes}")
    return LaunchEnv(
        launcher="slurm",
        world_size=world,
        devices=per_node,
        num_nodes=nodes,
        global_rank=_int(environ, "SLURM_PROCID", "slurm"),
        local_rank=_int(environ, "SLURM_LOCALID", "slurm"),
        node_rank=_int(environ, "SLURM_NODEID", "slurm") if "SLURM_NODEID" in environ else 0,
    )


def _torchelastic_launcher(
    name: str, detect: Callable[[Mapping[str, str]], bool], devices_flag: str = "", nodes_flag: str = ""
) -> Launcher:
    """A launcher that starts processes through torchelastic: its variables say the job's shape."""
    return Launcher(
        name,
        detect=detect,
        read=partial(_torchelastic, launcher=name),
        devices_from="LOCAL_WORLD_SIZE" + (f", from {devices_flag}" if devices_flag else ""),
        nodes_from="WORLD_SIZE / LOCAL_WORLD_SIZE" + (f", from {nodes_flag}" if nodes_flag else ""),
    )


# `fabric run` calls torchrun after setting LT_CLI_USED and LT_* (--accelerator, --precision and
# --strategy among them, which a Lightning Trainer would ignore: `phenoscale fit` honours them), so
# it is tried before torchrun, whose variables (TORCHELASTIC_RUN_ID with RANK/LOCAL_RANK/WORLD_SIZE/
# LOCAL_WORLD_SIZE/GROUP_RANK) it shares
register_launcher(
    _torchelastic_launcher(
        "fabric",
        lambda environ: _is_torchelastic(environ) and bool(environ.get("LT_CLI_USED")),
        "--devices",
        "--num-nodes",
    )
)
register_launcher(_torchelastic_launcher("torchrun", _is_torchelastic))
# `srun` sets SLURM_NTASKS and friends; an interactive allocation (job name `bash`/`interactive`)
# is not a launch, as in Lightning's SLURMEnvironment
register_launcher(
    Launcher(
        "slurm",
        detect=lambda environ: (
            "SLURM_NTASKS" in environ and environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")
        ),
        read=_slurm,
        devices_from="SLURM_NTASKS_PER_NODE",
        nodes_from="SLURM_NNODES",
        cluster_environment=_slurm_cluster_environment,
    )
)


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The first registered launcher that recognises `environ` (default: os.environ), read from it."""
    environ = os.environ if environ is None else environ
    for launcher in _LAUNCHERS.values():
        if launcher.detect(environ):
            return launcher.read(environ)
    return LaunchEnv(launcher=NO_LAUNCHER, world_size=1, devices=1, num_nodes=1)


def cluster_plugins(env: LaunchEnv) -> list[Any]:
    """The Trainer plugins `env`'s launcher needs (its ClusterEnvironment, if it names one)."""
    if env.launcher == NO_LAUNCHER:
        return []
    make = get_launcher(env.launcher).cluster_environment
    return [] if make is None else [make()]


def _check(name: str, configured: str, derived: int, env: LaunchEnv, hint: str) -> int:
    if str(configured) == "auto":
        return derived
    try:
        value = int(configured)
    except ValueError:
        raise LaunchMismatchError(f"trainer.{name}={configured!r}: allowed are 'auto' or a positive integer") from None
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
    if env.launcher == NO_LAUNCHER:
        n_dev = 1 if str(devices) == "auto" else _positive("devices", devices)
        n_nodes = 1 if str(num_nodes) == "auto" else _positive("num_nodes", num_nodes)
        if n_nodes > 1:
            raise LaunchMismatchError(
                f"trainer.num_nodes={n_nodes} but no launcher was detected: start one process "
                "group per node with `torchrun --nnodes ...` or `srun` (see docs/runs.md)"
            )
        return n_dev, n_nodes
    launcher = get_launcher(env.launcher)
    return (
        _check("devices", devices, env.devices, env, f"processes per node, {launcher.devices_from}"),
        _check("num_nodes", num_nodes, env.num_nodes, env, f"nodes, {launcher.nodes_from}"),
    )


def _positive(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise LaunchMismatchError(f"trainer.{name}={value!r}: allowed are 'auto' or a positive integer")
    return number
