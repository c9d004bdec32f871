"""The design of a synthetic screen: genes, modules, latent phenotypes, plate layout, batch effects.

Everything random here is drawn from a stream named by its purpose (`_rng(seed, purpose)`), so a
setting that changes one part of the design (say the plate format) leaves the others unchanged,
and the whole design is a pure function of the ScreenConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl

from datamodules.synthetic.render import AXES, CHANNELS, REFERENCE_RADIUS, K, Optics

GENE = "gene"
CONTROL = "control"


@dataclass(frozen=True)
class ScreenConfig:
    """Every setting of the generator; written to OUT/screen.json so a screen can be remade."""

    genes: int = 200
    image_size: int = 128
    cell_radius: float = 9.0  # unperturbed cell radius in pixels (the magnification)
    seed: int = 0
    experiments: int = 4  # assigned to cell types round-robin
    cell_types: tuple[str, ...] = ("HUVEC", "RPE")
    replicates: int = 3  # experiments each gene is in (capped at `experiments`)
    sites_per_well: int = 2
    plate_format: int = 96  # 96 (8 x 12) or 384 (16 x 24) wells
    skip_edge_wells: bool = False  # RxRx1 leaves the outer ring empty (384 -> 308 wells)
    controls_per_plate: int = 16  # at least; wells left free are controls too
    control_label: str = "non-targeting"
    null_fraction: float = 0.4  # genes with no phenotype at all
    singleton_fraction: float = 0.1  # genes with a phenotype shared with no other gene
    module_size_min: int = 3
    module_size_max: int = 8
    anticorrelated_fraction: float = 0.3  # share of modules paired with an opposite partner
    axes_per_module: int = 4  # a module moves a few morphological axes, not all
    phenotype_strength: float = 4.0  # mean norm of a gene's latent phenotype
    gene_noise: float = 0.3  # gene-specific deviation from its module's direction
    experiment_biology: float = 0.4  # std per axis of an experiment's shift of the cell state
    plate_biology: float = 0.15  # same, per plate
    technical: float = 1.0  # scales gain/offset/blur/illumination variation
    dtype: str = "uint8"
    modules_from: str | None = None  # complex file "name<TAB>space-separated genes"
    shard_max_mb: int = 256

    def __post_init__(self) -> None:
        problems = []
        if self.genes < 2:
            problems.append(f"genes={self.genes} (need >= 2)")
        if self.image_size < 32:
            problems.append(f"image_size={self.image_size} (need >= 32)")
        if self.plate_format not in (96, 384):
            problems.append(f"plate_format={self.plate_format} (allowed: 96, 384)")
        if self.dtype not in ("uint8", "uint16"):
            problems.append(f"dtype={self.dtype!r} (allowed: uint8, uint16)")
        if not self.cell_types:
            problems.append("cell_types is empty")
        if self.experiments < 1 or self.replicates < 1 or self.sites_per_well < 1:
            problems.append("experiments, replicates and sites_per_well must be >= 1")
        if not 0 <= self.null_fraction + self.singleton_fraction <= 1:
            problems.append("null_fraction + singleton_fraction must lie in [0, 1]")
        if not 2 <= self.module_size_min <= self.module_size_max:
            problems.append("need 2 <= module_size_min <= module_size_max")
        if not 1 <= self.axes_per_module <= K:
            problems.append(f"axes_per_module must lie in [1, {K}]")
        if problems:
            raise ValueError("invalid ScreenConfig: " + "; ".join(problems))


PRESETS: dict[str, dict[str, object]] = {
    # 2,304 sites of 6 x 128 x 128 (12 plates): rendered in seconds, trained on 64-px crops on a
    # CPU. 32 control wells per plate (RxRx1 has ~30): TVN whitens each batch with the control
    # covariance, which 16 controls estimate too poorly for 128-dimensional embeddings.
    "demo": {"controls_per_plate": 32},
    # seconds-long end-to-end tests: 24 genes, 2 experiments x 1 plate, 1 site of 6 x 64 x 64
    "tiny": dict(genes=24, image_size=64, cell_radius=6.0, experiments=2, replicates=2, sites_per_well=1),
    # RxRx1's shape: 1,108 genes in every one of 51 experiments of 4 cell types, 4 plates of 308
    # wells (384 minus the edge), 2 sites of 6 x 512 x 512 per well: ~125k sites, ~190 GB uint8
    "rxrx1": dict(
        genes=1108,
        image_size=512,
        cell_radius=20.0,
        experiments=51,
        cell_types=("HUVEC", "RPE", "HEPG2", "U2OS"),
        replicates=51,
        sites_per_well=2,
        plate_format=384,
        skip_edge_wells=True,
        controls_per_plate=31,
        module_size_max=12,
        shard_max_mb=1024,
    ),
}


def preset(name: str, **overrides: object) -> ScreenConfig:
    """The named preset with `overrides` (None values are ignored) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    known = {f.name for f in fields(ScreenConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ScreenConfig fields {unknown}; allowed: {sorted(known)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ScreenConfig(**values)


# Typical morphology of each cell line as an offset of the cell state (0 = the generic cell).
CELL_TYPE_STATE: dict[str, dict[str, float]] = {
    "HUVEC": {"cell_elongation": 1.5, "cell_size": 0.4, "density": -0.3, "actin_fibres": 0.5},
    "RPE": {"cell_size": 0.8, "nucleus_size": -0.4, "actin_fibres": 1.2, "clumping": 0.5},
    "HEPG2": {"cell_size": -0.8, "clumping": 2.0, "density": 0.8, "er_spread": 0.8},
    "U2OS": {"cell_size": 1.0, "shape_irregularity": 1.0, "density": -0.5, "mito_perinuclear": -0.8},
}


@dataclass(frozen=True)
class ScreenDesign:
    """The full plan of a screen, before any pixel is drawn."""

    config: ScreenConfig
    phenotypes: pl.DataFrame  # perturbation, module (null if none), role, latent Array(Float32, K)
    modules: pl.DataFrame  # module, gene
    relationships: pl.DataFrame  # entity1, entity2: every within-module pair, both orders
    anticorrelated: list[tuple[str, str]]  # module pairs with opposite phenotype directions
    sites: pl.DataFrame  # shard metadata columns + site_index + state Array(Float32, K)
    optics: pl.DataFrame  # plate + the Optics fields: the technical batch effects

    def optics_of(self, plate: str) -> Optics:
        row = self.optics.row(by_predicate=pl.col("plate") == plate, named=True)
        return Optics(
            gain=np.asarray(row["gain"]),
            offset=np.asarray(row["offset"]),
            blur=row["blur"],
            illum_amp=row["illum_amp"],
            illum_angle=row["illum_angle"],
            vignette=row["vignette"],
        )


_PURPOSES = ("modules", "directions", "latents", "layout", "biology", "optics")


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, _PURPOSES.index(purpose)])


def _sparse_direction(rng: np.random.Generator, n_axes: int) -> np.ndarray:
    """A unit vector moving `n_axes` random axes (a module changes a few aspects of the cell)."""
    u = np.zeros(K)
    u[rng.choice(K, n_axes, replace=False)] = rng.standard_normal(n_axes)
    return u / np.linalg.norm(u)


def synthetic_modules(cfg: ScreenConfig) -> tuple[list[str], list[list[str]]]:
    """Gene names G0001.. and modules of random sizes covering the non-null, non-singleton share."""
    rng = _rng(cfg.seed, "modules")
    width = max(4, len(str(cfg.genes)))
    genes = [f"G{i + 1:0{width}d}" for i in range(cfg.genes)]
    n_in_modules = cfg.genes - round(cfg.genes * (cfg.null_fraction + cfg.singleton_fraction))
    order = list(rng.permutation(genes))
    modules: list[list[str]] = []
    start = 0
    while n_in_modules - start >= cfg.module_size_min:
        size = min(int(rng.integers(cfg.module_size_min, cfg.module_size_max + 1)), n_in_modules - start)
        if 0 < n_in_modules - start - size < cfg.module_size_min:
            size = n_in_modules - start  # never leave a remainder too small to be a module
        modules.append(sorted(order[start : start + size]))
        start += size
    return genes, modules


def read_complexes(path: str | Path) -> list[tuple[str, list[str]]]:
    """A complex file: one complex per line, `name<TAB>space-separated gene symbols`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--modules-from: {path} is not a file")
    complexes = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].split():
            raise ValueError(f"{path}:{n}: expected 'complex name<TAB>space-separated genes', got {line[:80]!r}")
        complexes.append((parts[0].strip(), sorted(set(parts[1].split()))))
    if not complexes:
        raise ValueError(f"{path}: no complexes found")
    return complexes


def file_modules(cfg: ScreenConfig) -> tuple[list[str], list[list[str]], list[str]]:
    """Genes and modules taken from a real complex file, so that real annotations are the truth.

    Complexes (sizes within the configured range) are accepted at random when none of their
    genes is already in the screen or co-annotated (in ANY complex of the file) with a gene in
    the screen; genes without a phenotype are likewise chosen with no partner in the screen.
    Hence the file's pairs restricted to the screen are exactly the planted within-module pairs.
    Returns (genes, modules, module names).
    """
    rng = _rng(cfg.seed, "modules")
    complexes = read_complexes(cfg.modules_from)
    partners: dict[str, set[str]] = {}
    for _, members in complexes:
        for g in members:
            partners.setdefault(g, set()).update(members)
    n_in_modules = cfg.genes - round(cfg.genes * (cfg.null_fraction + cfg.singleton_fraction))
    chosen: set[str] = set()
    modules, names = [], []
    for i in rng.permutation(len(complexes)):
        name, members = complexes[i]
        if len(chosen) >= n_in_modules:
            break
        if not cfg.module_size_min <= len(members) <= cfg.module_size_max:
            continue
        if len(chosen) + len(members) > n_in_modules + cfg.module_size_min:
            continue
        if any(partners[g] & chosen for g in members):
            continue
        modules.append(members)
        names.append(name)
        chosen.update(members)
    solo = []
    n_solo = cfg.genes - len(chosen)
    for g in rng.permutation(sorted(partners)):
        if len(solo) == n_solo:
            break
        if g not in chosen and not (partners[g] & chosen):
            solo.append(str(g))
            chosen.add(str(g))
    if len(solo) < n_solo or not modules:
        raise ValueError(
            f"{cfg.modules_from}: cannot pick {cfg.genes} genes with non-overlapping complexes of "
            f"{cfg.module_size_min}-{cfg.module_size_max} genes; lower --genes or widen the size range"
        )
    in_modules = sorted(g for m in modules for g in m)
    return in_modules + sorted(solo), modules, names


def _latents(cfg: ScreenConfig, genes: list[str], modules: list[list[str]], names: list[str]):
    """Module directions (some in anti-correlated pairs) and every gene's latent phenotype."""
    rng = _rng(cfg.seed, "directions")
    directions = [_sparse_direction(rng, cfg.axes_per_module) for _ in modules]
    order = rng.permutation(len(modules))
    n_pairs = int(round(cfg.anticorrelated_fraction * len(modules) / 2))
    anticorrelated = []
    for j in range(n_pairs):
        a, b = order[2 * j], order[2 * j + 1]
        directions[b] = -directions[a]
        anticorrelated.append((names[a], names[b]))
    module_of = {g: i for i, m in enumerate(modules) for g in m}
    free = [g for g in genes if g not in module_of]
    n_single = round(cfg.genes * cfg.singleton_fraction)
    singletons = set(rng.permutation(free)[:n_single].tolist()) if free else set()
    rng = _rng(cfg.seed, "latents")
    rows = []
    for g in genes:
        strength = cfg.phenotype_strength * rng.uniform(0.6, 1.4)
        noise = rng.standard_normal(K) / math.sqrt(K)
        if g in module_of:
            latent = strength * (directions[module_of[g]] + cfg.gene_noise * noise)
            module, role = names[module_of[g]], "module"
        elif g in singletons:
            latent, module, role = strength * _sparse_direction(rng, cfg.axes_per_module), None, "singleton"
        else:
            latent, module, role = np.zeros(K), None, "null"
        rows.append({"perturbation": g, "module": module, "role": role, "latent": latent.astype(np.float32)})
    phenotypes = pl.DataFrame(
        rows, schema={"perturbation": pl.Utf8, "module": pl.Utf8, "role": pl.Utf8, "latent": pl.Array(pl.Float32, K)}
    )
    return phenotypes, anticorrelated


def _wells(cfg: ScreenConfig) -> list[str]:
    n_rows, n_cols = (8, 12) if cfg.plate_format == 96 else (16, 24)
    rows = range(1, n_rows - 1) if cfg.skip_edge_wells else range(n_rows)
    cols = range(2, n_cols) if cfg.skip_edge_wells else range(1, n_cols + 1)
    return [f"{chr(ord('A') + r)}{c:02d}" for r in rows for c in cols]


def experiment_names(cfg: ScreenConfig) -> list[tuple[str, str]]:
    """(experiment, cell type): RxRx-style names HUVEC-01, RPE-01, HUVEC-02, ..."""
    count: dict[str, int] = {}
    out = []
    for e in range(cfg.experiments):
        cell_type = cfg.cell_types[e % len(cfg.cell_types)]
        count[cell_type] = count.get(cell_type, 0) + 1
        out.append((f"{cell_type}-{count[cell_type]:02d}", cell_type))
    return out


def _layout(cfg: ScreenConfig, genes: list[str]) -> pl.DataFrame:
    """One row per site: each gene in `replicates` experiments (least-loaded first, ties random),
    spread evenly over the plates of each experiment at random wells; free wells are controls."""
    rng = _rng(cfg.seed, "layout")
    n_exp = cfg.experiments
    reps = min(cfg.replicates, n_exp)
    load = np.zeros(n_exp)
    members: list[list[str]] = [[] for _ in range(n_exp)]
    for g in rng.permutation(genes):
        picks = np.lexsort((rng.random(n_exp), load))[:reps]
        load[picks] += 1
        for e in picks:
            members[e].append(str(g))
    wells = _wells(cfg)
    capacity = len(wells) - cfg.controls_per_plate
    if capacity < 1:
        raise ValueError(
            f"controls_per_plate={cfg.controls_per_plate} leaves no gene wells on a {len(wells)}-well plate"
        )
    n_plates = max(1, math.ceil(max(len(m) for m in members) / capacity))
    rows = []
    for (experiment, cell_type), genes_e in zip(experiment_names(cfg), members):
        for p, plate_genes in enumerate(np.array_split(np.asarray(genes_e, dtype=object), n_plates)):
            plate = f"{experiment}_P{p + 1}"
            content = list(plate_genes) + [None] * (len(wells) - len(plate_genes))
            for well, gene in zip(rng.permutation(wells), rng.permutation(np.asarray(content, dtype=object))):
                for site in range(1, cfg.sites_per_well + 1):
                    rows.append(
                        {
                            "key": f"{plate}_{well}_s{site}",
                            "experiment": experiment,
                            "plate": plate,
                            "well": str(well),
                            "site": site,
                            "perturbation": cfg.control_label if gene is None else gene,
                            "perturbation_type": CONTROL if gene is None else GENE,
                            "is_control": gene is None,
                            "cell_type": cell_type,
                        }
                    )
    return pl.DataFrame(rows).sort("experiment", "plate", "well", "site").with_row_index("site_index")


def _state_offsets(names: list[str], scale: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: rng.normal(0, scale, K) for name in names}


def _optics(cfg: ScreenConfig, plates: pl.DataFrame) -> pl.DataFrame:
    """Technical batch effects: experiment-level stain/exposure/focus/illumination, plate jitter."""
    rng = _rng(cfg.seed, "optics")
    t = cfg.technical
    mag = cfg.cell_radius / REFERENCE_RADIUS  # blur in pixels grows with the magnification
    per_exp = {}
    for experiment in plates["experiment"].unique(maintain_order=True):
        per_exp[experiment] = dict(
            gain=np.exp(rng.normal(0, 0.25 * t, len(CHANNELS))),
            offset=rng.uniform(0.01, 0.01 + 0.08 * t, len(CHANNELS)),
            blur=rng.uniform(0, 1.2 * t * mag),
            illum_amp=rng.uniform(0, 0.35 * t),
            illum_angle=rng.uniform(0, 2 * np.pi),
            vignette=rng.uniform(0, 0.4 * t),
        )
    rows = []
    for experiment, plate in plates.select("experiment", "plate").iter_rows():
        e = per_exp[experiment]
        optics = Optics(
            gain=e["gain"] * np.exp(rng.normal(0, 0.08 * t, len(CHANNELS))),
            offset=e["offset"],
            blur=float(max(0.0, e["blur"] + rng.normal(0, 0.15 * t * mag))),
            illum_amp=float(e["illum_amp"]),
            illum_angle=float(e["illum_angle"] + rng.normal(0, 0.2)),
            vignette=float(e["vignette"]),
        )
        rows.append({"plate": plate, **optics.as_row()})
    return pl.DataFrame(
        rows,
        schema={
            "plate": pl.Utf8,
            "gain": pl.List(pl.Float64),
            "offset": pl.List(pl.Float64),
            "blur": pl.Float64,
            "illum_amp": pl.Float64,
            "illum_angle": pl.Float64,
            "vignette": pl.Float64,
        },
    )


def design_screen(cfg: ScreenConfig) -> ScreenDesign:
    """Plan the screen: who is perturbed where, with which phenotype, under which batch effects."""
    if cfg.modules_from:
        genes, modules, names = file_modules(cfg)
    else:
        genes, modules = synthetic_modules(cfg)
        names = [f"M{i + 1:03d}" for i in range(len(modules))]
    phenotypes, anticorrelated = _latents(cfg, genes, modules, names)
    module_rows = [(name, g) for name, m in zip(names, modules) for g in m]
    modules_frame = pl.DataFrame(module_rows, schema={"module": pl.Utf8, "gene": pl.Utf8}, orient="row")
    pairs = modules_frame.join(modules_frame, on="module", suffix="_b").filter(pl.col("gene") != pl.col("gene_b"))
    relationships = pairs.select(entity1="gene", entity2="gene_b").unique().sort("entity1", "entity2")

    sites = _layout(cfg, genes)
    rng = _rng(cfg.seed, "biology")
    plates = sites.select("experiment", "plate").unique(maintain_order=True)
    exp_shift = _state_offsets(plates["experiment"].unique(maintain_order=True).to_list(), cfg.experiment_biology, rng)
    plate_shift = _state_offsets(plates["plate"].to_list(), cfg.plate_biology, rng)
    cell_state = {ct: np.array([CELL_TYPE_STATE.get(ct, {}).get(a, 0.0) for a in AXES]) for ct in cfg.cell_types}
    latent_of = dict(zip(phenotypes["perturbation"].to_list(), phenotypes["latent"].to_numpy()))
    zero = np.zeros(K)
    state = np.stack(
        [
            latent_of.get(p, zero) + cell_state[ct] + exp_shift[e] + plate_shift[pl_]
            for p, ct, e, pl_ in sites.select("perturbation", "cell_type", "experiment", "plate").iter_rows()
        ]
    ).astype(np.float32)
    sites = sites.with_columns(pl.Series("state", state, dtype=pl.Array(pl.Float32, K)))
    return ScreenDesign(
        config=cfg,
        phenotypes=phenotypes,
        modules=modules_frame,
        relationships=relationships,
        anticorrelated=anticorrelated,
        sites=sites,
        optics=_optics(cfg, plates),
    )
