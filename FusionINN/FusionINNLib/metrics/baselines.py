"""Classical pixel-wise fusion baselines to compare a learned fusion against.

* ``"mean"``: y = (x1 + x2) / 2.
* ``"max"``: y = max(x1, x2) (keeps the brighter structure of either source).
* ``"weighted"``: FuseVis' weighted average (Kumar & Gumhold, "FuseVis: interpreting neural networks
  for image fusion using per-pixel saliency visualization", Computers 9(4):98, 2020, eq. 3):
  w_k = x_k / (x1 + x2), y = w1·x1 + w2·x2 = (x1² + x2²) / (x1 + x2). Each pixel leans towards
  the brighter source. Where x1 + x2 = 0 (both intensities 0 for the non-negative inputs the
  formula is meant for) the weights are undefined; y is defined as 0 there, the limit of the
  formula (0 ≤ y ≤ max(x1, x2)). Negative intensities make the weights meaningless (a sum near 0
  gives unbounded values), so they raise ValueError: min–max normalise first.

All baselines work on 2-D images or 3-D volumes of the same shape and any real dtype; the result is
float32 when the inputs fit in float32 (uint8/uint16/int16/float32) and float64 otherwise.
"""
from __future__ import annotations

import numpy as np

from ..core.choices import BASELINE_METHODS as CLASSICAL_FUSION_METHODS  # defined once

__all__ = ["CLASSICAL_FUSION_METHODS", "classical_fusion"]



def _check(x, name: str) -> np.ndarray:
    array = np.asarray(x)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


def classical_fusion(x1, x2, method: str) -> np.ndarray:
    """Fuse two co-registered images pixel by pixel with a classical rule.

    ``method``: ``"mean"`` (x1 + x2)/2, ``"max"`` max(x1, x2), or ``"weighted"`` — FuseVis eq. 3,
    y = Σ_k w_k x_k with w_k = x_k/(x1 + x2), i.e. (x1² + x2²)/(x1 + x2), y = 0 where x1 + x2 = 0;
    needs non-negative intensities. Returns a new array of the inputs' shape (float32 or float64,
    see the module docstring). Raises ValueError for an unknown method, different shapes, NaN/inf
    values or (weighted) negative values.
    """
    if method not in CLASSICAL_FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; expected one of {', '.join(CLASSICAL_FUSION_METHODS)}")
    a = _check(x1, "x1")
    b = _check(x2, "x2")
    if a.shape != b.shape:
        raise ValueError(f"x1 and x2 must have the same shape, got {a.shape} and {b.shape}")
    out_dtype = np.result_type(a.dtype, b.dtype, np.float32)
    # Compute in float64: uint8 arithmetic would overflow and float32 squares lose digits.
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    if method == "mean":
        fused = (a64 + b64) / 2
    elif method == "max":
        fused = np.maximum(a64, b64)
    else:
        if a64.size and min(a64.min(), b64.min()) < 0:
            raise ValueError("weighted fusion needs non-negative intensities (w_k = x_k/(x1 + x2)); "
                             "min-max normalise the inputs first")
        total = a64 + b64
        empty = total == 0
        fused = (a64 * a64 + b64 * b64) / np.where(empty, 1.0, total)
        fused[empty] = 0.0
    return fused.astype(out_dtype, copy=False)
