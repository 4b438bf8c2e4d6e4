"""Fuse, decompose, score and explain jobs (see :mod:`FusionINNLib.jobs` for the contract)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from ..io.volume import OutputSet, Volume, read_volume
from .codec import Message
from .models import DEFAULT_MODELS, ModelCache

# An image input: a file path (read by the job) or a Volume already in memory (e.g. from MRML).
ImageInput = Union[str, "os.PathLike[str]", Volume]
Progress = Callable[[float], None]
Cancel = Callable[[], bool]
Log = Callable[[str], None]


def _silent(message: str) -> None:
    pass


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _volume(value: ImageInput) -> Volume:
    return value if isinstance(value, Volume) else read_volume(value)


def _name(value: ImageInput, fallback: str) -> str:
    return os.fspath(value) if _is_path(value) else fallback


def _check_cancel(cancel: Optional[Cancel]) -> None:
    if cancel is not None and cancel():
        from ..core.engine import Cancelled

        raise Cancelled("cancelled by the user")


# -- fuse -------------------------------------------------------------------------------------
@dataclass
class FuseRequest(Message):
    """Fuse ``input1`` and ``input2`` (paths or Volumes); write ``output`` (+ ``latent_output``) when given.

    ``model``: checkpoint path, None = the bundled model. ``keep_latent`` keeps the latent in the
    result (implied by ``latent_output``). ``input_names`` name the inputs in the record and in
    messages (default: the paths, or "input1"/"input2").
    """

    KIND = "fuse"
    input1: ImageInput = ""
    input2: ImageInput = ""
    output: Optional[str] = None
    latent_output: Optional[str] = None
    keep_latent: bool = False
    model: Optional[str] = None
    device: str = "auto"
    batch_size: int = 8
    axis: int = 0
    normalization: str = "volume"
    amp: bool = False
    input_names: Optional[Tuple[str, str]] = None
    sidecar: bool = True  # also write <output>.fusioninn.json (the header of .nrrd/.mha carries the record anyway)


@dataclass
class FuseResult(Message):
    """The fused volume (input 1's grid, y in [0, 1]), the kept latent (2, *padded) or None, the
    fusion record (JSON form of :class:`FusionINNLib.io.record.FusionRecord`), notes and written files."""

    KIND = "fuse_result"
    fused: Optional[Volume] = None
    latent: Optional[np.ndarray] = None
    record: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    written: List[str] = field(default_factory=list)


def run_fuse(request: FuseRequest, progress: Optional[Progress] = None, cancel: Optional[Cancel] = None,
             log: Optional[Log] = None, models: Optional[ModelCache] = None) -> FuseResult:
    from .pipeline import check_latent_format, check_outputs, fuse_files, fuse_volumes, record_sidecar, write_fused

    log = log or _silent
    models = models or DEFAULT_MODELS
    keep_latent = request.keep_latent or request.latent_output is not None
    options = dict(device=request.device, batch_size=request.batch_size, axis=request.axis,
                   normalization=request.normalization, amp=request.amp, progress=progress, cancel=cancel, log=log)
    if _is_path(request.input1) and _is_path(request.input2) and request.output is not None and \
            request.input_names is None and (request.latent_output is not None or not keep_latent) and request.sidecar:
        # Files in, files out: fuse_files checks the outputs before reading and frees the inputs
        # before the network runs.
        output = fuse_files(request.input1, request.input2, request.output, latent=request.latent_output,
                            model=models.get(request.model), **options)
    else:
        names = request.input_names or (_name(request.input1, "input1"), _name(request.input2, "input2"))
        if request.output is not None:
            inputs = [Path(p) for p in (request.input1, request.input2) if _is_path(p)]
            check_outputs(inputs, [request.output, request.latent_output,
                                   record_sidecar(request.output) if request.sidecar else None])
            check_latent_format(request.latent_output)
        loaded = models.get(request.model)
        output = fuse_volumes(_volume(request.input1), _volume(request.input2), loaded, keep_latent=keep_latent,
                              input_names=tuple(names), **options)
        if request.output is not None:
            write_fused(output, request.output, request.latent_output, sidecar=request.sidecar)
    written = [] if request.output is None else [str(request.output)]
    if request.latent_output is not None:
        written.append(str(request.latent_output))
    return FuseResult(output.fused, output.latent if keep_latent else None, output.record,
                      list(output.notes), written)


# -- decompose --------------------------------------------------------------------------------
@dataclass
class DecomposeRequest(Message):
    """Decompose ``fused`` (path or Volume) exactly with ``latent`` or by sampling ``samples`` latents.

    ``record``: the fusion record (JSON form); None with a path = read from the file's header or
    sidecar, None with a Volume = no record (normalized units). ``latent``: path or array (2, *padded).
    Outputs are written when ``output1``/``output2`` (and ``std1``/``std2``) are given.
    """

    KIND = "decompose"
    fused: ImageInput = ""
    record: Optional[Dict[str, Any]] = None
    latent: Optional[Union[str, np.ndarray]] = None
    output1: Optional[str] = None
    output2: Optional[str] = None
    std1: Optional[str] = None
    std2: Optional[str] = None
    samples: int = 1
    seed: int = 0
    temperature: float = 1.0
    prior: str = "normal"
    model: Optional[str] = None
    device: str = "auto"
    batch_size: int = 8
    allow_model_mismatch: bool = False
    float_output: bool = False
    name: Optional[str] = None


@dataclass
class DecomposeResult(Message):
    """Both source estimates (source units when the record is known) and, for sampling with
    ``samples > 1``, their per-voxel standard deviations."""

    KIND = "decompose_result"
    source1: Optional[Volume] = None
    source2: Optional[Volume] = None
    std1: Optional[Volume] = None
    std2: Optional[Volume] = None
    exact: bool = False
    notes: List[str] = field(default_factory=list)
    written: List[str] = field(default_factory=list)


def run_decompose(request: DecomposeRequest, progress: Optional[Progress] = None, cancel: Optional[Cancel] = None,
                  log: Optional[Log] = None, models: Optional[ModelCache] = None) -> DecomposeResult:
    from ..core.errors import OptionError
    from ..io.record import as_record
    from .pipeline import (
        check_latent_fits,
        check_output_slices,
        check_outputs,
        check_record_fits,
        decompose_files,
        decompose_volume,
        read_latent,
        read_record,
    )

    log = log or _silent
    models = models or DEFAULT_MODELS
    options = dict(samples=request.samples, seed=request.seed, temperature=request.temperature, prior=request.prior,
                   device=request.device, batch_size=request.batch_size, progress=progress, cancel=cancel, log=log,
                   allow_model_mismatch=request.allow_model_mismatch)
    if request.float_output:
        options["float_output"] = True
    # No model given: the pipeline finds the one the record names (else the bundled model).
    model = None if request.model is None else models.get(request.model)
    exact = request.latent is not None
    written = [str(p) for p in (request.output1, request.output2, request.std1, request.std2) if p is not None]
    if _is_path(request.fused) and request.record is None and request.output1 is not None \
            and request.output2 is not None and (request.latent is None or _is_path(request.latent)):
        output = decompose_files(request.fused, request.output1, request.output2, latent=request.latent,
                                 std1=request.std1, std2=request.std2, model=model, **options)
        return DecomposeResult(output.source1, output.source2, output.std1, output.std2, exact, list(output.notes),
                               written)
    if (request.output1 is None) != (request.output2 is None):
        raise OptionError(rule="both", options=("output1", "output2"))
    if (request.std1 is None) != (request.std2 is None):
        raise OptionError(rule="both", options=("std1", "std2"))
    if request.std1 is not None and request.latent is None and request.samples < 2:  # before any work
        raise OptionError(rule="at_least", options=("std1", "samples"), value=2)
    name = request.name or _name(request.fused, "the fused volume")
    inputs = [Path(request.fused)] if _is_path(request.fused) else []
    if _is_path(request.latent):
        inputs.append(Path(request.latent))
    if written:
        check_outputs(inputs, [request.output1, request.output2, request.std1, request.std2])
    volume = _volume(request.fused)
    for out in (request.output1, request.output2, request.std1, request.std2):
        check_output_slices(out, volume)
    record = as_record(request.record, f"{name}: the fusion record given")
    if record is None and _is_path(request.fused):
        record = read_record(request.fused, volume)
    if record is not None:
        check_record_fits(record, volume, name)
    latent = request.latent
    if _is_path(latent):
        latent = read_latent(latent, fused=volume)
    if latent is not None and request.samples > 1:
        raise OptionError(rule="excludes", options=("latent", "samples"))
    loaded = model if model is not None else _recorded_model(record, request.fused, log)
    if latent is not None:
        check_latent_fits(np.asarray(latent), volume, loaded, int((record or {}).get("axis", 0)),
                          _name(request.latent, "the kept latent"))
    output = decompose_volume(volume, record, loaded, latent=None if latent is None else np.asarray(latent),
                              name=name, **options)
    if request.std1 is not None and output.std1 is None:
        raise OptionError(rule="at_least", options=("std1", "samples"), value=2)
    if written:
        with OutputSet() as files:
            files.add_volume(output.source1, request.output1)
            files.add_volume(output.source2, request.output2)
            if request.std1 is not None:
                files.add_volume(output.std1, request.std1)
                files.add_volume(output.std2, request.std2)
    return DecomposeResult(output.source1, output.source2, output.std1, output.std2, exact, list(output.notes),
                           written)


def _recorded_model(record: Optional[Dict[str, Any]], fused: ImageInput, log: Log):
    from ..io import checkpoint

    find = getattr(checkpoint, "recorded_model", None)
    if find is None:
        return checkpoint.resolve_model()
    return find(record, fused if _is_path(fused) else None, log)


# -- score ------------------------------------------------------------------------------------
@dataclass
class ScoreRequest(Message):
    """Score ``fused`` against ``input1``/``input2`` (paths or Volumes) with :mod:`FusionINNLib.metrics.scoring`.

    ``baselines``: classical fusions to score alongside ("mean", "max", "weighted"), made with
    ``normalization`` (default: the fused image's record, else "volume"); ``keep_baselines`` returns
    their volumes. ``decomposed1``/``decomposed2``: decompositions to score against input 1 / input 2
    (one scale per pair: the source's). ``axis`` None = the record's axis, else 0.
    """

    KIND = "score"
    input1: ImageInput = ""
    input2: ImageInput = ""
    fused: ImageInput = ""
    mask: Optional[ImageInput] = None
    decomposed1: Optional[ImageInput] = None
    decomposed2: Optional[ImageInput] = None
    paper_compatible: bool = False
    data_range: Optional[float] = None
    axis: Optional[int] = None
    baselines: Tuple[str, ...] = ()
    keep_baselines: bool = False
    normalization: Optional[str] = None
    record: Optional[Dict[str, Any]] = None


@dataclass
class ScoreReport(Message):
    """``fusion``: {"summary", "per_slice", "notes"} of the fused image; ``baselines``: {method: summary};
    ``decomposition``: {"1"/"2": summary}; ``notes``: everything worth showing; ``baseline_volumes``
    only with ``keep_baselines``."""

    KIND = "score_report"
    fusion: Dict[str, Any] = field(default_factory=dict)
    baselines: Dict[str, Dict[str, float]] = field(default_factory=dict)
    decomposition: Dict[str, Dict[str, float]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    baseline_volumes: Dict[str, Volume] = field(default_factory=dict)
    axis: int = 0

    @property
    def summary(self) -> Dict[str, float]:
        return dict(self.fusion.get("summary", {}))


def run_score(request: ScoreRequest, progress: Optional[Progress] = None, cancel: Optional[Cancel] = None,
              log: Optional[Log] = None, models: Optional[ModelCache] = None) -> ScoreReport:
    from ..metrics.scoring import align_input2, score_decomposition, score_fusion

    names = (_name(request.input1, "input 1"), _name(request.input2, "input 2"),
             _name(request.fused, "the fused volume"))
    volume1, volume2, fused = _volume(request.input1), _volume(request.input2), _volume(request.fused)
    mask = None if request.mask is None else _volume(request.mask)
    record = request.record
    if record is None and _is_path(request.fused):
        from .pipeline import read_record

        try:
            record = read_record(request.fused, fused)
        except ValueError:
            record = None  # scoring does not need the record; a damaged one is decomposition's business
    axis = request.axis if request.axis is not None else int((record or {}).get("axis", 0))
    steps = 1 + len(request.baselines) + int(request.decomposed1 is not None) + int(request.decomposed2 is not None)
    done = [0]

    def step() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0] / steps)
        _check_cancel(cancel)

    _check_cancel(cancel)
    scored = score_fusion(volume1, volume2, fused, mask=mask, paper_compatible=request.paper_compatible,
                          data_range=request.data_range, axis=axis, names=names)
    report = ScoreReport(fusion=scored, notes=list(scored["notes"]), axis=axis)
    step()
    if request.baselines:
        from ..metrics.scoring import baseline_fusions

        normalization = request.normalization or ((record or {}).get("normalization") or [{}])[0].get("mode") \
            or "volume"
        volumes = baseline_fusions(volume1, volume2, methods=tuple(request.baselines), normalization=normalization,
                                   axis=axis)
        for method, volume in volumes.items():
            report.baselines[method] = dict(score_fusion(volume1, volume2, volume, mask=mask,
                                                         paper_compatible=request.paper_compatible,
                                                         data_range=request.data_range, axis=axis,
                                                         names=names[:2] + (method,))["summary"])
            step()
        if request.keep_baselines:
            report.baseline_volumes = volumes
    for index, decomposed in ((1, request.decomposed1), (2, request.decomposed2)):
        if decomposed is None:
            continue
        source = volume1 if index == 1 else align_input2(volume1, volume2)[0]
        summary = score_decomposition(source, _volume(decomposed), data_range=request.data_range, axis=axis)
        report.decomposition[str(index)] = dict(summary["summary"])
        step()
    return report


# -- explain ----------------------------------------------------------------------------------
@dataclass
class ExplainRequest(Message):
    """Guidance maps (and, with ``point_ijk``, Jacobian images) of the fusion of ``input1``/``input2``.

    File outputs (``guidance1``/``guidance2`` required together, ``rgb``, ``jacobian1``/``jacobian2``,
    ``scatter``) are written when given; the result always holds the volumes. ``slices``: "a:b",
    one index, or None for every slice.
    """

    KIND = "explain"
    input1: ImageInput = ""
    input2: ImageInput = ""
    guidance1: Optional[str] = None
    guidance2: Optional[str] = None
    rgb: Optional[str] = None
    point_ijk: Optional[Tuple[int, int, int]] = None
    jacobian1: Optional[str] = None
    jacobian2: Optional[str] = None
    jacobians: bool = False
    scatter: Optional[str] = None
    scatter_radius: int = 5
    slices: Optional[str] = None
    model: Optional[str] = None
    axis: int = 0
    normalization: str = "volume"
    spacing: Optional[int] = None
    approximate: bool = False
    gamma: float = 1.0
    device: str = "auto"


@dataclass
class ExplainResult(Message):
    KIND = "explain_result"
    guidance1: Optional[Volume] = None
    guidance2: Optional[Volume] = None
    rgb: Optional[np.ndarray] = None
    fused: Optional[Volume] = None
    jacobian1: Optional[Volume] = None
    jacobian2: Optional[Volume] = None
    description: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    written: List[str] = field(default_factory=list)


def run_explain(request: ExplainRequest, progress: Optional[Progress] = None, cancel: Optional[Cancel] = None,
                log: Optional[Log] = None, models: Optional[ModelCache] = None) -> ExplainResult:
    from ..core.errors import OptionError
    from .explain import VolumeExplainer, explain_files, parse_slices

    log = log or _silent
    models = models or DEFAULT_MODELS
    loaded = models.get(request.model)
    if request.guidance1 is not None or request.guidance2 is not None:
        if not (_is_path(request.input1) and _is_path(request.input2)):
            raise ValueError("file outputs of an explain job need file inputs")
        if request.guidance1 is None or request.guidance2 is None:
            raise OptionError(rule="both", options=("guidance1", "guidance2"))
        files = explain_files(request.input1, request.input2, request.guidance1, request.guidance2, rgb=request.rgb,
                              point_ijk=request.point_ijk, jacobian1=request.jacobian1, jacobian2=request.jacobian2,
                              scatter=request.scatter, slices=request.slices, model=loaded, axis=request.axis,
                              normalization=request.normalization, spacing=request.spacing,
                              approximate=request.approximate, gamma=request.gamma,
                              scatter_radius=request.scatter_radius, device=request.device, progress=progress,
                              cancel=cancel, log=log)
        out = files.output
        jac = files.jacobians or (None, None)
        return ExplainResult(out.guidance1, out.guidance2, out.rgb, out.fused, jac[0], jac[1], out.description(),
                             list(out.notes), list(files.written))
    if request.spacing is not None and request.approximate:
        raise OptionError(rule="one_of", options=("spacing", "approximate"))
    explainer = VolumeExplainer(_volume(request.input1), _volume(request.input2), loaded, axis=request.axis,
                                normalization=request.normalization, device=request.device, log=log)
    slice_range = parse_slices(request.slices, explainer.slice_count) if request.slices else None
    out = explainer.guidance(slice_range, spacing=request.spacing, approximate=request.approximate,
                             gamma=request.gamma, progress=progress, cancel=cancel)
    jac: Tuple[Optional[Volume], Optional[Volume]] = (None, None)
    if request.point_ijk is not None and (request.jacobians or request.jacobian1 is not None):
        jac = explainer.jacobian(tuple(request.point_ijk))
    return ExplainResult(out.guidance1, out.guidance2, out.rgb, out.fused, jac[0], jac[1], out.description(),
                         list(out.notes), [])
