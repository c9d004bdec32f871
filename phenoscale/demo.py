"""`phenoscale demo`: does a masked autoencoder learn biology better than its baselines?

On the built-in synthetic screen (planted modules, batch effects) it trains a tiny MAE, CA-MAE and
WSL classifier, embeds every site with them and with references (each masked autoencoder's
randomly initialised twin, per-channel image statistics, and the planted phenotypes themselves:
the oracle), and
scores known-relationship recall with and without TVN alignment. It also runs the CA-MAE on a
5-channel subset and a permuted channel order (the channel-agnostic claim) and scores every
block of the MAE encoder (the intermediate-layer finding). Everything lands in OUT.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch

import datamodules
import lightning_modules
from datamodules.synthetic.render import CHANNELS
from evaluation import EvalConfig, EvalResult
from lightning_modules.hardware import resolve_embed_precision
from phenoscale.baselines import ImageStatistics
from phenoscale.config import load_config
from phenoscale.demo_report import write_demo_report
from phenoscale.embedding import embed_batch, embed_model, embedding_device
from phenoscale.paths import demo_config
from phenoscale.workflow import Screen, ensure_screen, eval_data_config, recall_rows, score, train

#: the embedders that are not trained models; a trained family's label comes from its registration
REFERENCE_LABELS = {"image_stats": "image statistics", "oracle": "oracle (planted phenotypes)"}


def demo_models() -> tuple[str, ...]:
    """Registered families that have a demo config (configs/experiments/demo_<family>.yaml), in registry order."""
    return tuple(name for name in lightning_modules.family_names() if demo_config(name).is_file())


def random_init_name(family: str) -> str:
    """The untrained twin of a self-supervised family: same architecture, seed and pooling."""
    return f"random_init_{family}"


def label(name: str) -> str:
    """How the table names an embedder: a family's label, its random-init twin, or a reference."""
    if name in REFERENCE_LABELS:
        return REFERENCE_LABELS[name]
    if name.startswith("random_init_"):
        return f"random-init {lightning_modules.get_family(name.removeprefix('random_init_')).label} encoder"
    return lightning_modules.get_family(name).label


#: embed() precision per embedder, float32 ("32") unless named here. The CA-MAE's passes (trained,
#: random-init, 5 channels) take most of the demo's embedding time; "auto" runs them in
#: bf16 where the CPU or GPU multiplies bf16 natively, which leaves their recall unchanged, and in
#: float32 elsewhere (lightning_modules.hardware). The WSL's embeddings stay float32: TVN amplified
#: their bf16 rounding (docs/runs.md).
EMBED_PRECISION = {"camae": "auto", random_init_name("camae"): "auto"}
#: evaluation batches on which the CA-MAE embeds the channels in reversed order too: its encoder is
#: permutation-equivariant over channels by construction, so a whole pass would recompute the same
#: numbers; the sample measures how equal they are
ORDER_CHECK_BATCHES = 8


@dataclass
class DemoSettings:
    out: Path = Path("runs/demo")
    genes: int = 200
    seed: int = 0
    max_steps: int | None = None  # None: each model's configs/experiments/demo_<model>.yaml budget
    models: tuple[str, ...] = field(default_factory=demo_models)
    overrides: list[str] = field(default_factory=list)  # dotlist applied to every model


@dataclass
class DemoRow:
    """One embedder's scores and what it cost to train."""

    name: str
    result: EvalResult
    steps: int = 0
    crops_seen: int = 0
    train_seconds: float = 0.0
    precision: str = "32"  # of its embed() pass, as resolved for the hardware


def embed_precision(name: str) -> str:
    """'32' or 'bf16': the embedder's EMBED_PRECISION entry resolved for this machine."""
    return resolve_embed_precision(EMBED_PRECISION.get(name, "32"), embedding_device().type)


def demo_eval_config(screen: Screen) -> EvalConfig:
    """Recall against the planted relationships; TVN first (primary), no alignment second.

    Alignment batches are experiments: each holds ~140 control wells, enough for TVN's per-batch
    control covariance (a plate's ~45 are few for 128 dimensions).
    """
    return EvalConfig(
        annotations=[str(screen.relationships)],
        alignment=["tvn", "none"],
        batch_column="experiment",
        benchmarks=["recall", "consistency"],
        clusters=None,
        truth_dir=str(screen.truth),
    )


def run_demo(settings: DemoSettings) -> pl.DataFrame:
    """Everything the demo does; returns the recall table it prints and reports."""
    out = settings.out
    screen = ensure_screen(out / "screen", "demo", genes=settings.genes, seed=settings.seed)
    eval_cfg = demo_eval_config(screen)
    rows: list[DemoRow] = []
    crop = 0
    trained: dict[str, torch.nn.Module] = {}
    embedded: dict[str, Path] = {}
    for name in settings.models:
        overrides = [
            f"data.train_shards={screen.shards}",
            f"run.run_dir={out / name}",
            f"run.seed={settings.seed}",
            *settings.overrides,
        ]
        if settings.max_steps is not None:
            overrides.append(f"trainer.max_steps={settings.max_steps}")
        cfg = load_config(demo_config(name), overrides)
        start = time.perf_counter()
        fitted, model = train(cfg)
        seconds = time.perf_counter() - start
        crop = cfg.model.img_size
        trained[name] = model
        precision = embed_precision(name)
        embeddings = embed_model(
            model, eval_data_config(screen.shards, crop), out / "embeddings" / f"{name}.parquet", precision=precision
        )
        embedded[name] = embeddings
        rows.append(
            DemoRow(
                name,
                score(embeddings, eval_cfg, out / "eval" / name),
                fitted.global_step,
                fitted.global_step * cfg.scaling.effective_batch_size,
                seconds,
                precision,
            )
        )
    references = {"image_stats": ImageStatistics()}
    for name in (m for m in settings.models if lightning_modules.get_family(m).self_supervised):
        cfg = load_config(demo_config(name), [f"data.train_shards={screen.shards}", *settings.overrides])
        torch.manual_seed(settings.seed)
        references[random_init_name(name)] = lightning_modules.build_module(
            cfg.model, cfg.optim, in_chans=len(CHANNELS)
        )
    for name, model in references.items():
        precision = embed_precision(name)
        embeddings = embed_model(
            model.eval(),
            eval_data_config(screen.shards, crop or 64),
            out / "embeddings" / f"{name}.parquet",
            precision=precision,
        )
        rows.append(DemoRow(name, score(embeddings, eval_cfg, out / "eval" / name), precision=precision))
    channels = channel_generalisation(trained.get("camae"), embedded.get("camae"), screen, crop, eval_cfg, out)
    order = channel_order_check(trained.get("camae"), screen, crop)
    blocks = block_scan(trained.get("mae"), embedded.get("mae"), screen, crop, eval_cfg, out)
    table = recall_table(rows)
    write_demo_report(out, table, channels, blocks, settings, order)
    return table


def recall_table(rows: list[DemoRow]) -> pl.DataFrame:
    """One row per embedder (and the oracle): recall with TVN and without, plus training budget."""
    records = []
    for row in rows:
        recall = recall_rows(row.result)
        for source in recall["source"].unique(maintain_order=True):
            part = recall.filter(pl.col("source") == source)
            by_alignment = dict(zip(part["alignment"], part["recall"]))
            records.append(
                {
                    "embedder": label(row.name),
                    "source": source,
                    "recall_none": by_alignment.get("none"),
                    "recall_tvn": by_alignment.get("tvn"),
                    "steps": row.steps,
                    "crops_seen": row.crops_seen,
                    "train_minutes": round(row.train_seconds / 60, 2),
                    "embed_precision": row.precision,
                }
            )
    oracle = rows[0].result.oracle
    if oracle is not None:
        scored = {r["source"] for r in records}
        first = oracle.filter(
            (pl.col("threshold_low") == oracle["threshold_low"].min()) & pl.col("source").is_in(list(scored))
        )
        for source, value in zip(first["source"], first["recall"]):
            records.append(
                {
                    "embedder": label("oracle"),
                    "source": source,
                    "recall_none": value,
                    "recall_tvn": value,
                    "steps": 0,
                    "crops_seen": 0,
                    "train_minutes": 0.0,
                    "embed_precision": None,
                }
            )
    return pl.DataFrame(records)


def channel_generalisation(
    camae: torch.nn.Module | None, as_trained: Path | None, screen: Screen, crop: int, eval_cfg: EvalConfig, out: Path
) -> pl.DataFrame:
    """CA-MAE recall on all 6 channels and a 5-channel subset (no retraining).

    The 6-channel row scores `as_trained`, the CA-MAE's own embeddings, instead of embedding again;
    each row names the embeddings file it scored.
    """
    if camae is None:
        return pl.DataFrame()
    variants = {"6 channels (as trained)": None, "5 channels (last dropped)": list(CHANNELS[:-1])}
    records = []
    for label, channels in variants.items():
        if channels is None:
            embeddings = as_trained
        else:
            path = out / "embeddings" / f"camae_{len(channels)}ch_{'_'.join(c[:3] for c in channels)}.parquet"
            embeddings = embed_model(
                camae,
                eval_data_config(screen.shards, crop, channels=channels),
                path,
                precision=embed_precision("camae"),
            )
        for r in recall_rows(score(embeddings, eval_cfg)).iter_rows(named=True):
            records.append({"channels": label, "embeddings": str(embeddings), **r})
    return pl.DataFrame(records)


def channel_order_check(camae: torch.nn.Module | None, screen: Screen, crop: int) -> dict[str, float] | None:
    """The CA-MAE's embeddings of the first ORDER_CHECK_BATCHES evaluation batches with the stains in
    reversed order against the original order: relative difference overall and of the worst crop."""
    if camae is None:
        return None
    device = embedding_device()
    bf16 = embed_precision("camae") == "bf16"
    loader = datamodules.build_datamodule(eval_data_config(screen.shards, crop)).eval_dataloader()
    original, reversed_order = [], []
    model = camae.to(device).eval()
    with torch.inference_mode():
        for batch in itertools.islice(loader, ORDER_CHECK_BATCHES):
            original.append(embed_batch(model, batch["image"], device, bf16).double().cpu())
            reversed_order.append(embed_batch(model, batch["image"].flip(1), device, bf16).double().cpu())
    a, b = torch.cat(original), torch.cat(reversed_order)
    per_crop = (b - a).norm(dim=1) / a.norm(dim=1)
    return {
        "crops": len(a),
        "relative_difference": float((b - a).norm() / a.norm()),
        "worst_crop_relative_difference": float(per_crop.max()),
    }


def block_scan(
    mae: torch.nn.Module | None, as_trained: Path | None, screen: Screen, crop: int, eval_cfg: EvalConfig, out: Path
) -> pl.DataFrame:
    """MAE recall from every encoder block's output (Phenom-2 picks an intermediate block).

    The block the MAE embeds with by default scores `as_trained`, its own embeddings.
    """
    if mae is None:
        return pl.DataFrame()
    records = []
    for block in range(mae.num_blocks):
        if block == mae.resolve_block(None):
            embeddings = as_trained
        else:
            path = out / "embeddings" / f"mae_block{block}.parquet"
            embeddings = embed_model(mae, eval_data_config(screen.shards, crop), path, block=block)
        for r in recall_rows(score(embeddings, eval_cfg)).iter_rows(named=True):
            records.append({"block": block, **r})
    return pl.DataFrame(records)
