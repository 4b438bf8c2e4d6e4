"""Who may change process-wide state (no torch import here, so the command line can ask cheaply).

FusionINNLib is imported by programs that own their process (the ``fusioninn`` command line, the
training CLI, the Slicer module's worker, :mod:`FusionINNLib.worker`) and by 3D Slicer's own
process (the module's GUI side). Process-wide settings, such as glibc's allocator tuning in
:func:`FusionINNLib.core.engine.tune_cpu_allocator`, are made only after :func:`allow_process_tuning`;
in Slicer's process nobody calls it, so nothing there changes.
"""
from __future__ import annotations

_ALLOWED = False


def allow_process_tuning(allowed: bool = True) -> None:
    global _ALLOWED
    _ALLOWED = bool(allowed)


def process_tuning_allowed() -> bool:
    return _ALLOWED
