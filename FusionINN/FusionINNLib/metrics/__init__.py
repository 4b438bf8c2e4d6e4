"""The metrics layer: fusion and decomposition quality (:mod:`.quality`), the one scorer that decides
what is compared with what (:mod:`.scoring`), classical fusion baselines (:mod:`.baselines`) and
artefact measures (:mod:`.artefacts`).

Builds on :mod:`FusionINNLib.core` and :mod:`FusionINNLib.io`. The metric functions are exported
here, so ``from FusionINNLib.metrics import q_xy`` and ``metrics.fusion_metrics(...)`` read as the
metric suite itself; their definitions live in :mod:`.quality` only (numpy and scipy, no torch).
"""
from __future__ import annotations

from .quality import (
    DECOMPOSITION_METRIC_NAMES,
    FUSION_METRIC_NAMES,
    METRIC_DESCRIPTIONS,
    MetricWarning,
    average_gradient,
    decomposition_mae,
    decomposition_metrics,
    decomposition_psnr,
    decomposition_ssim,
    entropy,
    fusion_metrics,
    mutual_information,
    normalized_mutual_information,
    psnr,
    q_fmi,
    q_ncie,
    q_p,
    q_ssim,
    q_xy,
    qabf,
    quantise_like_matplotlib,
    spatial_frequency,
    standard_deviation,
    viff,
)

__all__ = [
    "DECOMPOSITION_METRIC_NAMES",
    "FUSION_METRIC_NAMES",
    "METRIC_DESCRIPTIONS",
    "MetricWarning",
    "average_gradient",
    "decomposition_mae",
    "decomposition_metrics",
    "decomposition_psnr",
    "decomposition_ssim",
    "entropy",
    "fusion_metrics",
    "mutual_information",
    "normalized_mutual_information",
    "psnr",
    "q_fmi",
    "q_ncie",
    "q_p",
    "q_ssim",
    "q_xy",
    "qabf",
    "quantise_like_matplotlib",
    "spatial_frequency",
    "standard_deviation",
    "viff",
]
