"""EFAARCallback: online biological evaluation during training (solo-learn style).

Every `every_n_epochs` training epochs: embed the evaluation DataModule with the model's
`embed()` (eval mode, no grad), average crops per site, align, aggregate, relate, benchmark, and
log `eval/recall_<source>`, `eval/recall_mean`, `eval/consistency`, ... Under DDP each rank
embeds its own share of the sites with the pass `phenoscale embed` uses
(evaluation.site_embedding); the ranks' per-site sums reach rank 0 in one gather, rank 0
evaluates, and the metrics are broadcast so every rank logs identical values. Rank 0 failing is
broadcast too, so no rank waits forever.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import polars as pl
import torch.distributed as dist

from evaluation.config import EvalConfig
from evaluation.pipeline import EvalResult, run_efaar
from evaluation.site_embedding import SiteSums, part_frame, rank_site_sums

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EFAARCallback(L.Callback):
    """Evaluate `eval_datamodule` every `cfg.every_n_epochs` epochs and log `eval/*` metrics."""

    def __init__(self, eval_datamodule: Any, cfg: EvalConfig | None = None, prefix: str = "eval") -> None:
        super().__init__()
        for needed in ("manifest", "eval_dataloader"):
            if not hasattr(eval_datamodule, needed):
                raise TypeError(f"eval_datamodule needs `{needed}` (docs/ARCHITECTURE.md, Batches)")
        self.datamodule = eval_datamodule
        self.cfg = cfg or EvalConfig()
        self.prefix = prefix
        self.last_results: dict[int | None, EvalResult] = {}  # rank 0 only: block -> result
        self.last_metrics: dict[str, float] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.cfg.every_n_epochs:
            return
        metrics = self.evaluate(pl_module)
        for name, value in metrics.items():
            pl_module.log(f"{self.prefix}/{name}", value, sync_dist=False, rank_zero_only=False)

    def evaluate(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Embed, gather, evaluate on rank 0, broadcast; returns the metrics every rank will log."""
        blocks = list(self.cfg.blocks) if self.cfg.blocks else [None]
        rank0 = not _distributed() or dist.get_rank() == 0
        sites = self._embed(pl_module, blocks, progress=rank0)
        parts: list[Any] = [sites]
        if _distributed():  # the one reduction: every rank's sums to rank 0
            parts = [None] * dist.get_world_size() if rank0 else None
            dist.gather_object(sites, parts, dst=0)
        payload: list[Any] = [None]
        if rank0:
            try:
                payload[0] = self._score(blocks, SiteSums.combine(parts))
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                payload[0] = err
        if _distributed():
            dist.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], Exception):
            raise RuntimeError(f"EFAAR evaluation failed on rank 0: {payload[0]}") from payload[0]
        self.last_metrics = payload[0]
        return payload[0]

    def _embed(self, pl_module: L.LightningModule, blocks: list[int | None], progress: bool) -> SiteSums:
        was_training = pl_module.training
        pl_module.eval()
        try:
            return rank_site_sums(
                pl_module,
                self.datamodule.eval_dataloader(),
                pl_module.device,
                self.cfg.pooling,
                blocks,
                progress=progress,
            )
        finally:
            pl_module.train(was_training)

    def _score(self, blocks: list[int | None], sites: SiteSums) -> dict[str, float]:
        if len(sites.rows) == 0:
            raise ValueError("the evaluation dataloader yielded no sites")
        manifest: pl.DataFrame = self.datamodule.manifest
        self.last_results = {b: run_efaar(part_frame(manifest, sites, b), self.cfg) for b in blocks}
        return block_metrics(self.last_results)


def block_metrics(results: dict[int | None, EvalResult]) -> dict[str, float]:
    """Loggable metrics: the best block's (by recall_mean) unprefixed, each block's as `block<i>/...`.

    None values (benchmarks that could not be computed) are left out: a logger has no "missing",
    and logging 0 would pretend a result.
    """
    summaries = {b: r.summary() for b, r in results.items()}
    if len(summaries) == 1:
        return {k: v for k, v in next(iter(summaries.values())).items() if v is not None}
    ranked = [(s.get("recall_mean") if s.get("recall_mean") is not None else -1.0, b) for b, s in summaries.items()]
    best = max(ranked, key=lambda t: t[0])[1]
    out = {k: v for k, v in summaries[best].items() if v is not None}
    out["best_block"] = float(best)
    for b, s in summaries.items():
        out.update({f"block{b}/{k}": v for k, v in s.items() if v is not None})
    return out
