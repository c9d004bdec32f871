"""`phenoscale export`: a checkpoint -> a shareable folder (weights, config.json, model card).

The model itself is written by `lightning_modules.export`; this module adds what only the run
knows: the stains in channel order, what the model was trained on and how well it recalls known
relationships (the newest `phenoscale evaluate` metrics.json of the run, or one given).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datamodules
import lightning_modules
from lightning_modules.export import CARD, write_export
from phenoscale.config import load_config
from phenoscale.run import RunDir


def run_of(checkpoint: Path) -> RunDir | None:
    """The run directory a checkpoint lives in (<run>/checkpoints/x.ckpt with <run>/config.yaml)."""
    run = RunDir(checkpoint.resolve().parent.parent)
    return run if checkpoint.resolve().parent == run.checkpoints.resolve() and run.config.is_file() else None


def training_data(run: RunDir | None) -> tuple[list[str] | None, dict[str, Any]]:
    """(stains in channel order, facts about the training shards) as far as the run tells."""
    if run is None:
        return None, {}
    data = load_config(run.config).data
    facts: dict[str, Any] = {"train_shards": data.train_shards}
    channels = list(data.channels) if data.channels is not None else None
    shard_dir = Path(data.train_shards)
    if shard_dir.is_dir() and (shard_dir / "manifest.parquet").is_file():
        manifest = datamodules.read_manifest(shard_dir)
        facts.update(
            sites=manifest.height,
            experiments=manifest["experiment"].n_unique(),
            perturbations=manifest["perturbation"].n_unique(),
            cell_types=sorted(manifest["cell_type"].unique()),
        )
        channels = channels or list(manifest["channels"][0])
    return channels, facts


def recall_metrics(run: RunDir | None, metrics: Path | None) -> tuple[Path | None, dict[str, float]]:
    """The recall figures of `metrics` (else the run's newest reports/**/metrics.json)."""
    if metrics is None and run is not None:
        found = sorted(run.reports.glob("**/metrics.json"), key=lambda p: p.stat().st_mtime)
        metrics = found[-1] if found else None
    if metrics is None:
        return None, {}
    summary = json.loads(Path(metrics).read_text()).get("summary", {})
    return metrics, {k: v for k, v in summary.items() if "recall" in k and v is not None}


def model_card(
    module: Any,
    checkpoint: Path,
    channels: list[str] | None,
    facts: dict[str, Any],
    metrics_path: Path | None,
    recall: dict[str, float],
    encoder_only: bool,
    hub_repo: str | None = None,
) -> str:
    """README.md of the export: what the model is, takes, was trained on and scores."""
    cfg = module.model_cfg
    lines = [
        "---",
        "library_name: phenoscale",
        "tags: [microscopy, cell-painting, phenomics]",
        "---",
        "",
        f"# {cfg.family.upper()} {cfg.backbone}",
        "",
        f"Exported by `phenoscale export` from `{checkpoint.name}`"
        + (" (encoder only: embeddings, no reconstruction)." if encoder_only else "."),
        "",
        "```python",
        "from lightning_modules import load_pretrained",
        f'model = load_pretrained("hf://{hub_repo or "ORG/REPO"}")  # or this folder',
        "emb = model.embed(images)  # raw uint8/uint16 (B, C, H, W)",
        "```",
        "",
        "## Inputs",
        "",
        f"- channels, in order: {', '.join(channels) if channels else 'not recorded'} ({module.in_chans} at training)",
        f"- crops of {cfg.img_size} x {cfg.img_size} px, raw integer pixels; the model self-standardises "
        "(divide by the dtype maximum, per-image per-channel instance norm)",
        f"- embedding: pooling `{cfg.embed_pooling}`, "
        f"block {cfg.embed_block if cfg.embed_block is not None else 'last'}; "
        f"MLP-bias layout `{cfg.mlp_bias_layout}`",
        "",
        "## Training data",
        "",
    ]
    if facts:
        lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in facts.items()]
    else:
        lines.append("- not recorded (the checkpoint is not inside a phenoscale run directory)")
    lines += ["", "## Evaluation", ""]
    if recall:
        lines += [f"From `{metrics_path}`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in sorted(recall.items())]
    else:
        lines.append("No recall measured: run `phenoscale evaluate` on its embeddings and export again with --metrics.")
    return "\n".join(lines) + "\n"


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    encoder_only: bool = False,
    channels: list[str] | None = None,
    metrics: str | Path | None = None,
    hub_repo: str | None = None,
) -> Path:
    """Write OUT_DIR/{model.safetensors, config.json, README.md} for `checkpoint`; returns OUT_DIR."""
    checkpoint = Path(checkpoint)
    module = lightning_modules.load_pretrained(checkpoint)
    run = run_of(checkpoint) if checkpoint.is_file() else None
    run_channels, facts = training_data(run)
    channels = channels or run_channels or module.channel_names
    if channels is not None and len(channels) != module.in_chans:
        raise ValueError(f"{len(channels)} channels {channels} given for a model trained on {module.in_chans}")
    metrics_path, recall = recall_metrics(run, Path(metrics) if metrics else None)
    out = write_export(module, out_dir, channels=channels, encoder_only=encoder_only)
    (out / CARD).write_text(
        model_card(module, checkpoint, channels, facts, metrics_path, recall, encoder_only, hub_repo)
    )
    return out
