"""Train a model: dataclass defaults <- CONFIG <- key=value overrides, in run.run_dir.

Everything of a run lives in its run directory (config.yaml, checkpoints/, logs/, embeddings/,
reports/). Rerunning the same command with the same run.run_dir resumes from
checkpoints/last.ckpt, data position included. SIGTERM / SIGUSR1 (SLURM preemption) checkpoint
and exit cleanly; a non-finite loss stops with the step named and keeps the last good checkpoint.

Under a launcher use train.py (the same thing); devices and num_nodes are taken from the
launcher ('auto') and an explicit mismatch is an error:
  fabric run --accelerator cpu --devices 2 train.py CONFIG [KEY=VALUE ...]
  torchrun --nproc_per_node 8 train.py CONFIG [KEY=VALUE ...]
  srun python train.py CONFIG [KEY=VALUE ...]     (sbatch --nodes N --ntasks-per-node G)

Examples (data.train_shards is required: a shard directory, e.g. from `phenoscale synth`):
  phenoscale synth runs/screen
  phenoscale fit configs/experiments/tiny.yaml data.train_shards=runs/screen/shards
  phenoscale fit configs/experiments/demo_mae.yaml data.train_shards=runs/screen/shards run.name=mae1
  phenoscale fit configs/paper/mae_vit_s16.yaml my_cluster_data.yaml scaling.lr_rule=sqrt
  phenoscale config configs/experiments/demo_mae.yaml      # see every setting first
See docs/runs.md for the run directory, launchers and resume behaviour.
"""

from __future__ import annotations

import argparse
import sys

from phenoscale.callbacks import NonFiniteLossError
from phenoscale.commands import add_config_items
from phenoscale.config import ConfigError, load_config, split_cli_args
from phenoscale.launch import LaunchMismatchError

HELP = "train a model from an experiment config (resumes an existing run directory)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_items(parser, required=True)


def run(args: argparse.Namespace) -> int:
    from phenoscale.fitting import fit  # heavy imports only when training

    try:
        cfg = load_config(*split_cli_args(args.items))
        result = fit(cfg)
    except (ConfigError, LaunchMismatchError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, NonFiniteLossError) else 3
    state = "preempted (checkpoint saved; rerun to resume)" if result.preempted else "finished"
    print(f"[phenoscale] {state} at step {result.global_step}; run directory {result.run_dir}")
    return 0
