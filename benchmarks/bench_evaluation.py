"""Evaluation speed and memory against the peers, on the same inputs, in the same run.

Cases (each side in its own child process; peak memory = the child's VmHWM, from benchmarks.harness.run_isolated):
  * TVN on 200,000 wells x 384 dims in 50 batches: ours vs efaar_benchmarking.tvn_on_controls
  * known-relationship recall, five real sources, 20,000-gene x 384 map: ours vs efaar
    known_relationship_benchmark (which holds the N x N similarity matrix)
  * exact recall on a 100,000-gene map (ours only; target < 5 min within 24 GB)
  * retrieval mAP on 20,000 profiles (4 replicates per perturbation, 5% control wells as the
    negatives, JUMP's phenotypic-activity setting): ours vs copairs (average_precision +
    mean_average_precision; copairs expresses "negatives are controls" as neg_diffby=[label, is_ref]).
    With negatives = every other profile copairs materialises ~2e8 pairs (>13 GB here), too much
    for this shared machine.
Sizes scale with PHENOSCALE_BENCH_EVAL_SCALE (default 1; e.g. 0.25 on a busy machine) and the
large map with PHENOSCALE_BENCH_EVAL_LARGE (genes, default 100000). Inputs come from
evaluation.toy (seeded), gene names from the real annotation files (padded with synthetic names).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import Measurement, run_isolated

REPO = Path(__file__).resolve().parents[1]
SCALE = float(os.environ.get("PHENOSCALE_BENCH_EVAL_SCALE", "1"))
LARGE = int(os.environ.get("PHENOSCALE_BENCH_EVAL_LARGE", "100000"))
DIM = 384
PRELUDE = f"""
import sys, time, json, numpy as np
sys.path.insert(0, {str(REPO)!r})
"""


def _child(code: str) -> dict:
    return run_isolated(PRELUDE + code, timeout=3600)


def _gene_names(n: int) -> np.ndarray:
    from evaluation.annotations import SOURCES, annotations_dir, load_relationships

    genes: set[str] = set()
    for source in SOURCES:
        rels = load_relationships(annotations_dir() / f"{source}.txt")
        genes |= set(rels["entity1"].to_list()) | set(rels["entity2"].to_list())
    real = np.array(sorted(genes))[:n]
    return np.concatenate([real, np.array([f"SYN{i:06d}" for i in range(n - len(real))])])


def _map_file(tmp: Path, n_genes: int, name: str) -> Path:
    """A seeded (genes, profiles) map saved as .npz: module structure from evaluation.toy."""
    from evaluation.embeddings_io import embedding_matrix
    from evaluation.toy import toy_screen

    genes = _gene_names(n_genes)
    rng = np.random.default_rng(0)
    genes = genes[rng.permutation(len(genes))]  # modules mix real and synthetic names
    screen = toy_screen(genes, dim=DIM, wells_per_gene=1, controls_per_batch=2, n_batches=1, seed=1)
    x = embedding_matrix(screen)[: len(genes)]
    path = tmp / f"{name}.npz"
    np.savez(path, genes=genes, profiles=x)
    return path


def _time_and_memory(
    what: str,
    ours: dict,
    peer: dict,
    peer_name: str,
    *,
    faster: float | None,
    less_memory: float | None,
    extra: dict,
) -> list[Measurement]:
    """`what` time and peak memory against the peer's, each a ratio target (None: reported only)."""
    common = {"baseline_name": peer_name, "lower_is_better": True, "extra": extra}
    return [
        Measurement.versus(
            f"{what} time", ours["seconds"], "s", baseline_value=peer["seconds"], at_least=faster, of="faster", **common
        ),
        Measurement.versus(
            f"{what} peak memory",
            ours["peak_gb"],
            "GB",
            baseline_value=peer["peak_gb"],
            at_least=less_memory,
            of="less memory",
            **common,
        ),
    ]


def bench_tvn(tmp: Path) -> list[Measurement]:
    from evaluation.embeddings_io import embedding_matrix
    from evaluation.toy import toy_screen

    n_genes = int(9000 * SCALE)
    screen = toy_screen(n_genes, dim=DIM, wells_per_gene=20, controls_per_batch=int(400 * SCALE), n_batches=50, seed=2)
    np.save(tmp / "tvn_x.npy", embedding_matrix(screen))
    screen.drop("embedding").write_parquet(tmp / "tvn_meta.parquet")
    load = f"""
import polars as pl
x = np.load({str(tmp / "tvn_x.npy")!r}); meta = pl.read_parquet({str(tmp / "tvn_meta.parquet")!r})
"""
    ours = _child(
        load
        + f"""
from evaluation.align import tvn
ctrl, batches = meta['is_control'].to_numpy(), meta['experiment'].to_numpy()
t = time.perf_counter(); out = tvn(x, ctrl, batches); seconds = time.perf_counter() - t
np.save({str(tmp / "tvn_ours.npy")!r}, out); print(json.dumps({{'seconds': seconds}}))
"""
    )
    peer = _child(
        load
        + f"""
from efaar_benchmarking.efaar import tvn_on_controls
from evaluation.toy import CONTROL
md = meta.to_pandas()
t = time.perf_counter()
out = tvn_on_controls(x, md, 'perturbation', CONTROL, 'experiment')
seconds = time.perf_counter() - t
np.save({str(tmp / "tvn_peer.npy")!r}, out); print(json.dumps({{'seconds': seconds}}))
"""
    )
    diff = float(np.abs(np.load(tmp / "tvn_ours.npy").astype(np.float64) - np.load(tmp / "tvn_peer.npy")).max())
    extra = {
        "wells": len(screen),
        "dims": DIM,
        "batches": 50,
        "max_abs_diff_vs_efaar": diff,
        "peak_gb": ours["peak_gb"],
        "peer_peak_gb": peer["peak_gb"],
    }
    return [
        *_time_and_memory("tvn", ours, peer, "efaar tvn_on_controls", faster=10, less_memory=None, extra=extra),
    ]


def _recall_child(map_path: Path, out: Path) -> str:
    return f"""
from evaluation.annotations import SOURCES, load_sources, pairs_in_map
from evaluation.benchmarks.recall import known_relationship_recall
data = np.load({str(map_path)!r}); genes, x = data['genes'], data['profiles']
t = time.perf_counter()
sources = load_sources(list(SOURCES))
result = known_relationship_recall(genes, x, {{s: pairs_in_map(r, genes) for s, r in sources.items()}})
seconds = time.perf_counter() - t
result.write_parquet({str(out)!r}); print(json.dumps({{'seconds': seconds}}))
"""


def bench_recall(tmp: Path) -> list[Measurement]:
    import polars as pl

    n_genes = int(20000 * SCALE)
    map_path = _map_file(tmp, n_genes, "map20k")
    ours = _child(_recall_child(map_path, tmp / "recall_ours.parquet"))
    peer = _child(f"""
import pandas as pd
from sklearn.utils import Bunch
from efaar_benchmarking.benchmarking import known_relationship_benchmark
from evaluation.annotations import annotations_dir
data = np.load({str(map_path)!r}); genes, x = data['genes'], data['profiles']
t = time.perf_counter()
res = known_relationship_benchmark(Bunch(features=pd.DataFrame(x), metadata=pd.DataFrame({{'g': genes}})), 'g',
                                   benchmark_data_dir=str(annotations_dir()))
seconds = time.perf_counter() - t
res.to_csv({str(tmp / "recall_peer.csv")!r}, index=False); print(json.dumps({{'seconds': seconds}}))
""")
    mine = pl.read_parquet(tmp / "recall_ours.parquet")
    theirs = pl.read_csv(tmp / "recall_peer.csv")
    diffs = []
    for row in theirs.iter_rows(named=True):
        for low, high in [(0.05, 0.95), (0.1, 0.9)]:
            value = mine.filter((pl.col("source") == row["source"]) & (pl.col("threshold_low") == low))["recall"][0]
            diffs.append(abs(value - row[f"recall_{low}_{high}"]))
    extra = {
        "genes": n_genes,
        "dims": DIM,
        "max_abs_recall_diff_vs_efaar": max(diffs),
        "recall": dict(
            zip(
                mine.filter(pl.col("threshold_low") == 0.05)["source"],
                mine.filter(pl.col("threshold_low") == 0.05)["recall"],
            )
        ),
        "peak_gb": ours["peak_gb"],
        "peer_peak_gb": peer["peak_gb"],
    }
    return [
        *_time_and_memory(
            "recall 5 sources", ours, peer, "efaar known_relationship_benchmark", faster=5, less_memory=5, extra=extra
        ),
    ]


def bench_large_recall(tmp: Path) -> list[Measurement]:
    map_path = _map_file(tmp, LARGE, "map_large")
    ours = _child(_recall_child(map_path, tmp / "recall_large.parquet"))
    extra = {"genes": LARGE, "dims": DIM, "null_pairs": LARGE * (LARGE - 1) // 2, "peak_gb": ours["peak_gb"]}
    met = ours["seconds"] < 300 and ours["peak_gb"] < 24
    return [
        Measurement(
            name=f"exact recall {LARGE} genes time",
            value=ours["seconds"],
            unit="s",
            target="< 300 s within 24 GB",
            met=met,
            extra=extra,
        )
    ]


def bench_map(tmp: Path) -> list[Measurement]:
    from evaluation.embeddings_io import embedding_matrix
    from evaluation.toy import toy_screen

    n_profiles = int(20000 * SCALE)
    controls_per_batch = n_profiles // 80  # 5% controls over 4 batches, the rest 4 replicates per perturbation
    screen = toy_screen(
        (n_profiles - 4 * controls_per_batch) // 4,
        dim=DIM,
        wells_per_gene=4,
        controls_per_batch=controls_per_batch,
        n_batches=4,
        seed=3,
    )
    np.save(tmp / "map_x.npy", embedding_matrix(screen))
    np.save(tmp / "map_labels.npy", screen["perturbation"].to_numpy().astype(str))
    load = f"x = np.load({str(tmp / 'map_x.npy')!r}); labels = np.load({str(tmp / 'map_labels.npy')!r})\n"
    ours = _child(
        load
        + f"""
from evaluation.benchmarks.retrieval import average_precision, mean_average_precision
from evaluation.toy import CONTROL
t = time.perf_counter(); ap = average_precision(labels, x, reference=labels == CONTROL)
scores = mean_average_precision(ap, 1000)
seconds = time.perf_counter() - t
scores.write_parquet({str(tmp / "map_ours.parquet")!r}); print(json.dumps({{'seconds': seconds}}))
"""
    )
    peer = _child(
        load
        + f"""
import pandas as pd
from copairs.map import average_precision, mean_average_precision
from evaluation.toy import CONTROL
meta = pd.DataFrame({{'label': labels, 'is_ref': (labels == CONTROL).astype(int)}})
t = time.perf_counter()
ap = average_precision(meta, x, ['label'], [], [], ['label', 'is_ref'], progress_bar=False)
scores = mean_average_precision(ap, ['label'], null_size=1000, threshold=0.05, seed=0, progress_bar=False,
                                cache_dir={str(tmp / "copairs_cache")!r})
seconds = time.perf_counter() - t
scores[['label', 'mean_average_precision', 'p_value']].to_csv({str(tmp / "map_peer.csv")!r}, index=False)
print(json.dumps({{'seconds': seconds}}))
"""
    )
    import polars as pl

    merged = pl.read_parquet(tmp / "map_ours.parquet").join(pl.read_csv(tmp / "map_peer.csv"), on="label")
    diff = float((merged["mean_average_precision"] - merged["mean_average_precision_right"]).abs().max())
    extra = {
        "profiles": len(screen),
        "dims": DIM,
        "labels": len(merged),
        "max_abs_map_diff_vs_copairs": diff,
        "peak_gb": ours["peak_gb"],
        "peer_peak_gb": peer["peak_gb"],
    }
    return [
        *_time_and_memory("mAP", ours, peer, "copairs", faster=5, less_memory=None, extra=extra),
    ]


CASES = {"tvn": bench_tvn, "recall": bench_recall, "map": bench_map, "large": bench_large_recall}
SELECTED = os.environ.get("PHENOSCALE_BENCH_EVAL_CASES", ",".join(CASES)).split(",")


def run() -> list[Measurement]:
    measurements: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        for name, case in CASES.items():
            if name not in SELECTED:
                continue
            results = case(Path(tmp))
            for m in results:
                print(
                    f"   {m.name}: {m.value:.4g} {m.unit} vs {m.baseline_value} ({m.baseline_name}) "
                    f"{json.dumps(m.extra)[:300]}",
                    flush=True,
                )
            measurements += results
    return measurements
