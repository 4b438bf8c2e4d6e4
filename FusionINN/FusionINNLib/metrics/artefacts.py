"""Artefact measures for a fused image: the 2×2 checkerboard of a squeeze-based flow and a hot
background. Each function takes 2-D slices or 3-D volumes (slices along axis 0) of one shape.

FusionINN's flow rearranges every 2×2 block into channels (i-RevNet squeeze) before its middle
coupling block and back afterwards. A model that has not learned to keep the four positions of a
block consistent leaves a fixed pattern on the squeeze grid, which the diagonal 2×2 Haar detail
picks up. Natural images (and both sources) have little diagonal detail compared with horizontal
and vertical detail, so the share of the diagonal detail in all 2×2 detail energy, compared with
the sources' share, measures the artefact independently of how much detail a slice has.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["haar_details", "diagonal_detail_share", "checkerboard_ratio", "block_boundary_ratio",
           "hot_background_fraction", "background_mask"]


def _as_stack(image, name: str) -> np.ndarray:
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a 2-D image or a 3-D volume, got shape {np.shape(image)}")
    return array


def haar_details(image) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-level 2-D Haar detail coefficients on the aligned 2×2 grid (the squeeze grid).

    For each block [[a, b], [c, d]] (rows 2i, 2i+1; columns 2j, 2j+1; an odd last row or column is
    dropped): horizontal H = (a + b − c − d)/2, vertical V = (a − b + c − d)/2, diagonal
    D = (a − b − c + d)/2 (orthonormal Haar; Mallat, *A Wavelet Tour of Signal Processing*, §7.7).
    Returns (H, V, D), each (slices, rows // 2, columns // 2).
    """
    x = _as_stack(image, "image")
    rows, cols = (x.shape[1] // 2) * 2, (x.shape[2] // 2) * 2
    x = x[:, :rows, :cols]
    a, b = x[:, 0::2, 0::2], x[:, 0::2, 1::2]
    c, d = x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    return (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2


def _block_mask(mask, shape: Tuple[int, int, int]) -> np.ndarray:
    """Blocks whose four pixels are all inside ``mask`` (all blocks when mask is None)."""
    if mask is None:
        return np.ones((shape[0], shape[1] // 2, shape[2] // 2), dtype=bool)
    m = _as_stack(mask, "mask") > 0
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} differs from the image's {shape}")
    rows, cols = (shape[1] // 2) * 2, (shape[2] // 2) * 2
    m = m[:, :rows, :cols]
    return m[:, 0::2, 0::2] & m[:, 0::2, 1::2] & m[:, 1::2, 0::2] & m[:, 1::2, 1::2]


def diagonal_detail_share(image, mask=None) -> float:
    """ΣD² / Σ(H² + V² + D²) over the 2×2 blocks inside ``mask`` (see ``haar_details``): 1/3 for
    white noise, far less for natural images, 1 for a pure checkerboard. NaN without detail."""
    x = _as_stack(image, "image")
    inside = _block_mask(mask, x.shape)
    h, v, d = haar_details(x)
    diagonal = float((d[inside] ** 2).sum())
    total = diagonal + float((h[inside] ** 2).sum()) + float((v[inside] ** 2).sum())
    return diagonal / total if total > 0 else float("nan")


def checkerboard_ratio(source1, source2, fused, mask=None) -> float:
    """Diagonal detail share of the fused image divided by the sources' share, the sources pooled
    (their diagonal energy over their total detail energy). ≈ 1 when the fused image has the
    sources' kind of detail; > 1 when it carries a 2×2 pattern of its own. The acceptance bound of
    the bundled model is ≤ 1.1 inside the brain."""
    s1, s2, f = (_as_stack(x, n) for x, n in ((source1, "source1"), (source2, "source2"), (fused, "fused")))
    if not s1.shape == s2.shape == f.shape:
        raise ValueError(f"shapes differ: {s1.shape}, {s2.shape}, {f.shape}")
    inside = _block_mask(mask, f.shape)
    energies = []
    for image in (s1, s2):
        h, v, d = haar_details(image)
        diagonal = float((d[inside] ** 2).sum())
        energies.append((diagonal, diagonal + float((h[inside] ** 2).sum()) + float((v[inside] ** 2).sum())))
    source_total = energies[0][1] + energies[1][1]
    if source_total <= 0:
        return float("nan")
    source_share = (energies[0][0] + energies[1][0]) / source_total
    fused_share = diagonal_detail_share(f, mask)
    return fused_share / source_share if source_share > 0 else float("nan")


def _boundary_energy_ratio(x: np.ndarray, inside: np.ndarray) -> float:
    """E[Δ² across 2×2 block boundaries] / E[Δ² inside blocks], rows and columns together."""
    across = within = 0.0
    n_across = n_within = 0
    for axis in (1, 2):
        diff = np.diff(x, axis=axis) ** 2
        ok = np.logical_and(np.take(inside, range(inside.shape[axis] - 1), axis=axis),
                            np.take(inside, range(1, inside.shape[axis]), axis=axis))
        index = np.arange(diff.shape[axis]) % 2 == 1  # Δ between pixel 2i+1 and 2i+2: crosses a boundary
        shape = [1, 1, 1]
        shape[axis] = -1
        crossing = np.broadcast_to(index.reshape(shape), diff.shape)
        across += float(diff[ok & crossing].sum())
        within += float(diff[ok & ~crossing].sum())
        n_across += int((ok & crossing).sum())
        n_within += int((ok & ~crossing).sum())
    if not n_across or not n_within or (within <= 0 and across <= 0):
        return float("nan")
    if within <= 0:
        return float("inf")  # piecewise constant on the 2x2 grid
    return (across / n_across) / (within / n_within)


def block_boundary_ratio(source1, source2, fused, mask=None) -> float:
    """Blockiness on the squeeze grid: for each image, the mean squared neighbour difference across
    2×2 block boundaries over the one inside blocks (≈ 1 for any image without a grid of its own);
    the fused image's value divided by the sources' (pooled, mean of the two). > 1: the fused image
    jumps at block boundaries (a 2×2 block pattern that the diagonal share does not see)."""
    s1, s2, f = (_as_stack(x, n) for x, n in ((source1, "source1"), (source2, "source2"), (fused, "fused")))
    if not s1.shape == s2.shape == f.shape:
        raise ValueError(f"shapes differ: {s1.shape}, {s2.shape}, {f.shape}")
    inside = np.ones(f.shape, bool) if mask is None else _as_stack(mask, "mask") > 0
    source = (_boundary_energy_ratio(s1, inside) + _boundary_energy_ratio(s2, inside)) / 2
    return _boundary_energy_ratio(f, inside) / source


def hot_background_fraction(fused, background, threshold: float = 0.3) -> float:
    """Fraction of the ``background`` voxels (a boolean array: where *both* sources are background)
    at which the fused image (normalized units, ≈ [0, 1]) exceeds ``threshold``. NaN without
    background. The acceptance bound of the bundled model is ≤ 1e-4 (0.01 %)."""
    f = np.asarray(fused)
    b = np.asarray(background, dtype=bool)
    if f.shape != b.shape:
        raise ValueError(f"background shape {b.shape} differs from the fused image's {f.shape}")
    count = int(b.sum())
    return float((f[b] > threshold).sum()) / count if count else float("nan")


def background_mask(volume1, volume2, *, tolerance: Optional[float] = None) -> np.ndarray:
    """Where both source volumes (raw units) sit at their own minimum (± ``tolerance``, default 0):
    the constant background of skull-stripped BraTS volumes (0, or the constant minimum of the
    z-scored BraTS 2013 exports)."""
    masks = []
    for volume in (volume1, volume2):
        v = np.asarray(volume, dtype=np.float64)
        masks.append(v <= v.min() + (tolerance or 0.0))
    return masks[0] & masks[1]
