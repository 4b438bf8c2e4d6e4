"""The one parser of slice-range text (``"70:80"``, ``":80"``, ``"70"``): no torch, no SimpleITK.

The Slicer module checks a range in its own process before it sends a job (through
:mod:`FusionINNLib.slicer_support`, which re-exports it), and the explain job parses the same text
in the worker, so both accept and refuse exactly the same ranges.
"""
from __future__ import annotations

from typing import Tuple


def parse_slice_range(text: str, count: int) -> Tuple[int, int]:
    """``"a:b"`` (half-open, either bound optional) or ``"a"`` → (start, stop) within 0..count.
    Torch-free, so the Slicer module checks a range before a job starts (through
    :mod:`FusionINNLib.slicer_support`); ``jobs.explain.parse_slices`` is this function."""
    text = str(text).strip()
    try:
        if ":" in text:
            first, second = text.split(":", 1)
            start = int(first) if first.strip() else 0
            stop = int(second) if second.strip() else count
        else:
            start = int(text)
            stop = start + 1
    except ValueError:
        raise ValueError(f"slices must look like a:b (e.g. 70:80) or a single index, got {text!r}") from None
    if not 0 <= start < stop <= count:
        raise ValueError(f"slice range {start}:{stop} is empty or outside 0:{count}")
    return start, stop
