"""Every fixed set of choices, defined once (no torch, no SimpleITK: the Slicer GUI and both
command lines import it before anything heavy).

The modules that use a choice re-export it under the name they always had (``engine.PRIORS``,
``losses.LATENT_LOSSES``, ``normalization.MODES``, ``batch.BASELINE_METHODS`` ...), so existing code
keeps working; new code imports from here.
"""
from __future__ import annotations

PRIORS = ("normal", "zeros", "ones", "uniform")  # latent priors (decomposition and training)
LATENT_LOSSES = ("pixel_mmd", "moments", "reference_mmd", "none")
DEFAULT_LATENT_LOSS = LATENT_LOSSES[0]
NORMALIZATIONS = ("volume", "slice")  # intensity normalizations
DEVICES = ("auto", "cpu", "cuda", "mps")
BASELINE_METHODS = ("mean", "max", "weighted")  # classical fusions scored next to FusionINN
TRAINING_MODALITIES = ("t1ce", "flair", "t1", "t2")  # the modalities a training can fuse

__all__ = ["PRIORS", "LATENT_LOSSES", "DEFAULT_LATENT_LOSS", "NORMALIZATIONS", "DEVICES", "BASELINE_METHODS",
           "TRAINING_MODALITIES"]
