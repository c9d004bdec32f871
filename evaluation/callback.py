"""EFAARCallback: online biological evaluation during training (solo-learn style).

Every `every_n_epochs` training epochs: embed the evaluation DataModule with the model's
`embed()` (eval mode, no grad), average crops per site, align, aggregate, relate, benchmark, and
log `eval/recall_<source>`, `eval/recall_mean`, `eval/consistency`, ... Under DDP each rank
embeds its own share of the sites; the per-site sums are gathered (padded to equal length, as
collectives need equal shapes), rank 0 evaluates, and the metrics are broadcast so every rank
logs identical values. Rank 0 failing is broadcast too, so no rank waits forever.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import lightning as L
import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from evaluation.config import EvalConfig
from evaluation.embeddings_io import embeddings_frame
from evaluation.pipeline import EvalResult, run_efaar

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """NCCL collectives need CUDA tensors; gloo (CPU, the tests) takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's (index, values) rows; sizes differ per rank, so pad then trim."""
    if not _distributed():
        return index, values
    device = _collective_device()
    index, values = index.to(device), values.to(device)
    size = torch.tensor([len(index)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    pad = longest - len(index)
    padded_index = torch.cat([index, index.new_full((pad,), -1)])
    padded_values = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
    all_index = [torch.empty_like(padded_index) for _ in sizes]
    all_values = [torch.empty_like(padded_values) for _ in sizes]
    dist.all_gather(all_index, padded_index)
    dist.all_gather(all_values, padded_values)
    keep = [slice(0, int(s.item())) for s in sizes]
    return (torch.cat([i[k] for i, k in zip(all_index, keep)]).cpu(),
            torch.cat([v[k] for v, k in zip(all_values, keep)]).cpu())


def _site_means(site: torch.Tensor, embedding: torch.Tensor, n_sites: int) -> tuple[np.ndarray, np.ndarray]:
    """(site rows present, mean embedding per site) from crop-level rows, float64 accumulation."""
    sums = torch.zeros((n_sites, embedding.shape[1]), dtype=torch.float64)
    counts = torch.zeros(n_sites, dtype=torch.float64)
    sums.index_add_(0, site, embedding.double())
    counts.index_add_(0, site, torch.ones(len(site), dtype=torch.float64))
    present = torch.nonzero(counts > 0).squeeze(1)
    return present.numpy(), (sums[present] / counts[present, None]).float().numpy()


class EFAARCallback(L.Callback):
    """Evaluate `eval_datamodule` every `cfg.every_n_epochs` epochs and log `eval/*` metrics."""

    def __init__(self, eval_datamodule: Any, cfg: Optional[EvalConfig] = None, prefix: str = "eval") -> None:
        super().__init__()
        for needed in ("manifest", "eval_dataloader"):
            if not hasattr(eval_datamodule, needed):
                raise TypeError(f"eval_datamodule needs `{needed}` (docs/ARCHITECTURE.md, Batches)")
        self.datamodule = eval_datamodule
        self.cfg = cfg or EvalConfig()
        self.prefix = prefix
        self.last_results: dict[Optional[int], EvalResult] = {}  # rank 0 only: block -> result
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
        crops = self._embed(pl_module, blocks)
        rank0 = not _distributed() or dist.get_rank() == 0
        payload: list[Any] = [None]
        gathered = [_gather_rows(*crops[b]) for b in blocks]
        if rank0:
            try:
                payload[0] = self._score(blocks, gathered)
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                payload[0] = err
        if _distributed():
            dist.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], Exception):
            raise RuntimeError(f"EFAAR evaluation failed on rank 0: {payload[0]}") from payload[0]
        self.last_metrics = payload[0]
        return payload[0]

    def _embed(self, pl_module: L.LightningModule, blocks: list[Optional[int]]):
        was_training = pl_module.training
        pl_module.eval()
        sites, outputs = [], {b: [] for b in blocks}
        try:
            with torch.no_grad():
                # None: no bar when stderr is not a terminal (a batch job's log), as the training bar
                quiet = True if _distributed() and dist.get_rank() != 0 else None
                for batch in tqdm(self.datamodule.eval_dataloader(), desc="EFAAR embed", disable=quiet, leave=False):
                    images = batch["image"].to(pl_module.device)
                    sites.append(batch["site_index"].to(torch.int64).cpu())
                    for b in blocks:
                        emb = pl_module.embed(images, pooling=self.cfg.pooling, block=b)
                        outputs[b].append(emb.detach().float().cpu())
        finally:
            pl_module.train(was_training)
        index = torch.cat(sites) if sites else torch.zeros(0, dtype=torch.int64)
        width = {b: (outputs[b][0].shape[1] if outputs[b] else 0) for b in blocks}
        if _distributed():  # a rank with no batch still has to take part with the right width
            for b in blocks:
                w = torch.tensor([width[b]], device=_collective_device())
                dist.all_reduce(w, op=dist.ReduceOp.MAX)
                width[b] = int(w.item())
        return {b: (index, torch.cat(outputs[b]) if outputs[b] else torch.zeros((0, width[b]))) for b in blocks}

    def _score(self, blocks, gathered) -> dict[str, float]:
        manifest: pl.DataFrame = self.datamodule.manifest
        self.last_results = {}
        for b, (site, emb) in zip(blocks, gathered):
            if len(site) == 0:
                raise ValueError("the evaluation dataloader yielded no sites")
            present, means = _site_means(site, emb, manifest.height)
            frame = embeddings_frame(manifest[present], means)
            self.last_results[b] = run_efaar(frame, self.cfg)
        return block_metrics(self.last_results)


def block_metrics(results: dict[Optional[int], EvalResult]) -> dict[str, float]:
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
