"""Plain-data encoding of job requests and results (JSON values + ``.npy`` files for voxels).

A request or result is a dataclass whose fields are JSON values, paths, tuples, nested job
dataclasses, :class:`~FusionINNLib.io.volume.Volume` objects or numpy arrays. ``to_dict`` turns it into
JSON-serialisable data: voxels are never put inside the JSON; an :class:`ArrayStore` (a folder)
writes each array to its own ``.npy`` file and the JSON holds ``{"__array__": "<file>"}`` or
``{"__volume__": {"array": ..., "spacing": ..., ...}}``. ``from_dict`` reads them back (memory-mapped
when the store allows it). Without a store, encoding a value that holds voxels raises
``TypeError``: a message over a pipe must never silently drop an image.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Type, TypeVar

import numpy as np

from ..io.atomic import temporary_sibling
from ..io.volume import Volume

ARRAY_TAG = "__array__"
VOLUME_TAG = "__volume__"
KIND_KEY = "kind"

T = TypeVar("T")


class ArrayStore:
    """A folder holding the voxels of encoded messages, one ``.npy`` file per array.

    The sender creates the store (e.g. in a temporary folder shared with the worker); the receiver
    decodes with the same folder path, which is embedded in the file references, so it only has to
    be readable by both processes. Files are written atomically; the store never deletes them (the
    owner of the folder does, once the job is done).
    """

    def __init__(self, folder: Any, mmap: bool = False):
        self.folder = Path(folder)
        self.mmap = mmap
        self._counter = itertools.count()

    def put(self, array: np.ndarray) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"array-{os.getpid()}-{next(self._counter)}-{uuid.uuid4().hex[:8]}.npy"
        temp = temporary_sibling(path)
        try:
            with open(temp, "wb") as stream:
                np.save(stream, np.ascontiguousarray(array), allow_pickle=False)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        return str(path)

    def get(self, reference: str) -> np.ndarray:
        return np.load(reference, mmap_mode="r" if self.mmap else None, allow_pickle=False)


def _default_get(reference: str) -> np.ndarray:
    return np.load(reference, allow_pickle=False)


def encode(value: Any, store: Optional[ArrayStore] = None) -> Any:
    """``value`` as JSON-serialisable data (see the module docstring)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Volume):
        if store is None:
            raise TypeError("this message holds an in-memory volume: encode it with an ArrayStore")
        return {VOLUME_TAG: {"array": store.put(value.array), "spacing": list(value.spacing),
                             "origin": list(value.origin), "direction": list(value.direction),
                             "is_2d": bool(value.is_2d), "metadata": dict(value.metadata),
                             "notes": list(value.notes)}}
    if isinstance(value, np.ndarray):
        if store is None:
            raise TypeError("this message holds an array: encode it with an ArrayStore")
        return {ARRAY_TAG: store.put(value)}
    if hasattr(value, "to_dict") and callable(value.to_dict):
        try:
            return value.to_dict(store)
        except TypeError:
            return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: encode(getattr(value, f.name), store) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): encode(v, store) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v, store) for v in value]
    raise TypeError(f"cannot encode a {type(value).__name__} in a job message")


def decode(value: Any, store: Optional[ArrayStore] = None) -> Any:
    """The inverse of :func:`encode` for tagged values; plain JSON comes back as it is."""
    get = store.get if store is not None else _default_get
    if isinstance(value, dict):
        if set(value) == {ARRAY_TAG}:
            return get(value[ARRAY_TAG])
        if set(value) == {VOLUME_TAG}:
            data = value[VOLUME_TAG]
            return Volume(get(data["array"]), tuple(data["spacing"]), tuple(data["origin"]),
                          tuple(data["direction"]), bool(data.get("is_2d", False)),
                          dict(data.get("metadata") or {}), list(data.get("notes") or []))
        return {k: decode(v, store) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v, store) for v in value]
    return value


class Message:
    """Base of every request and result: ``to_dict(store)`` / ``from_dict(data, store)``.

    ``to_dict`` adds ``"kind"`` (the class's :attr:`KIND`) so that :func:`FusionINNLib.jobs.message_from_dict`
    can rebuild the right class; unknown keys are ignored by ``from_dict`` (a newer sender may add
    fields), missing ones take their defaults. Fields annotated as tuples come back as tuples.
    """

    KIND = ""

    def to_dict(self, store: Optional[ArrayStore] = None) -> Dict[str, Any]:
        data = {KIND_KEY: self.KIND}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            data[f.name] = encode(getattr(self, f.name), store)
        return data

    @classmethod
    def from_dict(cls: Type[T], data: Dict[str, Any], store: Optional[ArrayStore] = None) -> T:
        kind = data.get(KIND_KEY)
        if kind not in (None, cls.KIND):  # type: ignore[attr-defined]
            raise ValueError(f"a {cls.KIND!r} message was expected, got {kind!r}")  # type: ignore[attr-defined]
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            value = decode(data[f.name], store)
            nested = _nested_class(cls, f)
            if nested is not None and isinstance(value, dict):
                value = nested.from_dict(value, store)
            elif isinstance(value, list) and "Tuple" in str(f.type):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value) \
                    if "Tuple[Tuple" in str(f.type) else tuple(value)
            values[f.name] = value
        return cls(**values)  # type: ignore[call-arg]


def _nested_class(cls: type, f: dataclasses.Field) -> Optional[type]:
    """The Message subclass a field holds, from the class's ``NESTED`` table."""
    return getattr(cls, "NESTED", {}).get(f.name)
