"""Render one microscopy site from a cell state: cells with nucleus, cytoplasm, membrane, puncta.

The latent phenotype acts on MORPHOLOGY (size, shape, density, spatial arrangement, texture,
puncta counts, co-localisation between stains), not mainly on mean intensity, because the
models self-standardise every channel of every image (mean and std are divided out) and because
real screens differ that way. Every cell is drawn in its own small window; all windows of a site
are computed at once as (n_cells, P, P) arrays and scattered into the image with np.bincount, so
the cost is a few vectorised numpy passes per site whatever the number of cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

# The latent axes, in order. A gene's latent vector is a point in this space (0 = unperturbed);
# one unit along an axis is a clearly visible but overlapping shift of the cell population.
AXES: tuple[str, ...] = (
    "cell_size",  # cell radius x exp(0.18 z)
    "cell_elongation",  # aspect ratio of the cell ellipse
    "shape_irregularity",  # amplitude of boundary harmonics (ruffled vs round cells)
    "density",  # cells per site x exp(0.3 z)
    "clumping",  # share of cells growing in tight colonies vs scattered
    "nucleus_size",  # nucleus / cell radius ratio
    "nucleus_offset",  # nucleus displaced from the cell centre (polarity)
    "chromatin_texture",  # granularity of the DNA stain inside nuclei
    "mitotic_fraction",  # share of round mitotic cells with condensed bright chromatin
    "er_spread",  # ER perinuclear (z<0) vs spread to the periphery (z>0)
    "er_texture",  # reticular texture contrast of the ER stain
    "actin_fibres",  # stress-fibre stripes in the actin stain vs cortical ring only
    "nucleoli_count",  # RNA-rich nucleoli per nucleus
    "mito_fragmentation",  # many small mitochondria (z>0) vs few large ones, same total signal
    "mito_perinuclear",  # mitochondria near the nucleus (co-localised with ER) vs peripheral
    "golgi_size",  # perinuclear Golgi blob in the WGA stain
    "rna_mito_intensity",  # the one pure intensity axis: RNA up, mitochondria down
)
K = len(AXES)
_AX = {name: i for i, name in enumerate(AXES)}

# RxRx1 / Recursion Cell Painting channel order (w1..w6).
CHANNELS: tuple[str, ...] = ("Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA")
DNA, ER, ACTIN, RNA, MITO, MEMBRANE = range(6)
# Cell radius (pixels) at which the fine-structure sizes below are given; other magnifications
# scale edges, textures, puncta and blur by cell_radius / REFERENCE_RADIUS.
REFERENCE_RADIUS = 9.0
# Integrated stain per unit of cell area of an unperturbed cell (its look at state 0); for
# MitoTracker this is only its diffuse part: its puncta's total is held constant separately.
_STAIN_PER_AREA = np.array([0.28, 0.54, 0.6, 0.32, 0.5, 0.5])


@dataclass(frozen=True)
class Optics:
    """Technical batch effects of one plate: what the microscope, stains and handling add."""

    gain: np.ndarray  # (C,) multiplicative stain/exposure gain
    offset: np.ndarray  # (C,) background added before shot noise, in units of a bright cell
    blur: float  # Gaussian PSF sigma in pixels (focus, objective)
    illum_amp: float  # linear illumination gradient amplitude across the field
    illum_angle: float  # its direction, radians
    vignette: float  # radial fall-off at the corners

    def as_row(self) -> dict[str, object]:
        return {
            "gain": self.gain.tolist(),
            "offset": self.offset.tolist(),
            "blur": self.blur,
            "illum_amp": self.illum_amp,
            "illum_angle": self.illum_angle,
            "vignette": self.vignette,
        }


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))  # clipped: no float32 overflow far outside a cell


def _col(values: np.ndarray) -> np.ndarray:
    """Per-cell values (n,) as float32 (n, 1, 1), to broadcast over each cell's window."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def bandpass_noise(rng: np.random.Generator, shape: tuple[int, int], wavelength: float) -> np.ndarray:
    """Unit-variance Gaussian noise whose spatial frequencies centre on 1/wavelength (texture)."""
    h, w = shape
    spec = np.fft.rfft2(rng.standard_normal(shape))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f0 = 1.0 / max(wavelength, 2.0)
    spec *= np.exp(-0.5 * ((f - f0) / (0.5 * f0)) ** 2)
    field = np.fft.irfft2(spec, s=shape)
    return field / (field.std() + 1e-8)


def _place_cells(rng: np.random.Generator, n: int, size: int, radius: float, clump: float) -> np.ndarray:
    """Cell centres (n, 2): a share `clump` grows around colony seeds, the rest scattered;
    a few rounds of pairwise repulsion keep nuclei from stacking (cells touch, rarely overlap)."""
    n_col = max(1, n // 10)
    seeds = rng.uniform(0, size, (n_col, 2))
    in_colony = rng.random(n) < clump
    pos = rng.uniform(0, size, (n, 2))
    pos[in_colony] = seeds[rng.integers(0, n_col, in_colony.sum())] + rng.normal(0, 1.6 * radius, (in_colony.sum(), 2))
    min_d = 1.5 * radius
    for _ in range(6):
        d = pos[:, None, :] - pos[None, :, :]
        dist = np.sqrt((d**2).sum(-1)) + np.eye(n) * 1e6
        push = np.clip(min_d - dist, 0, None) / (dist + 1e-6)
        pos += 0.5 * (d * push[..., None]).sum(1)
    return np.mod(pos, size)  # wrap: cells leaving one edge re-enter the other, density stays put


def render_site(
    state: np.ndarray,
    optics: Optics,
    rng: np.random.Generator,
    size: int,
    cell_radius: float,
    dtype: np.dtype = np.uint8,
) -> np.ndarray:
    """One site image (6, size, size) of `dtype` for the biological `state` (K,) under `optics`.

    `state` is the gene's latent phenotype plus the cell type's and the batch's biological
    offsets; `cell_radius` is the unperturbed cell radius in pixels (sets the magnification).
    """
    z = np.asarray(state, dtype=np.float64)
    if z.shape != (K,):
        raise ValueError(f"state must have shape ({K},) (one value per axis in AXES), got {z.shape}")
    area = size * size
    mag = cell_radius / REFERENCE_RADIUS  # fine structures (edges, textures, puncta) scale with it
    radius = cell_radius * np.exp(0.18 * z[_AX["cell_size"]])
    coverage = 0.45 * np.exp(0.3 * z[_AX["density"]])
    n = max(2, int(rng.poisson(coverage * area / (np.pi * radius**2))))
    clump = float(_sigmoid(-0.5 + 1.2 * z[_AX["clumping"]]))
    centres = _place_cells(rng, n, size, radius, clump)

    # ---- per-cell shape parameters (population distribution shifted by the state)
    mitotic = rng.random(n) < _sigmoid(-3.0 + 1.0 * z[_AX["mitotic_fraction"]])
    rc = radius * np.exp(rng.normal(0, 0.12, n)) * np.where(mitotic, 0.7, 1.0)
    aspect = np.exp(np.abs(rng.normal(0.25 + 0.25 * z[_AX["cell_elongation"]], 0.15, n)))
    aspect = np.where(mitotic, 1.0, aspect)
    theta = rng.uniform(0, np.pi, n)
    irr = 0.07 * np.exp(0.6 * z[_AX["shape_irregularity"]])
    harm = rng.normal(0, irr, (n, 3)) * np.where(mitotic, 0.2, 1.0)[:, None]  # k = 2, 3, 4
    harm_phase = rng.uniform(0, 2 * np.pi, (n, 3))
    rn = 0.48 * np.exp(0.15 * z[_AX["nucleus_size"]] + rng.normal(0, 0.07, n))
    rn = np.clip(np.where(mitotic, 0.62, rn), 0.2, 0.8)
    n_aspect = 1.0 + 0.5 * (aspect - 1.0)
    off_mag = np.clip(0.12 + 0.12 * z[_AX["nucleus_offset"]], 0.0, 0.9 - rn) * np.where(mitotic, 0.0, 1.0)
    off_dir = rng.uniform(0, 2 * np.pi, n)
    ox, oy = off_mag * np.cos(off_dir), off_mag * np.sin(off_dir)  # in units of rc, cell frame

    # ---- one window of P x P pixels per cell, all cells at once (float32: memory-bound work)
    half = int(np.ceil((rc * np.sqrt(aspect) * (1 + np.abs(harm).sum(1))).max())) + 2
    offsets = np.arange(-half, half + 1)
    grid = offsets.astype(np.float32)
    cy = np.round(centres[:, 0]).astype(np.int64)
    cx = np.round(centres[:, 1]).astype(np.int64)
    dy = _col(cy - centres[:, 0]) + grid[None, :, None]
    dx = _col(cx - centres[:, 1]) + grid[None, None, :]
    cos_t, sin_t, rc_ = _col(np.cos(theta)), _col(np.sin(theta)), _col(rc)
    u = (dx * cos_t + dy * sin_t) / rc_  # along the long axis, units of rc
    v = (-dx * sin_t + dy * cos_t) / rc_  # across it
    sa = _col(np.sqrt(aspect))
    eu, ev = u / sa, v * sa  # the cell ellipse mapped to a circle
    rho = np.sqrt(eu**2 + ev**2)
    # boundary radius 1 + sum_k A_k cos(k phi + psi_k), with e^{i k phi} as powers of (eu + i ev) / rho
    e1 = (eu + 1j * ev) / np.maximum(rho, 1e-6)
    coef = (harm * np.exp(1j * harm_phase)).astype(np.complex64)
    e2 = e1 * e1
    a2, a3, a4 = (coef[:, k, None, None] for k in range(3))
    boundary = 1.0 + (a2 * e2 + a3 * (e2 * e1) + a4 * (e2 * e2)).real
    edge_px = (boundary - rho) * rc_  # signed distance to the membrane, px
    cell = _sigmoid(edge_px / (0.7 * mag))
    nsa, rn_ = _col(np.sqrt(n_aspect)), _col(rn)
    rho_n = np.sqrt(((u - _col(ox)) / nsa) ** 2 + ((v - _col(oy)) * nsa) ** 2) / rn_
    nuc_edge_px = (1.0 - rho_n) * rn_ * rc_
    nucleus = _sigmoid(nuc_edge_px / (0.6 * mag)) * cell
    cyto = np.clip(cell - nucleus, 0, None)
    dist_nuc = np.clip(-nuc_edge_px, 0, None) / rc_  # from the nuclear edge, units of rc
    # A widefield image integrates each stain over the cell's height. Cells are thickest around
    # the nucleus and thin out towards the membrane, and cytoplasm lies above and below the
    # nucleus, so every cytoplasmic stain is brightest near the nucleus and the stains co-localise
    # (measured within the cells of the real Cell Painting field in ../shared/data/images: pixel
    # correlations 0.38-0.98 between stains, DNA included; docs/synthetic.md).
    column = (cyto + 0.8 * nucleus) * (0.3 + 0.7 * np.exp(-dist_nuc / 0.4))

    bright = np.exp(rng.normal(0, 0.15, (6, n)))  # cell-to-cell stain variation
    layers = np.empty((6, n, 2 * half + 1, 2 * half + 1), dtype=np.float32)
    # DNA: nucleus (texture is added image-wide below)
    layers[DNA] = nucleus
    # ER: cytoplasm with a perinuclear gradient whose length scale follows er_spread
    er_len = 0.35 * np.exp(0.45 * z[_AX["er_spread"]])
    layers[ER] = column * (0.25 + np.exp(-dist_nuc / er_len))
    # Actin: diffuse over the cell's height + cortical ring + stress fibres along the long axis
    fibres = float(np.clip(0.35 + 0.35 * z[_AX["actin_fibres"]], 0, 1.2))
    period = 3.2 * mag / rc_
    stripes = 0.5 * (1 + np.cos(2 * np.pi * v / period + _col(rng.uniform(0, 2 * np.pi, n))))
    cortex = np.exp(-((edge_px / (1.2 * mag)) ** 2)) * cell
    layers[ACTIN] = column + 0.4 * cortex + fibres * stripes * cyto * _col(~mitotic)
    # RNA: diffuse cytoplasm + nucleus (nucleoli added as puncta below)
    rna_gain = np.exp(0.25 * z[_AX["rna_mito_intensity"]])
    layers[RNA] = 0.35 * column + 0.2 * nucleus
    layers[MITO] = column  # the diffuse part; the mitochondria are puncta, added below
    # WGA: plasma membrane glycoproteins, the ring at the cell's edge and the membrane above and
    # below the cell, seen over its height
    layers[MEMBRANE] = 0.5 * np.exp(-((edge_px / mag) ** 2)) + column
    # Stains bind stoichiometrically: a cell's integrated signal is set by its content (DNA
    # doubled in mitosis), not by its shape, so a bigger nucleus is dimmer, not brighter. This
    # keeps morphology from leaking into mean intensities, as in real Cell Painting.
    content = _STAIN_PER_AREA[:, None] * np.pi * rc[None, :] ** 2 * bright
    content[DNA] *= np.where(mitotic, 2.0, 1.0)
    content[RNA] *= rna_gain
    content[MITO] /= rna_gain
    sums = layers.sum((2, 3))
    layers *= np.divide(content, sums, out=np.zeros_like(sums), where=sums > 0)[:, :, None, None]

    image = np.zeros((6, size * size))
    rows = np.mod(cy[:, None, None] + offsets[None, :, None], size)
    cols = np.mod(cx[:, None, None] + offsets[None, None, :], size)
    flat = np.broadcast_to(rows * size + cols, layers.shape[1:]).ravel()
    for c in range(6):
        image[c] = np.bincount(flat, weights=layers[c].ravel(), minlength=size * size)
    image = image.reshape(6, size, size)

    # ---- image-wide textures, visible only where the stain is
    chrom_wl = 2.0 * mag * np.exp(0.35 * z[_AX["chromatin_texture"]])
    chrom_amp = 0.35 * np.exp(0.35 * z[_AX["chromatin_texture"]])
    image[DNA] *= np.clip(1 + chrom_amp * bandpass_noise(rng, (size, size), chrom_wl), 0.05, None)
    er_amp = float(np.clip(0.3 + 0.25 * z[_AX["er_texture"]], 0.0, 0.9))
    image[ER] *= np.clip(1 + er_amp * bandpass_noise(rng, (size, size), 3.0 * mag), 0.05, None)

    # ---- puncta: mitochondria, nucleoli, Golgi
    cells = _CellFrames(centres, rc, theta, ox, oy, rng)
    frag = np.exp(0.4 * z[_AX["mito_fragmentation"]])
    n_mito = rng.poisson(14 * frag * (rc / cell_radius) ** 2 * np.where(mitotic, 0.5, 1.0))
    owner = np.repeat(np.arange(n), n_mito)
    peri = float(_sigmoid(0.6 * z[_AX["mito_perinuclear"]]))
    t = rng.beta(2.0 * (1 - peri) + 0.5, 2.0 * peri + 0.5)  # 0 = nuclear edge, 1 = membrane
    ang = rng.uniform(0, 2 * np.pi, owner.size)
    r_in = rn[owner] * 1.05
    rr = r_in + t * (0.95 - r_in)
    mito_total = 3.0 * mag**2 / frag * np.exp(-0.25 * z[_AX["rna_mito_intensity"]])  # per cell: constant
    sa = np.sqrt(aspect[owner])  # stretch positions with the cell ellipse
    cells.spots(
        image[MITO], owner, rr, ang, sigma=0.9 * mag / np.sqrt(frag), total=mito_total * bright[MITO, owner], stretch=sa
    )
    nucleoli_mean = 2.5 * np.exp(0.45 * z[_AX["nucleoli_count"]])
    n_nucleoli = rng.poisson(nucleoli_mean, n) * (~mitotic)
    owner = np.repeat(np.arange(n), n_nucleoli)
    ang = rng.uniform(0, 2 * np.pi, owner.size)
    rr = rn[owner] * 0.55 * np.sqrt(rng.random(owner.size))
    cells.spots(image[RNA], owner, rr, ang, sigma=0.8 * mag, total=8.0 * mag**2 / nucleoli_mean * rna_gain)
    owner = np.flatnonzero(~mitotic)
    golgi = 0.22 * np.exp(0.4 * z[_AX["golgi_size"]])
    gang = off_dir[owner] + np.pi + rng.normal(0, 0.4, owner.size)  # opposite the nuclear offset
    gr = rn[owner] * 1.1
    cells.spots(image[MEMBRANE], owner, gr, gang, sigma=golgi * rc[owner], total=0.37 * rc[owner] ** 2)
    return _acquire(image, optics, rng, dtype)


@dataclass(frozen=True)
class _CellFrames:
    """The frame of every cell of a site, which its puncta are placed in: each punctum is given
    only by its owner and its polar position around the owner's nucleus."""

    centres: np.ndarray  # (n, 2) cell centres (y, x) in pixels
    rc: np.ndarray  # (n,) cell radii in pixels: the unit of positions in a cell's frame
    theta: np.ndarray  # (n,) angle of the long axis
    ox: np.ndarray  # (n,) nucleus centre along the long axis, units of rc
    oy: np.ndarray  # (n,) and across it
    rng: np.random.Generator  # the site's stream: each spot's brightness varies

    def spots(
        self,
        target: np.ndarray,
        owner: np.ndarray,
        r: np.ndarray,
        angle: np.ndarray,
        *,
        sigma: float | np.ndarray,
        total: float | np.ndarray,
        stretch: float | np.ndarray = 1.0,
    ) -> None:
        """Add Gaussian spots of the cells `owner` to `target`, at distance `r` (units of the owner's
        radius) and `angle` from its nucleus centre, the distance stretched by `stretch` along the
        long axis and shrunk by it across; `total` is each spot's integrated intensity (so a change
        of spot size alone leaves the mean intensity unchanged)."""
        if owner.size == 0:
            return
        u = self.ox[owner] + r * np.cos(angle) * stretch
        v = self.oy[owner] + r * np.sin(angle) / stretch
        size = target.shape[0]
        uu, vv = u * self.rc[owner], v * self.rc[owner]
        c, s = np.cos(self.theta[owner]), np.sin(self.theta[owner])
        py = self.centres[owner, 0] + uu * s + vv * c
        px = self.centres[owner, 1] + uu * c - vv * s
        sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), owner.shape)
        half = int(np.ceil(3 * sigma.max())) + 1
        grid = np.arange(-half, half + 1)
        iy, ix = np.round(py).astype(np.int64), np.round(px).astype(np.int64)
        gy = (iy - py)[:, None, None] + grid[None, :, None]
        gx = (ix - px)[:, None, None] + grid[None, None, :]
        jitter = np.exp(self.rng.normal(0, 0.2, owner.size))
        peak = np.broadcast_to(total, owner.shape) * jitter / (2 * np.pi * sigma**2)
        w = np.exp(-(gy**2 + gx**2) / (2 * sigma[:, None, None] ** 2)) * peak[:, None, None]
        flat = np.mod(iy[:, None, None] + grid[None, :, None], size) * size + np.mod(
            ix[:, None, None] + grid[None, None, :], size
        )
        target += np.bincount(flat.ravel(), weights=w.ravel(), minlength=size * size).reshape(size, size)


def _acquire(image: np.ndarray, optics: Optics, rng: np.random.Generator, dtype: np.dtype) -> np.ndarray:
    """Microscope: PSF blur, illumination field, per-channel gain/background, shot + read noise."""
    size = image.shape[-1]
    if optics.blur > 0.05:
        image = gaussian_filter(image, sigma=(0, optics.blur, optics.blur), mode="wrap")
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    illum = (
        1
        + optics.illum_amp * (np.cos(optics.illum_angle) * xx + np.sin(optics.illum_angle) * yy)
        - optics.vignette * (xx**2 + yy**2) / 2
    )
    signal = image * optics.gain[:, None, None] * illum[None] + optics.offset[:, None, None]
    info = np.iinfo(dtype)
    photons = 120.0  # expected photon count of a bright cell: sets the shot-noise level
    lam = np.clip(signal, 0, None) * photons
    counts = rng.normal(0, 1.5, signal.shape)  # read noise
    dim = lam < 30  # exact Poisson where counts are low; its cheaper normal limit elsewhere
    counts[dim] += rng.poisson(lam[dim])
    counts[~dim] += lam[~dim] + np.sqrt(lam[~dim]) * rng.standard_normal(int((~dim).sum()))
    scale = 0.35 * info.max / photons  # a bright cell lands at ~35% of the range; puncta above
    return np.clip(np.round(counts * scale), 0, info.max).astype(dtype)
