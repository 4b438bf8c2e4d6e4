"""The jobs layer: one typed request → one job → one typed result, for every front end.

The ``fusioninn`` command line, ``fusioninn batch``/``demo``, the FusionINNTraining CLI and the
Slicer module's worker process build a *request*, call :func:`run` and render the *result*; none of
them holds pipeline logic of its own. The work below is :mod:`FusionINNLib.jobs.pipeline`,
:mod:`FusionINNLib.metrics.scoring`, :mod:`FusionINNLib.jobs.explain`, :mod:`FusionINNLib.jobs.batch` and
:mod:`FusionINNLib.train.training`.

=====================  ======================  ============================================
request                result                  what
=====================  ======================  ============================================
:class:`FuseRequest`       :class:`FuseResult`       fuse two images (+ kept latent), write files
:class:`DecomposeRequest`  :class:`DecomposeResult`  exact (kept latent) or sampled decomposition
:class:`ScoreRequest`      :class:`ScoreReport`      metric suite, baselines, decomposition rows
:class:`ExplainRequest`    :class:`ExplainResult`    guidance maps, RGB, Jacobian images
:class:`BatchRequest`      :class:`BatchReport`      every case of a folder + summary.tsv
:class:`TrainRequest`      :class:`TrainReport`      training run (+ preview fusion)
=====================  ======================  ============================================

Contract (for the Slicer worker, issue 11, and any other client)
----------------------------------------------------------------
``run(request, progress=None, cancel=None, log=None, models=None) -> result``
    * ``progress(fraction)``: fraction of this job done, in [0, 1], non-decreasing; called from the
      thread that runs the job;
    * ``cancel() -> bool``: polled between batches of slices / cases / training steps; when it
      returns True the job raises :class:`FusionINNLib.core.engine.Cancelled` and writes nothing
      (a batch marks the remaining cases ``cancelled`` and still writes its summary; training keeps
      its last finished epoch in ``last.pt``);
    * ``log(message)``: notes for people (resampling, NaN replacement, model warnings); the same
      notes are in the result's ``notes``;
    * ``models``: a :class:`ModelCache` (default: one shared per process) so a long-lived worker
      loads each checkpoint once and reloads it when the file changes.
    Every job also has its own ``run_<kind>`` function with the same signature.

Requests and results are dataclasses of plain values
    * image inputs are **file paths or** :class:`~FusionINNLib.io.volume.Volume` objects (a Volume is
      voxels + ITK geometry: what the Slicer module builds from an MRML node); ``model`` is a
      checkpoint path, None = the bundled model; outputs are written only when their paths are given,
      atomically, all or nothing;
    * ``message.to_dict(store)`` gives JSON-serialisable data (``"kind"`` names the class); voxels go
      to ``.npy`` files in an :class:`ArrayStore` folder, never into the JSON, and ``to_dict``
      without a store refuses a message holding voxels (``TypeError``); :func:`message_from_dict`
      ``(data, store)`` rebuilds the request or result. So a worker receives ``json.loads(line)``,
      runs it and answers with ``result.to_dict(store)``;
    * errors are exceptions; the typed ones (:mod:`FusionINNLib.core.errors`) carry fields, have a
      ``to_dict()`` for the pipe and are worded per front end (``error.message("gui")`` names no
      command-line flag). :func:`error_to_dict` / :func:`FusionINNLib.core.errors.error_from_dict` carry
      any exception over a pipe.
    * the fusion record in results is the JSON form of :class:`FusionINNLib.io.record.FusionRecord`
      (same keys as the files' ``FusionINN_record`` header and sidecar and the node attribute
      ``FusionINN.Record``).

Example (what ``fusioninn fuse A B --output F --latent Z`` does)::

    from FusionINNLib import jobs
    result = jobs.run(jobs.FuseRequest("a.nii.gz", "b.nii.gz", output="f.nrrd", latent_output="z.nrrd"))
    result.fused, result.record["normalization"], result.written
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from .codec import ArrayStore, Message, decode, encode
from .folders import BatchReport, BatchRequest, TrainReport, TrainRequest, run_batch, run_train
from .imaging import (
    DecomposeRequest,
    DecomposeResult,
    ExplainRequest,
    ExplainResult,
    FuseRequest,
    FuseResult,
    ScoreReport,
    ScoreRequest,
    run_decompose,
    run_explain,
    run_fuse,
    run_score,
)
from .models import DEFAULT_MODELS, ModelCache

RUNNERS: Dict[type, Callable[..., Any]] = {
    FuseRequest: run_fuse,
    DecomposeRequest: run_decompose,
    ScoreRequest: run_score,
    ExplainRequest: run_explain,
    BatchRequest: run_batch,
    TrainRequest: run_train,
}
MESSAGE_CLASSES: Dict[str, type] = {cls.KIND: cls for cls in (
    FuseRequest, FuseResult, DecomposeRequest, DecomposeResult, ScoreRequest, ScoreReport, ExplainRequest,
    ExplainResult, BatchRequest, BatchReport, TrainRequest, TrainReport)}


def run(request: Message, progress: Optional[Callable[[float], None]] = None,
        cancel: Optional[Callable[[], bool]] = None, log: Optional[Callable[[str], None]] = None,
        models: Optional[ModelCache] = None) -> Message:
    """Run one job (see the module docstring)."""
    runner = RUNNERS.get(type(request))
    if runner is None:
        raise TypeError(f"not a job request: {type(request).__name__}")
    return runner(request, progress=progress, cancel=cancel, log=log, models=models)


def message_from_dict(data: Dict[str, Any], store: Optional[ArrayStore] = None) -> Message:
    """The request or result encoded by ``to_dict`` (its ``"kind"`` picks the class)."""
    cls = MESSAGE_CLASSES.get(str(data.get("kind")))
    if cls is None:
        raise ValueError(f"unknown job message kind {data.get('kind')!r}")
    return cls.from_dict(data, store)


def error_to_dict(error: BaseException) -> Dict[str, Any]:
    """Any exception as plain data for a pipe: typed errors keep their fields (rebuild them with
    :func:`FusionINNLib.core.errors.error_from_dict`), others keep their class name and text;
    ``cancelled`` is true for :class:`~FusionINNLib.core.engine.Cancelled`."""
    from ..core.errors import FusionINNError

    data: Dict[str, Any] = error.to_dict() if isinstance(error, FusionINNError) else {"kind": "exception"}
    data.update(type=type(error).__name__, text=" ".join(str(error).split()) or type(error).__name__,
                cancelled=type(error).__name__ == "Cancelled")
    return data


__all__ = [
    "ArrayStore", "Message", "ModelCache", "DEFAULT_MODELS", "encode", "decode", "run", "message_from_dict",
    "error_to_dict", "FuseRequest", "FuseResult", "DecomposeRequest", "DecomposeResult", "ScoreRequest",
    "ScoreReport", "ExplainRequest", "ExplainResult", "BatchRequest", "BatchReport", "TrainRequest", "TrainReport",
    "run_fuse", "run_decompose", "run_score", "run_explain", "run_batch", "run_train",
]
