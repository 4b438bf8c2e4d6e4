"""Batch and training jobs: whole folders of cases (see :mod:`FusionINNLib.jobs` for the contract)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from .codec import Message
from .imaging import Cancel, Log, Progress, _silent
from .models import DEFAULT_MODELS, ModelCache


# -- batch ------------------------------------------------------------------------------------
@dataclass
class BatchRequest(Message):
    """Fuse every case under ``directory`` into ``output_dir`` (see :mod:`FusionINNLib.jobs.batch`)."""

    KIND = "batch"
    directory: str = ""
    output_dir: str = ""
    modalities: Tuple[str, str] = ("t1ce", "flair")
    pattern1: Optional[str] = None
    pattern2: Optional[str] = None
    keep_latent: bool = False
    metrics: bool = False
    paper_compatible: bool = False
    model: Optional[str] = None
    device: str = "auto"
    batch_size: int = 8
    axis: int = 0
    normalization: str = "volume"
    output_format: str = "nii.gz"


@dataclass
class BatchReport(Message):
    """One row per case (``case``, ``status``, ``message``, paths, metrics) and the summary file."""

    KIND = "batch_report"
    cases: List[Dict[str, Any]] = field(default_factory=list)
    summary_path: str = ""
    cancelled: bool = False
    counts: Dict[str, int] = field(default_factory=dict)
    description: str = ""

    @property
    def succeeded(self) -> int:
        return int(self.counts.get("ok", 0))


def run_batch(request: BatchRequest, progress: Optional[Progress] = None, cancel: Optional[Cancel] = None,
              log: Optional[Log] = None, models: Optional[ModelCache] = None) -> BatchReport:
    from . import batch

    models = models or DEFAULT_MODELS
    result = batch.run_batch(request.directory, request.output_dir, modalities=tuple(request.modalities),
                             pattern1=request.pattern1, pattern2=request.pattern2, keep_latent=request.keep_latent,
                             metrics=request.metrics, paper_compatible=request.paper_compatible,
                             model=models.get(request.model), device=request.device, batch_size=request.batch_size,
                             axis=request.axis, normalization=request.normalization,
                             output_format=request.output_format, progress=progress, cancel=cancel,
                             log=log or _silent)
    rows = [{"case": o.case_id, "status": o.status, "message": o.message,
             "input1": None if o.input1 is None else str(o.input1),
             "input2": None if o.input2 is None else str(o.input2),
             "output": None if o.output is None else str(o.output),
             "latent": None if o.latent is None else str(o.latent), "metrics": dict(o.metrics)}
            for o in result.outcomes]
    counts = {status: result.count(status) for status in batch.STATUSES}
    return BatchReport(rows, str(result.summary_path), result.cancelled, counts, result.describe())


# -- train ------------------------------------------------------------------------------------
@dataclass
class TrainRequest(Message):
    """Train as ``config`` says (the fields of :class:`FusionINNLib.train.training.TrainingConfig`, by name;
    see :mod:`FusionINNLib.train.options` for every option) and optionally fuse one validation case
    with the new model into ``preview_output`` (with its fusion record)."""

    KIND = "train"
    config: Dict[str, Any] = field(default_factory=dict)
    preview_output: Optional[str] = None


@dataclass
class TrainReport(Message):
    KIND = "train_report"
    model_path: str = ""
    best_epoch: int = 0
    best_val_loss: float = float("nan")
    mean_decomposition_ssim: float = float("nan")
    epochs_run: int = 0
    stopped_early: bool = False
    history_path: str = ""
    metrics_path: str = ""
    run_dir: str = ""
    plot_path: Optional[str] = None
    metrics: Dict[str, float] = field(default_factory=dict)
    preview_case: Optional[str] = None


PREVIEW_SHARE = 0.05  # fraction of the progress given to the preview fusion when one is requested


def run_train(request: TrainRequest, progress: Optional[Progress] = None, cancel: Optional[Cancel] = None,
              log: Optional[Log] = None, models: Optional[ModelCache] = None,
              status: Optional[Callable[[float, str], None]] = None) -> TrainReport:
    """``status(fraction, message)``, when given, receives the step descriptions along with the
    progress (the Slicer CLI shows them as ``<filter-comment>``); ``progress(fraction)`` otherwise."""
    from ..train.training import TrainingConfig, train

    config = TrainingConfig.from_dict(dict(request.config))
    share = 1.0 - PREVIEW_SHARE if request.preview_output else 1.0

    def on_progress(fraction: float, message: str) -> None:
        if status is not None:
            status(fraction * share, message)
        elif progress is not None:
            progress(fraction * share)

    result = train(config, progress=on_progress if (status or progress) else None, log=log, cancel=cancel)
    report = TrainReport(str(result.model_path), int(result.best_epoch), float(result.best_val_loss),
                         float(result.mean_decomposition_ssim), int(result.epochs_run), bool(result.stopped_early),
                         str(result.history_path), str(result.metrics_path), str(result.run_dir),
                         None if result.plot_path is None else str(result.plot_path),
                         {k: float(v) for k, v in result.metrics.items()})
    if request.preview_output and int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun: rank 0 only
        if status is not None:
            status(share, "fusing a validation case for the preview")
        report.preview_case = write_preview(result.model_path, config.data_dir, request.preview_output,
                                            config.device, log or _silent, models)
    if progress is not None and status is None:
        progress(1.0)
    return report


def write_preview(model_path: Any, data_dir: str, output: str, device: str, log: Log,
                  models: Optional[ModelCache] = None) -> str:
    """Fuse the first validation case (else the first training case) of a trained model into
    ``output`` through the fuse job, so the preview carries the same record as any fusion."""
    from ..io.brats import LOGGER as discovery_logger
    from ..io.brats import discover_cases
    from .imaging import FuseRequest, run_fuse

    loaded = (models or DEFAULT_MODELS).get(str(model_path))
    metadata = loaded.metadata
    modalities = tuple(metadata.get("modalities") or ())
    data = metadata.get("data") or {}
    level = discovery_logger.level
    discovery_logger.setLevel("ERROR")  # the training has already reported the skipped folders
    try:
        cases = discover_cases(data_dir, modalities).cases
    finally:
        discovery_logger.setLevel(level)
    by_id = {case.case_id: case for case in cases}
    chosen = None
    for ids in (data.get("val_cases"), data.get("train_cases")):
        chosen = next((by_id[i] for i in ids or [] if i in by_id), None)
        if chosen is not None:
            break
    chosen = chosen or cases[0]
    paths = [str(chosen.path(name)) for name in modalities]
    # No sidecar: the preview goes to a Slicer temporary file, whose NRRD header carries the record.
    run_fuse(FuseRequest(paths[0], paths[1], output=output, model=str(model_path), device=device,
                         axis=int(metadata.get("axis", 0)), normalization=metadata.get("normalization", "volume"),
                         sidecar=False),
             log=log, models=models)
    return chosen.case_id
