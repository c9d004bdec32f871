"""Cross-checks against the peer libraries on identical inputs.

efaar_benchmarking 1.0 (centre-scale, TVN, aggregation, recall, consistency, energy distance,
CORUM clusters) and copairs 0.5 (mAP on the real LINCS plate SQ00015054) both run here, so the
references are computed live; nothing is hard-coded.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.utils import Bunch

efaar = pytest.importorskip("efaar_benchmarking.efaar")
efaar_bench = pytest.importorskip("efaar_benchmarking.benchmarking")
copairs_map = pytest.importorskip("copairs.map")

from evaluation.aggregate import aggregate  # noqa: E402
from evaluation.align import centerscale_on_controls, tvn  # noqa: E402
from evaluation.annotations import SOURCES, load_clusters, load_relationships, pairs_in_map  # noqa: E402
from evaluation.benchmarks.clusters import cluster_benchmark  # noqa: E402
from evaluation.benchmarks.perturbation import energy_distance, mean_pairwise_cosine  # noqa: E402
from evaluation.benchmarks.recall import known_relationship_recall  # noqa: E402
from evaluation.benchmarks.retrieval import average_precision, mean_average_precision  # noqa: E402
from evaluation.embeddings_io import embedding_matrix  # noqa: E402
from evaluation.relate import l2_normalised  # noqa: E402
from evaluation.toy import CONTROL, toy_screen  # noqa: E402

PLATE = "profiles/cytominer_eval/SQ00015054_normalized_feature_select.csv.gz"


def _screen(genes, dim=24, **kwargs):
    screen = toy_screen(genes, dim=dim, **kwargs)
    x = embedding_matrix(screen).astype(np.float64)
    meta = screen.drop("embedding").to_pandas()
    return x, meta


@pytest.mark.parametrize("batch_col", [None, "experiment"])
def test_centerscale_and_tvn_match_efaar(batch_col):
    x, meta = _screen(150, dim=24, controls_per_batch=60, seed=1)
    batches = None if batch_col is None else meta[batch_col].to_numpy()
    ctrl = meta["is_control"].to_numpy()
    ref_cs = efaar.centerscale_on_controls(x, meta, "perturbation", CONTROL, batch_col)
    ref_tvn = efaar.tvn_on_controls(x, meta, "perturbation", CONTROL, batch_col)
    np.testing.assert_allclose(centerscale_on_controls(x, ctrl, batches), ref_cs, atol=1e-6, rtol=0)
    np.testing.assert_allclose(tvn(x, ctrl, batches), ref_tvn, atol=1e-6, rtol=0)
    assert np.abs(ref_tvn).max() > 1  # not a trivially small output


def test_tvn_float32_input_stays_close_to_float64():
    x, meta = _screen(100, dim=16, controls_per_batch=40, seed=2)
    ctrl, batches = meta["is_control"].to_numpy(), meta["experiment"].to_numpy()
    out32 = tvn(x.astype(np.float32), ctrl, batches)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, tvn(x, ctrl, batches), atol=1e-4)


@pytest.fixture(scope="module")
def real_sources(shared_data):
    return {s: load_relationships(shared_data / "annotations" / f"{s}.txt") for s in SOURCES}


@pytest.mark.parametrize("method", ["mean", "median"])
def test_aggregation_and_recall_match_efaar_on_real_annotations(shared_data, real_sources, method):
    corum = real_sources["CORUM"]
    genes = np.unique(np.concatenate([corum["entity1"].to_numpy()[:300], corum["entity2"].to_numpy()[:300]]))
    x, meta = _screen(genes, dim=16, seed=3, module_size=6)
    x = efaar.centerscale_on_controls(x, meta, "perturbation", CONTROL, "experiment")
    ref = efaar.aggregate(x, meta, "perturbation", [CONTROL], method)
    frame, profiles = aggregate(meta["perturbation"].to_numpy(), x, meta["is_control"].to_numpy(), method)
    assert frame["perturbation"].to_list() == ref.metadata["perturbation"].tolist()
    np.testing.assert_allclose(profiles, ref.features.to_numpy(), atol=1e-6)

    map_genes = frame["perturbation"].to_numpy()
    pairs = {s: pairs_in_map(r, map_genes) for s, r in real_sources.items()}
    ours = known_relationship_recall(map_genes, profiles, pairs)
    reference = efaar_bench.known_relationship_benchmark(
        Bunch(features=pd.DataFrame(profiles), metadata=pd.DataFrame({"perturbation": map_genes})),
        "perturbation",
        benchmark_data_dir=str(shared_data / "annotations"),
    )
    assert len(reference) >= 4  # several real sources overlap the map
    for row in reference.to_dict("records"):
        mine = ours.filter(pl.col("source") == row["source"])
        assert mine["n_pairs"][0] == row["query_distribution_size"]
        assert mine["n_null"][0] == row["null_distribution_size"]
        for low, high in [(0.05, 0.95), (0.1, 0.9)]:
            value = mine.filter(pl.col("threshold_low") == low)["recall"][0]
            assert value == pytest.approx(row[f"recall_{low}_{high}"], abs=1e-6)


def test_consistency_and_energy_distance_match_efaar():
    rng = np.random.default_rng(4)
    replicates, controls = rng.normal(size=(7, 20)) + 0.5, rng.normal(size=(80, 20))
    assert mean_pairwise_cosine(l2_normalised(replicates)) == pytest.approx(
        efaar_bench.pert_signal_consistency_metric(replicates), abs=1e-6
    )
    assert energy_distance(replicates, controls) == pytest.approx(
        efaar_bench.pert_signal_magnitude_metric(replicates, controls), abs=1e-9
    )


def test_cluster_benchmark_matches_efaar_on_real_corum(shared_data, capsys):
    clusters = load_clusters(shared_data / "annotations" / "CORUM_clusters.tsv")
    genes = np.array(sorted({g for members in list(clusters.values())[:400] for g in members}))
    profiles = np.random.default_rng(5).normal(size=(len(genes), 12)).astype(np.float32)
    ours = cluster_benchmark(genes, profiles, clusters).to_pandas()
    ref = efaar_bench.cluster_benchmark(
        Bunch(features=pd.DataFrame(profiles), metadata=pd.DataFrame({"g": genes})),
        "g",
        benchmark_data_dir=str(shared_data / "annotations"),
    )
    merged = ref.merge(ours, on="cluster")
    assert len(merged) == len(ref) == len(ours) > 20
    np.testing.assert_allclose(merged["ks_stat_x"], merged["ks_stat_y"], atol=1e-6)
    np.testing.assert_allclose(merged["ks_pval"], merged["ks_pvalue"], atol=1e-6)
    np.testing.assert_allclose(merged["within_cossim_mean"], merged["within_mean"], atol=1e-6)


@pytest.fixture(scope="module")
def plate(shared_data):
    df = pd.read_csv(shared_data / PLATE)
    meta = df[[c for c in df.columns if c.startswith("Metadata_")]].copy()
    meta["Metadata_broad_sample"] = meta["Metadata_broad_sample"].fillna("DMSO")
    features = df[[c for c in df.columns if not c.startswith("Metadata_")]].to_numpy(np.float64)
    return meta, features


def assert_same_ap(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Equal to float rounding, except where two cosine similarities nearly tie: summed in another
    order (another thread count) they can swap ranks, moving one AP by ~1e-5 (seen once in 384
    with OMP_NUM_THREADS=1)."""
    diff = np.abs(ours - theirs)
    assert diff.max() < 1e-4
    assert (diff < 1e-6).mean() > 0.99


def test_map_matches_copairs_on_real_plate_grouped_by_compound(plate):
    meta, features = plate
    column = "Metadata_broad_sample"
    ref_ap = copairs_map.average_precision(meta, features, [column], [], [], [column], progress_bar=False)
    ours = average_precision(meta[column].to_numpy(), features)
    assert len(ours) == ref_ap["average_precision"].notna().sum() == 384
    assert_same_ap(ours["average_precision"].to_numpy(), ref_ap["average_precision"].to_numpy()[ours["row"].to_numpy()])
    np.testing.assert_array_equal(ours["n_total_pairs"].to_numpy(), ref_ap["n_total_pairs"].to_numpy())
    ref_map = copairs_map.mean_average_precision(
        ref_ap, [column], null_size=5000, threshold=0.05, seed=0, progress_bar=False
    )
    merged = ref_map.merge(mean_average_precision(ours, null_size=5000).to_pandas(), left_on=column, right_on="label")
    assert len(merged) == 59  # 58 compounds + DMSO
    np.testing.assert_allclose(merged["mean_average_precision_x"], merged["mean_average_precision_y"], atol=1e-5)
    # p-values are Monte Carlo estimates of the same null (different random draws): close, not equal
    assert np.abs(merged["p_value_x"] - merged["p_value_y"]).max() < 0.02


def test_map_against_controls_matches_copairs(plate):
    """JUMP phenotypic activity: negatives are the DMSO wells only (copairs via neg_diffby on a reference flag)."""
    meta, features = plate
    meta = meta.assign(is_ref=(meta["Metadata_broad_sample"] == "DMSO").astype(int))
    column = "Metadata_broad_sample"
    ref_ap = copairs_map.average_precision(meta, features, [column], [], [], [column, "is_ref"], progress_bar=False)
    ours = average_precision(meta[column].to_numpy(), features, reference=meta["is_ref"].to_numpy() == 1)
    assert len(ours) == 384 - 24
    assert_same_ap(ours["average_precision"].to_numpy(), ref_ap["average_precision"].to_numpy()[ours["row"].to_numpy()])
    assert (ours["n_total_pairs"].to_numpy() == ref_ap["n_total_pairs"].to_numpy()[ours["row"].to_numpy()]).all()
