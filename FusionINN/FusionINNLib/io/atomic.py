"""All-or-nothing file writes: write a hidden temporary sibling, then rename it over the target.

``os.replace`` within one folder is atomic on POSIX and Windows, so a reader sees either the old
file or the complete new one, never a half-written file, and a crash leaves at most a hidden
``.<name>.*.tmp<ext>`` file behind (the leading dot keeps it out of case discovery).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_sibling(path: PathLike) -> Path:
    """A fresh, unused file name next to ``path`` that keeps its (multi-part) extension, so that
    writers choosing the format from the name (SimpleITK, matplotlib) still do the right thing."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as error:
        # the error names the random temporary file, which means nothing to the user: name the folder
        reason = (error.strerror or type(error).__name__).lower()
        raise type(error)(error.errno, f"cannot create a file in this folder ({reason})", str(path.parent)) from None
    try:
        os.close(handle)
        # mkstemp creates 0600 files; give the final file the permissions a plain open() would.
        os.chmod(name, 0o666 & ~_current_umask())
    except BaseException:  # also a SIGTERM turned into an exception: leave no temporary file behind
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` when the block ends
    normally and is removed when the block raises (``path`` is then left as it was)."""
    path = Path(path)
    temp: Optional[Path] = None
    try:
        # created inside the try, so that a signal handler's exception right after the creation
        # still removes it (a SIGTERM'd training run must not leave a hidden .tmp behind)
        temp = temporary_sibling(path)
        yield temp
        os.replace(temp, path)
    except OSError as error:  # e.g. the disk filled up while writing: name the target, not the temp file
        if temp is None:
            raise
        temp.unlink(missing_ok=True)
        raise renamed_error(error, temp, path) from None
    except BaseException:
        if temp is not None:
            temp.unlink(missing_ok=True)
        raise


def renamed_error(error: OSError, temp: Path, path: Path) -> OSError:
    """``error`` about the temporary file ``temp`` (or about no file: a failed flush) as an error
    about its target ``path``."""
    if error.errno is None or (error.filename is not None and str(error.filename) != str(temp)):
        return error
    return type(error)(error.errno, error.strerror, str(path))


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` all-or-nothing, creating missing parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temp:
        temp.write_bytes(data)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends on every platform) to ``path`` all-or-nothing."""
    return atomic_write_bytes(path, text.encode("utf-8"))
