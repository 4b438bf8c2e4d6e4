"""The fusion record: one type, one codec, three carriers.

A fused image is only decomposable back into source units if what fusion did travels with it: the
slice axis, both normalizations, the model (path, SHA-256, configuration), the device, the input
names and notes, and the kept latent's fingerprint. That is a :class:`FusionRecord`. It is written
and read in one way (:meth:`FusionRecord.to_json` / :meth:`FusionRecord.from_json`, one validator)
for every place it is carried:

=========================  ===============================================  ======================
carrier                    key / file                                       written by
=========================  ===============================================  ======================
NRRD / MHA header          ``FusionINN_record`` (:data:`RECORD_KEY`)        ``write_fused``
JSON sidecar               ``<name>.fusioninn.json`` (:func:`sidecar_path`)  ``write_fused``, Slicer save
MRML node attribute        ``FusionINN.Record`` (:data:`NODE_ATTRIBUTE`)    the Slicer module
=========================  ===============================================  ======================

Readers: :func:`read_record` (a file: header, else sidecar), :func:`record_from_attributes` (a node).
The JSON keys are those every earlier version wrote (``format``, ``version``, ``axis``,
``normalization``, ``model``, ``device``, ``inputs``, ``notes``, optionally ``latent_sha256``), so
old files and scenes read unchanged; unknown keys are kept (a newer writer may add some), a newer
``version`` is refused.

:class:`FusionRecord` is a ``dict`` (its JSON form) with typed accessors, so code that treats a
record as a mapping, ``json.dumps`` and ``==`` keep working. This module imports neither torch nor
SimpleITK: the Slicer module's GUI process uses it directly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..core.normalization import NormalizationParams

RECORD_FORMAT = "fusioninn-record"
RECORD_KEY = "FusionINN_record"
NODE_ATTRIBUTE = "FusionINN.Record"
RECORD_VERSION = 1
SIDECAR_SUFFIX = ".fusioninn.json"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff")
HEADER_LIMIT = 1 << 22  # an image header is never longer than 4 MiB


class RecordError(ValueError):
    """A fusion record that cannot be used; the message names where it was read from."""


class FusionRecord(dict):
    """What fusion did, as its JSON object (a dict) with typed accessors; see the module docstring."""

    @classmethod
    def create(cls, *, axis: int, normalization: Sequence[Any], model: Mapping[str, Any], device: str = "",
               inputs: Sequence[str] = ("input1", "input2"), notes: Optional[List[str]] = None,
               latent_sha256: Optional[str] = None) -> FusionRecord:
        """A new record; ``normalization`` holds two NormalizationParams (or their dicts)."""
        entries = [entry.to_dict() if isinstance(entry, NormalizationParams) else dict(entry)
                   for entry in normalization]
        record = cls(format=RECORD_FORMAT, version=RECORD_VERSION, axis=int(axis), normalization=entries,
                     model=dict(model), device=str(device), inputs=[str(name) for name in inputs],
                     notes=notes if notes is not None else [])
        if latent_sha256:
            record["latent_sha256"] = latent_sha256
        return record.validated("the new fusion record")

    # -- typed view ------------------------------------------------------------------------
    @property
    def axis(self) -> int:
        return int(self.get("axis", 0))

    @property
    def normalization_params(self) -> Tuple[NormalizationParams, NormalizationParams]:
        first, second = self["normalization"]
        return NormalizationParams.from_dict(first), NormalizationParams.from_dict(second)

    @property
    def model(self) -> Dict[str, Any]:
        return dict(self.get("model") or {})

    @property
    def model_sha256(self) -> str:
        return str(self.model.get("sha256", "") or "")

    @property
    def inputs(self) -> List[str]:
        return list(self.get("inputs") or [])

    @property
    def notes(self) -> List[str]:
        return list(self.get("notes") or [])

    @property
    def latent_sha256(self) -> Optional[str]:
        return self.get("latent_sha256") or None

    @property
    def version(self) -> int:
        return int(self.get("version", 0))

    # -- codec -----------------------------------------------------------------------------
    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(dict(self), indent=indent, default=str)

    def header_metadata(self) -> Dict[str, str]:
        """NRRD/MHA metadata ``{RECORD_KEY: json}``."""
        return {RECORD_KEY: self.to_json()}

    def sidecar_text(self) -> str:
        return self.to_json(indent=1)

    def node_attributes(self) -> Dict[str, str]:
        """MRML node attributes ``{NODE_ATTRIBUTE: json}``."""
        return {NODE_ATTRIBUTE: self.to_json()}

    def validated(self, where: str) -> FusionRecord:
        """``self`` if it is a usable record, else :class:`RecordError` naming ``where``."""
        if self.get("format") != RECORD_FORMAT:
            raise RecordError(f"{where}: not a FusionINN fusion record (unrecognized format)")
        try:
            version = int(self.get("version", 0))
        except (TypeError, ValueError):
            raise RecordError(f"{where}: fusion record has an invalid version {self.get('version')!r}") from None
        if version > RECORD_VERSION:
            raise RecordError(f"{where}: fusion record version {self.get('version')} is newer than this software")
        normalization = self.get("normalization")
        try:
            if not isinstance(normalization, list) or len(normalization) != 2:
                raise ValueError("it needs two normalization entries")
            for entry in normalization:
                NormalizationParams.from_dict(entry)
            if int(self.get("axis", 0)) not in (0, 1, 2):
                raise ValueError(f"axis {self.get('axis')!r} is not 0, 1 or 2")
        except (TypeError, ValueError, KeyError) as error:
            raise RecordError(f"{where}: damaged fusion record ({' '.join(str(error).split())[:200]})") from None
        return self

    @classmethod
    def from_dict(cls, data: Any, where: str = "the fusion record") -> FusionRecord:
        if not isinstance(data, dict):
            raise RecordError(f"{where}: not a FusionINN fusion record")
        return cls(data).validated(where)

    @classmethod
    def from_json(cls, text: str, where: str = "the fusion record") -> FusionRecord:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            raise RecordError(f"{where}: the fusion record is not valid JSON") from None
        return cls.from_dict(data, where)


def as_record(record: Optional[Mapping[str, Any]], where: str = "the fusion record") -> Optional[FusionRecord]:
    """``record`` (a dict from anywhere, e.g. a job message) as a checked FusionRecord; None stays None."""
    if record is None or isinstance(record, FusionRecord):
        return record  # type: ignore[return-value]
    return FusionRecord.from_dict(dict(record), where)


# -- carriers ---------------------------------------------------------------------------------
def sidecar_path(image_path: Any) -> Path:
    """``/d/fused.nii.gz`` → ``/d/fused.fusioninn.json``."""
    path = Path(image_path)
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + SIDECAR_SUFFIX)


def header_value(path: Any, key: str = RECORD_KEY) -> Optional[str]:
    """The value of ``key`` in a NRRD (``key:=value``) or MetaImage (``key = value``) header, read
    as text without the voxels (and without SimpleITK); None for other formats or no such key."""
    path = str(path)
    lower = path.lower()
    if not lower.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        return None
    try:
        with open(path, "rb") as stream:
            head = stream.read(HEADER_LIMIT)
    except OSError:
        return None
    nrrd = lower.endswith((".nrrd", ".nhdr"))
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r")
        if nrrd and not line.strip():
            break  # a blank line ends a NRRD header
        text = line.decode("utf-8", errors="replace")
        if nrrd and text.startswith(key + ":="):
            return text[len(key) + 2:].replace("\\n", "\n").replace("\\\\", "\\")
        if not nrrd:
            if text.startswith("ElementDataFile"):
                break
            name, sep, value = text.partition("=")
            if sep and name.strip() == key:
                return value.strip()
    return None


def read_record(image_path: Any, metadata: Optional[Mapping[str, str]] = None) -> Optional[FusionRecord]:
    """The record of a fused image file: its header (``metadata`` as already read, else the file's
    header text), else its sidecar, else None. Errors name the file the record came from."""
    text = None if metadata is None else metadata.get(RECORD_KEY)
    if text is None and metadata is None:
        text = header_value(image_path)
    where = str(image_path)
    if text is None:
        sidecar = sidecar_path(image_path)
        if sidecar.is_file():
            try:
                text = sidecar.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise RecordError(f"{sidecar}: cannot read the fusion record ({type(error).__name__})") from None
    if text is None:
        return None
    return FusionRecord.from_json(text, where)


def write_sidecar(image_path: Any, record: Mapping[str, Any]) -> Path:
    """``<image>.fusioninn.json`` next to a saved fused image, atomically; returns its path."""
    from .atomic import atomic_write_text

    checked = as_record(record, "the fusion record to save")
    path = sidecar_path(image_path)
    atomic_write_text(path, checked.sidecar_text())
    return path


def record_from_attributes(attributes: Mapping[str, Optional[str]]) -> Optional[FusionRecord]:
    """The record a fused volume node carries (:data:`NODE_ATTRIBUTE`), or None when it has none."""
    text = attributes.get(NODE_ATTRIBUTE)
    if not text:
        return None
    return FusionRecord.from_json(text, f"the node attribute {NODE_ATTRIBUTE}")


__all__ = ["FusionRecord", "RecordError", "RECORD_FORMAT", "RECORD_KEY", "NODE_ATTRIBUTE", "RECORD_VERSION",
           "SIDECAR_SUFFIX", "as_record", "sidecar_path", "header_value", "read_record", "write_sidecar",
           "record_from_attributes"]
