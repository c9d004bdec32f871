"""The synthetic screen: deterministic, consistent with its truth, and carrying real, measurable
structure (planted modules visible in morphology after self-standardisation; batch effects
visible in control wells and removed by per-plate alignment on controls)."""

from __future__ import annotations

import csv
import itertools
import json
import tarfile

import numpy as np
import polars as pl
import pytest
from scipy.ndimage import gaussian_filter, maximum_filter

from datamodules import read_manifest
from datamodules.shards import decode_npy
from datamodules.synthetic import (
    AXES,
    CHANNELS,
    SCREEN_JSON,
    Optics,
    ScreenConfig,
    design_screen,
    in_cell_stain_correlation,
    preset,
    read_truth,
    render_site,
    write_screen,
)
from phenoscale.cli import main as cli_main
from real_field import PEDIATRIC_STAINS, pediatric_field

TINY = dict(
    genes=24,
    image_size=48,
    cell_radius=6.0,
    experiments=3,
    replicates=2,
    sites_per_well=1,
    module_size_min=3,
    module_size_max=4,
    controls_per_plate=8,
)
PLAIN = Optics(gain=np.ones(6), offset=np.full(6, 0.02), blur=0.0, illum_amp=0.0, illum_angle=0.0, vignette=0.0)


def load_images(shard_dir) -> dict[str, np.ndarray]:
    images = {}
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".npy"):
                    images[member.name[:-4]] = decode_npy(tar.extractfile(member).read())
    return images


@pytest.fixture(scope="module")
def tiny_screen(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "tiny"
    write_screen(preset("demo", **TINY), out, workers=1, progress=False)
    return out


# ---------------------------------------------------------------- determinism and layout
def test_same_seed_same_bytes_whatever_the_workers(tiny_screen, tmp_path):
    write_screen(preset("demo", **TINY), tmp_path / "again", workers=2, progress=False)
    a, b = load_images(tiny_screen / "shards"), load_images(tmp_path / "again" / "shards")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert read_manifest(tiny_screen / "shards").equals(read_manifest(tmp_path / "again" / "shards"))
    other = design_screen(preset("demo", **{**TINY, "seed": 1}))
    assert not other.phenotypes.equals(design_screen(preset("demo", **TINY)).phenotypes)


def test_manifest_matches_truth_and_contract(tiny_screen):
    manifest = read_manifest(tiny_screen / "shards")
    truth = read_truth(tiny_screen / "truth")
    images = load_images(tiny_screen / "shards")
    assert set(manifest["key"]) == set(images)
    image = images[manifest["key"][0]]
    assert image.shape == (6, 48, 48) and image.dtype == np.uint8
    assert manifest["channels"][0].to_list() == list(CHANNELS)
    genes = set(manifest.filter(~pl.col("is_control"))["perturbation"])
    assert genes == set(truth.phenotypes["perturbation"]) and len(genes) == 24
    assert set(manifest.filter(pl.col("is_control"))["perturbation"]) == {"non-targeting"}
    assert set(manifest["perturbation_type"]) == {"gene", "control"}
    # relationships: every within-module pair in both orders, nothing else, no self pairs
    expected = {
        (a, b)
        for _, members in truth.modules.group_by("module")
        for a, b in itertools.permutations(members["gene"].to_list(), 2)
    }
    got = set(truth.relationships.iter_rows())
    assert got == expected and all(a != b for a, b in got)
    roles = dict(truth.phenotypes.group_by("role").len().iter_rows())
    assert roles == {"null": round(24 * 0.4), "singleton": round(24 * 0.1), "module": 24 - 12}
    latent = truth.phenotypes["latent"].to_numpy()
    null = (truth.phenotypes["role"] == "null").to_numpy()
    assert latent.shape == (24, len(AXES)) and np.all(latent[null] == 0)
    assert np.all(np.linalg.norm(latent[~null], axis=1) > 0.5)
    in_module = truth.phenotypes.filter(pl.col("module").is_not_null())
    assert set(in_module["perturbation"]) == set(truth.modules["gene"])
    assert (tiny_screen / SCREEN_JSON).is_file()


def test_relationships_file_has_the_real_annotation_format(tiny_screen, shared_data):
    real = (shared_data / "annotations" / "CORUM.txt").read_text().splitlines()[0]
    ours = (tiny_screen / "truth" / "relationships.csv").read_text().splitlines()
    assert ours[0] == real == "entity1,entity2"
    assert all(len(row) == 2 for row in csv.reader(ours[1:]))


def test_controls_on_every_plate_and_replicates_across_experiments(tiny_screen):
    manifest = read_manifest(tiny_screen / "shards")
    per_plate = manifest.group_by("plate").agg(pl.col("is_control").sum().alias("controls"), pl.len())
    assert per_plate.height == 3 and per_plate["controls"].min() >= TINY["controls_per_plate"]
    assert per_plate["len"].to_list() == [96] * 3
    genes = (
        manifest.filter(~pl.col("is_control"))
        .group_by("perturbation")
        .agg(pl.col("experiment").n_unique().alias("experiments"), pl.len().alias("wells"))
    )
    assert genes["experiments"].to_list() == [2] * 24 and genes["wells"].to_list() == [2] * 24
    assert manifest.select("plate", "well").is_duplicated().sum() == 0


def test_rxrx1_preset_has_rxrx1_shape():
    design = design_screen(preset("rxrx1", experiments=2, sites_per_well=1))
    plate = design.sites.filter(pl.col("plate") == design.sites["plate"][0])
    assert plate.height == 308 and plate["is_control"].sum() == 31  # 384 minus the edge; 1108 / 4 = 277 genes
    assert design.sites["plate"].n_unique() == 8 and design.phenotypes.height == 1108
    assert set(design.sites["cell_type"]) == {"HUVEC", "RPE"}


# ---------------------------------------------------------------- real complexes as truth
def test_modules_from_corum_make_the_real_annotations_the_truth(shared_data):
    clusters = shared_data / "annotations" / "CORUM_clusters.tsv"
    design = design_screen(preset("demo", genes=80, modules_from=str(clusters)))
    complexes = {
        name: set(genes.split()) for name, genes in (line.split("\t") for line in clusters.read_text().splitlines())
    }
    for module, members in design.modules.group_by("module"):
        assert set(members["gene"]) == complexes[module[0]]
    genes = set(design.phenotypes["perturbation"])
    assert len(genes) == 80
    corum = pl.read_csv(shared_data / "annotations" / "CORUM.txt")
    real_pairs = set(corum.filter(pl.col("entity1").is_in(genes) & pl.col("entity2").is_in(genes)).iter_rows())
    assert real_pairs == set(design.relationships.iter_rows()) and len(real_pairs) > 40


def test_modules_from_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "complexes.tsv"
    bad.write_text("no tab here\n")
    with pytest.raises(ValueError, match="complexes.tsv:1: expected 'complex name<TAB>"):
        design_screen(preset("demo", modules_from=str(bad)))
    with pytest.raises(ValueError, match="plate_format=100"):
        ScreenConfig(plate_format=100)
    with pytest.raises(ValueError, match="unknown preset 'rxrx9'"):
        preset("rxrx9")


# ---------------------------------------------------------------- the renderer's axes
def _nuclei(image: np.ndarray) -> tuple[int, float]:
    from scipy import ndimage

    mask = image[0] > 0.5 * np.percentile(image[0], 99)
    labels, count = ndimage.label(mask)
    return count, mask.mean()


def test_axes_change_morphology_not_mean_intensity():
    def site(axis: str, value: float, seed: int) -> np.ndarray:
        state = np.zeros(len(AXES))
        state[AXES.index(axis)] = value
        return render_site(state, PLAIN, np.random.default_rng(seed), 128, 8.0).astype(np.float64)

    base = [site("density", 0.0, s) for s in range(4)]
    dense = [site("density", 2.0, s) for s in range(4)]
    assert np.mean([_nuclei(x)[0] for x in dense]) > 1.4 * np.mean([_nuclei(x)[0] for x in base])
    # a bigger nucleus holds the same DNA: its area grows, the image's mean DNA signal does not
    big = [site("nucleus_size", 2.5, s) for s in range(4)]
    area_ratio = np.mean([_nuclei(x)[1] for x in big]) / np.mean([_nuclei(x)[1] for x in base])
    mean_ratio = np.mean([x[0].mean() for x in big]) / np.mean([x[0].mean() for x in base])
    assert area_ratio > 1.3 and abs(mean_ratio - 1) < 0.1
    # fragmented mitochondria: many more, smaller puncta at the same total MitoTracker signal
    frag = [site("mito_fragmentation", 2.5, s) for s in range(4)]

    def puncta(x: np.ndarray) -> int:
        """Spots standing out of the diffuse MitoTracker: local maxima of a difference of Gaussians."""
        spots = gaussian_filter(x[4], 0.7) - gaussian_filter(x[4], 1.5)
        return int(((spots == maximum_filter(spots, 3)) & (spots > 20)).sum())

    assert np.mean([puncta(x) for x in frag]) > 1.3 * np.mean([puncta(x) for x in base])  # measured: 1.48x
    assert abs(np.mean([x[4].mean() for x in frag]) / np.mean([x[4].mean() for x in base]) - 1) < 0.15


# ---------------------------------------------------------------- structure that can be measured
def well_features(image: np.ndarray) -> np.ndarray:
    """Hand-crafted features of SELF-STANDARDISED channels (mean and std divided out, as the
    models do), so only morphology and texture remain: gradient energy, upper quantiles,
    autocorrelation at lags 1 and 3, and cross-channel correlations (co-localisation)."""
    x = image.astype(np.float64)
    x = (x - x.mean((1, 2), keepdims=True)) / (x.std((1, 2), keepdims=True) + 1e-5)
    grad = np.abs(np.diff(x, axis=1)).mean((1, 2)) + np.abs(np.diff(x, axis=2)).mean((1, 2))
    quantiles = np.quantile(x.reshape(6, -1), [0.5, 0.9, 0.99], axis=1).ravel()
    auto = [(x * np.roll(x, lag, axis=2)).mean((1, 2)) for lag in (1, 3)]
    corr = np.corrcoef(x.reshape(6, -1))[np.triu_indices(6, 1)]
    return np.concatenate([grad, quantiles, *auto, corr])


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    """A small screen with a clear signal, its features per site and the truth."""
    out = tmp_path_factory.mktemp("synth") / "structured"
    cfg = preset(
        "demo",
        genes=40,
        image_size=96,
        cell_radius=7.0,
        experiments=2,
        replicates=2,
        sites_per_well=2,
        null_fraction=0.25,
        singleton_fraction=0.0,
        module_size_min=4,
        module_size_max=5,
        controls_per_plate=24,
    )
    write_screen(cfg, out, workers=2, progress=False)
    manifest = read_manifest(out / "shards")
    images = load_images(out / "shards")
    features = np.stack([well_features(images[k]) for k in manifest["key"]])
    return manifest, features, read_truth(out / "truth")


def centre_scale_on_controls(features: np.ndarray, manifest: pl.DataFrame) -> np.ndarray:
    out = np.empty_like(features)
    control = manifest["is_control"].to_numpy()
    for plate in manifest["plate"].unique():
        rows = (manifest["plate"] == plate).to_numpy()
        ref = features[rows & control]
        out[rows] = (features[rows] - ref.mean(0)) / (ref.std(0) + 1e-8)
    return out


def gene_cosines(features: np.ndarray, manifest: pl.DataFrame) -> tuple[list[str], np.ndarray]:
    genes = sorted(set(manifest.filter(~pl.col("is_control"))["perturbation"]))
    pert = manifest["perturbation"].to_numpy()
    agg = np.stack([features[pert == g].mean(0) for g in genes])
    agg /= np.linalg.norm(agg, axis=1, keepdims=True)
    return genes, agg @ agg.T


def planted_recall(features: np.ndarray, manifest: pl.DataFrame, truth) -> tuple[float, float]:
    """(known-relationship recall as the papers define it: share of planted pairs in the 5% tails
    of all gene-pair cosines, mean planted cosine minus mean cosine of all pairs)."""
    genes, cos = gene_cosines(features, manifest)
    index = {g: i for i, g in enumerate(genes)}
    planted = np.array([cos[index[a], index[b]] for a, b in truth.relationships.iter_rows()])
    null = cos[np.triu_indices(len(genes), 1)]
    pct = np.searchsorted(np.sort(null), planted) / null.size
    return float(((pct <= 0.05) | (pct >= 0.95)).mean()), float(planted.mean() - null.mean())


def test_modules_are_visible_in_morphology_after_control_centering(structured):
    manifest, features, truth = structured
    recall, margin = planted_recall(centre_scale_on_controls(features, manifest), manifest, truth)
    assert recall > 0.3 and margin > 0.3  # random recall: 0.10 (measured: 0.51 and 0.62)
    # without alignment the batch effects bury the modules (measured: 0.10)
    unaligned, _ = planted_recall(features, manifest, truth)
    assert unaligned < recall - 0.15


def test_anticorrelated_modules_point_opposite_ways(structured):
    manifest, features, truth = structured
    genes, cos = gene_cosines(centre_scale_on_controls(features, manifest), manifest)
    module_of = dict(truth.modules.select("gene", "module").iter_rows())
    latent = dict(zip(truth.phenotypes["perturbation"], truth.phenotypes["latent"].to_numpy()))
    members = {m: [g for g in genes if module_of.get(g) == m] for m in set(module_of.values())}
    means = {m: np.mean([latent[g] for g in gs], 0) for m, gs in members.items()}
    pairs = [
        (a, b)
        for a, b in itertools.combinations(sorted(means), 2)
        if np.dot(means[a], means[b]) / np.linalg.norm(means[a]) / np.linalg.norm(means[b]) < -0.8
    ]
    assert pairs, "the design must plant at least one anti-correlated module pair"
    index = {g: i for i, g in enumerate(genes)}
    across = [cos[index[x], index[y]] for a, b in pairs for x in members[a] for y in members[b]]
    assert np.mean(across) < -0.2


# each synthetic stain's counterpart in the real field (AGP = actin, Golgi and membrane: twice)
REAL_STAIN = {"Hoechst": "DNA", "ConA": "ER", "Phalloidin": "AGP", "Syto14": "RNA", "MitoTracker": "Mito", "WGA": "AGP"}


def test_stains_co_localise_inside_cells_as_in_real_cell_painting(shared_data):
    """A widefield image integrates every stain over the cell's height, so in real Cell Painting
    all stains, DNA included, rise together inside cells (the real field: 0.38-0.98). The CA-MAE
    learns by predicting one stain from the others, so a screen whose stains are unrelated would
    under-rate it. Before the renderer's cell-height profile the synthetic pairs read -0.22 at
    least and 0.19 on average, against the real field's 0.38 and 0.68."""
    real_index = {stain: PEDIATRIC_STAINS.index(REAL_STAIN[stain]) for stain in CHANNELS}
    body = [real_index[s] for s in ("ConA", "Phalloidin", "MitoTracker", "Syto14")]
    real = in_cell_stain_correlation(pediatric_field(shared_data), body)
    optics = Optics(gain=np.ones(6), offset=np.full(6, 0.02), blur=0.8, illum_amp=0.0, illum_angle=0.0, vignette=0.0)
    states = np.random.default_rng(0).normal(0, 0.5, (16, len(AXES)))  # the cell states around a screen's
    synthetic_body = [CHANNELS.index(s) for s in ("ConA", "Phalloidin", "Syto14", "WGA")]
    synthetic = np.mean(
        [
            in_cell_stain_correlation(render_site(state, optics, np.random.default_rng(i), 128, 9.0), synthetic_body)
            for i, state in enumerate(states)
        ],
        axis=0,
    )
    pairs = [
        (a, b)
        for a, b in itertools.combinations(range(len(CHANNELS)), 2)
        if REAL_STAIN[CHANNELS[a]] != REAL_STAIN[CHANNELS[b]]
    ]
    real_pairs = np.array([real[real_index[CHANNELS[a]], real_index[CHANNELS[b]]] for a, b in pairs])
    synthetic_pairs = np.array([synthetic[a, b] for a, b in pairs])
    assert real_pairs.min() > 0.3  # the measure itself: every real stain pair co-localises
    assert synthetic_pairs.min() > 0.1  # measured: 0.17 (Hoechst and MitoTracker)
    assert synthetic_pairs.mean() > 0.6 * real_pairs.mean()  # measured: 0.51 against 0.68


def test_batch_effects_are_visible_and_removed_by_control_alignment(structured):
    manifest, features, _ = structured
    control = manifest["is_control"].to_numpy()
    experiment = manifest["experiment"].to_numpy()[control]
    same = experiment[:, None] == experiment[None, :]
    off_diagonal = ~np.eye(same.shape[0], dtype=bool)

    def between_over_within(f: np.ndarray) -> float:
        f = (f - f.mean(0)) / (f.std(0) + 1e-8)
        d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
        return d[~same].mean() / d[same & off_diagonal].mean()

    raw = between_over_within(features[control])
    aligned = between_over_within(centre_scale_on_controls(features, manifest)[control])
    assert raw > 1.15 and aligned < 1.05


# ---------------------------------------------------------------- the command
def test_cli_writes_a_screen_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "synth",
        str(out),
        "--genes",
        "10",
        "--image-size",
        "40",
        "--cell-radius",
        "5",
        "--experiments",
        "2",
        "--sites-per-well",
        "1",
        "--workers",
        "1",
        "--seed",
        "3",
    ]
    assert cli_main(args) == 0
    assert "wrote 192 sites (10 genes" in capsys.readouterr().out
    assert (out / "shards" / "manifest.parquet").is_file() and (out / "truth" / "phenotypes.parquet").is_file()
    # every option named after a ScreenConfig field reached the config; the others kept the preset's value
    saved = json.loads((out / SCREEN_JSON).read_text())["config"]
    assert (saved["image_size"], saved["cell_radius"], saved["seed"], saved["controls_per_plate"]) == (40, 5.0, 3, 32)
    assert cli_main(args) == 2 and "already holds a synthetic screen" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite"]) == 0
    assert cli_main(["synth", str(tmp_path / "x"), "--modules-from", str(tmp_path / "missing.tsv")]) == 2
    assert "is not a file" in capsys.readouterr().err
