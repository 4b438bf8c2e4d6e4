"""The metadata a trained model carries: what it was trained on and how, and its final metrics.

Every checkpoint a run writes (``best.pt``, ``last.pt``, the output model) holds this dict under
``metadata`` (:mod:`FusionINNLib.io.checkpoint`); the fuse job takes the modalities, normalization
and axis from it, and the model card (``docs/models.md``) quotes its data, split and metrics.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .training import TrainingConfig, TrainingData


def model_metadata(config: TrainingConfig, data: TrainingData, *, best_epoch: int, best_loss: float,
                   validated: bool, epochs_run: int, world_size: int,
                   metrics: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The metadata dict of a model trained with ``config`` on ``data``. ``validated``: the best
    epoch was chosen on the validation loss (else on the training loss, when there is no
    validation set); ``metrics``: the final evaluation's means (empty while training)."""
    c = config
    return {
        "modalities": list(c.modalities),
        "normalization": c.normalization,
        "axis": c.axis,
        "labels": c.label_rule() or "brain",
        "data": {
            "data_dir": str(c.data_dir),
            "summary": data.data_summary,
            "train_cases": [case.case_id for case in data.train_data],
            "val_cases": [case.case_id for case in data.val_data],
            "train_slices": int(data.slice_counts["train"]),
            "val_slices": int(data.slice_counts["val"]),
        },
        "split": {
            "train_subjects": sorted({case.subject_id for case in data.train_cases}),
            "val_subjects": sorted({case.subject_id for case in data.val_cases}),
            "seed": c.seed,
            "val_fraction": c.val_fraction,
        },
        "training": {
            "config": c.to_dict(),
            "best_epoch": best_epoch,
            "best_loss": best_loss,
            "best_on": "validation" if validated else "training",
            "epochs_run": epochs_run,
            "world_size": world_size,
            "torch": torch.__version__,
        },
        "metrics": metrics or {},
    }
