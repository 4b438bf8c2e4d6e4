"""Synthetic BraTS-style cases (T1-Gd, FLAIR and a tumour segmentation) for tests and the demo.

A phantom is built in three steps, all vectorised over the voxel grid (numpy/scipy only):

1. **Anatomy as label maps.** The brain is a skull-stripped ellipsoid whose surface is made lumpy by
   a smooth random field. Normalised ellipsoid coordinates u = (p − c) / a give a "depth"
   d = 1 − ‖u‖·(1 + ε·f_surface(p)) that is 0 on the surface and 1 in the centre. Cortical grey
   matter is the band d < t_GM + β·f_gyri(p) (f_gyri a short-wavelength field that folds the
   cortex), cerebrospinal fluid (CSF) fills a thin subarachnoid rim plus sulcal clefts where f_gyri
   is high, two banana-shaped lateral ventricles and a thin third ventricle sit near the midline, two
   deep grey nuclei sit beside them, and white matter is the rest.
2. **Tumour.** A core of radius R (voxels) is placed at a seeded random position that keeps it
   inside the brain. With ρ = ‖p − c_t‖ / R distorted by a smooth field, BraTS-2021 labels are
   necrosis (label 1) for ρ < r_nec, enhancing rim (label 4) for r_nec ≤ ρ < 1 and oedema (label 2)
   for 1 ≤ ρ' < r_oed, where ρ' uses a stronger, finger-like distortion and oedema is kept out of
   CSF (vasogenic oedema spreads along white matter, not into the ventricles).
3. **Image formation.** Each tissue gets a mean intensity per modality (see ``TISSUE_INTENSITY``:
   on T1-Gd the enhancing rim is brightest and necrosis/CSF dark; on FLAIR oedema is brightest and
   CSF is suppressed, i.e. darkest), multiplied by (1 + small texture field), blurred with a
   Gaussian of σ = 0.7 voxel for partial-volume edges, multiplied by a smooth bias field
   b = exp(γ·f_bias) (independent per modality, wavelength ≥ 1.5× the field of view) and corrupted
   with Rician noise |s + n₁ + i·n₂|, n₁, n₂ ~ N(0, σ²), σ = 2.5 % of the white-matter intensity
   (the magnitude of complex Gaussian noise, Gudbjartsson & Patz 1995). Finally everything outside
   the brain is set to 0, as in skull-stripped BraTS data.

Smooth random fields are sums of random plane waves f(p) = √(2/K) Σ_k cos(ω_k·p + φ_k) with
|ω_k| = 2π/λ_k, which is smooth at every scale λ, unit variance, costs K passes over the grid and
needs no FFT or padding. Everything is driven by one ``numpy.random.Generator``, so a seed fully
determines a case. A 64×128×128 case takes ≈ 0.3 s on one core.

Arrays are indexed (z, y, x) like ``SimpleITK.GetArrayFromImage``; the files written by
``write_phantom_cases`` have 1 mm spacing, origin 0 and identity (LPS) direction.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .atomic import atomic_file

DEFAULT_SHAPE = (64, 128, 128)
MIN_SIDE = 16
PHANTOM_MODALITIES = ("t1ce", "flair")

# BraTS 2018-2021 label convention.
LABEL_NECROSIS = 1
LABEL_OEDEMA = 2
LABEL_ENHANCING = 4

# Tissue codes of the optional "tissue" map (not written to disk).
TISSUE_BACKGROUND = 0
TISSUE_CSF = 1
TISSUE_GREY = 2
TISSUE_WHITE = 3
TISSUE_DEEP_GREY = 4
TISSUE_NECROSIS = 5
TISSUE_ENHANCING = 6
TISSUE_OEDEMA = 7

# Mean intensities in arbitrary scanner-like units. Orderings follow clinical appearance: on
# T1-Gd white > grey > CSF, the contrast-enhancing rim brighter than anything, necrosis dark; on
# FLAIR grey > white, free water (CSF) suppressed to near black, oedema the brightest tissue and
# the necrotic core intermediate (proteinaceous fluid is not fully suppressed).
TISSUE_INTENSITY: Dict[str, Dict[int, float]] = {
    "t1ce": {
        TISSUE_CSF: 250.0,
        TISSUE_GREY: 520.0,
        TISSUE_WHITE: 720.0,
        TISSUE_DEEP_GREY: 580.0,
        TISSUE_NECROSIS: 300.0,
        TISSUE_ENHANCING: 1150.0,
        TISSUE_OEDEMA: 470.0,
    },
    "flair": {
        TISSUE_CSF: 90.0,
        TISSUE_GREY: 560.0,
        TISSUE_WHITE: 420.0,
        TISSUE_DEEP_GREY: 520.0,
        TISSUE_NECROSIS: 480.0,
        TISSUE_ENHANCING: 650.0,
        TISSUE_OEDEMA: 900.0,
    },
}
NOISE_FRACTION_OF_WHITE = 0.025
PARTIAL_VOLUME_SIGMA = 0.7


def _validate_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as error:
        raise ValueError(f"phantom shape must be three integers (Z, Y, X), got {shape!r}") from error
    if len(dims) != 3 or any(d < MIN_SIDE for d in dims):
        raise ValueError(f"phantom shape must be three integers >= {MIN_SIDE} (Z, Y, X), got {shape!r}")
    return dims  # type: ignore[return-value]


class _Grid:
    """Broadcastable voxel coordinates (z, 1, 1), (1, y, 1), (1, 1, x) in voxel units."""

    def __init__(self, shape: Tuple[int, int, int], origin: Sequence[int] = (0, 0, 0)):
        self.shape = shape
        self.z = (np.arange(shape[0], dtype=np.float32) + origin[0]).reshape(-1, 1, 1)
        self.y = (np.arange(shape[1], dtype=np.float32) + origin[1]).reshape(1, -1, 1)
        self.x = (np.arange(shape[2], dtype=np.float32) + origin[2]).reshape(1, 1, -1)

    def smooth_field(
        self, rng: np.random.Generator, wavelengths: Tuple[float, float], terms: int = 8
    ) -> np.ndarray:
        """Unit-variance random plane-wave sum √(2/K) Σ cos(ω_k·p + φ_k), |ω_k| = 2π/λ_k."""
        field = np.zeros(self.shape, dtype=np.float32)
        for _ in range(terms):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction) + 1e-12
            omega = (2.0 * np.pi / rng.uniform(*wavelengths)) * direction
            phase = rng.uniform(0.0, 2.0 * np.pi)
            # Separable phase: (Z,1,1) + (1,Y,1) + (1,1,X) broadcasts to the full grid once.
            argument = (omega[0] * self.z + phase) + omega[1] * self.y + omega[2] * self.x
            field += np.cos(argument, dtype=np.float32)
        field *= np.float32(np.sqrt(2.0 / terms))
        return field


def _ellipsoid(grid: _Grid, centre: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
    """Squared normalised radius ‖(p − c)/a‖² on the grid."""
    return (
        ((grid.z - centre[0]) / semi_axes[0]) ** 2
        + ((grid.y - centre[1]) / semi_axes[1]) ** 2
        + ((grid.x - centre[2]) / semi_axes[2]) ** 2
    )


def _anatomy(grid: _Grid, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Tissue map (uint8 codes) and brain mask, plus the geometry the tumour placement needs."""
    shape = np.array(grid.shape, dtype=np.float64)
    centre = shape / 2.0 + rng.uniform(-0.02, 0.02, size=3) * shape
    # Brain proportions: longest anterior-posterior (y), then left-right (x), then superior-inferior.
    semi_axes = shape * np.array([0.40, 0.42, 0.36]) * rng.uniform(0.95, 1.05, size=3)
    mean_axis = float(np.mean(semi_axes))

    radius = np.sqrt(_ellipsoid(grid, centre, semi_axes))
    surface_field = grid.smooth_field(rng, (0.5 * mean_axis, 1.2 * mean_axis), terms=6)
    radius *= 1.0 + 0.035 * surface_field
    brain = radius < 1.0
    depth = 1.0 - radius  # 0 at the brain surface, 1 at the centre

    # Cortex: a grey band about 3 mm thick under the surface, folded into sulci. The sulci are the
    # zero-level sheets of a short-wavelength field f_gyri (gyri ~ 10-18 mm wide): a CSF cleft
    # where |f| is small and depth < 9 mm, lined by grey matter where |f| is moderately small.
    gyri = grid.smooth_field(rng, (10.0, 18.0), terms=10)
    fold_distance = np.abs(gyri)
    voxel = 1.0 / mean_axis  # one voxel expressed in normalised depth units
    grey = brain & ((depth < 3.0 * voxel) | ((fold_distance < 0.55) & (depth < 11.0 * voxel)))
    csf = brain & ((depth < 0.8 * voxel) | ((fold_distance < 0.12) & (depth < 9.0 * voxel)))

    # Lateral ventricles: ellipsoids either side of the midline, bent into a banana shape by
    # shifting their vertical centre with the anterior-posterior coordinate.
    u_y = (grid.y - centre[1]) / semi_axes[1]
    bend = 0.25 * semi_axes[0] * u_y**2
    ventricle_axes = semi_axes * np.array([0.20, 0.42, 0.10])
    ventricles = np.zeros(grid.shape, dtype=bool)
    for side in (-1.0, 1.0):
        offset_x = side * 0.13 * semi_axes[2]
        squared = (
            ((grid.z - (centre[0] + 0.12 * semi_axes[0] - bend)) / ventricle_axes[0]) ** 2
            + ((grid.y - centre[1]) / ventricle_axes[1]) ** 2
            + ((grid.x - (centre[2] + offset_x)) / ventricle_axes[2]) ** 2
        )
        ventricles |= squared < 1.0
    third = _ellipsoid(grid, centre - np.array([0.05 * semi_axes[0], 0.0, 0.0]),
                       semi_axes * np.array([0.18, 0.16, 0.025]) + np.array([0.0, 0.0, 0.6]))
    ventricles |= third < 1.0

    deep_grey = np.zeros(grid.shape, dtype=bool)
    for side in (-1.0, 1.0):
        nucleus_centre = centre + np.array([-0.05 * semi_axes[0], 0.05 * semi_axes[1], side * 0.30 * semi_axes[2]])
        deep_grey |= _ellipsoid(grid, nucleus_centre, semi_axes * np.array([0.22, 0.20, 0.12])) < 1.0

    tissue = np.full(grid.shape, TISSUE_WHITE, dtype=np.uint8)
    tissue[deep_grey] = TISSUE_DEEP_GREY
    tissue[grey] = TISSUE_GREY
    tissue[csf | ventricles] = TISSUE_CSF
    tissue[~brain] = TISSUE_BACKGROUND
    geometry = {"centre": centre, "semi_axes": semi_axes}
    return tissue, brain, geometry


def _place_tumour(
    tissue: np.ndarray, brain: np.ndarray, geometry: dict, rng: np.random.Generator
) -> np.ndarray:
    """Write the tumour into ``tissue`` (in place) and return the BraTS label map (uint8)."""
    centre, semi_axes = geometry["centre"], geometry["semi_axes"]
    min_axis = float(semi_axes.min())
    core_radius = rng.uniform(0.30, 0.42) * min_axis
    # Keep the core (radius R) inside the brain: in normalised coordinates its centre may sit at
    # most 0.88 − R/min_axis from the brain centre (0.88 leaves room for the lumpy surface).
    max_offset = max(0.1, 0.88 - core_radius / min_axis)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-12
    tumour_centre = centre + semi_axes * direction * rng.uniform(0.15, max_offset)

    necrotic_ratio = rng.uniform(0.50, 0.68)
    oedema_ratio = rng.uniform(1.5, 1.9)
    # Work in a bounding box around the oedema only: the tumour covers a few % of the volume.
    reach = oedema_ratio * 1.35 * core_radius + 2.0
    lower = np.maximum(np.floor(tumour_centre - reach).astype(int), 0)
    upper = np.minimum(np.ceil(tumour_centre + reach).astype(int) + 1, np.array(tissue.shape))
    box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper))
    local = _Grid(tuple(int(v) for v in upper - lower), origin=lower)

    distance = np.sqrt(_ellipsoid(local, tumour_centre, (core_radius,) * 3))
    core_shape = local.smooth_field(rng, (0.8 * core_radius, 2.5 * core_radius), terms=6)
    finger_shape = local.smooth_field(rng, (0.5 * core_radius, 1.5 * core_radius), terms=8)
    rho_core = distance * (1.0 + 0.12 * core_shape)
    rho_oedema = distance * (1.0 + 0.22 * finger_shape)

    box_tissue = tissue[box]
    box_brain = brain[box]
    necrosis = box_brain & (rho_core < necrotic_ratio)
    enhancing = box_brain & (rho_core < 1.0) & ~necrosis
    oedema = (
        box_brain
        & (rho_oedema < oedema_ratio)
        & ~(necrosis | enhancing)
        & (box_tissue != TISSUE_CSF)
    )

    seg = np.zeros(tissue.shape, dtype=np.uint8)
    box_seg = seg[box]
    box_seg[oedema] = LABEL_OEDEMA
    box_seg[enhancing] = LABEL_ENHANCING
    box_seg[necrosis] = LABEL_NECROSIS
    box_tissue[oedema] = TISSUE_OEDEMA
    box_tissue[enhancing] = TISSUE_ENHANCING
    box_tissue[necrosis] = TISSUE_NECROSIS
    return seg


def _render(
    tissue: np.ndarray, brain: np.ndarray, modality: str, grid: _Grid, rng: np.random.Generator
) -> np.ndarray:
    """Tissue map → intensity image with texture, partial volume, bias field and Rician noise."""
    lookup = np.zeros(256, dtype=np.float32)
    for code, value in TISSUE_INTENSITY[modality].items():
        lookup[code] = value
    image = lookup[tissue]
    # Fine texture (±3 %) inside tissue, stronger (±8 %) inside the tumour, which is heterogeneous.
    texture = grid.smooth_field(rng, (3.0, 7.0), terms=8)
    heterogeneity = np.where(tissue >= TISSUE_NECROSIS, np.float32(0.08), np.float32(0.03))
    image *= 1.0 + heterogeneity * texture
    image = ndimage.gaussian_filter(image, PARTIAL_VOLUME_SIGMA, truncate=3.0)

    field_of_view = float(max(grid.shape))
    bias = grid.smooth_field(rng, (1.5 * field_of_view, 3.0 * field_of_view), terms=4)
    image *= np.exp(np.float32(0.12) * bias)

    sigma = NOISE_FRACTION_OF_WHITE * TISSUE_INTENSITY[modality][TISSUE_WHITE]
    real = image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    image = np.sqrt(real * real + imaginary * imaginary)
    image[~brain] = 0.0  # skull-stripped: exactly zero background, as in BraTS
    return image.astype(np.float32, copy=False)


def make_phantom_case(
    shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0, return_tissue: bool = False
) -> Dict[str, np.ndarray]:
    """One synthetic BraTS-style case, arrays indexed (z, y, x).

    Returns ``{"t1ce": float32, "flair": float32, "seg": uint8}`` with BraTS-2021 labels
    (1 necrosis, 2 oedema, 4 enhancing rim); with ``return_tissue=True`` also ``"tissue"``
    (uint8 codes ``TISSUE_*``: 1 CSF incl. ventricles, 2 cortical grey, 3 white, 4 deep grey,
    5-7 tumour compartments), which tests use to check contrasts. The same (shape, seed) always
    gives the same case.
    """
    dims = _validate_shape(shape)
    rng = np.random.default_rng(seed)
    grid = _Grid(dims)
    tissue, brain, geometry = _anatomy(grid, rng)
    seg = _place_tumour(tissue, brain, geometry, rng)
    case = {modality: _render(tissue, brain, modality, grid, rng) for modality in PHANTOM_MODALITIES}
    case["seg"] = seg
    if return_tissue:
        case["tissue"] = tissue
    return case


def phantom_case_name(index: int) -> str:
    """BraTS-2021-style folder/file stem of phantom case ``index``: ``BraTS2021_Phantom_00000``."""
    return f"BraTS2021_Phantom_{index:05d}"


def phantom_case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` in a set generated with ``seed``: independent streams per case."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def _write_image_atomically(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk  # local import: the phantom generator itself needs only numpy/scipy

    image = sitk.GetImageFromArray(array)  # numpy (z, y, x) → ITK (x, y, z)
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    # SimpleITK picks the format from the extension, so the temporary name keeps ".nii.gz"; the
    # leading dot hides it from case discovery if a crash leaves it behind.
    with atomic_file(path) as temp:
        sitk.WriteImage(image, str(temp), True)


def write_phantom_cases(
    out_dir: os.PathLike | str,
    cases: int = 2,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> List[Path]:
    """Write ``cases`` phantom cases in BraTS-2021 naming and return their folders.

    Layout: ``out_dir/BraTS2021_Phantom_00000/BraTS2021_Phantom_00000_{t1ce,flair,seg}.nii.gz``,
    intensities float32, seg uint8, 1 mm spacing, identity direction. Case ``i`` uses seed
    ``phantom_case_seed(seed, i)``, so a set is reproducible and different seeds give unrelated
    sets. Each file is written to a temporary name and renamed. ``progress(done, total)`` is
    called after every case.
    """
    if int(cases) < 1:
        raise ValueError(f"number of phantom cases must be >= 1, got {cases}")
    dims = _validate_shape(shape)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"phantom output {out} exists and is not a directory")
    written: List[Path] = []
    for index in range(int(cases)):
        name = phantom_case_name(index)
        case_dir = out / name
        case_dir.mkdir(parents=True, exist_ok=True)
        volumes = make_phantom_case(dims, seed=phantom_case_seed(seed, index))
        for key in (*PHANTOM_MODALITIES, "seg"):
            _write_image_atomically(volumes[key], case_dir / f"{name}_{key}.nii.gz")
        written.append(case_dir)
        if progress is not None:
            progress(index + 1, int(cases))
    return written
