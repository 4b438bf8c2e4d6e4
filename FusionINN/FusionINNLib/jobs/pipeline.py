"""The main jobs on volumes and files: fuse two images, decompose a fused one.

Data flow of fusion: read both inputs -> resample input 2 onto input 1's grid when the geometry
differs (linear; refused when they do not overlap) -> normalize each (parameters kept) -> slice-wise
model forward -> write the fused volume (+ kept latent) in input 1's geometry, with a *record*
(normalization parameters, model identity, axis, notes) in the file's metadata (NRRD/MHA) and
always in a JSON sidecar ``<name>.fusioninn.json``. Decomposition runs the same path backwards
and ends in each source's original intensity units.

The GUI (Slicer module), the training CLI and the ``fusioninn`` command line all call these
functions; :class:`Volume` objects are what the Slicer module builds from MRML nodes.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..core.engine import CancelCheck, ProgressCallback, SliceEngine, fill_cleared_background
from ..core.errors import LatentMismatchError, ModelMismatchError, OptionError
from ..core.normalization import (
    NORMALIZED_LIMIT,
    NormalizationParams,
    denormalize_integers,
    denormalize_std,
    denormalize_volume,
    integer_dtype,
    normalize_volume,
)
from ..io.atomic import temporary_sibling
from ..io.checkpoint import LoadedModel, resolve_model
from ..io.checkpoint import recorded_model as model_of_record
from ..io.record import RECORD_FORMAT, RECORD_KEY, RECORD_VERSION, FusionRecord, as_record, sidecar_path  # noqa: F401
from ..io.record import read_record as _read_record
from ..io.volume import (
    DETACHED_HEADER_SUFFIXES,
    INTEGER_ONLY_SUFFIXES,
    SINGLE_SLICE_SUFFIXES,
    OutputSet,
    UsageError,
    Volume,
    VolumeError,
    native_output_captured,
    overlap_fraction,
    read_image,
    read_volume,
    resample_like,
)

# A fused image holds y = sigmoid(u) in [0, 1]; resampling it (e.g. cubic, in a viewer) may
# overshoot a little, which is clipped. Anything further out is not a fused image.
FUSED_RANGE_TOLERANCE = 0.01
# A sampled estimate further than this fraction of the source range outside it is impossible,
# not sampling noise (see _clamp_sampled).
IMPLAUSIBLE_MARGIN = 0.1
# Input 2 covering less than this fraction of input 1's grid makes the resampling note a warning.
MIN_OVERLAP = 0.9
PathLike = Union[str, "os.PathLike[str]"]
Log = Callable[[str], None]


@dataclass
class FusionOutput:
    fused: Volume
    latent: Optional[np.ndarray]  # (2, *padded) [z, r] in slice order of ``record['axis']``
    record: Dict[str, Any]
    notes: List[str] = field(default_factory=list)


@dataclass
class DecompositionOutput:
    source1: Volume
    source2: Volume
    std1: Optional[Volume] = None
    std2: Optional[Volume] = None
    notes: List[str] = field(default_factory=list)


def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (numpy k, j, i order; 0 = slices), got {axis}")
    return axis


# Formats whose files hold pixels but no position, spacing or orientation.
GEOMETRYLESS_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# A label map (segmentation, mask) has a handful of small non-negative integer values.
LABEL_MAP_MAX_VALUES = 8
LABEL_MAP_SAMPLE = 1 << 20


def _label_values(array: np.ndarray) -> Optional[np.ndarray]:
    """The values of ``array`` if it looks like a label map (at most ``LABEL_MAP_MAX_VALUES``
    distinct non-negative integers, at least two), else None. A strided sample decides cheaply
    for ordinary images, which have hundreds of values; the whole volume confirms."""
    if array.dtype.kind not in "biuf" or array.size < 2:
        return None
    step = max(1, array.size // LABEL_MAP_SAMPLE)
    for data in (array.reshape(-1)[::step], array):
        values = np.unique(data)
        if len(values) > LABEL_MAP_MAX_VALUES:
            return None
    if len(values) < 2 or values.min() < 0 or not np.all(np.mod(values, 1) == 0) or values.max() > 255:
        return None
    return values


def input_warnings(volume1: Volume, volume2: Volume, names: Tuple[str, str] = ("input1", "input2"),
                   same_file: bool = False) -> List[str]:
    """Likely mistakes that still fuse correctly, each worded with what was detected and what to
    do about it: a label map or a constant image as an input, the same image twice."""
    warnings: List[str] = []
    if any(v.array.dtype.kind not in "biuf" for v in (volume1, volume2)):
        return warnings  # not an image of numbers: normalization refuses it in words
    if same_file or (volume1.shape == volume2.shape and volume1.array.dtype == volume2.array.dtype
                     and np.array_equal(volume1.array, volume2.array, equal_nan=volume1.array.dtype.kind == "f")):
        what = "are the same file" if same_file else "hold identical images"
        warnings.append(f"warning: {names[0]} and {names[1]} {what}: the fusion of an image with itself shows "
                        "nothing new; give the second modality as input 2 (fused anyway)")
    for name, volume in zip(names, (volume1, volume2)):
        array = volume.array
        finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
        if finite.size and finite.min() == finite.max():
            warnings.append(f"warning: {name} is constant (every voxel {float(finite.min()):g}): it carries no "
                            "image information, the fused image is the other input alone; check the file "
                            "(fused anyway)")
            continue
        values = _label_values(array)
        if values is not None:
            shown = ", ".join(f"{v:g}" for v in values.astype(np.float64))
            warnings.append(f"warning: {name} looks like a label map or mask ({len(values)} distinct integer values: "
                            f"{shown}), not an intensity image; a segmentation given by mistake? (fused anyway, "
                            "its labels as intensities)")
    return warnings


def check_geometry_carried(paths: Sequence[PathLike], volumes: Sequence[Volume]) -> None:
    """Refuse two inputs of different sizes when a file format holds no geometry (PNG, JPEG...):
    resampling one onto the other would place pixels by a guess."""
    names = [Path(p).name.lower() for p in paths]
    if volumes[0].shape != volumes[1].shape and any(n.endswith(GEOMETRYLESS_SUFFIXES) for n in names):
        size = [" x ".join(str(n) for n in (v.shape[1:] if v.is_2d else v.shape)) for v in volumes]
        raise VolumeError(f"{paths[0]} ({size[0]}) and {paths[1]} ({size[1]}) differ in size, and "
                          "PNG/JPEG/BMP/TIFF files carry no position or spacing, so one cannot "
                          "be resampled onto the other; resize them to the same size first, or use images with "
                          "geometry (.nrrd, .nii.gz)")


def prepare_inputs(volume1: Volume, volume2: Volume, log: Log = print) -> Tuple[Volume, List[str]]:
    """Input 2 on input 1's grid (resampled linearly if needed) and the notes saying so."""
    notes = list(volume1.notes) + list(volume2.notes)
    if volume1.same_grid(volume2):
        return volume2, notes
    covered = overlap_fraction(volume1, volume2)
    if covered == 0.0:
        raise VolumeError("the two inputs do not overlap in physical space; are they co-registered?")
    moving = volume2.with_array(np.nan_to_num(volume2.array.astype(np.float32)))
    resampled = resample_like(moving, volume1)
    notes.append("input 2 resampled (linear) onto input 1's grid: their geometries differ")
    log(notes[-1])
    if covered < 1.0:
        # outside input 2's extent the resampled image is 0: a partial overlap is often a
        # registration problem, and the fusion there sees input 1 alone
        message = (f"input 2 covers only {100.0 * covered:.3g} % of input 1's grid; the rest is filled with 0 "
                   "(input 1 alone is fused there)")
        notes.append(("warning: " + message + "; are the inputs co-registered?") if covered < MIN_OVERLAP else message)
        log(notes[-1])
    return resampled, notes


@dataclass
class NormalizedPair:
    """Both inputs normalized on input 1's grid; ``geometry`` keeps input 1's grid, not its voxels."""

    geometry: Volume
    x1: np.ndarray
    x2: np.ndarray
    params: Tuple[NormalizationParams, NormalizationParams]
    notes: List[str]


def normalize_pair(volume1: Volume, volume2: Volume, *, axis: int = 0, normalization: str = "volume",
                   log: Log = print, input_names: Tuple[str, str] = ("input1", "input2"),
                   same_file: bool = False) -> NormalizedPair:
    """Input 2 onto input 1's grid, both normalized: everything fusion needs from the inputs.

    Once this returns, the source voxels are no longer needed: a caller that does not keep the
    volumes (``fuse_files``) frees two volumes of memory before the network runs. Likely mistakes
    (:func:`input_warnings`) are logged and kept in the notes.
    """
    _check_axis(axis)
    warnings = input_warnings(volume1, volume2, input_names, same_file=same_file)
    volume2, notes = prepare_inputs(volume1, volume2, log)
    for warning in warnings:
        notes.append(warning)
        log(warning)
    for name, volume in zip(input_names, (volume1, volume2)):
        if volume.array.dtype.kind == "f" and not np.isfinite(volume.array).any():
            raise VolumeError(f"{name}: every voxel is NaN or infinite; there is no image to fuse")
    normalized = []
    for name, volume in zip(input_names, (volume1, volume2)):
        try:
            normalized.append(normalize_volume(volume.array, normalization, axis))
        except ValueError as error:  # complex or non-numeric voxels: name the input
            raise VolumeError(f"{name}: {error}") from None
    (x1, params1), (x2, params2) = normalized
    del normalized
    for name, params in zip(input_names, (params1, params2)):
        if params.nonfinite:
            notes.append(f"{name}: {params.nonfinite} NaN/Inf voxels replaced by the background value")
            log(notes[-1])
        if params.note:
            notes.append(f"{name}: {params.note}")
            log(notes[-1])
    # A zero-strided view: the grid and shape of input 1 without holding on to its voxels.
    geometry = replace(volume1, array=np.broadcast_to(np.zeros((), np.float32), volume1.shape), metadata={},
                       notes=[])
    return NormalizedPair(geometry, x1, x2, (params1, params2), notes)


def fuse_normalized(pair: NormalizedPair, model: LoadedModel, *, axis: int = 0, keep_latent: bool = False,
                    device: str = "auto", batch_size: int = 8, amp: bool = False,
                    progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None,
                    log: Log = print, input_names: Tuple[str, str] = ("input1", "input2")) -> FusionOutput:
    """The network part of :func:`fuse_volumes`, on inputs from :func:`normalize_pair`."""
    notes = pair.notes
    if keep_latent and amp:
        amp = False
        notes.append("AMP disabled: a kept latent needs float32 for an exact decomposition")
    engine = SliceEngine(model.model, device, batch_size, amp, progress=progress, cancel=cancel, log=log)
    result = engine.fuse(pair.x1, pair.x2, axis=axis, keep_latent=keep_latent)
    if not np.isfinite(result.fused).all() or (result.latent is not None and not np.isfinite(result.latent).all()):
        raise ValueError(f"the model ({model.source}) produced NaN/Inf values; is the model file damaged or from a "
                         "diverged training run?")
    record = FusionRecord.create(axis=axis, normalization=pair.params, model=model.describe(),
                                 device=str(engine.device), inputs=input_names, notes=notes)
    # the fused voxels' fingerprint: a record (sidecar) that ends up next to another fused image
    # of the same shape is noticed at decomposition
    record["fused_sha256"] = fused_fingerprint(result.fused)
    if result.latent is not None:
        # the latent's own fingerprint: checked for every latent format, also NIfTI, which keeps
        # no header for the fused image's fingerprint (batch latents are .nii.gz by default)
        record["latent_sha256"] = latent_fingerprint(result.latent)
    fused = pair.geometry.with_array(result.fused)
    return FusionOutput(fused, result.latent, record, notes)


def fuse_volumes(volume1: Volume, volume2: Volume, model: Optional[LoadedModel] = None, *,
                 axis: int = 0, normalization: str = "volume", keep_latent: bool = False,
                 device: str = "auto", batch_size: int = 8, amp: bool = False,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None,
                 log: Log = print, input_names: Tuple[str, str] = ("input1", "input2")) -> FusionOutput:
    """Fuse two volumes; the result is on ``volume1``'s grid with values y in [0, 1]."""
    _check_axis(axis)
    model = model or resolve_model()
    pair = normalize_pair(volume1, volume2, axis=axis, normalization=normalization, log=log,
                          input_names=input_names)
    return fuse_normalized(pair, model, axis=axis, keep_latent=keep_latent, device=device, batch_size=batch_size,
                           amp=amp, progress=progress, cancel=cancel, log=log, input_names=input_names)


def decompose_volume(fused: Volume, record: Optional[Dict[str, Any]] = None,
                     model: Optional[LoadedModel] = None, *, latent: Optional[np.ndarray] = None,
                     samples: int = 1, seed: int = 0, temperature: float = 1.0, prior: str = "normal",
                     device: str = "auto", batch_size: int = 8,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None,
                     log: Log = print, allow_model_mismatch: bool = False,
                     name: str = "the fused volume", float_output: bool = False) -> DecompositionOutput:
    """Decompose ``fused`` into source estimates in source units (when the record is known).

    With ``latent`` (from fusion with ``keep_latent``) the result is the exact inverse, in the
    source's integer type when the source was an integer image and every voxel lands on an integer
    (``float_output`` keeps float32). Otherwise ``samples`` latents are drawn from ``prior``
    (scaled by ``temperature``) and the per-voxel mean is returned (float32, clamped to the
    recorded source range, with a note counting the clamped voxels), plus the per-voxel standard
    deviation when ``samples > 1``. ``name`` (the file) is what error messages call the fused volume.
    """
    model = model or model_of_record(record, log=log)
    notes: List[str] = []
    y = fused_values(fused.array, name, notes, log)  # first: a wrong image is refused before any note
    if latent is not None and record is not None:
        check_latent_record(record, latent, "the latent")
    axis = 0
    params: Optional[Tuple[NormalizationParams, NormalizationParams]] = None
    if record is not None:
        check_record_model(record, model, allow_model_mismatch, notes, log)
        axis = _check_axis(int(record.get("axis", 0)))
        params = (NormalizationParams.from_dict(record["normalization"][0]),
                  NormalizationParams.from_dict(record["normalization"][1]))
    else:
        notes.append(f"warning: {name} has no fusion record: the decomposed images are in normalized units (about "
                     "0..1), not the sources' units, slices along axis 0; keep the .fusioninn.json sidecar (or an "
                     ".nrrd/.mha fused image) next to the fused image")
        log(notes[-1])
    engine = SliceEngine(model.model, device, batch_size, progress=progress, cancel=cancel, log=log)
    std = (None, None)
    if latent is not None:
        x1, x2 = engine.decompose_exact(y, latent, axis=axis)
    else:
        x1, x2, s1, s2 = engine.decompose_sampled(y, axis, samples, seed, temperature, prior)
        std = (s1, s2)
    for index, x in enumerate((x1, x2)):
        # NaN comes from a diverged model, never from a valid decomposition; a sampled inverse may
        # overflow next to saturated voxels (clamped below), an exact one must not
        if np.isnan(x).any() or (latent is not None and not np.isfinite(x).all()):
            raise ValueError(f"the model produced NaN/Inf values decomposing {name} (source {index + 1}); "
                             "is the model file damaged or from a diverged training run?")
    if params is not None:
        # one at a time: only one extra volume is alive during the conversion
        x1 = _to_source_units(x1, params[0], exact=latent is not None and not float_output, index=1, notes=notes,
                              log=log)
        x2 = _to_source_units(x2, params[1], exact=latent is not None and not float_output, index=2, notes=notes,
                              log=log)
        std = tuple(None if s is None else denormalize_std(s, p) for s, p in zip(std, params))
    if latent is None:
        if params is not None:  # each source's recorded minimum (its background) where y says background
            fill_cleared_background(model.model, y, (x1, x2), std, (params[0].minimum, params[1].minimum))
        bounds = [_plausible_range(None if params is None else params[i]) for i in range(2)]
        x1 = _clamp_sampled(x1, bounds[0], 1, notes, log)
        x2 = _clamp_sampled(x2, bounds[1], 2, notes, log)
        std = tuple(None if s is None else np.fmin(s, np.float32((b[1] - b[0]) / 2)) for s, b in zip(std, bounds))
    output = DecompositionOutput(fused.with_array(x1), fused.with_array(x2), notes=notes)
    if std[0] is not None:
        output.std1, output.std2 = fused.with_array(std[0]), fused.with_array(std[1])
    return output


def _to_source_units(x: np.ndarray, params: NormalizationParams, *, exact: bool, index: int, notes: List[str],
                     log: Log) -> np.ndarray:
    """An exact decomposition of an integer source in the source's type (bit-exact); else float32."""
    dtype = integer_dtype(params) if exact else None
    if dtype is not None:
        restored, worst = denormalize_integers(x, params, dtype)
        if restored is not None:
            return restored
        notes.append(f"source {index}: written as float32, not {params.source_dtype}: the round trip is not exact "
                     f"to the integer (a voxel lies {worst:.3g} from one; float32 cannot carry every value of "
                     "this source)")
        log(notes[-1])
    return denormalize_volume(x, params)


def _plausible_range(params: Optional[NormalizationParams]) -> Tuple[float, float]:
    """Where a source voxel can lie: the recorded finite source range, else the range the
    normalization maps into the flow's invertible domain (older records, no record)."""
    if params is not None and params.minimum is not None and params.maximum is not None:
        return params.minimum, params.maximum
    low, high = -NORMALIZED_LIMIT, 1.0 + NORMALIZED_LIMIT
    if params is None:
        return low, high
    offset, scale = np.asarray(params.offset), np.asarray(params.scale)
    ends = np.concatenate([offset + low * scale, offset + high * scale])
    return float(ends.min()), float(ends.max())


def _clamp_sampled(x: np.ndarray, bounds: Tuple[float, float], index: int, notes: List[str], log: Log) -> np.ndarray:
    """Sampled estimates outside the source range are impossible values: clamp them, say how many.

    Slight undershoots (a background estimated a little below its value) are ordinary sampling
    error; values beyond ``IMPLAUSIBLE_MARGIN`` of the range outside it (the inverse with a random
    latent diverges next to saturated fused voxels, e.g. -3e6 for a source of -105..2030) make
    the note a warning.
    """
    low, high = np.float32(bounds[0]), np.float32(bounds[1])
    outside = int(np.count_nonzero((x < low) | (x > high)))
    if not outside:
        return x
    margin = IMPLAUSIBLE_MARGIN * max(float(high) - float(low), 1e-12)
    far = int(np.count_nonzero((x < low - margin) | (x > high + margin)))
    lowest, highest = float(x.min()), float(x.max())
    np.clip(x, low, high, out=x)
    message = (f"source {index}: {outside} sampled voxel estimate(s) ({100.0 * outside / x.size:.2g} %) outside the "
               f"source range {bounds[0]:.6g}..{bounds[1]:.6g} clamped to it")
    if far:
        extremes = [f"as low as {lowest:.3g}"] if lowest < low - margin else []
        extremes += [f"as high as {highest:.3g}"] if highest > high + margin else []
        message = (f"warning: {message}; {far} of them were impossible values ({', '.join(extremes)}), where the "
                   "sampled inverse diverges next to saturated fused voxels; the kept latent gives the "
                   "exact sources")
    notes.append(message)
    log(notes[-1])
    return x


def fused_values(array: np.ndarray, name: str, notes: List[str], log: Log) -> np.ndarray:
    """The fused image y in [0, 1] as float32, or a clear error when it cannot be one.

    8-bit files (PNG/JPEG/BMP outputs of ``fuse``) store round(255 y): they are scaled back with
    a note, since the quantisation makes the decomposition approximate.
    """
    if array.dtype == np.uint8:
        notes.append(f"warning: {name}: 8-bit fused image read as value/255; 8-bit quantisation makes the "
                     "decomposition approximate (use a float format such as .nrrd for exact results)")
        log(notes[-1])
        return array.astype(np.float32) / np.float32(255.0)
    y = np.asarray(array, dtype=np.float32)
    if not np.isfinite(y).all():
        raise VolumeError(f"{name}: the fused volume contains NaN/Inf voxels")
    low, high = float(y.min()), float(y.max())
    if low < -FUSED_RANGE_TOLERANCE or high > 1.0 + FUSED_RANGE_TOLERANCE:
        raise VolumeError(f"{name}: values range from {low:.6g} to {high:.6g}, but a fused image lies in "
                          "[0, 1]; is this a fused image written by 'fusioninn fuse'?")
    if low < 0.0 or high > 1.0:
        y = np.clip(y, 0.0, 1.0)
    return y


def check_record_model(record: Dict[str, Any], model: LoadedModel, allow_mismatch: bool,
                       notes: List[str], log: Log) -> None:
    recorded_model = record.get("model") or {}
    recorded = recorded_model.get("sha256", "")
    recorded_config = recorded_model.get("config")
    same_architecture = not isinstance(recorded_config, dict) or recorded_config == model.config.to_dict()
    if same_architecture and (not recorded or not model.sha256 or recorded == model.sha256):
        return
    error = ModelMismatchError(recorded_sha256=recorded, recorded_path=recorded_model.get("path", "?"),
                               used_sha256=model.sha256, used_path=model.source, same_architecture=same_architecture)
    if not allow_mismatch:
        raise error
    notes.append("warning: " + error.describe())
    log(notes[-1])


# -- files ------------------------------------------------------------------------------------
def record_sidecar(path: PathLike) -> Path:
    return sidecar_path(path)


def read_record(fused_path: PathLike, volume: Optional[Volume] = None) -> Optional[FusionRecord]:
    """The fusion record from the image's metadata (``volume``, as read), else its header, else its
    JSON sidecar, else None: :func:`FusionINNLib.io.record.read_record`, the one codec."""
    return _read_record(fused_path, None if volume is None else volume.metadata)


def has_fusion_record(path: PathLike, volume: Optional[Volume] = None) -> bool:
    """Whether ``path`` is a fused image written by ``fuse``: the record in its header (read
    without the voxels), or a record sidecar next to it whose ``fused_sha256`` names these voxels
    (a sidecar shares the stem of other files: ``case.fusioninn.json`` of ``case.nrrd`` sits next to
    the source ``case.nii.gz`` too). ``volume``: the image, if already read. Never raises."""
    path = Path(path)
    try:
        if not path.is_file():
            return False  # reading it is left to the command, which says what is wrong
        if volume is not None:
            if RECORD_KEY in volume.metadata:
                return True
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            with native_output_captured():  # what the C++ readers print about an odd file
                reader.ReadImageInformation()
            if reader.HasMetaDataKey(RECORD_KEY):
                return True
        sidecar = record_sidecar(path)
        if not sidecar.is_file():
            return False
        recorded = json.loads(sidecar.read_text(encoding="utf-8")).get("fused_sha256")
        if not recorded:
            return True  # a record from before the fingerprint: trust the name
        if volume is None:
            with native_output_captured():
                volume = read_volume(path)
        return volume.array.dtype == np.uint8 or recorded == fused_fingerprint(volume.array)
    except (RuntimeError, OSError, ValueError, AttributeError):
        return False


def check_metrics_order(input1: PathLike, input2: PathLike, fused: PathLike) -> None:
    """``metrics IN1 IN2 FUSED`` with the fused image given as an input (and an input as FUSED)
    scores the wrong images: refused, with the way to score them as given."""
    if has_fusion_record(fused):
        return
    for position, path in (("INPUT1", input1), ("INPUT2", input2)):
        if has_fusion_record(path):
            raise UsageError(f"{path} is a fused image (it has a fusion record) but is given as {position}, and "
                             f"{fused} (given as FUSED) is not; the order is INPUT1 INPUT2 FUSED (pass --as-given to "
                             "score them in this order anyway)")


def check_record_fits(record: Dict[str, Any], volume: Volume, name: str) -> None:
    """A per-slice record must have one entry per slice of the fused volume."""
    axis = int(record.get("axis", 0))
    for entry in record["normalization"]:
        params = NormalizationParams.from_dict(entry)
        if params.mode == "slice" and len(params.offset) != volume.shape[axis]:
            raise ValueError(f"{name}: its fusion record describes {len(params.offset)} slices along axis {axis} "
                             f"but the image has {volume.shape[axis]}; was the image cropped or resampled?")


LATENT_KEY = "FusionINN_latent"


def fused_fingerprint(array: np.ndarray) -> str:
    """SHA-256 of the fused voxels as float32, stored in the kept latent's header: a latent only
    inverts the fused image it was written with, and a shape check cannot tell two fusions of
    same-sized volumes apart."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def latent_fingerprint(latent: np.ndarray) -> str:
    """SHA-256 of a kept latent (2, *padded) as float32, stored in the fused image's record."""
    return hashlib.sha256(np.ascontiguousarray(latent, dtype=np.float32).tobytes()).hexdigest()


def check_latent_record(record: Dict[str, Any], latent: np.ndarray, name: str) -> None:
    """Refuse a latent that is not the one the fused image's record names (any latent format)."""
    recorded = record.get("latent_sha256")
    if recorded and recorded != latent_fingerprint(latent):
        raise LatentMismatchError(path=name, reason="record")


def latent_image(latent: np.ndarray, reference: Volume, axis: int) -> sitk.Image:
    """The kept latent as a 2-component image; its grid is the reference's (the fused volume),
    padded at the high end."""
    components = np.stack([latent[0], latent[1]], axis=-1)  # (k, j, i, 2)
    image = sitk.GetImageFromArray(np.ascontiguousarray(components, dtype=np.float32), isVector=True)
    image.SetSpacing(reference.spacing)
    image.SetOrigin(reference.origin)
    image.SetDirection(reference.direction)
    image.SetMetaData(LATENT_KEY, json.dumps({"axis": axis, "components": ["z", "u_residual"],
                                              "fused_sha256": fused_fingerprint(reference.array)}))
    return image


def read_latent(path: PathLike, fused: Optional[Volume] = None) -> np.ndarray:
    """The kept latent (2, *padded grid). With ``fused``, refuse a latent whose header records a
    different fused image (NRRD and MHA keep the header; NIfTI cannot, so it is not checked)."""
    path = Path(path)
    try:
        image, path = read_image(path)  # the one reader's file and damage checks
    except VolumeError as error:  # name what it is: a latent
        raise VolumeError(str(error).replace(": cannot read image", ": cannot read latent image", 1)) from None
    if image.GetNumberOfComponentsPerPixel() != 2 or image.GetDimension() != 3:
        raise VolumeError(f"{path}: not a FusionINN latent (expected a 3-D image with 2 components)")
    if fused is not None:
        try:
            recorded = json.loads(image.GetMetaData(LATENT_KEY)).get("fused_sha256")
        except (RuntimeError, ValueError, AttributeError):
            recorded = None  # no header (e.g. NIfTI) or one from an older version
        if recorded and recorded != fused_fingerprint(fused.array):
            raise LatentMismatchError(path=str(path), reason="fingerprint")
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    del image
    if not np.isfinite(array).all():
        raise VolumeError(f"{path}: the latent contains NaN/Inf values")
    return np.moveaxis(array, -1, 0)


def check_latent_fits(latent: np.ndarray, fused: Volume, model: LoadedModel, axis: int, name: str) -> None:
    """The kept latent must be on the fused volume's padded slice grid (see ``latent_image``)."""
    multiple = model.config.pad_multiple
    in_plane = [size for index, size in enumerate(fused.shape) if index != axis]
    dims = [-(-size // multiple) * multiple for size in in_plane]  # padded up to the squeezes' multiple
    dims.insert(axis, fused.shape[axis])
    expected_shape = (2, *dims)
    if tuple(latent.shape) != expected_shape:
        raise LatentMismatchError(path=name, reason="shape", latent_shape=tuple(latent.shape[1:]),
                                  expected_shape=tuple(expected_shape[1:]))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # also hard links
    except OSError:
        return False


def probe_output_format(path: Path) -> None:
    """Fail now, not after the computation, when ``path``'s format cannot be written there.

    Writes a 2x2 image of the output's kind to a temporary sibling and removes it. Detached-header
    formats are refused: their second (data) file cannot be renamed together with the header.
    """
    name = path.name.lower()
    if name.endswith(DETACHED_HEADER_SUFFIXES) or name.endswith(".img.gz"):
        raise VolumeError(f"{path}: this format writes a separate data file, which cannot be written "
                          "all-or-nothing; use a single-file format (.nrrd, .mha, .nii.gz)")
    if name.endswith((".json", ".txt", ".tsv", ".csv")):
        return  # text outputs
    if name.endswith(INTEGER_ONLY_SUFFIXES):
        probe = sitk.Image(2, 2, sitk.sitkUInt8)
    else:
        probe = sitk.Image(2, 2, 2, sitk.sitkFloat32)
    temp = temporary_sibling(path)
    try:
        sitk.WriteImage(probe, str(temp))
    except RuntimeError:
        suffix = "".join(path.suffixes[-2:]) if name.endswith(".gz") else path.suffix
        raise VolumeError(f"{path}: cannot write images in the '{suffix or '(no extension)'}' format; "
                          "use .nrrd, .mha, .nii.gz, .nii (or .png/.tif for 2-D images)") from None
    finally:
        temp.unlink(missing_ok=True)


def check_output_slices(path: Optional[PathLike], volume: Volume) -> None:
    """PNG/JPEG/BMP hold one slice: ITK would silently keep only the first of a 3-D volume."""
    if path is not None and Path(path).name.lower().endswith(SINGLE_SLICE_SUFFIXES) and volume.shape[0] > 1:
        raise VolumeError(f"{path}: this 2-D format holds one slice but the volume has {volume.shape[0]}; "
                          "use .nrrd, .mha, .nii.gz or .tif")


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symbolic-link loop: reading it fails later with its own message
        return Path(os.path.abspath(path))


def check_output_names(outputs: Sequence[Optional[PathLike]]) -> None:
    """An empty output name ('' or a path ending in a folder) is refused in words, before
    pathlib says "PosixPath('.') has an empty name"."""
    for out in outputs:
        if out is not None and (str(out).strip() == "" or Path(out).name in ("", ".", "..")):
            raise ValueError(f"{str(out) or chr(39) * 2}: output file name is empty; give a file name such as "
                             "fused.nrrd")


def check_outputs(inputs: List[Path], outputs: List[Optional[PathLike]]) -> None:
    check_output_names(outputs)
    chosen = [Path(o) for o in outputs if o is not None]
    resolved_inputs = {_resolved(p) for p in inputs}
    for out in chosen:
        if _resolved(out) in resolved_inputs or any(_same_file(out, p) for p in inputs):
            raise ValueError(f"{out}: output would overwrite an input file")
        if out.exists() and out.is_dir():
            raise ValueError(f"{out}: output is a directory; give a file name")
        if out.exists() and not out.is_file():
            raise ValueError(f"{out}: output exists and is not a regular file (a pipe, socket or device)")
        if not out.parent.exists():
            raise FileNotFoundError(f"{out.parent}: output folder does not exist")
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(f"{out.parent}: output folder is not writable")
    if len({_resolved(o) for o in chosen}) != len(chosen):
        raise ValueError("two outputs share the same file name")
    for out in chosen:
        probe_output_format(out)


def check_latent_format(latent_path: Optional[PathLike]) -> None:
    if latent_path is not None and Path(latent_path).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp",
                                                                         ".tif", ".tiff"):
        raise VolumeError(f"{latent_path}: the latent needs a float format (.nrrd, .mha, .nii.gz)")


def write_fused(output: FusionOutput, path: PathLike, latent_path: Optional[PathLike] = None,
                sidecar: bool = True) -> None:
    """Fused image, JSON sidecar (unless ``sidecar`` is false, e.g. a preview in Slicer's temporary
    folder: the NRRD/MHA header still carries the record) and (optionally) latent, all or nothing."""
    path = Path(path)
    record = as_record(output.record)
    check_latent_format(latent_path)
    with OutputSet() as outputs:
        if latent_path is not None:
            if output.latent is None:
                raise ValueError("no latent was kept: fuse with keep_latent=True")
            outputs.add_image(latent_image(output.latent, output.fused, output.record["axis"]), latent_path)
        if sidecar:
            outputs.add_text(record.sidecar_text(), record_sidecar(path))
        outputs.add_volume(output.fused, path, metadata=record.header_metadata())


def fuse_files(input1: PathLike, input2: PathLike, output: PathLike, latent: Optional[PathLike] = None,
               model: Optional[PathLike] = None, **options: Any) -> FusionOutput:
    """Read, fuse and write; nothing is written if anything fails or is cancelled."""
    inputs = [Path(input1), Path(input2)]
    check_output_names([output, latent])
    check_outputs(inputs, [output, latent, record_sidecar(output)])
    check_latent_format(latent)
    loaded = model if isinstance(model, LoadedModel) else resolve_model(model)
    names = (str(inputs[0]), str(inputs[1]))
    network_options = {k: v for k, v in options.items() if k != "normalization"}
    _check_axis(options.get("axis", 0))
    # The volumes read here are referenced by nothing once normalize_pair returns: only the
    # normalized copies stay in memory while the network runs (see docs/robustness.md, memory).
    volume1, volume2 = read_volume(inputs[0]), read_volume(inputs[1])
    check_geometry_carried(inputs, (volume1, volume2))
    for path, volume in zip(inputs, (volume1, volume2)):
        if has_fusion_record(path, volume):  # a likely mix-up of files; the fusion itself is well defined
            volume1.notes.append(f"warning: {path} is a fused image (it has a fusion record), given as an input to "
                                 "fuse; did you mean a source image? (fused anyway)")
            options.get("log", print)(volume1.notes[-1])
    pair = normalize_pair(volume1, volume2, axis=options.get("axis", 0),
                          normalization=options.get("normalization", "volume"), log=options.get("log", print),
                          input_names=names, same_file=_same_file(inputs[0], inputs[1]))
    del volume1, volume2
    check_output_slices(output, pair.geometry)
    result = fuse_normalized(pair, loaded, keep_latent=latent is not None, input_names=names, **network_options)
    del pair
    write_fused(result, output, latent)
    return result


def decompose_files(fused: PathLike, output1: PathLike, output2: PathLike, latent: Optional[PathLike] = None,
                    std1: Optional[PathLike] = None, std2: Optional[PathLike] = None,
                    model: Optional[PathLike] = None, **options: Any) -> DecompositionOutput:
    """Read a fused image (+ record, + optional kept latent), decompose, write the outputs."""
    fused_path = Path(fused)
    check_outputs([fused_path] + ([Path(latent)] if latent else []), [output1, output2, std1, std2])
    if (std1 is None) != (std2 is None):
        raise OptionError(rule="both", options=("std1", "std2"))
    if std1 is not None and (latent is not None or options.get("samples", 1) < 2):  # before any work
        raise OptionError(rule="at_least", options=("std1", "samples"), value=2)
    volume = read_volume(fused_path)
    for out in (output1, output2, std1, std2):
        check_output_slices(out, volume)
    record = read_record(fused_path, volume)
    if record is not None:
        check_record_fits(record, volume, str(fused_path))
    warning = None
    if record is not None:
        recorded = record.get("fused_sha256")
        if recorded and volume.array.dtype != np.uint8 and recorded != fused_fingerprint(volume.array):
            warning = (f"warning: {fused_path} differs from the fused image its fusion record was written with (a "
                       "record of another fusion, or an image changed since, e.g. resampled); the source units come "
                       "from that record")
    latent_array = read_latent(latent, fused=volume) if latent is not None else None
    if latent_array is not None and options.get("samples", 1) > 1:
        raise OptionError(rule="excludes", options=("latent", "samples"))
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = resolve_model(model) if model is not None else model_of_record(record, fused_path, options.get("log"))
    if latent_array is not None:
        check_latent_fits(latent_array, volume, loaded, int((record or {}).get("axis", 0)), str(latent))
        if record is not None:
            check_latent_record(record, latent_array, str(latent))
    result = decompose_volume(volume, record, loaded, latent=latent_array, name=str(fused_path), **options)
    if warning is not None:  # once the image proved to be a fused one (a broken image gets its error alone)
        result.notes.append(warning)
        options.get("log", print)(warning)
    if std1 is not None and result.std1 is None:
        raise OptionError(rule="at_least", options=("std1", "samples"), value=2)
    with OutputSet() as outputs:
        outputs.add_volume(result.source1, output1)
        outputs.add_volume(result.source2, output2)
        if std1 is not None:
            outputs.add_volume(result.std1, std1)
            outputs.add_volume(result.std2, std2)
    return result
