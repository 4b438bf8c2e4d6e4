"""Images with geometry: read/write anything SimpleITK reads, resample onto a reference grid.

A :class:`Volume` always holds a 3-D numpy array indexed (k, j, i) = (slice, row, column), as
``SimpleITK.GetArrayFromImage`` returns it, plus origin, spacing and a 3x3 direction in ITK (LPS,
i-j-k) order. 2-D images (PNG, TIFF, 2-D NRRD) become one-slice volumes and are written back as
2-D. Colour (RGB/RGBA) images are converted to luminance (ITU-R BT.601 weights) with a note,
because fusion works on scalar intensities; other multi-component (e.g. float vector fields),
complex and 4-D images are refused with a clear message.

Damaged files. Several ITK readers accept a truncated file and fill the missing voxels with zeros
or garbage (NIfTI, plain or gzipped; VTK; GIPL; the later pages of a TIFF) or only print a
warning (JPEG). :func:`read_volume` therefore checks that the file holds all its voxel bytes
(:func:`check_complete_file`) and turns what the C++ libraries print on stderr into one clear
error instead of extra lines. Only regular files are read: a FIFO or device would block or
never end.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..core.errors import UsageError, VolumeError  # noqa: F401 - defined once in core.errors, re-exported
from .atomic import renamed_error, temporary_sibling

PathLike = Union[str, "os.PathLike[str]"]
INTEGER_ONLY_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# 2-D-only writers: ITK silently keeps the first slice of a 3-D volume written to them.
SINGLE_SLICE_SUFFIXES = INTEGER_ONLY_SUFFIXES
# Header + separate data file: two files cannot be replaced in one atomic rename.
DETACHED_HEADER_SUFFIXES = (".nhdr", ".mhd", ".hdr", ".img")
# What the C++ readers print when they meet a damaged file but still return an image.
NATIVE_ERROR_MARKERS = ("premature end", "corrupt", "can not read", "cannot read", "failed to read",
                        "not read completely", "truncat", "unexpected end", "error")
LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)


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
        spacing = np.asarray(self.spacing, dtype=np.float64)
        origin = np.asarray(self.origin, dtype=np.float64)
        direction = np.asarray(self.direction, dtype=np.float64)
        # ITK refuses zero spacing deep inside, and a NaN or singular geometry maps every point
        # nowhere (an "inputs do not overlap" that is really a broken header): say so here.
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise VolumeError(f"voxel spacing must be three positive numbers, got {tuple(self.spacing)}")
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise VolumeError(f"origin must be three finite numbers, got {tuple(self.origin)}")
        if direction.shape != (9,) or not np.all(np.isfinite(direction)) or \
                abs(np.linalg.det(direction.reshape(3, 3))) < 1e-6:
            raise VolumeError(f"direction must be an invertible 3x3 matrix, got {tuple(self.direction)}")

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
    if components > 1:
        if components not in (3, 4):
            raise VolumeError(f"{name}: images with {components} components per voxel are not supported")
        if pixel_id not in (sitk.sitkVectorUInt8, sitk.sitkVectorUInt16):
            # Colour is stored as 8/16-bit integers; 3 float components are a vector field (e.g. a
            # displacement), whose "luminance" would mean nothing.
            raise VolumeError(f"{name}: vector images with {components} {image.GetPixelIDTypeAsString()} "
                              "components are not supported (colour images must be 8- or 16-bit RGB/RGBA)")
    array = sitk.GetArrayFromImage(image)
    if components > 1:
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
    try:
        return Volume(np.ascontiguousarray(array), tuple(spacing), tuple(origin), tuple(direction),
                      dimension == 2, metadata, notes)
    except VolumeError as error:
        raise VolumeError(f"{name}: {error}") from None


def _clean_direction(direction: Tuple[float, ...]) -> Tuple[float, ...]:
    # Entries below 1e-12 are rounding noise; as denormals (1e-309) they make ITK's SVD-based
    # matrix inverse return NaN, and then every physical point maps outside the image.
    return tuple(0.0 if abs(value) < 1e-12 else float(value) for value in direction)


def to_image(volume: Volume) -> sitk.Image:
    if volume.is_2d:
        if volume.array.shape[0] != 1:
            raise VolumeError(f"a 2-D image must have one slice, got {volume.array.shape[0]}")
        image = sitk.GetImageFromArray(volume.array[0])
        image.SetSpacing(volume.spacing[:2])
        image.SetOrigin(volume.origin[:2])
        d = _clean_direction(volume.direction)
        image.SetDirection((d[0], d[1], d[3], d[4]))
    else:
        image = sitk.GetImageFromArray(volume.array)
        image.SetSpacing(volume.spacing)
        image.SetOrigin(volume.origin)
        image.SetDirection(_clean_direction(volume.direction))
    return image


def check_input_file(path: PathLike) -> Path:
    """``path`` if it is an existing, readable regular file; else one clear error naming it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if path.is_symlink():
            raise VolumeError(f"{path}: broken or looping symbolic link") from None
        if isinstance(error, PermissionError):
            raise PermissionError(f"{path}: file is not readable (permission denied)") from None
        raise FileNotFoundError(f"{path}: file not found") from None
    if stat.S_ISDIR(mode):
        raise VolumeError(f"{path}: is a directory, not an image file")
    if not stat.S_ISREG(mode):
        # Reading a FIFO blocks until someone writes to it; a device may never end.
        raise VolumeError(f"{path}: is not a regular file (a pipe, socket or device)")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: file is not readable (permission denied)")
    return path


@contextmanager
def _native_output_captured() -> Iterator[List[str]]:
    """Collect what C/C++ code (ITK, libtiff, libjpeg) prints on descriptors 1 and 2 meanwhile.

    Yields a list that holds the captured text once the block ends (ITK's JPEG reader reports a
    truncated file on *stdout*, libtiff on stderr). Where the descriptors cannot be redirected
    (no console), nothing is captured and the libraries print as usual.
    """
    captured: List[str] = []
    saved: List[Tuple[int, int]] = []
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        for descriptor in (1, 2):
            saved.append((descriptor, os.dup(descriptor)))
    except (OSError, ValueError, AttributeError):
        for _, copy in saved:
            os.close(copy)
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        for descriptor, _ in saved:
            os.dup2(sink.fileno(), descriptor)
        try:
            yield captured
        finally:
            for descriptor, copy in saved:
                os.dup2(copy, descriptor)
                os.close(copy)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", errors="replace"))


native_output_captured = _native_output_captured  # for callers that probe files (pipeline.has_fusion_record)


def _looks_like_error(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in NATIVE_ERROR_MARKERS)


def read_volume(path: PathLike) -> Volume:
    """Read any image SimpleITK reads, with geometry; clear errors for unusable files."""
    image, path = read_image(path)
    volume = _from_image(image, str(path))
    if volume.array.size == 0:
        raise VolumeError(f"{path}: image has no voxels")
    return volume


def read_image(path: PathLike) -> Tuple[sitk.Image, Path]:
    """The one image reader under :func:`read_volume` and the kept-latent reader: the file checks
    (missing, directory, links, a NIfTI header claiming more than the file), ITK's native messages
    captured, and the damaged/truncated-file checks; returns the ITK image and the checked path."""
    path = check_input_file(path)
    check_nifti_header_fits(path)
    with _native_output_captured() as native:
        try:
            image = sitk.ReadImage(str(path))
            error_detail = ""
        except RuntimeError as error:
            image, error_detail = None, " ".join(str(error).split())
    printed = "".join(native).strip()
    if image is None:
        detail = (error_detail + " " + printed).lower()
        hint = "unknown image format or damaged file"
        if path.name.lower().endswith(".gz") or any(
                marker in detail for marker in ("truncat", "unexpected end", "not read completely",
                                                "expected", "fread got only", "premature end")):
            hint = "damaged or truncated file"
        raise VolumeError(f"{path}: cannot read image ({hint})")
    if printed and _looks_like_error(printed):
        first = " ".join(printed.splitlines()[0].split())[:160]
        raise VolumeError(f"{path}: damaged file (the image reader reported: {first})")
    if printed:
        print(printed, file=sys.stderr)  # plain warnings: pass them on unchanged
    check_complete_file(path, image)
    return image, path


# -- damaged-file checks ------------------------------------------------------------------------
def _voxel_bytes(image: sitk.Image) -> int:
    return int(sitk.GetArrayViewFromImage(image).nbytes)


def _nifti_expected_size(header: bytes) -> Optional[int]:
    """Header + voxel bytes a NIfTI-1/-2 single file (``n+1``/``n+2``) must hold; None if not one.

    NIfTI-1: sizeof_hdr = 348, dim int16[8] at byte 40, bitpix int16 at 72, vox_offset float32 at
    108, magic at 344. NIfTI-2: sizeof_hdr = 540, magic at 4, bitpix int16 at 14, dim int64[8] at
    16, vox_offset int64 at 168. Data bytes = prod(dim[1..dim[0]]) * bitpix / 8.
    """
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348 and header[344:347] == b"n+1":
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = max(352, int(struct.unpack(endian + "f", header[108:112])[0]))
        elif len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540 and header[4:7] == b"n+2":
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = max(544, int(struct.unpack(endian + "q", header[168:176])[0]))
        else:
            continue
        rank = dims[0]
        if not 1 <= rank <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1:rank + 1]):
            return None  # inconsistent header: leave the verdict to ITK
        count = 1
        for d in dims[1:rank + 1]:
            count *= int(d)
        return offset + count * bitpix // 8
    return None


def _gzip_payload_size(path: Path) -> Tuple[int, bool]:
    """(bytes decompressed, whether the gzip stream ended properly), reading in 1 MiB chunks.

    Concatenated members are legal gzip and are followed; zero bytes after the last member
    (padding some tools add) are ignored.
    """
    total, complete = 0, False
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            while chunk:
                if complete and not chunk.strip(b"\0"):
                    break  # padding after a finished member
                if complete:  # another member follows
                    decompressor, complete = zlib.decompressobj(16 + zlib.MAX_WBITS), False
                try:
                    total += len(decompressor.decompress(chunk, 1 << 24))
                    while decompressor.unconsumed_tail and not decompressor.eof:
                        total += len(decompressor.decompress(decompressor.unconsumed_tail, 1 << 24))
                except zlib.error:
                    return total, False
                complete = decompressor.eof
                chunk = decompressor.unused_data if complete else b""
    return total, complete


def _tiff_damage(path: Path, size: int) -> Optional[str]:
    """Why a classic TIFF is incomplete (an image directory or strip beyond the file end), or None.

    Layout: byte order (II/MM), 42, offset of the first image directory (IFD); each IFD holds a
    2-byte entry count, 12-byte entries and the offset of the next IFD (0 ends the chain).
    """
    with open(path, "rb") as handle:
        head = handle.read(8)
        endian = {b"II": "<", b"MM": ">"}.get(head[:2])
        if endian is None or len(head) < 8 or struct.unpack(endian + "H", head[2:4])[0] != 42:
            return None  # not a classic TIFF (BigTIFF etc.): leave it to the reader
        offset, seen = struct.unpack(endian + "I", head[4:8])[0], set()
        type_sizes = {3: 2, 4: 4}  # SHORT, LONG: the types strip offsets and counts use
        while offset:
            if offset in seen:
                return "its image directories form a loop"
            seen.add(offset)
            handle.seek(offset)
            count_bytes = handle.read(2)
            if len(count_bytes) < 2:
                return f"image directory {len(seen)} lies beyond the end of the file"
            count = struct.unpack(endian + "H", count_bytes)[0]
            entries, next_bytes = handle.read(12 * count), handle.read(4)
            if len(entries) < 12 * count or len(next_bytes) < 4:
                return f"image directory {len(seen)} is cut off"
            values: Dict[int, List[int]] = {}
            for index in range(count):
                tag, kind, number = struct.unpack(endian + "HHI", entries[12 * index:12 * index + 8])
                if tag not in (273, 279, 324, 325) or kind not in type_sizes:
                    continue  # strip/tile offsets (273/324) and byte counts (279/325) only
                width = type_sizes[kind]
                raw = entries[12 * index + 8:12 * index + 12]
                if number * width > 4:
                    here = handle.tell()
                    handle.seek(struct.unpack(endian + "I", raw)[0])
                    raw = handle.read(number * width)
                    handle.seek(here)
                    if len(raw) < number * width:
                        return f"image directory {len(seen)} points beyond the end of the file"
                code = "H" if width == 2 else "I"
                values[tag] = list(struct.unpack(endian + code * number, raw[:number * width]))
            starts = values.get(273) or values.get(324) or []
            lengths = values.get(279) or values.get(325) or []
            if any(start + length > size for start, length in zip(starts, lengths)):
                return f"the pixel data of image {len(seen)} is cut off"
            offset = struct.unpack(endian + "I", next_bytes)[0]
    return None


# deflate never compresses better than about 1032:1; a header asking for more is not this file's
DEFLATE_MAX_RATIO = 1032


def check_nifti_header_fits(path: PathLike) -> None:
    """Before reading: refuse a NIfTI whose header describes more bytes than the file can hold.

    A damaged header (or a cut file) can claim terabytes; ITK would try to allocate them before
    noticing. Plain ``.nii``: the file must hold vox_offset + data bytes. Gzipped: the data cannot
    exceed ``DEFLATE_MAX_RATIO`` times the compressed size.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(2)
        if magic == b"\x1f\x8b":
            with gzip.open(path, "rb") as handle:
                expected, limit = _nifti_expected_size(handle.read(544)), DEFLATE_MAX_RATIO
        else:
            with open(path, "rb") as handle:
                expected, limit = _nifti_expected_size(handle.read(544)), 1
    except (OSError, EOFError, zlib.error):
        return  # not readable as NIfTI here: the image reader reports what it is
    size = path.stat().st_size
    if expected is not None and expected > size * limit + 1024:
        raise VolumeError(f"{path}: damaged or truncated file (its header describes {expected} bytes, "
                          f"{'more than' if limit > 1 else 'but'} the {size}-byte file "
                          f"{'can hold' if limit > 1 else 'is shorter'})")


def check_complete_file(path: PathLike, image: sitk.Image) -> None:
    """Refuse a file that is shorter than its own header says (readers that pad with zeros).

    Exact for NIfTI (``.nii``, ``.nii.gz``), classic TIFF and BMP; for other gzip files and binary
    VTK/GIPL files the voxel bytes are a lower bound on the (uncompressed) size. Formats whose
    readers already fail on truncation (NRRD, MetaImage, PNG) need nothing here.
    """
    path = Path(path)
    name = path.name.lower()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        magic = handle.read(2)
    reason = None
    if magic == b"\x1f\x8b":  # gzip, whatever the name says (ITK reads by content)
        expected = None
        try:
            with gzip.open(path, "rb") as handle:
                expected = _nifti_expected_size(handle.read(544))
        except (OSError, EOFError, zlib.error):
            pass  # the stream check below says what is wrong
        if expected is None:
            expected = _voxel_bytes(image)
        else:
            with open(path, "rb") as handle:
                handle.seek(max(0, size - 4))
                trailer = handle.read(4)
            # gzip's trailer holds the uncompressed size mod 2^32: equal means complete (a cut
            # file ends in arbitrary bytes), so only a mismatch costs a full decompression.
            if len(trailer) == 4 and struct.unpack("<I", trailer)[0] == expected % (1 << 32):
                return
        total, complete = _gzip_payload_size(path)
        if not complete:
            reason = "the compressed data ends early"
        elif total < expected:
            reason = f"it holds {total} of the {expected} bytes its image needs"
    elif name.endswith((".nii", ".nii.gz")):
        with open(path, "rb") as handle:
            expected = _nifti_expected_size(handle.read(544))
        if expected is not None and size < expected:
            reason = f"it holds {size} of the {expected} bytes its header describes"
    elif name.endswith((".tif", ".tiff")):
        reason = _tiff_damage(path, size)
    elif name.endswith(".bmp"):
        with open(path, "rb") as handle:
            head = handle.read(6)
        declared = struct.unpack("<I", head[2:6])[0] if len(head) == 6 and head[:2] == b"BM" else 0
        if size < declared:  # the BMP file header states the file's total size
            reason = f"it holds {size} of the {declared} bytes its header describes"
    elif name.endswith((".vtk", ".gipl")):
        with open(path, "rb") as handle:
            head = handle.read(1024)
        binary = name.endswith(".gipl") or b"BINARY" in head.upper()
        needed = _voxel_bytes(image) + (256 if name.endswith(".gipl") else 0)  # GIPL: 256-byte header
        if binary and size < needed:
            reason = f"it holds {size} bytes but its voxels need {needed}"
    if reason:
        raise VolumeError(f"{path}: damaged or truncated file ({reason})")


def _integer_only_array(array: np.ndarray, path: Optional[Path] = None) -> np.ndarray:
    """PNG/JPEG/BMP store integers 0..65535 only: [0, 1] data becomes 0..255, other data is
    rounded; values that do not fit (negative, above 65535) are refused, never clipped silently."""
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 65535:
        return array.astype(np.uint8 if array.max() <= 255 else np.uint16)
    finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if finite.min() >= 0.0 and finite.max() <= 1.0:
        finite = finite * 255.0
    finite = np.rint(finite)
    if finite.min() < 0 or finite.max() > 65535:
        raise VolumeError(f"{path or 'output'}: values {float(array.min()):.6g}..{float(array.max()):.6g} do not fit "
                          "the 0..65535 integers of this format; use .nrrd, .nii.gz or .tif")
    return finite.astype(np.uint8 if finite.max() <= 255 else np.uint16)


def _prepare_image(volume: Volume, path: Path, metadata: Optional[Dict[str, str]]) -> sitk.Image:
    if path.is_dir():
        raise VolumeError(f"{path}: is a directory; give an output file name")
    if not path.parent.exists():
        raise FileNotFoundError(f"{path.parent}: output folder does not exist")
    array = volume.array
    if path.suffix.lower() in INTEGER_ONLY_SUFFIXES:
        array = _integer_only_array(array, path)
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
        try:
            write(temp)
        except OSError as error:
            raise renamed_error(error, temp, path) from None

    def add_image(self, image: sitk.Image, path: PathLike) -> None:
        def write(temp: Path) -> None:
            try:
                compress = Path(path).suffix.lower() in (".nrrd", ".mha", ".gz")
                sitk.WriteImage(image, str(temp), compress)
            except RuntimeError as error:
                raise VolumeError(f"{path}: cannot write image ({write_failure(str(error), temp)})") from None

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


WRITE_FAILURES = ("no space left on device", "read-only file system", "permission denied", "file too large",
                  "disk quota exceeded", "input/output error")


def write_failure(text: str, temp: Path) -> str:
    """What ITK's long write error means, in a few words: ITK's text names its source file and
    object address first and may never say why (a full disk), so the folder is checked too."""
    lowered = " ".join(text.split()).lower()
    for reason in WRITE_FAILURES:
        if reason in lowered:
            return reason
    try:
        if shutil.disk_usage(temp.parent).free < (1 << 20):
            return "no space left on device"
    except OSError:
        pass
    detail = " ".join(text.split())
    detail = re.sub(r"Exception thrown in SimpleITK \S+:|\S+\.(cxx|h|hxx):\d+:|ITK ERROR: \S+\(0x[0-9a-f]+\):", "",
                    detail).strip(" :")
    return detail[:160] or "the image writer failed"


def write_volume(volume: Volume, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write one image atomically (temp file beside the target, then rename), keeping geometry."""
    with OutputSet() as outputs:
        outputs.add_volume(volume, path, metadata)
    return Path(path)


def overlaps(reference: Volume, moving: Volume) -> bool:
    """Whether any voxel of ``reference`` lies inside ``moving``'s extent (any orientation)."""
    return overlap_fraction(reference, moving) > 0.0


def overlap_fraction(reference: Volume, moving: Volume) -> float:
    """The fraction of ``reference``'s voxels that lie inside ``moving``'s extent."""
    ones = replace(moving, array=np.ones(moving.shape, dtype=np.float32), is_2d=False)
    probe = resample_like(ones, reference, interpolator=sitk.sitkNearestNeighbor)
    return float(np.count_nonzero(probe.array > 0.5)) / max(1, probe.array.size)


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
