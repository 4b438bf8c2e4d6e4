"""The one scorer: every front end scores a fusion or a decomposition through these functions.

``fusioninn metrics``, ``fusioninn batch --metrics``, the Slicer module's Score section (through
:mod:`FusionINNLib.jobs`), ``fusioninn demo`` and the training reports all call
:func:`score_fusion` / :func:`score_decomposition`, so the same triple gets the same numbers
everywhere. The metric definitions are :mod:`FusionINNLib.metrics`; this module decides *what* is
compared with *what*, on which grid and on which intensity scale.

Grids (settled where the earlier copies disagreed)
    * input 2 is resampled (linear) onto input 1's grid when the geometries differ, and refused when
      the two do not overlap (all copies agreed);
    * the fused image must have input 1's shape: a fused image is always written on input 1's grid,
      so another shape means another case's fusion or a cropped one. It is refused with
      "... differs from input 1's ..." (the CLI's rule; ``batch.score_volumes`` used to resample it,
      which scored an interpolated image against the sources without saying so);
    * the mask is resampled (nearest neighbour) onto input 1's grid when its geometry differs (the
      batch/GUI rule: a Slicer segmentation is often stored on a grid cropped to the segment; the
      CLI used to refuse it) and means "voxel ≠ 0" (the CLI used "> 0"; the help always said
      non-zero). An empty mask on input 1's grid is refused;
    * a decomposed image is resampled (linear) onto its source's grid when they differ;
    * 2-D images (PNG ...) are scored as 2-D images (the CLI's rule; batch used to score them as a
      one-slice volume, which gives the same summary but a per-slice table of one row).

Data range (the intensity scale the metrics see)
    * fusion: ``data_range=R`` given → the values as they are, L = R; otherwise uint8 inputs on
      0..255 (L = 255) and anything else min–max normalised per image (per volume) to [0, 1] — the
      paper's rule, unchanged everywhere;
    * decomposition: ``data_range=R`` given → as they are, L = R; otherwise **one scale for both
      images, the source's**: both are mapped by (x − min(source)) / (max(source) − min(source)) and
      scored with L = 1. This is the demo's rule; the GUI's decomposition rows used to min–max each
      image on its own, which hides exactly the gain and offset errors a decomposition can have
      (an estimate at half the source's brightness scored SSIM 1);
    * training reports: the slices are already in normalized units, so the training passes the
      explicit ``data_range=1`` (as it always meant to, through pytorch-msssim; the numbers are the
      same SSIM, now computed by the metrics module like everywhere else).

Warnings: every :class:`~FusionINNLib.metrics.MetricWarning` is also in the result's ``notes``, which
the front ends show (CLI) or record (batch summary, GUI table); the warnings themselves are not
re-emitted.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.choices import BASELINE_METHODS
from ..io.volume import Volume, VolumeError, overlaps, resample_like

NOTE_INPUT2_RESAMPLED = "input 2 resampled (linear) onto input 1's grid: their geometries differ"


def _check_finite(volume: Volume, name: str) -> None:
    if volume.array.dtype.kind == "f" and not np.isfinite(volume.array).all():
        raise VolumeError(f"{name}: contains NaN or infinite voxels; the metrics need finite images")


def align_input2(volume1: Volume, volume2: Volume) -> Tuple[Volume, List[str]]:
    """Input 2 on input 1's grid (linear), refused when they do not overlap; with the note saying so."""
    if volume1.same_grid(volume2):
        return volume2, []
    if not overlaps(volume1, volume2):
        raise VolumeError("the two inputs do not overlap in physical space; are they co-registered?")
    moving = volume2.with_array(np.nan_to_num(volume2.array.astype(np.float32)))
    return resample_like(moving, volume1), [NOTE_INPUT2_RESAMPLED]


def mask_on_grid(mask: Volume, reference: Volume) -> Tuple[np.ndarray, List[str]]:
    """``mask != 0`` on ``reference``'s grid (nearest neighbour when the grids differ)."""
    notes: List[str] = []
    if reference.same_grid(mask):
        array = np.asarray(mask.array) != 0
    else:
        import SimpleITK as sitk

        nearest = resample_like(mask.with_array(np.nan_to_num(mask.array.astype(np.float32))), reference,
                                interpolator=sitk.sitkNearestNeighbor)
        array = nearest.array != 0
        notes.append("mask resampled (nearest neighbour) onto the first input's grid")
    if not array.any():
        raise ValueError("the mask is empty on the first input's grid (no non-zero voxel)")
    return array, notes


def _quiet(run):
    from .quality import MetricWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        return run()


def score_fusion(volume1: Volume, volume2: Volume, fused: Volume, *, mask: Optional[Volume] = None,
                 paper_compatible: bool = False, data_range: Optional[float] = None, axis: int = 0,
                 names: Sequence[str] = ("input 1", "input 2", "the fused volume")) -> Dict[str, Any]:
    """The metric suite of one triple (see the module docstring for grids and scale).

    ``names`` (e.g. the file paths) are what error messages call the three images. Returns
    :func:`FusionINNLib.metrics.fusion_metrics`'s dict (``summary``, ``per_slice``, ``notes``), with
    the read and resampling notes first.
    """
    from .quality import fusion_metrics

    for name, volume in zip(names, (volume1, volume2, fused)):
        _check_finite(volume, name)
    notes = list(volume1.notes) + list(volume2.notes)
    aligned2, extra = align_input2(volume1, volume2)
    notes += extra
    if fused.shape != volume1.shape:
        raise VolumeError(f"{names[2]}: shape {fused.shape} differs from input 1's {volume1.shape}")
    mask_array = None
    if mask is not None:
        mask_array, extra = mask_on_grid(mask, volume1)
        notes += extra
    two_d = volume1.is_2d and volume1.shape[0] == 1

    def squeeze(array):
        return None if array is None else (np.asarray(array)[0] if two_d else np.asarray(array))

    result = _quiet(lambda: fusion_metrics(squeeze(volume1.array), squeeze(aligned2.array), squeeze(fused.array),
                                           mask=squeeze(mask_array), paper_compatible=paper_compatible,
                                           data_range=data_range, axis=axis))
    result["notes"] = notes + list(result.get("notes", []))
    return result


def decomposition_scale(source: np.ndarray) -> Tuple[float, float]:
    """(offset, span) of the one scale both images of a decomposition pair are scored on."""
    values = np.asarray(source)
    low = float(np.min(values))
    span = float(np.max(values)) - low
    return low, (span if span > 0 else 1.0)


def score_decomposition(source: Any, decomposed: Any, *, mask: Any = None, data_range: Optional[float] = None,
                        axis: int = 0) -> Dict[str, Any]:
    """SSIM, PSNR and MAE of a decomposed image against its source (Volumes or arrays).

    Volumes on different grids: the decomposition is resampled onto the source's grid. Without
    ``data_range`` both images are put on the source's scale (module docstring), with it they are
    used as they are.
    """
    from .quality import decomposition_metrics

    notes: List[str] = []
    if isinstance(source, Volume):
        if isinstance(decomposed, Volume) and not source.same_grid(decomposed):
            decomposed = resample_like(decomposed.with_array(np.nan_to_num(decomposed.array.astype(np.float32))),
                                       source)
            notes.append("decomposed volume resampled (linear) onto its source's grid")
        two_d = source.is_2d and source.shape[0] == 1
        source_array = source.array[0] if two_d else source.array
        decomposed_array = decomposed.array if isinstance(decomposed, Volume) else np.asarray(decomposed)
        decomposed_array = decomposed_array[0] if two_d and decomposed_array.ndim == 3 else decomposed_array
        if isinstance(mask, Volume):
            mask = mask_on_grid(mask, source)[0]
            mask = mask[0] if two_d else mask
    else:
        source_array, decomposed_array = np.asarray(source), np.asarray(decomposed)
    if data_range is None:
        low, span = decomposition_scale(source_array)
        source_array = (np.asarray(source_array, dtype=np.float64) - low) / span
        decomposed_array = (np.asarray(decomposed_array, dtype=np.float64) - low) / span
        data_range = 1.0
    result = _quiet(lambda: decomposition_metrics(source_array, decomposed_array, mask=mask, data_range=data_range,
                                                  axis=axis))
    result["notes"] = notes + list(result.get("notes", []))
    return result


def pair_ssim(reference: np.ndarray, image: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM over the slices of two stacks (N, H, W) on an explicit scale: the training reports'
    SSIM (pytorch-msssim conventions: 11-tap Gaussian, σ = 1.5, 'valid' windows)."""
    return float(score_decomposition(np.asarray(reference), np.asarray(image), data_range=data_range)
                 ["summary"]["SSIM"])


# -- what the score job compares besides the fusion (also used by the Slicer module) --------------
def align_to_reference(reference: Volume, moving: Volume) -> Tuple[Volume, List[str]]:
    """``moving`` on ``reference``'s grid (linear resampling only when the grids differ)."""
    if reference.same_grid(moving):
        return moving, []
    resampled = resample_like(moving.with_array(np.nan_to_num(moving.array.astype(np.float32))), reference)
    return resampled, ["resampled (linear) onto the first input's grid: their geometries differ"]


def baseline_fusions(volume1: Volume, volume2: Volume, methods: Sequence[str] = BASELINE_METHODS,
                     normalization: str = "volume", axis: int = 0) -> Dict[str, Volume]:
    """The classical fusions (mean, max, weighted; FuseVis eq. 3) of the normalised inputs.

    Both inputs go through the normalisation the network sees
    (:func:`FusionINNLib.core.normalization.normalize_volume`) and are then clipped to [0, 1]: the
    robust volume map leaves the background and the darkest 0.5 % slightly below 0, and the
    weighted rule is only defined for non-negative intensities. The baselines are thus on the
    fused volume's [0, 1] scale and on input 1's grid.
    """
    from ..core.normalization import normalize_volume
    from .baselines import classical_fusion

    aligned2, _ = align_to_reference(volume1, volume2)
    x1 = np.clip(normalize_volume(np.asarray(volume1.array), normalization, axis)[0], 0.0, 1.0)
    x2 = np.clip(normalize_volume(np.asarray(aligned2.array), normalization, axis)[0], 0.0, 1.0)
    return {method: volume1.with_array(np.asarray(classical_fusion(x1, x2, method), dtype=np.float32))
            for method in methods}


def difference_volume(decomposed: Volume, source: Volume) -> Volume:
    """decomposed − source on the decomposed volume's grid (source resampled if needed), float32.

    Both must be in the same units: decompositions made with a fusion record are in source units.
    """
    aligned, _ = align_to_reference(decomposed, source)
    difference = np.asarray(decomposed.array, dtype=np.float32) - np.asarray(aligned.array, dtype=np.float32)
    return decomposed.with_array(difference)


__all__ = ["score_fusion", "score_decomposition", "pair_ssim", "align_input2", "mask_on_grid",
           "decomposition_scale", "NOTE_INPUT2_RESAMPLED", "align_to_reference", "baseline_fusions",
           "difference_volume"]
