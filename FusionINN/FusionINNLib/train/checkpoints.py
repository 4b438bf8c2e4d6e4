"""A training run's checkpoints: ``run_dir/last.pt`` to resume from, ``best.pt`` and the output model.

All three are ordinary model checkpoints written by :func:`FusionINNLib.io.checkpoint.save_checkpoint`
(so ``fusioninn fuse --model run_dir/last.pt`` works too); ``last.pt`` also holds the loop's state
under :data:`STATE_KEY`: optimizer, scheduler and AMP-scaler state, the history, the best epoch and
its weights, the epochs without improvement, the split and the data summary. Resuming reads it back
through the checkpoint loader's one safe read (:func:`FusionINNLib.io.checkpoint.read_payload`,
``torch.load(weights_only=True)``) and takes the run's settings from it, except
:data:`RESUME_OVERRIDABLE`.

The loop itself (when to save, what the counters mean) is :class:`FusionINNLib.train.training._Trainer`;
this module only turns that state into files and back.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch

from ..core.model import FusionFlow, FusionINNConfig
from ..io.checkpoint import CheckpointError, load_checkpoint, read_payload, save_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from .training import TrainingConfig

STATE_KEY = "training_state"
# Settings a resumed run may change; everything else comes from the checkpoint being resumed.
RESUME_OVERRIDABLE = ("epochs", "early_stopping", "device", "num_workers", "output", "run_dir",
                      "history_table", "metrics_table", "plot", "cache_dir", "resume", "data_dir")


@dataclass
class ResumePoint:
    """A read ``last.pt``: where it is, the whole payload (weights under ``state_dict``) and the loop state."""

    path: Path
    payload: Dict[str, Any]
    state: Dict[str, Any]


def read_resume(resume: str) -> ResumePoint:
    """``resume`` (a ``last.pt`` or the run folder holding it) read through the checkpoint loader.

    Raises ``FileNotFoundError`` when there is no such file and ``ValueError`` when it cannot be read
    or is a model without training state (e.g. ``best.pt`` or the output model)."""
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume not found: {path}")
    try:
        payload = read_payload(path)  # the checkpoint loader's one safe read (weights_only)
    except CheckpointError as error:
        raise ValueError(f"cannot read the checkpoint to resume: {error}") from None
    if not isinstance(payload, dict) or STATE_KEY not in payload:
        raise ValueError(f"{path}: not a training checkpoint (no {STATE_KEY}); resume from run_dir/last.pt")
    return ResumePoint(path=path, payload=payload, state=payload[STATE_KEY])


def resumed_config(saved: TrainingConfig, requested: TrainingConfig, path: Path) -> TrainingConfig:
    """The settings of a resumed run: ``saved`` (the checkpoint's) with :data:`RESUME_OVERRIDABLE`
    taken from ``requested``; without a requested run folder the run continues in ``path``'s folder."""
    for name in RESUME_OVERRIDABLE:
        setattr(saved, name, getattr(requested, name))
    if requested.run_dir is None:
        saved.run_dir = str(path.parent)
    return saved


def restore(point: ResumePoint, flow: FusionFlow, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: Optional[Any]) -> None:
    """Load the weights and the optimizer, scheduler and (when both exist) AMP-scaler state of ``point``.
    The loop's counters and history are the caller's to take from ``point.state``."""
    state = point.state
    flow.graph.load_state_dict(point.payload["state_dict"])
    flow.set_actnorm_data_init(False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def training_state(*, config: Dict[str, Any], epoch: int, optimizer: torch.optim.Optimizer, scheduler: Any,
                   scaler: Optional[Any], history: List[Dict[str, Any]], best_epoch: int, best_loss: float,
                   best_state: Optional[Dict[str, torch.Tensor]], stale_epochs: int, train_cases: Sequence[Any],
                   val_cases: Sequence[Any], data_summary: str) -> Dict[str, Any]:
    """The loop state ``last.pt`` keeps under :data:`STATE_KEY` (plain data and tensors only, so
    ``weights_only`` loading reads it). ``config`` is ``TrainingConfig.to_dict()``; the cases are
    :class:`~FusionINNLib.io.brats.Case` objects."""
    return {
        "config": config,
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "history": history,
        "best_epoch": best_epoch,
        "best_loss": best_loss,
        "best_state_dict": best_state,
        "stale_epochs": stale_epochs,
        "split": {"train": [case.to_dict() for case in train_cases],
                  "val": [case.to_dict() for case in val_cases]},
        "data_summary": data_summary,
    }


def save_last(run_dir: Path, flow: FusionFlow, metadata: Dict[str, Any], state: Dict[str, Any]) -> None:
    """Write ``run_dir/last.pt``: the current weights, ``metadata`` and the loop ``state``."""
    path = run_dir / "last.pt"
    try:
        save_checkpoint(path, flow, metadata, extra={STATE_KEY: state})
    except OSError as error:
        raise OSError(f"cannot write the checkpoint {path}: {error.strerror or error}") from error


def save_model(path: Path, model_config: FusionINNConfig, state_dict: Dict[str, torch.Tensor],
               metadata: Dict[str, Any]) -> None:
    """Write a model checkpoint of ``state_dict`` (e.g. the best epoch's weights, kept on the CPU)."""
    flow = FusionFlow(model_config)
    flow.graph.load_state_dict(state_dict)
    try:
        save_checkpoint(path, flow, metadata)
    except OSError as error:
        raise OSError(f"cannot write the model {path}: {error.strerror or error}") from error


def load_initial_weights(flow: FusionFlow, init_model: str, model_config: FusionINNConfig) -> None:
    """Start ``flow`` from the weights of the model file ``init_model`` (fine-tuning); its
    architecture must be ``model_config``'s."""
    loaded = load_checkpoint(init_model)
    # padding and the background rule have no weights, so a fine-tuning run may change them
    if replace(loaded.model.config, padding_mode=model_config.padding_mode,
               clear_background=model_config.clear_background) != model_config:
        raise ValueError(f"{init_model}: its architecture ({loaded.model.config}) differs from "
                         f"this run's ({model_config}); use the same blocks, subnet and seed settings")
    flow.graph.load_state_dict(loaded.model.graph.state_dict())
    flow.set_actnorm_data_init(False)
