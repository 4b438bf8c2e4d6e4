"""Images with geometry: read/write anything SimpleITK reads, resample onto a reference grid.

A :class:`Volume` always holds a 3-D numpy array indexed (k, j, i) = (slice, row, column), as
``SimpleITK.GetArrayFromImage`` returns it, plus origin, spacing and a 3x3 direction in ITK (LPS,
i-j-k) order. 2-D images (PNG, TIFF, 2-D NRRD) become one-slice volumes and are written back as
2-D. Colour (RGB/RGBA) images are converted to luminance (ITU-R BT.601 weights) with a note,
because fusion works on scalar intensities; other multi-component, complex and 4-D images are
refused with a clear message.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

PathLike = Union[str, "os.PathLike[str]"]
INTEGER_ONLY_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)


class VolumeError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


@dataclass
class Volume:
    array: np.ndarray
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    is_2d: bool = False
    metadata: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise VolumeError(f"a Volume holds a 3-D array, got shape {self.array.shape}")

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray, keep_metadata: bool = False) -> Volume:
        """Same geometry, new voxels."""
        return replace(self, array=array, metadata=dict(self.metadata) if keep_metadata else {}, notes=[])

    def same_grid(self, other: Volume, tolerance: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=tolerance)
            and np.allclose(self.origin, other.origin, rtol=0, atol=tolerance * max(1.0, *map(abs, self.spacing)))
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )


def _from_image(image: sitk.Image, name: str) -> Volume:
    notes: List[str] = []
    dimension = image.GetDimension()
    if dimension not in (2, 3):
        raise VolumeError(f"{name}: {dimension}-D images are not supported (need a 2-D or 3-D scalar image)")
    pixel_id = image.GetPixelID()
    if pixel_id in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise VolumeError(f"{name}: complex-valued images are not supported")
    components = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayFromImage(image)
    if components > 1:
        if components not in (3, 4):
            raise VolumeError(f"{name}: images with {components} components per voxel are not supported")
        rgb = array[..., :3].astype(np.float64)
        array = (rgb @ np.asarray(LUMINANCE_WEIGHTS)).astype(np.float32)
        notes.append(f"{name}: colour image converted to luminance (0.299 R + 0.587 G + 0.114 B)")
    metadata = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
    if dimension == 2:
        spacing = tuple(image.GetSpacing()) + (1.0,)
        origin = tuple(image.GetOrigin()) + (0.0,)
        d = image.GetDirection()
        direction = (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0)
        array = array[np.newaxis]
    else:
        spacing, origin, direction = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    return Volume(np.ascontiguousarray(array), tuple(spacing), tuple(origin), tuple(direction),
                  dimension == 2, metadata, notes)


def to_image(volume: Volume) -> sitk.Image:
    if volume.is_2d:
        if volume.array.shape[0] != 1:
            raise VolumeError(f"a 2-D image must have one slice, got {volume.array.shape[0]}")
        image = sitk.GetImageFromArray(volume.array[0])
        image.SetSpacing(volume.spacing[:2])
        image.SetOrigin(volume.origin[:2])
        d = volume.direction
        image.SetDirection((d[0], d[1], d[3], d[4]))
    else:
        image = sitk.GetImageFromArray(volume.array)
        image.SetSpacing(volume.spacing)
        image.SetOrigin(volume.origin)
        image.SetDirection(volume.direction)
    return image


def read_volume(path: PathLike) -> Volume:
    """Read any image SimpleITK reads, with geometry; clear errors for unusable files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if path.is_dir():
        raise VolumeError(f"{path}: is a directory, not an image file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: file is not readable")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        hint = "unknown image format or damaged file"
        if "gz" in path.suffix or "truncat" in detail.lower() or "unexpected end" in detail.lower():
            hint = "damaged or truncated file"
        raise VolumeError(f"{path}: cannot read image ({hint})") from None
    volume = _from_image(image, str(path))
    if volume.array.size == 0:
        raise VolumeError(f"{path}: image has no voxels")
    return volume


def _integer_only_array(array: np.ndarray) -> np.ndarray:
    """PNG/JPEG/BMP store integers only: [0, 1] data becomes 0..255, other data is clipped."""
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 65535:
        return array.astype(np.uint8 if array.max() <= 255 else np.uint16)
    finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if finite.min() >= 0.0 and finite.max() <= 1.0:
        finite = finite * 255.0
    finite = np.clip(np.rint(finite), 0, 65535)
    return finite.astype(np.uint8 if finite.max() <= 255 else np.uint16)


def temporary_sibling(path: Path) -> Path:
    """A fresh, unused file name next to ``path`` that keeps its (multi-part) extension."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    # mkstemp creates 0600 files; give the final file the permissions a plain open() would.
    os.chmod(name, 0o666 & ~_current_umask())
    return Path(name)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prepare_image(volume: Volume, path: Path, metadata: Optional[Dict[str, str]]) -> sitk.Image:
    if path.is_dir():
        raise VolumeError(f"{path}: is a directory; give an output file name")
    if not path.parent.exists():
        raise FileNotFoundError(f"{path.parent}: output folder does not exist")
    array = volume.array
    if path.suffix.lower() in INTEGER_ONLY_SUFFIXES:
        array = _integer_only_array(array)
    image = to_image(replace(volume, array=array))
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, value)
    return image


class OutputSet:
    """Write several files all-or-nothing: each goes to a temp sibling, then all are renamed.

    Use as a context manager; if the block raises, every temp file is removed and no target is
    touched. Renames happen only when the block completes.
    """

    def __init__(self) -> None:
        self._pending: List[Tuple[Path, Path]] = []

    def __enter__(self) -> OutputSet:
        return self

    def add_file(self, write: Callable[[Path], None], path: PathLike) -> None:
        """Reserve ``path``: ``write(temp_path)`` fills a temp sibling that is renamed at the end."""
        path = Path(path)
        temp = temporary_sibling(path)
        self._pending.append((temp, path))
        write(temp)

    def add_image(self, image: sitk.Image, path: PathLike) -> None:
        def write(temp: Path) -> None:
            try:
                compress = Path(path).suffix.lower() in (".nrrd", ".mha", ".gz")
                sitk.WriteImage(image, str(temp), compress)
            except RuntimeError as error:
                detail = " ".join(str(error).split())[:200]
                raise VolumeError(f"{path}: cannot write image ({detail})") from None

        self.add_file(write, path)

    def add_volume(self, volume: Volume, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
        self.add_image(_prepare_image(volume, Path(path), metadata), path)

    def add_text(self, text: str, path: PathLike) -> None:
        self.add_file(lambda temp: temp.write_text(text, encoding="utf-8"), path)

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            for temp, target in self._pending:
                os.replace(temp, target)
        else:
            for temp, _ in self._pending:
                temp.unlink(missing_ok=True)
        self._pending = []


def write_volume(volume: Volume, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write one image atomically (temp file beside the target, then rename), keeping geometry."""
    with OutputSet() as outputs:
        outputs.add_volume(volume, path, metadata)
    return Path(path)


def overlaps(reference: Volume, moving: Volume) -> bool:
    """Whether any voxel of ``reference`` lies inside ``moving``'s extent (any orientation)."""
    ones = replace(moving, array=np.ones(moving.shape, dtype=np.float32), is_2d=False)
    probe = resample_like(ones, reference, interpolator=sitk.sitkNearestNeighbor)
    return bool(probe.array.max() > 0.5)


def resample_like(moving: Volume, reference: Volume, interpolator: int = sitk.sitkLinear,
                  default_value: float = 0.0) -> Volume:
    """``moving`` resampled onto ``reference``'s grid (identity transform, physical space)."""
    moving_image = to_image(replace(moving, is_2d=False))
    reference_image = to_image(replace(reference, array=np.zeros(reference.shape, np.float32), is_2d=False))
    if moving_image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        moving_image = sitk.Cast(moving_image, sitk.sitkFloat32)
    resampled = sitk.Resample(moving_image, reference_image, sitk.Transform(), interpolator,
                              float(default_value), moving_image.GetPixelID())
    return replace(reference, array=sitk.GetArrayFromImage(resampled), metadata={}, notes=[])
