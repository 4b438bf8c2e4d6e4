"""Plain-data helpers for the Slicer module: no ``slicer``, ``vtk``, ``qt`` or ``torch`` import here.

Everything the ``FusionINN`` scripted module needs that is not a call into MRML lives here, so it
can be tested without Slicer:

Geometry (ITK LPS ⇄ Slicer RAS)
    A :class:`~FusionINNLib.io.volume.Volume` stores ITK geometry: a voxel with index (i, j, k) sits at
    the LPS point ``p_LPS = origin + D · diag(spacing) · (i, j, k)ᵀ`` (D the 3×3 direction, columns =
    index axes). Slicer stores the 4×4 ``IJKToRAS`` matrix ``M`` with ``p_RAS = M · (i, j, k, 1)ᵀ``.
    RAS and LPS differ by the sign of the first two axes, ``F = diag(-1, -1, 1)``, so
    ``M[:3, :3] = F · D · diag(spacing)`` and ``M[:3, 3] = F · origin``. The inverse reads the
    spacing as the column norms of ``F · M[:3, :3]``. Both keep the numpy (k, j, i) array order that
    ``slicer.util.arrayFromVolume`` and ``SimpleITK.GetArrayFromImage`` share, so voxels are never
    reordered.
Names, provenance, metrics tables, compare layout, colour maps
    Output node names derived from the inputs, the node attributes recording where an output came
    from, the typed columns of the metrics table, the custom slice-view layout XML.
Dependencies and background work
    Which Python packages the core needs and which are missing (and whether the installed torch
    is new enough); :class:`JobStatus`, what a poll of a job returns. The module runs its jobs in
    the worker process (:mod:`FusionINNLib.worker_client`); :class:`BackgroundJob` (a thread in the
    caller's process) is for scripts outside Slicer only: inside Slicer a Python thread starves,
    because PythonQt never releases the GIL in Qt's event loop (``docs/slicer.md``).
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .core.choices import BASELINE_METHODS  # noqa: F401 - defined once (FusionINNLib.core.choices), re-exported
from .core.slices import parse_slice_range  # noqa: F401 - defined once (core.slices), re-exported
from .io import record as _record

# -- geometry ---------------------------------------------------------------------------------
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
GEOMETRY_TOLERANCE = 1e-6


def itk_geometry_to_ijk_to_ras(spacing: Sequence[float], origin: Sequence[float],
                               direction: Sequence[float]) -> np.ndarray:
    """The Slicer ``IJKToRAS`` 4×4 matrix of an ITK geometry (LPS origin, row-major 3×3 direction).

    ``M[:3, :3] = F · D · diag(spacing)``, ``M[:3, 3] = F · origin`` with ``F = diag(-1, -1, 1)``.
    """
    spacing_array = np.asarray(spacing, dtype=np.float64).reshape(3)
    origin_array = np.asarray(origin, dtype=np.float64).reshape(3)
    direction_matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not (np.all(np.isfinite(spacing_array)) and np.all(spacing_array > 0)):
        raise ValueError(f"spacing must be finite and positive, got {tuple(spacing_array)}")
    if not (np.all(np.isfinite(origin_array)) and np.all(np.isfinite(direction_matrix))):
        raise ValueError("origin and direction must be finite")
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction_matrix @ np.diag(spacing_array)
    matrix[:3, 3] = LPS_TO_RAS @ origin_array
    return matrix


def ijk_to_ras_to_itk_geometry(matrix: Any) -> Tuple[Tuple[float, float, float], Tuple[float, float, float],
                                                     Tuple[float, ...]]:
    """``(spacing, origin, direction)`` in ITK LPS convention from a Slicer ``IJKToRAS`` matrix.

    Refuses matrices that are not affine (last row ≠ 0 0 0 1), not finite, or have a zero-length
    axis, because no image grid has such a geometry.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"IJKToRAS must be a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("IJKToRAS contains NaN or infinite values")
    if not np.allclose(m[3], (0.0, 0.0, 0.0, 1.0), atol=GEOMETRY_TOLERANCE):
        raise ValueError(f"IJKToRAS is not affine: last row is {tuple(m[3])}")
    lps_axes = LPS_TO_RAS @ m[:3, :3]
    spacing = np.linalg.norm(lps_axes, axis=0)
    if np.any(spacing <= GEOMETRY_TOLERANCE):
        raise ValueError(f"IJKToRAS has a zero-length voxel axis (spacing {tuple(spacing)})")
    direction = lps_axes / spacing
    origin = LPS_TO_RAS @ m[:3, 3]
    return (tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
            tuple(float(d) for d in direction.reshape(9)))


def compose_transform(parent_to_world: Any, ijk_to_ras: Any) -> np.ndarray:
    """``IJKToWorld = ParentToWorld · IJKToRAS``: where a linearly transformed volume really sits."""
    parent = np.asarray(parent_to_world, dtype=np.float64)
    local = np.asarray(ijk_to_ras, dtype=np.float64)
    if parent.shape != (4, 4) or local.shape != (4, 4):
        raise ValueError("both transforms must be 4x4 matrices")
    return parent @ local


def ras_to_ijk_index(ijk_to_ras: Any, ras: Sequence[float], shape_kji: Sequence[int]) -> Tuple[int, int, int]:
    """Nearest voxel index ``(i, j, k)`` of the RAS point ``ras``; ValueError outside the volume.

    ``shape_kji`` is the numpy array shape (k, j, i), as ``arrayFromVolume`` returns it.
    """
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    point = np.append(np.asarray(ras, dtype=np.float64).reshape(3), 1.0)
    continuous = np.linalg.solve(m, point)[:3]
    index = tuple(int(v) for v in np.floor(continuous + 0.5))
    size_ijk = tuple(int(s) for s in reversed(tuple(shape_kji)))
    if any(v < 0 or v >= s for v, s in zip(index, size_ijk)):
        raise ValueError(f"the point R={ras[0]:.1f} A={ras[1]:.1f} S={ras[2]:.1f} mm lies outside the volume "
                         f"(voxel index {index}, volume size {size_ijk}); move the crosshair into the image")
    return index  # type: ignore[return-value]


def latent_to_vector_array(latent: np.ndarray) -> np.ndarray:
    """A kept latent ``(2, k, j, i)`` as the ``(k, j, i, 2)`` array of a 2-component vector volume.

    The same component layout as :func:`FusionINNLib.jobs.pipeline.latent_image` writes to files, so a
    latent node saved from Slicer is a valid ``fusioninn decompose --latent`` input.
    """
    array = np.asarray(latent)
    if array.ndim != 4 or array.shape[0] != 2:
        raise ValueError(f"a latent has shape (2, k, j, i), got {array.shape}")
    return np.ascontiguousarray(np.moveaxis(array, 0, -1), dtype=np.float32)


def vector_array_to_latent(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`latent_to_vector_array`; refuses anything that is not 2 components."""
    values = np.asarray(array)
    if values.ndim != 4 or values.shape[-1] != 2:
        raise ValueError(f"not a FusionINN latent: expected a volume with 2 components per voxel, "
                         f"got array shape {values.shape}")
    return np.ascontiguousarray(np.moveaxis(values, -1, 0), dtype=np.float32)


# -- names ------------------------------------------------------------------------------------
MAX_NAME_PART = 40


def short_name(name: Optional[str], fallback: str = "volume") -> str:
    """A node name part: stripped, never empty, long names cut in the middle ("abc…xyz")."""
    text = " ".join(str(name or "").split()) or fallback
    if len(text) <= MAX_NAME_PART:
        return text
    half = (MAX_NAME_PART - 1) // 2
    return text[:half] + "…" + text[-half:]


def fused_volume_name(name1: str, name2: str) -> str:
    return f"{short_name(name1)} + {short_name(name2)} fused"


def latent_volume_name(fused_name: str) -> str:
    return f"{short_name(fused_name)} latent"


def decomposed_volume_names(fused_name: str, input_names: Sequence[str] = ()) -> Tuple[str, str]:
    """Names of the two decompositions, after the sources they estimate when those are known."""
    base = short_name(fused_name)
    labels = [short_name(n) for n in input_names][:2] if len(input_names) >= 2 else ["1", "2"]
    return f"{base} decomposed {labels[0]}", f"{base} decomposed {labels[1]}"


def std_volume_names(decomposed_names: Sequence[str]) -> Tuple[str, str]:
    return f"{decomposed_names[0]} std", f"{decomposed_names[1]} std"


def baseline_volume_name(method: str, name1: str, name2: str) -> str:
    return f"{short_name(name1)} + {short_name(name2)} {method}"


def guidance_volume_names(name1: str, name2: str) -> Tuple[str, str, str]:
    """Guidance of input 1, guidance of input 2, and their RGB composite."""
    return (f"{short_name(name1)} guidance", f"{short_name(name2)} guidance",
            f"{short_name(name1)} + {short_name(name2)} guidance RGB")


def jacobian_volume_names(name1: str, name2: str, index_ijk: Sequence[int]) -> Tuple[str, str]:
    where = "ijk " + ",".join(str(int(v)) for v in index_ijk)
    return f"{short_name(name1)} Jacobian at {where}", f"{short_name(name2)} Jacobian at {where}"


def difference_volume_name(decomposed_name: str, source_name: str) -> str:
    return f"{short_name(decomposed_name)} minus {short_name(source_name)}"


def metrics_table_name(fused_name: str) -> str:
    return f"{short_name(fused_name)} metrics"


# -- model and device choices -----------------------------------------------------------------
MODEL_SOURCES = ("bundled", "file")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def model_argument(source: str, path: Any) -> Optional[str]:
    """What to give :func:`FusionINNLib.io.checkpoint.resolve_model`: None for the bundled model.

    ``path`` comes from a path widget, which yields ``Path(".")`` when empty, so "." and "" mean
    "no file chosen".
    """
    if source not in MODEL_SOURCES:
        raise ValueError(f"unknown model source {source!r}; choose one of {', '.join(MODEL_SOURCES)}")
    if source == "bundled":
        return None
    text = str(path or "").strip()
    if unset_path(text):
        raise ValueError("choose a model file (.pt): our checkpoints or the authors' inn.pt")
    return text


def unset_path(path: Any) -> bool:
    """True for what an empty path widget yields: ``ctkDirectoryButton.directory`` and
    ``pathlib.Path()`` give ".", ``ctkPathLineEdit.currentPath`` gives ""."""
    text = str(path if path is not None else "").strip()
    return text in ("", ".")


def resumable_checkpoint(output_model: Any) -> Optional[str]:
    """``<dir>/<stem>_run/last.pt`` of a training whose output model is ``output_model``, if it exists.

    A cancelled training (Slicer stops a CLI with SIGKILL) keeps the last finished epoch there
    (:mod:`FusionINNLib.train.training` writes it atomically after every epoch), so it can be resumed.
    """
    import os

    text = str(output_model or "").strip()
    if unset_path(text):
        return None
    folder, name = os.path.split(text)
    stem = name[:-3] if name.lower().endswith(".pt") else name
    candidate = os.path.join(folder, stem + "_run", "last.pt")
    return candidate if os.path.isfile(candidate) else None


# -- provenance -------------------------------------------------------------------------------
ATTRIBUTE_PREFIX = "FusionINN."
RECORD_ATTRIBUTE = _record.NODE_ATTRIBUTE  # "FusionINN.Record": the record's node carrier (FusionINNLib.io.record)
ROLE_ATTRIBUTE = ATTRIBUTE_PREFIX + "Role"
ROLES = ("fused", "latent", "decomposed", "std", "baseline", "guidance", "jacobian", "difference", "metrics")
# Node reference roles (MRML references survive scene save/load and node renaming).
REFERENCE_LATENT = "FusionINNLatent"
REFERENCE_INPUT1 = "FusionINNInput1"
REFERENCE_INPUT2 = "FusionINNInput2"
REFERENCE_FUSED = "FusionINNFused"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def attribute_key(name: str) -> str:
    """``paper_compatible`` or ``paperCompatible`` → ``PaperCompatible`` (MRML attribute style)."""
    parts = [part for part in str(name).split("_") if part]
    if not parts:
        raise ValueError("an attribute needs a name")
    return "".join(part[:1].upper() + part[1:] for part in parts)


def provenance_attributes(role: str, record: Optional[Mapping[str, Any]] = None,
                          inputs: Sequence[str] = (), **details: Any) -> Dict[str, str]:
    """Node attributes (all strings) that say how an output was made.

    From the fusion ``record`` (:func:`FusionINNLib.jobs.pipeline.fuse_volumes`): model file, SHA-256,
    origin and configuration, normalization parameters, device, slice axis; plus ``inputs`` (node
    names) and any ``details`` (seed, samples, temperature, prior, method, ...). The fused volume
    also carries the whole record as JSON (:data:`RECORD_ATTRIBUTE`), which decomposition reads back.
    """
    if role not in ROLES:
        raise ValueError(f"unknown output role {role!r}")
    attributes = {ROLE_ATTRIBUTE: role}
    if record is not None:
        model = dict(record.get("model") or {})
        attributes.update({
            ATTRIBUTE_PREFIX + "ModelPath": str(model.get("path", "")),
            ATTRIBUTE_PREFIX + "ModelSHA256": str(model.get("sha256", "")),
            ATTRIBUTE_PREFIX + "ModelOrigin": str(model.get("origin", "")),
            ATTRIBUTE_PREFIX + "ModelConfig": _text(model.get("config", {})),
            ATTRIBUTE_PREFIX + "Normalization": _text(record.get("normalization", [])),
            ATTRIBUTE_PREFIX + "Device": str(record.get("device", "")),
            ATTRIBUTE_PREFIX + "Axis": str(record.get("axis", "")),
        })
        if role == "fused":
            attributes.update(_record.FusionRecord(record).node_attributes())
    if inputs:
        attributes[ATTRIBUTE_PREFIX + "Inputs"] = json.dumps([str(n) for n in inputs])
    for key, value in details.items():
        if value is None:
            continue
        attributes[ATTRIBUTE_PREFIX + attribute_key(key)] = _text(value)
    try:
        from . import __version__
    except ImportError:  # pragma: no cover - only when the file is used outside its package
        __version__ = "unknown"
    attributes[ATTRIBUTE_PREFIX + "Version"] = __version__
    return attributes


def record_from_attributes(attributes: Mapping[str, Optional[str]]) -> Optional[Dict[str, Any]]:
    """The fusion record stored on a fused volume, or None when the node has none (the one codec:
    :func:`FusionINNLib.io.record.record_from_attributes`, checked like a file's record)."""
    return _record.record_from_attributes(attributes)


# -- the fusion record in files (Slicer <-> fusioninn) ------------------------------------------
# One codec for every carrier: FusionINNLib.io.record (torch- and SimpleITK-free). A fused file carries
# its record in its header (NRRD/MHA key) and in the sidecar "<name>.fusioninn.json". Slicer reads
# NRRD keys into an ITK dictionary that Python cannot see and its writer drops them, so the module
# reads the header or sidecar itself when a fused file is loaded, and writes the sidecar when a
# fused node is saved.
RECORD_FORMAT = _record.RECORD_FORMAT
RECORD_FILE_KEY = _record.RECORD_KEY
RECORD_SIDECAR_SUFFIX = _record.SIDECAR_SUFFIX
IMAGE_SUFFIXES = _record.IMAGE_SUFFIXES
HEADER_LIMIT = _record.HEADER_LIMIT


def record_sidecar_path(image_path: Any) -> str:
    """``/d/fused.nii.gz`` → ``/d/fused.fusioninn.json`` (:func:`FusionINNLib.io.record.sidecar_path`)."""
    return str(_record.sidecar_path(image_path))


def _header_value(path: str, key: str) -> Optional[str]:
    """The value of ``key`` in a NRRD or MetaImage header (:func:`FusionINNLib.io.record.header_value`)."""
    return _record.header_value(path, key)


def check_record(record: Any, where: str) -> Dict[str, Any]:
    """A fusion record as read from anywhere, checked by the one codec
    (:class:`FusionINNLib.io.record.FusionRecord`)."""
    return _record.FusionRecord.from_dict(record, where)


def record_from_file(image_path: Any) -> Optional[Dict[str, Any]]:
    """The fusion record of a fused image file: its header key, else its sidecar, else None."""
    return _record.read_record(image_path)


def write_record_sidecar(image_path: Any, record: Mapping[str, Any]) -> str:
    """Write ``<image>.fusioninn.json`` next to a saved fused image (atomically); returns its path."""
    return str(_record.write_sidecar(image_path, record))


def looks_fused(array: np.ndarray, tolerance: float = 0.01) -> bool:
    """A fused image holds y = sigmoid(u) in [0, 1]: anything outside is certainly not one."""
    values = np.asarray(array)
    if values.size == 0 or values.dtype.kind not in "fiu":
        return False
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return False
    return float(finite.min()) >= -tolerance and float(finite.max()) <= 1.0 + tolerance


# -- metrics table ----------------------------------------------------------------------------
COLUMN_TYPES = ("string", "double", "int", "bit")


@dataclass
class TableColumn:
    """One typed column of a ``vtkMRMLTableNode``: the module maps ``type`` to a vtk array class."""

    name: str
    type: str
    values: List[Any]
    description: str = ""

    def __post_init__(self) -> None:
        if self.type not in COLUMN_TYPES:
            raise ValueError(f"unknown column type {self.type!r}")


def _description_text(entry: Any) -> str:
    if isinstance(entry, Mapping):
        return str(entry.get("description", ""))
    return "" if entry is None else str(entry)


def metrics_table_columns(results: Mapping[str, Mapping[str, float]],
                          descriptions: Optional[Mapping[str, Any]] = None,
                          metric_order: Optional[Sequence[str]] = None) -> List[TableColumn]:
    """Columns of the metrics table: one row per metric, one double column per fusion method.

    ``results`` maps a method label ("FusionINN", "mean", ...) to its ``{metric: value}``; rows
    follow ``metric_order`` (then any further metric, in first-seen order). A method lacking a
    metric gets NaN there, which Slicer shows as an empty cell.
    """
    if not results:
        raise ValueError("no metric results to tabulate")
    names: List[str] = list(metric_order or [])
    for summary in results.values():
        for name in summary:
            if name not in names:
                names.append(name)
    columns = [TableColumn("Metric", "string", names, "metric name (see the Description column)")]
    for method, summary in results.items():
        values = [float(summary[n]) if n in summary and summary[n] is not None else math.nan for n in names]
        columns.append(TableColumn(str(method), "double", values, f"value for {method}"))
    lookup = descriptions or {}
    columns.append(TableColumn("Description", "string", [_description_text(lookup.get(n)) for n in names],
                               "what the metric measures and which direction is better"))
    return columns


def decomposition_rows(summaries: Mapping[int, Mapping[str, float]], descriptions: Optional[Mapping[str, Any]] = None
                       ) -> Tuple[Dict[str, float], Dict[str, str]]:
    """Extra metrics-table rows for decompositions: ``{1: {"SSIM": ..}, 2: {..}}`` → row values and descriptions.

    Row names say which decomposition is compared with which input ("Decomposed 1 SSIM (vs input 1)").
    """
    lookup = descriptions or {}
    values: Dict[str, float] = {}
    texts: Dict[str, str] = {}
    for index in sorted(summaries):
        for metric, value in summaries[index].items():
            row = f"Decomposed {index} {metric} (vs input {index})"
            values[row] = float(value)
            texts[row] = f"decomposed volume {index} against input {index}: " + _description_text(lookup.get(metric))
    return values, texts


# -- compare layout and colour maps -----------------------------------------------------------
COMPARE_LAYOUT_ID = 57301  # custom layout ids must not clash with Slicer's built-in ones (< 1000)


@dataclass(frozen=True)
class CompareView:
    name: str    # slice view (singleton tag) name, used with layoutManager().sliceWidget(name)
    label: str   # short label shown in the view's corner
    role: str    # which volume goes in: input1, input2, fused, decomposed1, decomposed2
    color: str   # view bar colour


COMPARE_VIEWS = (
    CompareView("FusionINNInput1", "I1", "input1", "#F34A33"),
    CompareView("FusionINNInput2", "I2", "input2", "#6EB04B"),
    CompareView("FusionINNFused", "F", "fused", "#EDD54C"),
    CompareView("FusionINNDecomposed1", "D1", "decomposed1", "#C87533"),
    CompareView("FusionINNDecomposed2", "D2", "decomposed2", "#4D9FD6"),
)
ORIENTATIONS = ("Axial", "Sagittal", "Coronal")


def compare_views(has_decomposition: bool) -> List[CompareView]:
    return list(COMPARE_VIEWS if has_decomposition else COMPARE_VIEWS[:3])


def compare_layout_xml(views: Sequence[CompareView], orientation: str = "Axial") -> str:
    """Slicer layout XML: inputs and fused on the top row, decompositions (if any) below."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}")
    if not views:
        raise ValueError("a layout needs at least one view")

    def view_xml(view: CompareView) -> str:
        return (f'<item><view class="vtkMRMLSliceNode" singletontag="{view.name}">'
                f'<property name="orientation" action="default">{orientation}</property>'
                f'<property name="viewlabel" action="default">{view.label}</property>'
                f'<property name="viewcolor" action="default">{view.color}</property>'
                f"</view></item>")

    rows = [list(views[:3]), list(views[3:])]
    row_xml = "".join(
        '<item><layout type="horizontal">' + "".join(view_xml(v) for v in row) + "</layout></item>"
        for row in rows if row)
    return f'<layout type="vertical">{row_xml}</layout>'


OVERLAY_COLORMAPS: Dict[str, str] = {
    "Inferno": "vtkMRMLColorTableNodeFileInferno.txt",
    "Viridis": "vtkMRMLColorTableNodeFileViridis.txt",
    "Magma": "vtkMRMLColorTableNodeFileMagma.txt",
    "Plasma": "vtkMRMLColorTableNodeFilePlasma.txt",
    "Hot": "vtkMRMLPETProceduralColorNodePET-Heat",
    "Rainbow": "vtkMRMLColorTableNodeRainbow",
    "Red": "vtkMRMLColorTableNodeRed",
    "Green": "vtkMRMLColorTableNodeGreen",
    "Grey": "vtkMRMLColorTableNodeGrey",
    "Diverging blue-red": "vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
}
STD_COLORMAP = "Inferno"           # uncertainty: perceptually uniform, dark = certain
GUIDANCE_COLORMAP = "Viridis"
DIFFERENCE_COLORMAP = "Diverging blue-red"  # signed: white at 0 with a symmetric window


def symmetric_window_level(array: np.ndarray, percentile: float = 99.5) -> Tuple[float, float]:
    """(window, level) centred on 0 for signed difference maps: ±the ``percentile`` of |values|.

    Using a high percentile rather than the maximum keeps a few outliers from washing out the map.
    """
    values = np.abs(np.asarray(array, dtype=np.float64))
    values = values[np.isfinite(values)]
    half = float(np.percentile(values, percentile)) if values.size else 0.0
    return (2.0 * half if half > 0 else 1.0), 0.0


# -- Python dependencies ----------------------------------------------------------------------
# import name -> pip requirement. torch comes from the PyTorch extension (PyTorchUtils), numpy,
# SimpleITK and vtk ship with Slicer; these are what FusionINNLib needs on top. (scikit-image is
# not used by the core, so it is not installed.)
PYTHON_REQUIREMENTS: Dict[str, str] = {
    "FrEIA": "FrEIA==0.2",
    "scipy": "scipy>=1.8",
    "pytorch_msssim": "pytorch-msssim>=1.0",
}
# What the sample data (the generated phantom) needs: no torch.
SAMPLE_DATA_REQUIREMENTS: Dict[str, str] = {"scipy": "scipy>=1.8"}
# torch.serialization.safe_globals (used to load checkpoints with weights_only=True) is torch 2.5+.
TORCH_MINIMUM = (2, 5)
TORCH_REQUIREMENT = ">=2.5"


def missing_requirements(is_importable: Callable[[str], bool],
                         requirements: Optional[Mapping[str, str]] = None) -> List[str]:
    """pip requirement strings of the packages whose import name ``is_importable`` rejects."""
    table = PYTHON_REQUIREMENTS if requirements is None else requirements
    return [requirement for module, requirement in table.items() if not is_importable(module)]


def version_tuple(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """``"2.5.1+cu121"`` → ``(2, 5, 1)``; None for something that is not a version."""
    if not text:
        return None
    numbers = []
    for part in str(text).split("+")[0].split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        numbers.append(int(digits))
        if digits != part:
            break
    return tuple(numbers) if numbers else None


def torch_too_old(installed_version: Optional[str], minimum: Tuple[int, ...] = TORCH_MINIMUM) -> bool:
    """True when an installed torch is older than FusionINN needs (unknown versions are not refused)."""
    version = version_tuple(installed_version)
    return version is not None and version[:len(minimum)] < tuple(minimum)


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of a distribution without importing it (importing torch takes seconds)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


# -- GUI connection (parameter node wrapper) ---------------------------------------------------
PARAMETER_NAME_PROPERTY = "SlicerParameterName"


def gui_parameter_mapping(widgets: Mapping[str, Any], get_property: Callable[[Any, str], Any]) -> Dict[str, Any]:
    """``{parameter name: widget}`` for the widgets that carry a ``SlicerParameterName`` property.

    What ``parameterNodeWrapper.connectGui`` builds, computed here so that the module can call
    ``connectParametersToGui`` instead: on Slicer 5.8 ``connectGui`` returns None (its tag is lost,
    so ``disconnectGui`` cannot undo it), while ``connectParametersToGui`` returns the tag on 5.8 and
    later.
    """
    mapping: Dict[str, Any] = {}
    for widget in widgets.values():
        try:
            name = get_property(widget, PARAMETER_NAME_PROPERTY)
        except (AttributeError, TypeError):
            continue
        if name:
            mapping[str(name)] = widget
    return mapping


# -- background work --------------------------------------------------------------------------
@dataclass
class JobStatus:
    """A snapshot of a :class:`BackgroundJob`; ``messages`` holds only what was logged since the last poll."""

    running: bool
    fraction: float
    messages: List[str] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    result: Any = None
    error: Optional[BaseException] = None
    elapsed: float = 0.0


Work = Callable[[Callable[[float], None], Callable[[], bool], Callable[[str], None]], Any]


class BackgroundJob:
    """Run ``work(progress, is_cancelled, log)`` on a daemon thread; the caller's thread polls it.

    Not for Slicer's process (its Python threads starve, see the module docstring); the FusionINN
    module uses :class:`FusionINNLib.worker_client.WorkerClient` instead.

    Qt widgets and MRML nodes must only be touched from the main thread, so the worker never calls
    back into the GUI: it stores its progress fraction and log lines under a lock, and the module's
    ``QTimer`` calls :meth:`poll` to show them and, once ``done``, to build the output nodes from
    ``result`` (or report ``error``). :meth:`cancel` sets a flag that the core's cancel check reads
    between batches; the core then raises ``Cancelled`` and nothing is created.
    """

    def __init__(self, work: Work, name: str = "FusionINN job"):
        self._work = work
        self._name = name
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._fraction = 0.0
        self._messages: List[str] = []
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._finished = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started_at = 0.0
        self._ended_at: Optional[float] = None

    def start(self) -> BackgroundJob:
        if self._thread is not None:
            raise RuntimeError(f"{self._name} was already started")
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            result = self._work(self._set_progress, self._cancel.is_set, self._log)
            with self._lock:
                self._result = result
        except BaseException as error:  # noqa: BLE001 - handed to the GUI thread, never lost
            with self._lock:
                self._error = error
        finally:
            self._ended_at = time.monotonic()
            self._finished.set()

    def _set_progress(self, fraction: float) -> None:
        with self._lock:
            self._fraction = min(max(float(fraction), 0.0), 1.0)

    def _log(self, message: str) -> None:
        with self._lock:
            self._messages.append(str(message))

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the worker ends (for scripts and tests); True if it did."""
        return self._finished.wait(timeout)

    def poll(self) -> JobStatus:
        done = self._finished.is_set()
        with self._lock:
            messages, self._messages = self._messages, []
            end = self._ended_at if self._ended_at is not None else time.monotonic()
            status = JobStatus(running=self._thread is not None and not done, fraction=self._fraction,
                               messages=messages, done=done, elapsed=end - self._started_at)
            if done:
                status.result, status.error = self._result, self._error
                status.cancelled = self._cancel.is_set() and self._error is not None
        return status


def first_line(error: BaseException) -> str:
    """A one-line message for the status bar (the full text goes to the error dialog and log)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__
