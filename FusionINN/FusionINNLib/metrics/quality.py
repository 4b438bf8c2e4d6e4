"""Image-fusion quality metrics: the FusionINN paper's five, MMIF-AMIN's set and decomposition metrics.

Every metric is a plain function of numpy arrays (numpy / scipy only, fully vectorised: no Python loop
over pixels or windows). Two modes:

* default (``paper_compatible=False``): the *intended* full-image definitions (Z. Liu's toolbox for
  Q_XY and Q_P, Haghighat's Fast-FMI on the grey image), with degenerate cases defined sensibly;
* ``paper_compatible=True``: what produced Table 1 of the FusionINN paper (Kumar et al., 2024) —
  the authors' MATLAB code as shipped, including its centre-patch Q_XY (3×3) and Q_P (11×11), Q_FMI
  over the three identical planes of their RGBA PNGs side by side, the sequential summation that
  decides flat FMI windows, and the 8-bit quantisation of their PNGs.

Intensity scale (both modes, see ``docs/metrics.md``): when all inputs are ``uint8`` they are scored
on their 0..255 scale with data range L = 255, exactly as the authors' code does; other inputs are
min–max normalised per image (per volume for 3-D inputs) to [0, 1] with L = 1; ``data_range=R``
overrides this: the values are used as they are, with L = R. Histogram metrics (EN, MI, NMI,
Q_NCIE) always work on 256 grey levels: the uint8 values, else round(255·x/L) of the scored values
(which lie in [0, L]; with ``data_range`` values outside [0, R] are clipped, with a note).

Public entry points: :func:`fusion_metrics`, :func:`decomposition_metrics`,
:data:`METRIC_DESCRIPTIONS`, plus one function per metric (2-D images).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

# The public names are listed once, in the package's __all__ (metrics/__init__.py).
FUSION_METRIC_NAMES: Tuple[str, ...] = (
    "Q_SSIM", "Q_FMI", "Q_NCIE", "Q_XY", "Q_P",
    "EN", "AG", "SD", "SF", "MI", "NMI", "PSNR", "VIFF", "QABF",
)
DECOMPOSITION_METRIC_NAMES: Tuple[str, ...] = ("SSIM", "PSNR", "MAE")

METRIC_DESCRIPTIONS: Dict[str, str] = {
    "Q_SSIM": "Mean SSIM of the fused image against each source (Wang 2004; 0..1, higher is better)",
    "Q_FMI": "Fast feature mutual information on raw pixels, 3x3 windows (Haghighat 2014; 0..1, higher better)",
    "Q_NCIE": "Nonlinear correlation information entropy of sources and fusion (Wang 2008; 0..1, higher better)",
    "Q_XY": "Edge-information preservation Q^AB/F (Xydeas & Petrovic 2000; 0..1, higher better)",
    "Q_P": "Piella's SSIM-based fusion quality index (Piella & Heijmans 2003; <=1, higher better)",
    "EN": "Shannon entropy of the fused image's 256-level histogram in bits (higher = more information)",
    "AG": "Average gradient of the fused image (sharpness; higher = more detail; depends on the scale)",
    "SD": "Standard deviation of the fused image (contrast; depends on the intensity scale)",
    "SF": "Spatial frequency of the fused image (overall activity; depends on the intensity scale)",
    "MI": "Mutual information MI(A,F) + MI(B,F) in bits (256-level histograms; higher better)",
    "NMI": "Normalised mutual information (Hossny 2008; 0..2, higher better)",
    "PSNR": "Peak signal-to-noise ratio in dB against the source(s) (higher is better)",
    "VIFF": "Visual information fidelity for fusion (Han et al. 2013; higher better)",
    "QABF": "Full-image Q^AB/F edge preservation (= Q_XY of the intended definition; 0..1, higher better)",
    "SSIM": "SSIM of a decomposed image against its source (Wang 2004; 0..1, higher better)",
    "MAE": "Mean absolute error of a decomposed image against its source (lower is better)",
}


class MetricWarning(RuntimeWarning):
    """A metric met a degenerate input (constant image, empty mask, tiny image) and returned a defined
    value or NaN; the message says which and why."""


def _warn(message: str, stacklevel: int = 3) -> None:
    warnings.warn(message, MetricWarning, stacklevel=stacklevel)


# ------------------------------------------------------------------------------------------------
# Input validation and intensity scaling
# ------------------------------------------------------------------------------------------------

# matplotlib's 'gray' colormap stores 256 float levels; ``plt.imsave`` converts them to bytes by
# truncating 255*level, and 24 of the levels land one below their index (checked with matplotlib
# 3.11; see spec metrics.md section 0). These are the indices that come out one lower.
_MATPLOTLIB_GRAY_ONE_LOWER = (33, 37, 41, 45, 49, 53, 57, 61, 66, 74, 82, 90, 98, 106, 114, 122,
                              132, 148, 164, 180, 196, 212, 228, 244)
_MATPLOTLIB_GRAY_BYTES = np.arange(256, dtype=np.int64)
_MATPLOTLIB_GRAY_BYTES[list(_MATPLOTLIB_GRAY_ONE_LOWER)] -= 1


def quantise_like_matplotlib(x01: np.ndarray) -> np.ndarray:
    """Grey levels that ``plt.imsave(path, x, cmap='gray', vmin=0, vmax=1)`` writes for values in [0, 1].

    Colormap index = floor(256·x) clipped to 0..255 (values outside [0, 1] take the end colours),
    then the byte stored for that index (equal to the index except for 24 indices that come out one
    lower). This is the 8-bit quantisation of the FusionINN authors' PNGs. Returns int64 levels.
    """
    index = np.clip(np.floor(np.asarray(x01, dtype=np.float64) * 256.0), 0, 255).astype(np.int64)
    return _MATPLOTLIB_GRAY_BYTES[index]


def _check_array(x, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{name}: expected a numeric array, got dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise ValueError(f"{name}: complex images are not supported (dtype {array.dtype})")
    if array.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a 2-D image or a 3-D volume, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name}: the image is empty (shape {array.shape})")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


def _check_inputs(arrays: Sequence[np.ndarray], names: Sequence[str], mask) -> Tuple[list, Optional[np.ndarray]]:
    checked = [_check_array(a, n) for a, n in zip(arrays, names)]
    shape = checked[0].shape
    for array, name in zip(checked[1:], names[1:]):
        if array.shape != shape:
            raise ValueError(f"{name}: shape {array.shape} differs from {names[0]} shape {shape}")
    mask_array = None
    if mask is not None:
        mask_array = _check_array(mask, "mask")
        if mask_array.shape != shape:
            raise ValueError(f"mask: shape {mask_array.shape} differs from the image shape {shape}")
        mask_array = mask_array != 0
    return checked, mask_array


def _check_data_range(data_range) -> Optional[float]:
    if data_range is None:
        return None
    value = float(data_range)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    return value


@dataclass
class _Scaled:
    """Images of one metric call on their scoring scale.

    values: float64 intensities the metrics see; data_range: L for the SSIM/VIFF/PSNR constants;
    levels: uint8 grey levels 0..255 for the histogram metrics; ssim_values/ssim_range: what Q_SSIM
    sees (equal to values/data_range except in paper mode for non-8-bit inputs, where the paper
    computed Q_SSIM on the unquantised [0, 1] tensors).
    """

    values: List[np.ndarray]
    levels: List[np.ndarray]
    data_range: float
    ssim_values: List[np.ndarray]
    ssim_range: float


def _minmax01(x: np.ndarray, name: str, notes: List[str]) -> np.ndarray:
    x = x.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        notes.append(f"{name} is constant ({lo:g}); it is scored as an all-zero image")
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _levels_from(values: np.ndarray, data_range: float) -> np.ndarray:
    """Grey levels round(255·x/L) of images on [0, L], clipped to 0..255; MATLAB-style rounding
    (half away from zero; np.round would round half to even)."""
    return np.clip(np.floor(values * (255.0 / data_range) + 0.5), 0, 255).astype(np.uint8)


def _scale_default(images: Sequence[np.ndarray], names: Sequence[str], data_range: Optional[float],
                   notes: List[str]) -> _Scaled:
    all_uint8 = all(img.dtype == np.uint8 for img in images)
    if data_range is not None:
        values = [img.astype(np.float64) for img in images]
        for v, name in zip(values, names):
            if v.min() < 0 or v.max() > data_range:
                notes.append(f"{name} has values outside [0, data_range={data_range:g}]; the histogram "
                             "metrics (EN, MI, NMI, Q_NCIE) clip them to the end grey levels")
        levels = [_levels_from(v, data_range) for v in values]
        scale = data_range
    elif all_uint8:
        values = [img.astype(np.float64) for img in images]
        levels = list(images)
        scale = 255.0
    else:
        if any(img.dtype == np.uint8 for img in images):
            notes.append("inputs mix uint8 and other dtypes; every image is min-max normalised to [0, 1]")
        values = [_minmax01(img, name, notes) for img, name in zip(images, names)]
        levels = [_levels_from(v, 1.0) for v in values]
        scale = 1.0
    return _Scaled(values, levels, scale, values, scale)


def _scale_paper(images: Sequence[np.ndarray], names: Sequence[str], roles: Sequence[str],
                 data_range: Optional[float], notes: List[str]) -> _Scaled:
    """The authors' pipeline: floats in [0, 1] written by plt.imsave (sources autoscaled to their own
    min/max, the fused image with vmin=0, vmax=1), read back as 0..255 doubles."""
    if all(img.dtype == np.uint8 for img in images):
        if data_range is not None:
            notes.append("paper_compatible: uint8 inputs are already the authors' 8-bit grey levels; "
                         "data_range is not used")
        values = [img.astype(np.float64) for img in images]
        return _Scaled(values, list(images), 255.0, values, 255.0)
    unit = []
    for img, name, role in zip(images, names, roles):
        x = img.astype(np.float64)
        if data_range is not None:
            unit.append(np.clip(x / data_range, 0.0, 1.0))
        elif role == "fused" and x.min() >= 0.0 and x.max() <= 1.0:
            unit.append(x)  # plt.imsave(..., vmin=0, vmax=1) as in the authors' inn_vis.py
        else:
            if role == "fused":
                notes.append(f"paper_compatible: {name} is outside [0, 1]; it is min-max normalised "
                             "(the authors' fused images were sigmoid outputs in [0, 1])")
            unit.append(_minmax01(x, name, notes))
    levels = [quantise_like_matplotlib(u).astype(np.uint8) for u in unit]
    values = [lv.astype(np.float64) for lv in levels]
    return _Scaled(values, levels, 255.0, unit, 1.0)


def _scale(images, names, roles, paper_compatible: bool, data_range: Optional[float],
           notes: List[str]) -> _Scaled:
    if paper_compatible:
        return _scale_paper(images, names, roles, data_range, notes)
    return _scale_default(images, names, data_range, notes)


# ------------------------------------------------------------------------------------------------
# Small shared helpers
# ------------------------------------------------------------------------------------------------

def _masked_mean(values: np.ndarray, mask: Optional[np.ndarray], what: str) -> float:
    """Mean of a metric map over the positions selected by ``mask`` (same shape) or all positions."""
    if mask is not None:
        values = values[mask]
    if values.size == 0:
        _warn(f"{what}: no position to average (empty mask or image too small); result is NaN")
        return float("nan")
    return float(np.mean(values))


def _crop_mask(mask: Optional[np.ndarray], border: int) -> Optional[np.ndarray]:
    """Mask of the 'valid' positions of a (2·border+1)-wide window: a window counts when its centre
    pixel is in the mask."""
    if mask is None:
        return None
    if border == 0:
        return mask
    return mask[border:-border, border:-border]


def _entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy in bits of a histogram (0·log 0 = 0)."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(0.0 - np.sum(p * np.log2(p)))  # 0.0 − 0.0 avoids returning −0.0


def _histogram_entropies(x: np.ndarray, y: np.ndarray) -> Tuple[float, float, float]:
    """(H_X, H_Y, H_XY) in bits of the 256-level marginal and joint histograms of two level arrays."""
    joint = np.bincount((x.astype(np.intp) * 256 + y).ravel(), minlength=65536).reshape(256, 256)
    return _entropy_bits(joint.sum(1)), _entropy_bits(joint.sum(0)), _entropy_bits(joint)


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of ``size`` taps; its outer product is the normalised 2-D Gaussian of
    Wang's ssim_index / MATLAB fspecial (no tap falls below eps·max for the sizes used here)."""
    k = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(k * k) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(stack: np.ndarray, kernel_1d: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of the last two axes of ``stack`` with kernel ⊗ kernel."""
    border = (kernel_1d.size - 1) // 2
    out = ndimage.correlate1d(stack, kernel_1d, axis=-2, mode="constant")
    out = out[..., border:out.shape[-2] - border, :]
    out = ndimage.correlate1d(out, kernel_1d, axis=-1, mode="constant")
    return out[..., border:out.shape[-1] - border]


_SSIM_WINDOW = _gaussian_1d(11, 1.5)
_SSIM_BORDER = 5


@dataclass
class _Moments:
    """Local Gaussian-weighted statistics of a set of images (one-pass formulas, as Wang's code and
    pytorch-msssim compute them)."""

    means: List[np.ndarray]
    variances: List[np.ndarray]
    covariances: Dict[Tuple[int, int], np.ndarray]


def _local_moments(images: Sequence[np.ndarray], pairs: Sequence[Tuple[int, int]]) -> _Moments:
    stack = list(images) + [img * img for img in images] + [images[i] * images[j] for i, j in pairs]
    filtered = _filter_valid(np.stack(stack), _SSIM_WINDOW)
    n = len(images)
    means = [filtered[i] for i in range(n)]
    variances = [filtered[n + i] - means[i] * means[i] for i in range(n)]
    covariances = {
        pair: filtered[2 * n + k] - means[pair[0]] * means[pair[1]] for k, pair in enumerate(pairs)
    }
    return _Moments(means, variances, covariances)


def _ssim_map_pytorch(mu_x, mu_y, var_x, var_y, cov_xy, data_range: float) -> np.ndarray:
    """SSIM map in pytorch-msssim's evaluation order (K1 = 0.01, K2 = 0.03)."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    cs_map = (2 * cov_xy + c2) / (var_x + var_y + c2)
    return ((2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)) * cs_map


def _ssim_map_wang(mu_x, mu_y, var_x, var_y, cov_xy, data_range: float) -> np.ndarray:
    """SSIM map in Z. Wang's ssim_index evaluation order (K1 = 0.01, K2 = 0.03)."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))


def _too_small(shape: Tuple[int, ...], minimum: int, what: str) -> bool:
    if min(shape) < minimum:
        _warn(f"{what}: image {shape[0]}x{shape[1]} is smaller than the {minimum}x{minimum} the metric "
              "needs; result is NaN")
        return True
    return False


# ------------------------------------------------------------------------------------------------
# Cores: 2-D float64 images on their scoring scale, optional boolean mask of the same shape
# ------------------------------------------------------------------------------------------------

def _core_q_ssim(a, b, f, data_range, mask, moments: Optional[_Moments] = None) -> float:
    if _too_small(f.shape, 11, "Q_SSIM"):
        return float("nan")
    if moments is None:
        moments = _local_moments([a, b, f], [(0, 2), (1, 2)])
    mu, var, cov = moments.means, moments.variances, moments.covariances
    ssim_fa = _ssim_map_pytorch(mu[2], mu[0], var[2], var[0], cov[(0, 2)], data_range)
    ssim_fb = _ssim_map_pytorch(mu[2], mu[1], var[2], var[1], cov[(1, 2)], data_range)
    inner = _crop_mask(mask, _SSIM_BORDER)
    return 0.5 * (_masked_mean(ssim_fa, inner, "Q_SSIM") + _masked_mean(ssim_fb, inner, "Q_SSIM"))


# Flatness tolerance of the default-mode Q_P, relative to L²: one-pass local variances carry rounding
# noise of order 1e-16·L² (values up to L), so anything below 1e-10·L² is numerically flat.
_QP_FLAT_TOLERANCE = 1e-10


def _core_q_p(a, b, f, data_range, mask, paper: bool, moments: Optional[_Moments] = None) -> float:
    if paper:
        return _core_q_p_centre(a, b, f, mask)
    if _too_small(f.shape, 11, "Q_P"):
        return float("nan")
    if moments is None:
        moments = _local_moments([a, b, f], [(0, 2), (1, 2)])
    mu, cov = moments.means, moments.covariances
    var = [np.maximum(v, 0.0) for v in moments.variances]  # rounding can make them slightly negative
    total = var[0] + var[1]
    flat = total < _QP_FLAT_TOLERANCE * data_range * data_range
    weight_a = np.where(flat, 0.5, var[0] / np.where(flat, 1.0, total))
    ssim_fa = _ssim_map_wang(mu[2], mu[0], var[2], var[0], cov[(0, 2)], data_range)
    ssim_fb = _ssim_map_wang(mu[2], mu[1], var[2], var[1], cov[(1, 2)], data_range)
    q_map = weight_a * ssim_fa + (1 - weight_a) * ssim_fb
    return _masked_mean(q_map, _crop_mask(mask, _SSIM_BORDER), "Q_P")


def _centre_patch(shape: Tuple[int, int], half: int) -> Tuple[slice, slice]:
    r0, c0 = shape[0] // 2, shape[1] // 2
    return slice(r0 - half, r0 + half + 1), slice(c0 - half, c0 + half + 1)


def _core_q_p_centre(a, b, f, mask) -> float:
    """The authors' Q_P: local statistics only for the 11×11 windows centred on rows r0−5..r0+5 and
    columns c0−5..c0+5 (zero padding beyond the image, as their swapped imfilter call does),
    one-pass variances, exact-zero flatness test, L = 255."""
    pad = 10
    rows, cols = _centre_patch(f.shape, 5)
    # Windows centred at r0-5..r0+5 need image rows r0-10..r0+10 (padded indices r0..r0+20).
    window = (slice(rows.start - 5 + pad, rows.stop + 5 + pad), slice(cols.start - 5 + pad, cols.stop + 5 + pad))
    crops = [np.pad(x, pad)[window] for x in (a, b, f)]
    moments = _local_moments(crops, [(0, 1), (0, 2), (1, 2)])
    mu, var, cov = moments.means, moments.variances, moments.covariances
    var_a, var_b = var[0].copy(), var[1].copy()
    both_zero = (var_a + var_b) == 0
    var_a[both_zero] += 0.5
    var_b[both_zero] += 0.5
    weight_a = var_a / (var_a + var_b)
    ssim_fa = _ssim_map_wang(mu[2], mu[0], var[2], var[0], cov[(0, 2)], 255.0)
    ssim_fb = _ssim_map_wang(mu[2], mu[1], var[2], var[1], cov[(1, 2)], 255.0)
    q_map = weight_a * ssim_fa + (1 - weight_a) * ssim_fb
    patch_mask = None
    if mask is not None:
        patch_mask = np.pad(mask, pad)[rows.start + pad:rows.stop + pad, cols.start + pad:cols.stop + pad]
    return _masked_mean(q_map, patch_mask, "Q_P (centre 11x11)")


def _sobel_same(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Sobel responses with zero padding ('same' size), Kx = [[-1,0,1],[-2,0,2],[-1,0,1]] and
    Ky = Kx^T, as correlations (Liu's filter2). Exact for integer-valued images."""
    p = np.pad(x, 1)
    dx = p[:, 2:] - p[:, :-2]
    gx = dx[:-2] + 2 * dx[1:-1] + dx[2:]
    dy = p[2:, :] - p[:-2, :]
    gy = dy[:, :-2] + 2 * dy[:, 1:-1] + dy[:, 2:]
    return gx, gy


def _qxy_map(a, b, f) -> np.ndarray:
    """Per-pixel Q^AB/F map (Liu's metricXydeas as used by FusionINN: Γ = 1, κ_g = −10, σ_g = 0.5,
    κ_α = −20, σ_α = 0.75, weights g^1, per-pixel normalisation); the inputs are on the 0..255 scale
    because the 1e-5 guards are absolute."""
    magnitude, angle = [], []
    for x in (a, b, f):
        gx, gy = _sobel_same(x)
        magnitude.append(np.sqrt(gx * gx + gy * gy))
        gx_safe = np.where(gx == 0, 1e-5, gx)
        angle.append(np.arctan(gy / gx_safe))
    g_a, g_b, g_f = magnitude
    a_a, a_b, a_f = angle

    def preservation(g_s, a_s, g_f):
        # Order of the eps adjustments follows the original: the comparison uses the magnitudes as
        # they are, r1 uses g_f before its own eps adjustment.
        stronger = g_s > g_f
        g_s = np.where(g_s == 0, 1e-5, g_s)
        ratio_1 = g_f / g_s
        g_f = np.where(g_f == 0, 1e-5, g_f)
        ratio_2 = g_s / g_f
        strength = np.where(stronger, ratio_1, ratio_2)
        orientation = np.abs(np.abs(a_s - a_f) - np.pi / 2) * 2 / np.pi
        q_strength = 1 / (1 + np.exp(-10 * (strength - 0.5)))
        q_orientation = 1 / (1 + np.exp(-20 * (orientation - 0.75)))
        return q_strength * q_orientation, g_s, g_f

    q_af, w_a, g_f = preservation(g_a, a_a, g_f)
    q_bf, w_b, _ = preservation(g_b, a_b, g_f)
    return (q_af * w_a + q_bf * w_b) / (w_a + w_b)


def _core_q_xy(a, b, f, data_range, mask, paper: bool) -> float:
    to_255 = 255.0 / data_range
    if to_255 != 1.0:
        a, b, f = a * to_255, b * to_255, f * to_255
    q_map = _qxy_map(a, b, f)
    if not paper:
        return _masked_mean(q_map, mask, "Q_XY")
    if _too_small(f.shape, 3, "Q_XY (centre 3x3)"):
        return float("nan")
    rows, cols = _centre_patch(f.shape, 1)
    return _masked_mean(q_map[rows, cols], None if mask is None else mask[rows, cols], "Q_XY (centre 3x3)")


# --- Q_FMI ---------------------------------------------------------------------------------------
# Layout: a set of windows is a (9, n) array, row k = position k of the column-major flattened 3×3
# window, column = window. Every per-window operation is then a row operation vectorised over all
# windows, and the 9×9 joint pmfs are (9, 9, n) arrays whose contiguous last axis is the window.

_FMI_CHUNK = 2048  # windows per block of the joint pmfs: keeps the (9, 9, block) temporaries in cache
_POSITIONS = np.arange(1.0, 10.0)[:, None]


def _sequential_sum(x: np.ndarray) -> np.ndarray:
    """Left-to-right sum over the first axis (what Octave's sum does). numpy's pairwise/SIMD sum of
    nine fl(1/9) is exactly 1 while the sequential sum is 1 + 2^-52; the FMI correlation of two flat
    windows depends on that difference (spec metrics.md section 1, edge cases)."""
    total = x[0].copy()
    for k in range(1, x.shape[0]):  # 9 positions, each step vectorised over all windows
        total += x[k]
    return total


def _sequential_cumsum(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    for k in range(1, x.shape[0]):
        out[k] += out[k - 1]
    return out


def _fmi_windows(x: np.ndarray) -> np.ndarray:
    """All 3×3 windows (no padding) flattened column-major: shape (9, (H−2)(W−2))."""
    view = sliding_window_view(x, (3, 3))  # (H-2, W-2, row, col)
    return np.ascontiguousarray(view.transpose(3, 2, 0, 1)).reshape(9, -1)


def _normalise_windows(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    lo = w.min(axis=0)
    hi = w.max(axis=0)
    flat = hi == lo
    span = np.where(flat, 1.0, hi - lo)
    out = (w - lo) / span
    out[:, flat] = 1.0
    return out, flat


def _pmf_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of each column of a (9, n) pmf array (0·log 0 = 0)."""
    # |p| + 1e-300 equals |p| for every non-zero probability met here and turns log(0) into a finite
    # number that the factor p = 0 cancels: no masking pass needed.
    logs = np.log2(np.abs(p) + 1e-300)
    logs *= p
    return -logs.sum(axis=0)


def _fmi_scores_normalised(s: np.ndarray, f: np.ndarray, paper: bool) -> np.ndarray:
    """Fast-FMI score of each pair of min–max normalised windows (columns of s and f)."""
    p_s = s / _sequential_sum(s)
    p_f = f / _sequential_sum(f)
    d_s = p_s - _sequential_sum(p_s) / 9
    d_f = p_f - _sequential_sum(p_f) / 9
    numerator = _sequential_sum(d_s * d_f)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = numerator / np.sqrt(_sequential_sum(d_s * d_s) * _sequential_sum(d_f * d_f))
    corr[numerator == 0] = 0.0
    sd_s = np.sqrt(np.maximum(_sequential_sum(_POSITIONS ** 2 * p_s) - _sequential_sum(_POSITIONS * p_s) ** 2, 0))
    sd_f = np.sqrt(np.maximum(_sequential_sum(_POSITIONS ** 2 * p_f) - _sequential_sum(_POSITIONS * p_f) ** 2, 0))

    scores = np.zeros(s.shape[1])
    # Where the copula weight is 0 the joint pmf is the product of the marginals, MI = 0 and the
    # score is 0 (the authors' code gets ±1e-16 from rounding there).
    live = (corr != 0) & (sd_s != 0) & (sd_f != 0)
    for upper in (True, False):
        idx = np.flatnonzero(live & ((corr >= 0) if upper else (corr < 0)))
        for start in range(0, idx.size, _FMI_CHUNK):  # blocks of windows, each fully vectorised
            block = idx[start:start + _FMI_CHUNK]
            scores[block] = _fmi_joint_scores(p_s[:, block], p_f[:, block], corr[block], sd_s[block],
                                              sd_f[block], upper, paper)
    return scores


def _fmi_joint_scores(p_s, p_f, corr, sd_s, sd_f, upper: bool, paper: bool) -> np.ndarray:
    n = p_s.shape[1]
    cdf_f = _sequential_cumsum(p_f)[:, None, :]  # joint rows i: fused
    cdf_s = _sequential_cumsum(p_s)[None, :, :]  # joint columns j: source
    if upper:  # upper Fréchet copula min(u, v)
        if paper:  # the literal expression of the original code, 0.5(x + y − |x − y|), for its last bits
            copula = cdf_f + cdf_s
            copula -= np.abs(cdf_f - cdf_s)
            copula *= 0.5
        else:
            copula = np.minimum(cdf_f, cdf_s)
    else:  # lower Fréchet copula max(u + v − 1, 0)
        copula = cdf_f + cdf_s
        copula -= 1.0
        if paper:  # literal 0.5(t + |t|)
            copula += np.abs(copula)
            copula *= 0.5
        else:
            np.maximum(copula, 0.0, out=copula)
    # Σ_ij [copula(i,j) − P_f(i)·P_s(j)] with the product part summed in closed form (one pass
    # fewer; the order of the summation only moves the last bits).
    covariance = copula.reshape(81, n).sum(axis=0) - cdf_f.sum(axis=0)[0] * cdf_s.sum(axis=1)[0]
    weight = corr / (covariance / (sd_f * sd_s))

    # Cell masses M(i,j) − M(i−1,j) − M(i,j−1) + M(i−1,j−1), terms with a 0 index omitted.
    mass = copula.copy()
    mass[1:] -= copula[:-1]
    mass[:, 1:] -= copula[:, :-1]
    mass[1:, 1:] += copula[:-1, :-1]
    mass *= weight
    independent = p_f[:, None, :] * p_s[None, :, :]
    independent *= 1 - weight
    joint = mass
    joint += independent  # J = w·mass + (1 − w)·p_f p_sᵀ (can be slightly negative)
    h_joint = _pmf_entropy(joint.reshape(81, n))  # −Σ J·log2|J| over J ≠ 0
    h_s = _pmf_entropy(p_s)
    h_f = _pmf_entropy(p_f)
    mutual = h_s + h_f - h_joint
    with np.errstate(divide="ignore", invalid="ignore"):
        score = 2 * mutual / (h_s + h_f)
    score[mutual == 0] = 0.0
    return score


def _fmi_pair_scores(s: np.ndarray, f: np.ndarray, paper: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Scores of source windows s against fused windows f; also returns f as the authors' code leaves
    it (normalised unless the identity shortcut fired), which their (b, f) pass then compares."""
    identical = np.all(s == f, axis=0)
    s_norm, s_flat = _normalise_windows(s)
    f_norm, f_flat = _normalise_windows(f)
    scores = np.zeros(s.shape[1])
    scores[identical] = 1.0
    todo = ~identical
    if not paper:
        # Default mode defines the flat windows instead of leaving them to summation order: two flat
        # windows (at any levels) agree perfectly, a flat window against a textured one shares no
        # information (the authors' code gets 1 and ±1e-16 there by rounding).
        scores[todo & s_flat & f_flat] = 1.0
        todo &= ~(s_flat | f_flat)
    idx = np.flatnonzero(todo)
    if idx.size:
        scores[idx] = _fmi_scores_normalised(s_norm[:, idx], f_norm[:, idx], paper)
    f_after = np.where(identical, f, f_norm)
    return scores, f_after


def _fmi_window_scores(a_w, b_w, f_w, paper: bool) -> np.ndarray:
    score_af, f_after = _fmi_pair_scores(a_w, f_w, paper)
    # The authors' (b, f) identity test sees f as the (a, f) pass left it (spec section 1, step k).
    score_bf, _ = _fmi_pair_scores(b_w, f_after if paper else f_w, paper)
    return (score_af + score_bf) / 2


def _core_q_fmi(a, b, f, mask, paper: bool, rgb3: bool) -> float:
    if _too_small(f.shape, 3, "Q_FMI"):
        return float("nan")
    centres = None if mask is None else mask[1:-1, 1:-1].ravel()

    def scores_of(images, keep):
        windows = [_fmi_windows(x) for x in images]
        if keep is not None:
            windows = [w[:, keep] for w in windows]
        return _fmi_window_scores(*windows, paper)

    grey = scores_of((a, b, f), centres)
    if not rgb3:
        if grey.size == 0:
            _warn("Q_FMI: no 3x3 window centred in the mask; result is NaN")
            return float("nan")
        return float(np.mean(grey))
    # [X X X] side by side: every window inside one copy is a grey window (three times); the only
    # new windows straddle the two identical seams (columns W−2, W−1 | 0, 1 of the next copy).
    seam_columns = [f.shape[1] - 2, f.shape[1] - 1, 0, 1]
    seam_centres = None if mask is None else mask[1:-1, seam_columns][:, 1:3].ravel()
    seam = scores_of([x[:, seam_columns] for x in (a, b, f)], seam_centres)
    count = 3 * grey.size + 2 * seam.size
    if count == 0:
        _warn("Q_FMI: no 3x3 window centred in the mask; result is NaN")
        return float("nan")
    return float((3 * grey.sum() + 2 * seam.sum()) / count)


# --- histogram metrics ---------------------------------------------------------------------------

def _normalize1(levels: np.ndarray, paper: bool, what: str) -> Optional[np.ndarray]:
    """The authors' normalize1: round(255·(X − min)/(max − min)), an all-zero image left as is."""
    levels = levels.astype(np.intp)
    lo, hi = int(levels.min()), int(levels.max())
    if hi == lo:
        if hi == 0:
            return levels
        if paper:
            _warn(f"{what}: a constant non-zero image makes the authors' normalize1 divide 0 by 0 "
                  "(their MATLAB code stops); result is NaN")
            return None
        return np.zeros_like(levels)  # a constant image carries no information: one level
    scaled = (levels - lo) * 255.0 / (hi - lo)
    return np.floor(scaled + 0.5).astype(np.int64)


def _ncc(x: np.ndarray, y: np.ndarray) -> float:
    h_x, h_y, h_xy = _histogram_entropies(x, y)
    return (h_x + h_y - h_xy) / 8.0  # / log2(256 bins)


def _core_q_ncie(la, lb, lf, mask, paper: bool) -> float:
    if mask is not None:
        la, lb, lf = la[mask], lb[mask], lf[mask]
    if lf.size == 0:
        _warn("Q_NCIE: empty mask; result is NaN")
        return float("nan")
    normalised = [_normalize1(x, paper, "Q_NCIE") for x in (la, lb, lf)]
    if any(x is None for x in normalised):
        return float("nan")
    na, nb, nf = normalised
    r_ab, r_af, r_bf = _ncc(na, nb), _ncc(na, nf), _ncc(nb, nf)
    r = np.array([[1.0, r_ab, r_af], [r_ab, 1.0, r_bf], [r_af, r_bf, 1.0]])
    eigenvalues = np.linalg.eigvalsh(r)
    if not paper:
        # R is singular when images are identical (e.g. A = B = F); the solver then returns ±1e-16
        # for the zero eigenvalues, which 0·log 0 = 0 treats as exact zeros.
        eigenvalues = np.where(np.abs(eigenvalues) < 1e-12, 0.0, eigenvalues)
    if np.any(eigenvalues < 0):
        _warn("Q_NCIE: the correlation matrix has a negative eigenvalue (not positive semidefinite); "
              "the entropy is undefined (the authors' code returns a complex number); result is NaN")
        return float("nan")
    if paper and np.any(eigenvalues == 0):
        _warn("Q_NCIE: a zero eigenvalue gives 0·log(0) = NaN in the authors' code; result is NaN")
        return float("nan")
    share = eigenvalues[eigenvalues > 0] / 3.0
    h_r = -np.sum(share * np.log2(share)) / 8.0
    return float(1.0 - h_r)


def _select(levels: Sequence[np.ndarray], mask) -> Optional[List[np.ndarray]]:
    if mask is None:
        return [x.ravel() for x in levels]
    selected = [x[mask] for x in levels]
    return selected if selected[0].size else None


def _core_entropy(lf, mask) -> float:
    sel = _select([lf], mask)
    if sel is None:
        _warn("EN: empty mask; result is NaN")
        return float("nan")
    return _entropy_bits(np.bincount(sel[0], minlength=256))


def _core_mi(la, lb, lf, mask) -> float:
    sel = _select([la, lb, lf], mask)
    if sel is None:
        _warn("MI: empty mask; result is NaN")
        return float("nan")
    a, b, f = sel
    h_a, h_fa, h_af = _histogram_entropies(a, f)
    h_b, h_fb, h_bf = _histogram_entropies(b, f)
    return (h_a + h_fa - h_af) + (h_b + h_fb - h_bf)


def _core_nmi(la, lb, lf, mask, paper: bool) -> float:
    sel = _select([la, lb, lf], mask)
    if sel is None:
        _warn("NMI: empty mask; result is NaN")
        return float("nan")
    normalised = [_normalize1(x, paper, "NMI") for x in sel]
    if any(x is None for x in normalised):
        return float("nan")
    a, b, f = normalised
    total = 0.0
    for s in (a, b):
        h_s, h_f, h_sf = _histogram_entropies(s, f)
        if h_s + h_f == 0:
            # Both constant: MI = 0 = H_s + H_f. The fusion kept all of the (zero) information, so
            # the term gets the value of identical images, MI/(2H) = 1/2 — the same choice as two
            # flat FMI windows agreeing perfectly.
            total += 0.5
        else:
            total += (h_s + h_f - h_sf) / (h_s + h_f)
    return 2.0 * total


# --- intensity metrics on the fused image --------------------------------------------------------

def _core_average_gradient(f, mask) -> float:
    if _too_small(f.shape, 2, "AG"):
        return float("nan")
    dx = f[:-1, 1:] - f[:-1, :-1]
    dy = f[1:, :-1] - f[:-1, :-1]
    grad = np.sqrt((dx * dx + dy * dy) / 2)
    return _masked_mean(grad, None if mask is None else mask[:-1, :-1], "AG")


def _core_standard_deviation(f, mask) -> float:
    sel = f.ravel() if mask is None else f[mask]
    if sel.size == 0:
        _warn("SD: empty mask; result is NaN")
        return float("nan")
    return float(np.sqrt(np.mean((sel - sel.mean()) ** 2)))


def _core_spatial_frequency(f, mask) -> float:
    if _too_small(f.shape, 2, "SF"):
        return float("nan")
    row_diff = f[:, 1:] - f[:, :-1]
    col_diff = f[1:, :] - f[:-1, :]
    row_mask = None if mask is None else mask[:, :-1]
    col_mask = None if mask is None else mask[:-1, :]
    rf2 = _masked_mean(row_diff * row_diff, row_mask, "SF")
    cf2 = _masked_mean(col_diff * col_diff, col_mask, "SF")
    return float(math.sqrt(rf2 + cf2))


def _psnr_from_mse(mse: float, data_range: float, what: str) -> float:
    if math.isnan(mse):
        return float("nan")
    if mse == 0:
        _warn(f"{what}: the images are identical (MSE = 0); PSNR is +inf")
        return float("inf")
    return float(10 * math.log10(data_range * data_range / mse))


def _core_psnr(a, b, f, data_range, mask) -> float:
    mse_a = _masked_mean((a - f) ** 2, mask, "PSNR")
    mse_b = _masked_mean((b - f) ** 2, mask, "PSNR")
    return _psnr_from_mse((mse_a + mse_b) / 2, data_range, "PSNR")


# --- VIFF ----------------------------------------------------------------------------------------

_VIFF_SCALE_WEIGHTS = np.array([1.0, 0.0, 0.15, 1.0]) / 2.15
_VIFF_MIN_SIZE = 41  # smallest side for which all four scales have at least one position


def _viff_scale_maps(ref: np.ndarray, dist: np.ndarray, noise_var: float, tiny: float):
    """Han et al.'s per-scale maps for one source (ref) against the fused image (dist):
    (VID, VIND, gain) at each of the 4 scales, plus the image pair passed to the next scale."""
    out = []
    for scale in range(4):
        size = 2 ** (4 - scale) + 1
        kernel = _gaussian_1d(size, size / 5.0)
        if scale > 0:
            ref, dist = _filter_valid(np.stack([ref, dist]), kernel)[:, ::2, ::2]
        mu_r, mu_d, rr, dd, rd = _filter_valid(np.stack([ref, dist, ref * ref, dist * dist, ref * dist]), kernel)
        var_r = np.maximum(rr - mu_r * mu_r, 0.0)
        var_d = np.maximum(dd - mu_d * mu_d, 0.0)
        cov = rd - mu_r * mu_d
        gain = cov / (var_r + tiny)
        sv = var_d - gain * cov
        ref_flat = var_r < tiny
        gain[ref_flat] = 0.0
        sv[ref_flat] = var_d[ref_flat]
        var_r[ref_flat] = 0.0
        dist_flat = var_d < tiny
        gain[dist_flat] = 0.0
        sv[dist_flat] = 0.0
        negative = gain < 0
        sv[negative] = var_d[negative]
        gain[negative] = 0.0
        sv[sv <= tiny] = tiny
        vid = np.log10(1 + gain * gain * var_r / (sv + noise_var))
        vind = np.log10(1 + var_r / noise_var)
        out.append((vid, vind, gain))
    return out


def _viff_masks(mask: Optional[np.ndarray]) -> List[Optional[np.ndarray]]:
    """Map positions of each VIFF scale whose centre pixel lies in the mask (same geometry as the
    'valid' filtering and the 2:1 subsampling of the images)."""
    if mask is None:
        return [None] * 4
    out = []
    current = mask
    for scale in range(4):
        border = 2 ** (3 - scale)
        if scale > 0:
            current = current[border:current.shape[0] - border, border:current.shape[1] - border][::2, ::2]
        out.append(current[border:current.shape[0] - border, border:current.shape[1] - border])
    return out


def _core_viff(a, b, f, data_range, mask) -> float:
    if _too_small(f.shape, _VIFF_MIN_SIZE, "VIFF"):
        return float("nan")
    # Han et al. use a visual noise variance of 0.005·255² and absolute 1e-10 guards on 0..255 data;
    # scaling both with L² makes the metric independent of the intensity scale.
    scale_sq = (data_range / 255.0) ** 2
    noise_var = 0.005 * data_range * data_range
    tiny = 1e-10 * scale_sq
    maps_a = _viff_scale_maps(a, f, noise_var, tiny)
    maps_b = _viff_scale_maps(b, f, noise_var, tiny)
    regularizer = 1e-7  # Han et al.'s per-position constant C
    total = 0.0
    for scale, ((vid_a, vind_a, g_a), (vid_b, vind_b, g_b), keep) in enumerate(
            zip(maps_a, maps_b, _viff_masks(mask))):
        if _VIFF_SCALE_WEIGHTS[scale] == 0:
            continue
        use_a = g_a < g_b  # per position, the source with the smaller gain
        vid = np.where(use_a, vid_a, vid_b)
        vind = np.where(use_a, vind_a, vind_b)
        if keep is not None:
            vid, vind = vid[keep], vind[keep]
        if vid.size == 0:
            _warn(f"VIFF: no position of scale {scale + 1} lies in the mask; result is NaN")
            return float("nan")
        total += _VIFF_SCALE_WEIGHTS[scale] * (np.sum(vid + regularizer) / np.sum(vind + regularizer))
    return float(total)


# ------------------------------------------------------------------------------------------------
# Public per-metric functions (2-D images)
# ------------------------------------------------------------------------------------------------

_ROLES3 = ("source", "source", "fused")
_NAMES3 = ("source1", "source2", "fused")


def _prepare3(source1, source2, fused, mask, paper_compatible, data_range) -> Tuple[_Scaled, Optional[np.ndarray]]:
    (a, b, f), mask_array = _check_inputs([source1, source2, fused], _NAMES3, mask)
    if a.ndim != 2:
        raise ValueError(f"expected 2-D images, got shape {a.shape}; use fusion_metrics() for volumes")
    notes: List[str] = []
    scaled = _scale([a, b, f], _NAMES3, _ROLES3, paper_compatible, _check_data_range(data_range), notes)
    for note in notes:
        _warn(note)
    return scaled, mask_array


def _prepare_fused(fused, mask, paper_compatible, data_range) -> Tuple[_Scaled, Optional[np.ndarray]]:
    (f,), mask_array = _check_inputs([fused], ("fused",), mask)
    if f.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {f.shape}; use fusion_metrics() for volumes")
    notes: List[str] = []
    scaled = _scale([f], ("fused",), ("fused",), paper_compatible, _check_data_range(data_range), notes)
    for note in notes:
        _warn(note)
    return scaled, mask_array


def q_ssim(source1, source2, fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """Q_SSIM = (SSIM(F, A) + SSIM(F, B)) / 2 (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 13(4), 2004).

    SSIM as pytorch-msssim computes it (the paper's ssim_test.py): separable 11-tap Gaussian window,
    σ = 1.5, 'valid' maps of size (H−10)×(W−10), C1 = (0.01·L)², C2 = (0.03·L)², one-pass local
    statistics μ, σ² = E_w[X²] − μ², σ_XY = E_w[XY] − μ_X μ_Y and
    SSIM map = (2μ_Xμ_Y + C1)/(μ_X² + μ_Y² + C1) · (2σ_XY + C2)/(σ_X² + σ_Y² + C2), averaged over the
    map (over the windows whose centre is in ``mask``). Computed in float64 with a float64 window
    (pytorch-msssim builds its window in float32: differences ~5e-7).
    Paper mode: on the unquantised [0, 1] images (the paper scored float tensors, not PNGs).
    For pytorch-msssim's ssim(F, X, data_range=1) on float images already in [0, 1] pass
    ``data_range=1`` (the default rule would min–max stretch images that do not span [0, 1]).
    Images smaller than 11×11: NaN with a MetricWarning.
    """
    scaled, m = _prepare3(source1, source2, fused, mask, paper_compatible, data_range)
    a, b, f = scaled.ssim_values
    return _core_q_ssim(a, b, f, scaled.ssim_range, m)


def q_fmi(source1, source2, fused, *, mask=None, paper_compatible=False, data_range=None,
          rgb3: Optional[bool] = None) -> float:
    """Q_FMI: fast feature mutual information on raw pixels with 3×3 windows (Haghighat & Razian,
    "Fast-FMI", IEEE AICT 2014; the authors' fmi.m with feature 'none', w = 3).

    For every window position with a full 3×3 neighbourhood the windows a, b, f are min–max
    normalised (a flat window becomes all ones), flattened column-major to pmfs p = x/Σx over the
    positions k = 1..9, and compared: c = Pearson correlation of the pmfs,
    sd = sqrt(Σk²p − (Σkp)²), joint pmf J = φ·U + (1 − φ)·p_f p_sᵀ where U are the cell masses of
    the upper Fréchet copula min(P_f, P_s) of the CDFs and φ = c·sd_f·sd_s/Σ(min(P_f,P_s) − P_f P_s)
    (for c < 0 the lower copula max(P_f + P_s − 1, 0) instead), MI = H_s + H_f − H_J (bits) and the
    window score 2·MI/(H_s + H_f). Q_FMI = mean over windows of (score(a,f) + score(b,f)) / 2.

    Degenerate windows: identical raw windows score 1 (the authors' shortcut). Default mode also
    defines explicitly: two flat windows (at any levels, e.g. a black source background against a
    fused background of 1) score 1, a flat window against a textured one scores 0. Paper mode
    reproduces the authors' arithmetic instead (sequential sums, literal min/max expressions, the
    (b, f) identity test against the already normalised f), which gives the same 1 for two flat
    windows — only because of the sequential summation — and ±1e-16 for flat-vs-textured windows.
    Windows whose copula weight is 0 (c = 0 or a point-mass pmf, sd = 0) have MI = 0 and score 0 in
    both modes; in particular two windows whose only texture is one bright pixel (point masses,
    H = 0, MI/H = 0/0) score 0 as in the original code unless they are identical.

    ``rgb3`` (default: ``paper_compatible``) scores the H×3W image [X X X], as the authors' MATLAB
    call on their RGBA PNGs did: the grey windows three times plus the windows straddling the two
    seams. Images smaller than 3×3: NaN with a MetricWarning.
    """
    scaled, m = _prepare3(source1, source2, fused, mask, paper_compatible, data_range)
    a, b, f = scaled.values
    return _core_q_fmi(a, b, f, m, paper_compatible, paper_compatible if rgb3 is None else bool(rgb3))


def q_ncie(source1, source2, fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """Q_NCIE: nonlinear correlation information entropy (Q. Wang, Y. Shen & J. Jin, "Performance
    evaluation of image fusion techniques", in Image Fusion: Algorithms and Applications, 2008).

    Each image's 256 grey levels are stretched to 0..255 (round(255·(X − min)/(max − min)), the
    authors' normalize1); NCC(X, Y) = (H_X + H_Y − H_XY)/log2(256) from the 256×256 joint histogram
    (bits); R = [[1, NCC(A,B), NCC(A,F)], [NCC(A,B), 1, NCC(B,F)], [NCC(A,F), NCC(B,F), 1]];
    with eigenvalues λ_i of R: H_R = −Σ (λ_i/3)·log2(λ_i/3)/log2(256) and Q_NCIE = 1 − H_R.
    With a mask the histograms (and the stretch) use the masked pixels only.

    Note NCC(X, X) = H_X/8, so Q_NCIE = 1 needs identical images with 8 bits of entropy; independent
    images give 1 − log2(3)/8 ≈ 0.8019, the minimum for R = I.

    Degenerate cases: default mode scores a constant image as one grey level (it shares no
    information with anything, NCC = 0) and treats eigenvalues below 1e-12 in magnitude as 0 with
    0·log 0 = 0 (R is singular when all NCC are 1). Paper mode returns NaN with a MetricWarning where the authors'
    code fails: a constant non-zero image (0/0 in normalize1), a zero eigenvalue (0·log 0 = NaN).
    A negative eigenvalue (R not positive semidefinite; MATLAB returns a complex number) gives NaN
    with a warning in both modes.
    """
    scaled, m = _prepare3(source1, source2, fused, mask, paper_compatible, data_range)
    return _core_q_ncie(*scaled.levels, m, paper_compatible)


def q_xy(source1, source2, fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """Q_XY: Xydeas & Petrovic's edge-preservation index Q^AB/F (Electronics Letters 36(4), 2000), as
    in Z. Liu's fusion-metric toolbox (metricXydeas).

    Sobel responses with zero padding, magnitude g = sqrt(gx² + gy²), orientation α = arctan(gy/gx)
    (gx = 1e-5 where it is 0). For S ∈ {A, B}: G_SF = min/max ratio of g_S and g_F (zero magnitudes
    replaced by 1e-5), A_SF = ||α_S − α_F| − π/2|·2/π,
    Q_SF = 1/(1 + e^{−10(G_SF − 0.5)}) · 1/(1 + e^{−20(A_SF − 0.75)}), and per pixel
    Q = (Q_AF·g_A + Q_BF·g_B)/(g_A + g_B); Q_XY = mean of that map (over the mask). The sigmoid
    constants and the per-pixel normalisation are those of the FusionINN authors' copy. The image is
    scored on the 0..255 scale (values·255/L) because the 1e-5 guards are absolute.

    Default mode: the whole image (the intended definition, ``Q_XY_liu`` in the spec). Paper mode:
    only the central 3×3 pixels (rows/cols floor(H/2)−1..+1), which is what the authors' code
    computes because of swapped imfilter arguments. Flat regions score (Q_AF + Q_BF)/2 with G = 1.
    With these sigmoids a perfect fusion (F = A = B) scores 1/(1 + e^-5)² ≈ 0.98666, not 1.
    """
    scaled, m = _prepare3(source1, source2, fused, mask, paper_compatible, data_range)
    return _core_q_xy(*scaled.values, scaled.data_range, m, paper_compatible)


def qabf(source1, source2, fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """QABF: the full-image Q^AB/F of :func:`q_xy` (default-mode definition) in both modes — the value
    MMIF-AMIN and most of the fusion literature report. In paper mode the input still goes through
    the authors' 8-bit quantisation."""
    scaled, m = _prepare3(source1, source2, fused, mask, paper_compatible, data_range)
    return _core_q_xy(*scaled.values, scaled.data_range, m, False)


def q_p(source1, source2, fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """Q_P: Piella & Heijmans' fusion quality index, SSIM based (ICIP 2003; the authors'
    metricPeilla variant 1 on Z. Wang's ssim_index).

    Local statistics with the normalised 11×11 Gaussian window (σ = 1.5), C1 = (0.01·L)²,
    C2 = (0.03·L)²; λ = σ_A²/(σ_A² + σ_B²); Q = λ·SSIM(F, A) + (1 − λ)·SSIM(F, B) per window;
    Q_P = mean of Q.

    Default mode (``Q_P_liu``): all 'valid' windows (centre in the mask), variances clamped at 0 and
    windows with σ_A² + σ_B² < 1e-10·L² treated as flat (λ = 0.5) — the one-pass variances there
    are rounding noise (≲1e-15·L²) and noise/noise would make λ arbitrary.
    Paper mode: only the 11×11 windows centred on rows/cols floor(H/2)−5..+5 (the authors' swapped
    imfilter arguments), L = 255, one-pass variances, λ = 0.5 only where σ_A² + σ_B² is exactly 0 —
    bit-exact reproduction is impossible in near-flat non-zero regions (noise/noise).
    Images smaller than 11×11 in default mode: NaN with a MetricWarning.
    """
    scaled, m = _prepare3(source1, source2, fused, mask, paper_compatible, data_range)
    return _core_q_p(*scaled.values, scaled.data_range, m, paper_compatible)


def entropy(fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """EN = −Σ_l p_l log2 p_l over the 256 grey levels of the fused image (Shannon entropy, bits).

    Grey levels: the uint8 values, else round(255·x/L) of the scored values (paper mode: the
    authors' 8-bit PNG levels). A constant image has EN = 0.
    """
    scaled, m = _prepare_fused(fused, mask, paper_compatible, data_range)
    return _core_entropy(scaled.levels[0], m)


def average_gradient(fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """AG = mean over the (H−1)×(W−1) grid of sqrt(((F[i,j+1] − F[i,j])² + (F[i+1,j] − F[i,j])²)/2)
    (forward differences; e.g. Cui et al., Optics Communications 341, 2015). On the scoring scale:
    0..255 for 8-bit inputs, [0, 1] for normalised ones (so values differ by the factor 255).
    With a mask, the gradients anchored at masked pixels (i, j)."""
    scaled, m = _prepare_fused(fused, mask, paper_compatible, data_range)
    return _core_average_gradient(scaled.values[0], m)


def standard_deviation(fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """SD = sqrt(mean((F − mean(F))²)) of the fused image (population SD, on the scoring scale)."""
    scaled, m = _prepare_fused(fused, mask, paper_compatible, data_range)
    return _core_standard_deviation(scaled.values[0], m)


def spatial_frequency(fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """SF = sqrt(RF² + CF²) (Eskicioglu & Fisher, IEEE Trans. Commun. 43(12), 1995) with
    RF² = mean of (F[i,j+1] − F[i,j])² and CF² = mean of (F[i+1,j] − F[i,j])² over the available
    differences (with a mask: those anchored at masked pixels). On the scoring scale."""
    scaled, m = _prepare_fused(fused, mask, paper_compatible, data_range)
    return _core_spatial_frequency(scaled.values[0], m)


def mutual_information(source1, source2, fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """MI = MI(A, F) + MI(B, F), MI(X, Y) = H_X + H_Y − H_XY in bits from the 256×256 joint histogram of
    the grey levels (the authors' mutual_info.m; Qu, Zhang & Yan, Electronics Letters 38(7), 2002)."""
    scaled, m = _prepare3(source1, source2, fused, mask, paper_compatible, data_range)
    return _core_mi(*scaled.levels, m)


def normalized_mutual_information(source1, source2, fused, *, mask=None, paper_compatible=False,
                                  data_range=None) -> float:
    """NMI = 2·[MI(A,F)/(H_A + H_F) + MI(B,F)/(H_B + H_F)] (Hossny, Nahavandi & Creighton, Electronics
    Letters 44(18), 2008; the authors' metricMI variant 1), on levels stretched as in Q_NCIE.
    Range 0..2 (2 for F = A = B). When a source and F are both constant (H = 0, 0/0) that term is
    defined as 1/2, its value for identical images (nothing to lose, nothing lost); paper mode
    returns NaN with a warning for constant non-zero images."""
    scaled, m = _prepare3(source1, source2, fused, mask, paper_compatible, data_range)
    return _core_nmi(*scaled.levels, m, paper_compatible)


def psnr(source1, source2, fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """PSNR = 10·log10(L² / MSE) with MSE = (MSE(A, F) + MSE(B, F)) / 2 (dB). MSE = 0 (F = A = B)
    gives +inf with a MetricWarning."""
    scaled, m = _prepare3(source1, source2, fused, mask, paper_compatible, data_range)
    return _core_psnr(*scaled.values, scaled.data_range, m)


def viff(source1, source2, fused, *, mask=None, paper_compatible=False, data_range=None) -> float:
    """VIFF: visual information fidelity for fusion (Han, Cai, Cao & Xu, Information Fusion 14(2),
    2013; their VIFF_Public).

    Four scales s = 1..4 with Gaussian windows of N = 2^(5−s) + 1 taps, σ = N/5 ('valid' filtering;
    from scale 2 on the images are filtered and subsampled 2:1). Per scale and source S, Sheikh &
    Bovik's pixel-domain VIF model: g = σ_SF/σ_S², σ_v² = σ_F² − g·σ_SF (guards 1e-10),
    VID = log10(1 + g²σ_S²/(σ_v² + σ_n²)), VIND = log10(1 + σ_S²/σ_n²) with visual noise
    σ_n² = 0.005·L². Per position the source with the smaller g is used; per scale
    F_s = Σ(VID + C)/Σ(VIND + C) with C = 1e-7; VIFF = Σ_s p_s F_s, p = (1, 0, 0.15, 1)/2.15.
    Han et al. work on 0..255 data; σ_n² and the guards scale with L² here, so the value does not
    depend on the intensity scale. Constant sources give 1 (C/C). Needs images of at least 41×41
    (else NaN with a MetricWarning); with a mask only positions whose centre maps into it count.
    """
    scaled, m = _prepare3(source1, source2, fused, mask, paper_compatible, data_range)
    return _core_viff(*scaled.values, scaled.data_range, m)


def _prepare_pair(source, decomposed, mask, data_range) -> Tuple[_Scaled, Optional[np.ndarray]]:
    (x, y), mask_array = _check_inputs([source, decomposed], ("source", "decomposed"), mask)
    if x.ndim != 2:
        raise ValueError(f"expected 2-D images, got shape {x.shape}; use decomposition_metrics() for volumes")
    notes: List[str] = []
    scaled = _scale_default([x, y], ("source", "decomposed"), _check_data_range(data_range), notes)
    for note in notes:
        _warn(note)
    return scaled, mask_array


def _core_pair_ssim(x, y, data_range, mask) -> float:
    if _too_small(x.shape, 11, "SSIM"):
        return float("nan")
    mom = _local_moments([x, y], [(0, 1)])
    ssim_map = _ssim_map_pytorch(mom.means[1], mom.means[0], mom.variances[1], mom.variances[0],
                                 mom.covariances[(0, 1)], data_range)
    return _masked_mean(ssim_map, _crop_mask(mask, _SSIM_BORDER), "SSIM")


def _core_pair_psnr(x, y, data_range, mask) -> float:
    return _psnr_from_mse(_masked_mean((x - y) ** 2, mask, "PSNR"), data_range, "PSNR")


def _core_pair_mae(x, y, mask) -> float:
    return _masked_mean(np.abs(x - y), mask, "MAE")


def decomposition_ssim(source, decomposed, *, mask=None, data_range=None) -> float:
    """SSIM of a decomposed image against its source, pytorch-msssim conventions (see :func:`q_ssim`)."""
    scaled, m = _prepare_pair(source, decomposed, mask, data_range)
    return _core_pair_ssim(*scaled.values, scaled.data_range, m)


def decomposition_psnr(source, decomposed, *, mask=None, data_range=None) -> float:
    """PSNR = 10·log10(L²/MSE) of a decomposed image against its source (+inf when identical)."""
    scaled, m = _prepare_pair(source, decomposed, mask, data_range)
    return _core_pair_psnr(*scaled.values, scaled.data_range, m)


def decomposition_mae(source, decomposed, *, mask=None, data_range=None) -> float:
    """MAE = mean |source − decomposed| on the scoring scale (0..255 for 8-bit, [0, 1] normalised)."""
    scaled, m = _prepare_pair(source, decomposed, mask, data_range)
    return _core_pair_mae(*scaled.values, m)


# ------------------------------------------------------------------------------------------------
# Whole-suite entry points (2-D images or 3-D volumes)
# ------------------------------------------------------------------------------------------------

def _all_fusion_metrics_2d(scaled: _Scaled, mask: Optional[np.ndarray], paper: bool) -> Dict[str, float]:
    a, b, f = scaled.values
    la, lb, lf = scaled.levels
    big_enough = min(f.shape) >= 11
    moments = _local_moments([a, b, f], [(0, 2), (1, 2)]) if big_enough else None
    if scaled.ssim_values is scaled.values:
        ssim_moments, (sa, sb, sf) = moments, scaled.values
    else:
        sa, sb, sf = scaled.ssim_values
        ssim_moments = _local_moments([sa, sb, sf], [(0, 2), (1, 2)]) if big_enough else None
    L = scaled.data_range
    q_xy_full = _core_q_xy(a, b, f, L, mask, False)
    return {
        "Q_SSIM": _core_q_ssim(sa, sb, sf, scaled.ssim_range, mask, ssim_moments),
        "Q_FMI": _core_q_fmi(a, b, f, mask, paper, paper),
        "Q_NCIE": _core_q_ncie(la, lb, lf, mask, paper),
        "Q_XY": _core_q_xy(a, b, f, L, mask, True) if paper else q_xy_full,
        "Q_P": _core_q_p(a, b, f, L, mask, paper, None if paper else moments),
        "EN": _core_entropy(lf, mask),
        "AG": _core_average_gradient(f, mask),
        "SD": _core_standard_deviation(f, mask),
        "SF": _core_spatial_frequency(f, mask),
        "MI": _core_mi(la, lb, lf, mask),
        "NMI": _core_nmi(la, lb, lf, mask, paper),
        "PSNR": _core_psnr(a, b, f, L, mask),
        "VIFF": _core_viff(a, b, f, L, mask),
        "QABF": q_xy_full,
    }


def _all_decomposition_metrics_2d(scaled: _Scaled, mask: Optional[np.ndarray], paper: bool) -> Dict[str, float]:
    x, y = scaled.values
    return {
        "SSIM": _core_pair_ssim(x, y, scaled.data_range, mask),
        "PSNR": _core_pair_psnr(x, y, scaled.data_range, mask),
        "MAE": _core_pair_mae(x, y, mask),
    }


def _collect_warnings(run: Callable[[], Dict]) -> Tuple[Dict, List[str]]:
    """Run ``run`` while recording MetricWarnings; returns its result and the distinct messages in
    order of first appearance (other warnings pass through untouched)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        result = run()
    messages: List[str] = []
    for item in caught:
        if issubclass(item.category, MetricWarning):
            text = str(item.message)
            if text not in messages:
                messages.append(text)
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    return result, messages


def _run_suite(images: Sequence, names: Sequence[str], roles: Sequence[str], mask, paper: bool,
               data_range, axis: int, metric_names: Sequence[str],
               compute: Callable[[_Scaled, Optional[np.ndarray], bool], Dict[str, float]],
               foreground_images: int) -> dict:
    checked, mask_array = _check_inputs(images, names, mask)
    data_range = _check_data_range(data_range)
    ndim = checked[0].ndim
    if ndim == 3 and not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for {ndim}-D volumes")
    notes: List[str] = []
    if mask_array is not None and not mask_array.any():
        # a table of NaN is no result: refused, as every front end does (issue 13)
        raise ValueError("the mask is empty (no non-zero voxel); there is nothing to score")
    if checked[0].ndim == 2:
        scaled = _scale(checked, names, roles, paper, data_range, notes)
        values, messages = _collect_warnings(lambda: compute(scaled, mask_array, paper))
        notes.extend(messages)
        for note in notes:
            _warn(note, stacklevel=4)
        return {"summary": {k: float(values[k]) for k in metric_names}, "per_slice": {}, "notes": notes}

    axis = axis % ndim
    volumes = [np.moveaxis(v, axis, 0) for v in checked]
    mask_slices = None if mask_array is None else np.moveaxis(mask_array, axis, 0)
    n_slices = volumes[0].shape[0]
    if mask_slices is not None:
        foreground = mask_slices.reshape(n_slices, -1).any(axis=1)
        mask_rule = "mask voxels"
    else:
        # A slice counts when one of the sources has a voxel above its volume minimum (background).
        foreground = np.zeros(n_slices, dtype=bool)
        for v in volumes[:foreground_images]:
            foreground |= (v.reshape(n_slices, -1) > v.min()).any(axis=1)
        mask_rule = "a source voxel above the source's minimum"
    if paper:
        # The authors normalised and quantised every 2-D image on its own.
        def scaled_slice(k):
            return _scale([v[k] for v in volumes], names, roles, True, data_range, notes)
    else:
        whole = _scale(volumes, names, roles, False, data_range, notes)

        def scaled_slice(k):
            return _Scaled([v[k] for v in whole.values], [lv[k] for lv in whole.levels], whole.data_range,
                           [v[k] for v in whole.ssim_values], whole.ssim_range)

    per_slice: Dict[str, List[float]] = {k: [float("nan")] * n_slices for k in metric_names}
    slice_messages: Dict[str, List[int]] = {}
    for k in np.flatnonzero(foreground):  # one iteration per 2-D slice, each fully vectorised
        sliced = scaled_slice(k)
        slice_mask = None if mask_slices is None else mask_slices[k]
        values, messages = _collect_warnings(lambda s=sliced, m=slice_mask: compute(s, m, paper))
        for name in metric_names:
            per_slice[name][k] = float(values[name])
        for text in messages:
            slice_messages.setdefault(text, []).append(int(k))
    for text, slices in slice_messages.items():
        shown = ", ".join(str(s) for s in slices[:10]) + (", ..." if len(slices) > 10 else "")
        notes.append(f"{text} (slice{'s' if len(slices) > 1 else ''} {shown})")
    n_foreground = int(foreground.sum())
    if n_foreground == 0:
        notes.append(f"no slice along axis {axis} contains foreground ({mask_rule}); all metrics are NaN")
    summary = {}
    for name in metric_names:
        vals = np.array([per_slice[name][k] for k in np.flatnonzero(foreground)], dtype=np.float64)
        finite_or_inf = vals[~np.isnan(vals)]
        if vals.size and finite_or_inf.size < vals.size:
            notes.append(f"{name}: {vals.size - finite_or_inf.size} of {vals.size} foreground slices gave "
                         "NaN and are left out of the average")
        summary[name] = float(np.mean(finite_or_inf)) if finite_or_inf.size else float("nan")
    notes = list(dict.fromkeys(notes))  # per-slice scaling (paper mode) repeats its notes
    notes.insert(0, f"averaged over {n_foreground} of {n_slices} slices along axis {axis} "
                    f"(slices with {mask_rule})")
    for note in notes[1:]:
        _warn(note, stacklevel=4)
    return {"summary": summary, "per_slice": per_slice, "notes": notes}


def fusion_metrics(source1, source2, fused, *, mask=None, paper_compatible: bool = False, data_range=None,
                   axis: int = 0) -> dict:
    """All fusion metrics of one triple: the paper's five (Q_SSIM, Q_FMI, Q_NCIE, Q_XY, Q_P) and
    MMIF-AMIN's set (EN, AG, SD, SF, MI, NMI, PSNR, VIFF, QABF); see the per-metric functions for the
    definitions and ``docs/metrics.md`` for the two modes.

    Inputs: three arrays of the same shape, 2-D images or 3-D volumes, any real dtype (uint8 → 0..255
    with L = 255; otherwise min–max normalised per image — per volume for 3-D in the default mode,
    per slice in paper mode, like the authors' per-image PNGs; ``data_range=R`` → raw values, L = R).
    ``mask``: optional array of the same shape, non-zero = foreground; every metric is restricted to
    it (windows by their centre pixel, histograms by pixel).
    3-D: metrics per 2-D slice along ``axis``; the summary is the mean over the slices containing
    foreground (mask voxels, or without a mask a source voxel above its volume minimum), leaving out
    NaN values; slices without foreground are NaN in ``per_slice``.

    Returns ``{"summary": {name: float}, "per_slice": {name: [float per slice]} (empty for 2-D),
    "notes": [str]}``; degenerate inputs give defined values or NaN, explained in ``notes`` (and
    emitted once as MetricWarning). Bad input (shape mismatch, NaN/inf values, non-numeric dtype)
    raises ValueError.
    """
    return _run_suite([source1, source2, fused], _NAMES3, _ROLES3, mask, paper_compatible, data_range, axis,
                      FUSION_METRIC_NAMES, _all_fusion_metrics_2d, foreground_images=2)


def decomposition_metrics(source, decomposed, *, mask=None, data_range=None, axis: int = 0) -> dict:
    """SSIM, PSNR and MAE of a decomposed image against its source (FusionINN paper, Table 2).

    Same input rules and result structure as :func:`fusion_metrics` (always the default mode). For
    network outputs already in [0, 1] pass ``data_range=1`` so that both images keep their scale
    (min–max normalising each image separately would hide an intensity offset or gain error).
    """
    return _run_suite([source, decomposed], ("source", "decomposed"), ("source", "fused"), mask, False,
                      data_range, axis, DECOMPOSITION_METRIC_NAMES, _all_decomposition_metrics_2d,
                      foreground_images=1)
