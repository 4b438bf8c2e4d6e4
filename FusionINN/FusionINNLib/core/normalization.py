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

Near-degenerate volumes. The flow is exactly invertible in float32 only for inputs of moderate
size: measured with the bundled model, the round-trip error is 1e-6 for normalized values in
[0, 1], 4e-4 in [-8, 8] and 0.04 in [-32, 32] (10 for [-128, 128]). When the percentile map would
put voxels outside [-NORMALIZED_LIMIT, 1 + NORMALIZED_LIMIT] (a foreground of two values 65534 /
65535 next to a 0 background, a few hot voxels a hundred times brighter than the rest) the volume
mode falls back to the min-max map of all finite voxels, which lies in [0, 1], and says so in
``NormalizationParams.note``. ``minimum``/``maximum`` record the finite source range, which
bounds sampled decompositions.

Memory: a 512x512x400 volume has 105 M voxels, so every float64 copy costs 0.84 GB. The
arithmetic is still float64 (the same numbers as a whole-volume float64 computation), but it runs
on blocks of about ``BLOCK_VOXELS`` voxels along axis 0, the foreground values for the percentiles
are gathered in the source's own type and the percentiles come from an in-place partial sort.
Peak extra memory is then the float32 result plus about one source-typed copy of the foreground.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, List, Optional, Sequence

import numpy as np

from .choices import NORMALIZATIONS as MODES  # defined once, re-exported

ROBUST_PERCENTILES = (0.5, 99.5)
BLOCK_VOXELS = 1 << 22  # 4 M voxels: 32 MiB per float64 block
# Normalized values beyond [-4, 5] are outside the range where the flow inverts exactly in float32
# (see the module docstring); the volume mode then uses min-max instead of the percentiles.
NORMALIZED_LIMIT = 4.0


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
    # finite source range (None in records written before it was kept) and why the map differs
    # from the usual one ("" when it does not)
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    note: str = ""

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
                minimum=None if data.get("minimum") is None else float(data["minimum"]),
                maximum=None if data.get("maximum") is None else float(data["maximum"]),
                note=str(data.get("note", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"invalid normalization record: {error}") from error
        if params.mode not in MODES or len(params.offset) != len(params.scale) or not params.offset:
            raise ValueError(f"invalid normalization record: {data!r}")
        numbers = params.offset + params.scale + [v for v in (params.minimum, params.maximum) if v is not None]
        if not all(np.isfinite(numbers)) or 0.0 in params.scale:
            raise ValueError("invalid normalization record: offsets and scales must be finite, scales non-zero")
        return params


def background_value(array: np.ndarray) -> float:
    """The most frequent of 0, the minimum and the corner values (z-scored exports fill the
    background with a constant that need not be the minimum)."""
    array = np.asarray(array)
    # Integer images are finite by construction: skip the (whole-volume) finite-voxel copy.
    finite = array.reshape(-1) if array.dtype.kind in "biu" else array[np.isfinite(array)]
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


def _blocks(data: np.ndarray) -> Iterator[slice]:
    """Ranges along axis 0 holding about ``BLOCK_VOXELS`` voxels each."""
    per_index = max(1, data.size // max(1, data.shape[0]))
    step = max(1, BLOCK_VOXELS // per_index)
    for start in range(0, data.shape[0], step):
        yield slice(start, min(start + step, data.shape[0]))


def _float64_block(data: np.ndarray, rows: slice, background: Optional[float]) -> np.ndarray:
    """``data[rows]`` as a float64 copy, NaN/Inf replaced by ``background`` when it is given."""
    block = data[rows].astype(np.float64)
    if background is not None:
        block[~np.isfinite(block)] = background
    return block


def _along_axis(values: np.ndarray, ndim: int, axis: int, rows: slice) -> np.ndarray:
    """Per-slice ``values`` shaped to broadcast against ``data[rows]``."""
    shaped = _broadcast(values, ndim, axis)
    return shaped[rows] if axis == 0 else shaped


def linear_percentiles(values: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """``np.percentile(values, percentiles)`` (linear method) without copying ``values``.

    With n sorted values v, the q-th percentile is at position p = q/100 (n - 1):
    v[floor(p)] + (p - floor(p)) (v[floor(p) + 1] - v[floor(p)]). ``values`` (a scratch 1-D array
    the caller no longer needs) is partially sorted in place so that those order statistics sit
    at their sorted positions; the interpolation is float64.
    """
    count = values.size
    positions = [q / 100.0 * (count - 1) for q in percentiles]
    below = [int(np.floor(p)) for p in positions]
    above = [min(b + 1, count - 1) for b in below]
    values.partition(sorted(set(below + above)))
    result = []
    for position, low, high in zip(positions, below, above):
        a, b = float(values[low]), float(values[high])
        t = position - low
        # numpy's lerp: from the nearer end, so that t = 1 gives b exactly
        result.append(a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t))
    return np.asarray(result, dtype=np.float64)


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
    if data.dtype.kind not in "biuf":
        raise ValueError(f"cannot normalize voxels of type {data.dtype}")
    axis = axis % data.ndim
    source_dtype = str(data.dtype)
    nonfinite = 0 if data.dtype.kind in "biu" else int(data.size - np.count_nonzero(np.isfinite(data)))
    background = background_value(data) if nonfinite else None

    if mode == "volume":
        foreground = data[foreground_mask(data)]  # source dtype: no float64 copy of the volume
        if foreground.size == 0:  # nothing finite at all: every voxel becomes the background
            lo = hi = float(background or 0.0)
        else:
            lo, hi = linear_percentiles(foreground, ROBUST_PERCENTILES)
        del foreground
        offset = np.array([lo], dtype=np.float64)
        scale = _safe_scale(np.array([hi - lo]))
    else:
        other_axes = tuple(i for i in range(data.ndim) if i != axis)
        lo = np.full(data.shape[axis], np.inf)
        hi = np.full(data.shape[axis], -np.inf)
        for rows in _blocks(data):
            block = _float64_block(data, rows, background)
            block_lo = block.min(axis=other_axes) if other_axes else block
            block_hi = block.max(axis=other_axes) if other_axes else block
            if axis == 0:
                lo[rows], hi[rows] = block_lo, block_hi
            else:
                np.minimum(lo, block_lo, out=lo)
                np.maximum(hi, block_hi, out=hi)
        offset = lo
        scale = _safe_scale(hi - offset)
    minimum, maximum = _finite_range(data)
    note = ""
    if mode == "volume" and minimum is not None and ((minimum - offset[0]) / scale[0] < -NORMALIZED_LIMIT
                                                     or (maximum - offset[0]) / scale[0] > 1 + NORMALIZED_LIMIT):
        note = (f"values {minimum:.6g}..{maximum:.6g} lie far outside the foreground's {ROBUST_PERCENTILES[0]:g}-"
                f"{ROBUST_PERCENTILES[1]:g} percentile range {offset[0]:.6g}..{offset[0] + scale[0]:.6g}; normalized "
                "by min-max instead, so that the decomposition stays exact")
        offset = np.array([minimum], dtype=np.float64)
        scale = _safe_scale(np.array([maximum - minimum]))

    normalized = np.empty(data.shape, dtype=np.float32)
    for rows in _blocks(data):
        block = _float64_block(data, rows, background)
        block -= _along_axis(offset, data.ndim, axis, rows) if mode == "slice" else offset[0]
        block /= _along_axis(scale, data.ndim, axis, rows) if mode == "slice" else scale[0]
        normalized[rows] = block

    params = NormalizationParams(
        mode=mode,
        axis=axis,
        offset=[float(v) for v in offset],
        scale=[float(v) for v in scale],
        nonfinite=nonfinite,
        source_dtype=source_dtype,
        minimum=minimum,
        maximum=maximum,
        note=note,
    )
    return normalized, params


def _finite_range(data: np.ndarray) -> tuple:
    """(min, max) of the finite voxels as floats, block by block; (None, None) if there are none."""
    low, high = np.inf, -np.inf
    for rows in _blocks(data):
        block = data[rows]
        if block.dtype.kind == "f":
            block = block[np.isfinite(block)]
        if block.size:
            low, high = min(low, float(block.min())), max(high, float(block.max()))
    return (low, high) if low <= high else (None, None)


def _check_slices(data: np.ndarray, params: NormalizationParams) -> int:
    axis = params.axis % data.ndim
    if params.mode == "slice" and data.shape[axis] != len(params.offset):
        raise ValueError(
            f"normalization record has {len(params.offset)} slices but the image has "
            f"{data.shape[axis]} along axis {axis}"
        )
    return axis


def _affine_float32(data: np.ndarray, params: NormalizationParams, with_offset: bool) -> np.ndarray:
    """x * scale (+ offset) in float64, block by block, stored as float32."""
    axis = _check_slices(data, params)
    offset = np.asarray(params.offset, dtype=np.float64)
    scale = np.asarray(params.scale, dtype=np.float64)
    restored = np.empty(data.shape, dtype=np.float32)
    for rows in _blocks(data):
        block = data[rows].astype(np.float64)
        block *= _along_axis(scale, data.ndim, axis, rows) if params.mode == "slice" else scale[0]
        if with_offset:
            block += _along_axis(offset, data.ndim, axis, rows) if params.mode == "slice" else offset[0]
        restored[rows] = block
    return restored


def denormalize_volume(array: np.ndarray, params: NormalizationParams) -> np.ndarray:
    """Inverse of ``normalize_volume``: back to source intensity units (float32)."""
    return _affine_float32(np.asarray(array), params, with_offset=True)


def denormalize_std(array: np.ndarray, params: NormalizationParams) -> np.ndarray:
    """Scale a standard-deviation map (no offset) into source units."""
    return _affine_float32(np.asarray(array), params, with_offset=False)


# An exact decomposition of an integer source lands within float32 rounding of an integer; a
# voxel further than this from every integer shows that the round trip was not exact.
INTEGER_TOLERANCE = 0.3


def integer_dtype(params: NormalizationParams) -> Optional[np.dtype]:
    """The integer type the source had (bool as uint8, which every image format holds), or None."""
    try:
        dtype = np.dtype(params.source_dtype)
    except TypeError:
        return None
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    return dtype if dtype.kind in "iu" else None


def denormalize_integers(array: np.ndarray, params: NormalizationParams, dtype: np.dtype
                         ) -> tuple:
    """``denormalize_volume`` rounded to the integer ``dtype`` when that is exact: (result, worst).

    Block by block in float64; ``worst`` is the largest distance of a restored voxel from its
    integer. The result is None (and the caller keeps float32) when a voxel is further than
    ``INTEGER_TOLERANCE`` from an integer or outside the type's range, e.g. for a full-range
    int32/int64 source, whose 32/64 bits do not survive the float32 network.
    """
    data = np.asarray(array)
    axis = _check_slices(data, params)
    offset = np.asarray(params.offset, dtype=np.float64)
    scale = np.asarray(params.scale, dtype=np.float64)
    info = np.iinfo(dtype)
    result = np.empty(data.shape, dtype=dtype)
    worst = 0.0
    for rows in _blocks(data):
        block = data[rows].astype(np.float64)
        block *= _along_axis(scale, data.ndim, axis, rows) if params.mode == "slice" else scale[0]
        block += _along_axis(offset, data.ndim, axis, rows) if params.mode == "slice" else offset[0]
        rounded = np.rint(block)
        worst = max(worst, float(np.max(np.abs(block - rounded), initial=0.0)))
        if worst > INTEGER_TOLERANCE or (rounded.size and (rounded.min() < info.min or rounded.max() > info.max)):
            return None, worst
        result[rows] = rounded
    return result, worst
