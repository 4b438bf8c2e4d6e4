"""Invertible intensity normalization to roughly [0, 1], with the parameters needed to undo it.

Two modes:

``volume`` (default, robust)
    x_n = (x - lo) / (hi - lo) with lo, hi the 0.5th and 99.5th percentiles of the volume's
    foreground. Nothing is clipped: voxels outside [lo, hi] keep their offset, so the map is an
    exact affine bijection and the brightest voxels (enhancing tumour) survive the round trip.
``slice``
    The reference implementation's per-slice min-max along ``axis``:
    x_n = (x - min_s) / (max_s - min_s) for every slice s.

Foreground is every finite voxel that differs from the background value. The background is 0 for
ordinary MRI, but z-scored exports (BraTS 2013/2015) fill it with another constant, so the most
frequent of {0, minimum, corner values} is taken as background. A constant volume or slice has
hi == lo; its scale is then 1, so it maps to zeros instead of NaN. NaN/Inf voxels are replaced by
the background value before normalizing and counted in ``NormalizationParams.nonfinite``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List

import numpy as np

MODES = ("volume", "slice")
ROBUST_PERCENTILES = (0.5, 99.5)


@dataclass
class NormalizationParams:
    """What ``denormalize`` needs: per-slice (``slice``) or single (``volume``) offset and scale."""

    mode: str
    axis: int
    offset: List[float]
    scale: List[float]
    nonfinite: int = 0
    source_dtype: str = "float32"
    percentiles: List[float] = field(default_factory=lambda: list(ROBUST_PERCENTILES))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NormalizationParams:
        try:
            params = cls(
                mode=str(data["mode"]),
                axis=int(data["axis"]),
                offset=[float(v) for v in data["offset"]],
                scale=[float(v) for v in data["scale"]],
                nonfinite=int(data.get("nonfinite", 0)),
                source_dtype=str(data.get("source_dtype", "float32")),
                percentiles=[float(v) for v in data.get("percentiles", ROBUST_PERCENTILES)],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"invalid normalization record: {error}") from error
        if params.mode not in MODES or len(params.offset) != len(params.scale) or not params.offset:
            raise ValueError(f"invalid normalization record: {data!r}")
        return params


def background_value(array: np.ndarray) -> float:
    """The most frequent of 0, the minimum and the corner values (z-scored exports fill the
    background with a constant that need not be the minimum)."""
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return 0.0
    corners = array[tuple(np.ix_(*[[0, n - 1] for n in array.shape]))].reshape(-1)
    candidates = {0.0, float(finite.min())} | {float(v) for v in corners if np.isfinite(v)}
    counts = {value: int(np.count_nonzero(finite == value)) for value in sorted(candidates)}
    best = max(counts.values())
    return 0.0 if counts[0.0] == best else next(v for v, c in counts.items() if c == best)


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """Finite voxels that differ from the background; all finite voxels if that leaves none."""
    finite = np.isfinite(array)
    mask = finite & (array != background_value(array))
    return mask if mask.any() else finite


def _safe_scale(span: np.ndarray) -> np.ndarray:
    # A constant slice/volume has span 0: scale 1 keeps it finite (it maps to 0) and invertible.
    span = np.asarray(span, dtype=np.float64)
    return np.where(np.isfinite(span) & (span > 0), span, 1.0)


def _broadcast(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def normalize_volume(
    array: np.ndarray, mode: str = "volume", axis: int = 0
) -> tuple[np.ndarray, NormalizationParams]:
    """Map ``array`` to about [0, 1] (float32) and return the parameters that undo it."""
    if mode not in MODES:
        raise ValueError(f"unknown normalization mode {mode!r}; choose one of {', '.join(MODES)}")
    data = np.asarray(array)
    if data.ndim == 0 or data.size == 0:
        raise ValueError("cannot normalize an empty image")
    if np.iscomplexobj(data):
        raise ValueError("complex-valued images are not supported")
    axis = axis % data.ndim
    source_dtype = str(data.dtype)
    data = data.astype(np.float64, copy=True)
    nonfinite_mask = ~np.isfinite(data)
    nonfinite = int(nonfinite_mask.sum())
    if nonfinite:
        data[nonfinite_mask] = background_value(data)

    if mode == "volume":
        mask = foreground_mask(data)
        lo, hi = np.percentile(data[mask], ROBUST_PERCENTILES)
        offset = np.array([lo])
        scale = _safe_scale(np.array([hi - lo]))
        normalized = (data - offset[0]) / scale[0]
    else:
        other_axes = tuple(i for i in range(data.ndim) if i != axis)
        lo = data.min(axis=other_axes) if other_axes else data
        hi = data.max(axis=other_axes) if other_axes else data
        offset = np.asarray(lo, dtype=np.float64).reshape(-1)
        scale = _safe_scale(np.asarray(hi, dtype=np.float64).reshape(-1) - offset)
        normalized = (data - _broadcast(offset, data.ndim, axis)) / _broadcast(scale, data.ndim, axis)

    params = NormalizationParams(
        mode=mode,
        axis=axis,
        offset=[float(v) for v in offset],
        scale=[float(v) for v in scale],
        nonfinite=nonfinite,
        source_dtype=source_dtype,
    )
    return normalized.astype(np.float32), params


def denormalize_volume(array: np.ndarray, params: NormalizationParams) -> np.ndarray:
    """Inverse of ``normalize_volume``: back to source intensity units (float32)."""
    data = np.asarray(array, dtype=np.float64)
    offset = np.asarray(params.offset, dtype=np.float64)
    scale = np.asarray(params.scale, dtype=np.float64)
    if params.mode == "volume":
        restored = data * scale[0] + offset[0]
    else:
        axis = params.axis % data.ndim
        if data.shape[axis] != offset.size:
            raise ValueError(
                f"normalization record has {offset.size} slices but the image has "
                f"{data.shape[axis]} along axis {axis}"
            )
        restored = data * _broadcast(scale, data.ndim, axis) + _broadcast(offset, data.ndim, axis)
    return restored.astype(np.float32)


def denormalize_std(array: np.ndarray, params: NormalizationParams) -> np.ndarray:
    """Scale a standard-deviation map (no offset) into source units."""
    data = np.asarray(array, dtype=np.float64)
    scale = np.asarray(params.scale, dtype=np.float64)
    if params.mode == "volume":
        return (data * scale[0]).astype(np.float32)
    axis = params.axis % data.ndim
    return (data * _broadcast(scale, data.ndim, axis)).astype(np.float32)
