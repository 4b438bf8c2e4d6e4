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

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .checkpoint import LoadedModel, resolve_model
from .engine import CancelCheck, ProgressCallback, SliceEngine
from .normalization import NormalizationParams, denormalize_std, denormalize_volume, normalize_volume
from .volume import OutputSet, Volume, VolumeError, overlaps, read_volume, resample_like

RECORD_FORMAT = "fusioninn-record"
RECORD_KEY = "FusionINN_record"
RECORD_VERSION = 1
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


def prepare_inputs(volume1: Volume, volume2: Volume, log: Log = print) -> Tuple[Volume, List[str]]:
    """Input 2 on input 1's grid (resampled linearly if needed) and the notes saying so."""
    notes = list(volume1.notes) + list(volume2.notes)
    if volume1.same_grid(volume2):
        return volume2, notes
    if not overlaps(volume1, volume2):
        raise VolumeError("the two inputs do not overlap in physical space; are they co-registered?")
    moving = volume2.with_array(np.nan_to_num(volume2.array.astype(np.float32)))
    resampled = resample_like(moving, volume1)
    notes.append("input 2 resampled (linear) onto input 1's grid: their geometries differ")
    log(notes[-1])
    return resampled, notes


def fuse_volumes(volume1: Volume, volume2: Volume, model: Optional[LoadedModel] = None, *,
                 axis: int = 0, normalization: str = "volume", keep_latent: bool = False,
                 device: str = "auto", batch_size: int = 8, amp: bool = False,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None,
                 log: Log = print, input_names: Tuple[str, str] = ("input1", "input2")) -> FusionOutput:
    """Fuse two volumes; the result is on ``volume1``'s grid with values y in [0, 1]."""
    _check_axis(axis)
    model = model or resolve_model()
    volume2, notes = prepare_inputs(volume1, volume2, log)
    x1, params1 = normalize_volume(volume1.array, normalization, axis)
    x2, params2 = normalize_volume(volume2.array, normalization, axis)
    for name, params in zip(input_names, (params1, params2)):
        if params.nonfinite:
            notes.append(f"{name}: {params.nonfinite} NaN/Inf voxels replaced by the background value")
            log(notes[-1])
    if keep_latent and amp:
        amp = False
        notes.append("AMP disabled: a kept latent needs float32 for an exact decomposition")
    engine = SliceEngine(model.model, device, batch_size, amp, progress=progress, cancel=cancel, log=log)
    result = engine.fuse(x1, x2, axis=axis, keep_latent=keep_latent)
    record = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "axis": axis,
        "normalization": [params1.to_dict(), params2.to_dict()],
        "model": model.describe(),
        "device": str(engine.device),
        "inputs": list(input_names),
        "notes": notes,
    }
    fused = volume1.with_array(result.fused)
    return FusionOutput(fused, result.latent, record, notes)


def decompose_volume(fused: Volume, record: Optional[Dict[str, Any]] = None,
                     model: Optional[LoadedModel] = None, *, latent: Optional[np.ndarray] = None,
                     samples: int = 1, seed: int = 0, temperature: float = 1.0, prior: str = "normal",
                     device: str = "auto", batch_size: int = 8,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None,
                     log: Log = print, allow_model_mismatch: bool = False) -> DecompositionOutput:
    """Decompose ``fused`` into source estimates in source units (when the record is known).

    With ``latent`` (from fusion with ``keep_latent``) the result is the exact inverse. Otherwise
    ``samples`` latents are drawn from ``prior`` (scaled by ``temperature``) and the per-voxel mean
    is returned, plus the per-voxel standard deviation when ``samples > 1``.
    """
    model = model or resolve_model()
    notes: List[str] = []
    axis = 0
    params: Optional[Tuple[NormalizationParams, NormalizationParams]] = None
    if record is not None:
        check_record_model(record, model, allow_model_mismatch, notes, log)
        axis = _check_axis(int(record.get("axis", 0)))
        params = (NormalizationParams.from_dict(record["normalization"][0]),
                  NormalizationParams.from_dict(record["normalization"][1]))
    else:
        notes.append("no fusion record: decomposed images are in normalized units [0, 1], slices along axis 0")
        log(notes[-1])
    y = np.asarray(fused.array, dtype=np.float32)
    if not np.isfinite(y).all():
        raise VolumeError("the fused volume contains NaN/Inf voxels")
    engine = SliceEngine(model.model, device, batch_size, progress=progress, cancel=cancel, log=log)
    std = (None, None)
    if latent is not None:
        x1, x2 = engine.decompose_exact(y, latent, axis=axis)
    else:
        x1, x2, s1, s2 = engine.decompose_sampled(y, axis, samples, seed, temperature, prior)
        std = (s1, s2)
    if params is not None:
        x1, x2 = denormalize_volume(x1, params[0]), denormalize_volume(x2, params[1])
        std = tuple(None if s is None else denormalize_std(s, p) for s, p in zip(std, params))
    output = DecompositionOutput(fused.with_array(x1), fused.with_array(x2), notes=notes)
    if std[0] is not None:
        output.std1, output.std2 = fused.with_array(std[0]), fused.with_array(std[1])
    return output


def check_record_model(record: Dict[str, Any], model: LoadedModel, allow_mismatch: bool,
                       notes: List[str], log: Log) -> None:
    recorded = (record.get("model") or {}).get("sha256", "")
    if not recorded or not model.sha256 or recorded == model.sha256:
        return
    message = (f"the fused volume was made with model {recorded[:12]} "
               f"({(record.get('model') or {}).get('path', '?')}) but decomposition uses "
               f"{model.sha256[:12]} ({model.source})")
    if not allow_mismatch:
        raise ValueError(message + "; pass the same --model (or --ignore-model-mismatch)")
    notes.append("warning: " + message)
    log(notes[-1])


# -- files ------------------------------------------------------------------------------------
def record_sidecar(path: PathLike) -> Path:
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".fusioninn.json")


def read_record(fused_path: PathLike, volume: Optional[Volume] = None) -> Optional[Dict[str, Any]]:
    """The fusion record from the image's metadata, else from its JSON sidecar, else None."""
    text = (volume.metadata.get(RECORD_KEY) if volume is not None else None)
    sidecar = record_sidecar(fused_path)
    if text is None and sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8")
    if text is None:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{fused_path}: the fusion record is not valid JSON") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{fused_path}: unrecognized fusion record")
    if int(record.get("version", 0)) > RECORD_VERSION:
        raise ValueError(f"{fused_path}: fusion record version {record.get('version')} is newer than this software")
    return record


def latent_image(latent: np.ndarray, reference: Volume, axis: int) -> sitk.Image:
    """The kept latent as a 2-component image; its grid is the reference's, padded at the high end."""
    components = np.stack([latent[0], latent[1]], axis=-1)  # (k, j, i, 2)
    image = sitk.GetImageFromArray(np.ascontiguousarray(components, dtype=np.float32), isVector=True)
    image.SetSpacing(reference.spacing)
    image.SetOrigin(reference.origin)
    image.SetDirection(reference.direction)
    image.SetMetaData("FusionINN_latent", json.dumps({"axis": axis, "components": ["z", "u_residual"]}))
    return image


def read_latent(path: PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: latent file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise VolumeError(f"{path}: cannot read latent image (damaged or unknown format)") from None
    if image.GetNumberOfComponentsPerPixel() != 2 or image.GetDimension() != 3:
        raise VolumeError(f"{path}: not a FusionINN latent (expected a 3-D image with 2 components)")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    return np.moveaxis(array, -1, 0)


def _check_outputs(inputs: List[Path], outputs: List[Optional[PathLike]]) -> None:
    chosen = [Path(o) for o in outputs if o is not None]
    resolved_inputs = {p.resolve() for p in inputs}
    for out in chosen:
        if out.resolve() in resolved_inputs:
            raise ValueError(f"{out}: output would overwrite an input file")
        if out.exists() and out.is_dir():
            raise ValueError(f"{out}: output is a directory; give a file name")
        if not out.parent.exists():
            raise FileNotFoundError(f"{out.parent}: output folder does not exist")
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(f"{out.parent}: output folder is not writable")
    if len({o.resolve() for o in chosen}) != len(chosen):
        raise ValueError("two outputs share the same file name")


def write_fused(output: FusionOutput, path: PathLike, latent_path: Optional[PathLike] = None) -> None:
    """Fused image, JSON sidecar and (optionally) latent, all or nothing."""
    path = Path(path)
    text = json.dumps(output.record)
    if latent_path is not None and Path(latent_path).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp",
                                                                         ".tif", ".tiff"):
        raise VolumeError(f"{latent_path}: the latent needs a float format (.nrrd, .mha, .nii.gz)")
    with OutputSet() as outputs:
        if latent_path is not None:
            if output.latent is None:
                raise ValueError("no latent was kept: fuse with keep_latent=True")
            outputs.add_image(latent_image(output.latent, output.fused, output.record["axis"]), latent_path)
        outputs.add_text(json.dumps(output.record, indent=1), record_sidecar(path))
        outputs.add_volume(output.fused, path, metadata={RECORD_KEY: text})


def fuse_files(input1: PathLike, input2: PathLike, output: PathLike, latent: Optional[PathLike] = None,
               model: Optional[PathLike] = None, **options: Any) -> FusionOutput:
    """Read, fuse and write; nothing is written if anything fails or is cancelled."""
    inputs = [Path(input1), Path(input2)]
    _check_outputs(inputs, [output, latent, record_sidecar(output)])
    loaded = resolve_model(model)
    volume1, volume2 = read_volume(inputs[0]), read_volume(inputs[1])
    result = fuse_volumes(volume1, volume2, loaded, keep_latent=latent is not None,
                          input_names=(str(inputs[0]), str(inputs[1])), **options)
    write_fused(result, output, latent)
    return result


def decompose_files(fused: PathLike, output1: PathLike, output2: PathLike, latent: Optional[PathLike] = None,
                    std1: Optional[PathLike] = None, std2: Optional[PathLike] = None,
                    model: Optional[PathLike] = None, **options: Any) -> DecompositionOutput:
    """Read a fused image (+ record, + optional kept latent), decompose, write the outputs."""
    fused_path = Path(fused)
    _check_outputs([fused_path] + ([Path(latent)] if latent else []), [output1, output2, std1, std2])
    if (std1 is None) != (std2 is None):
        raise ValueError("give both --std1 and --std2, or neither")
    volume = read_volume(fused_path)
    record = read_record(fused_path, volume)
    latent_array = read_latent(latent) if latent is not None else None
    if latent_array is not None and options.get("samples", 1) > 1:
        raise ValueError("an exact decomposition (--latent) takes no --samples")
    result = decompose_volume(volume, record, resolve_model(model), latent=latent_array, **options)
    if std1 is not None and result.std1 is None:
        raise ValueError("standard-deviation maps need --samples 2 or more")
    with OutputSet() as outputs:
        outputs.add_volume(result.source1, output1)
        outputs.add_volume(result.source2, output2)
        if std1 is not None:
            outputs.add_volume(result.std1, std1)
            outputs.add_volume(result.std2, std2)
    return result
