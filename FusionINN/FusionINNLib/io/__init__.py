"""The I/O layer: images with geometry and their file checks, checkpoints, the fusion record,
all-or-nothing writes, BraTS case discovery and reading, and synthetic phantom cases.

Builds on :mod:`FusionINNLib.core` only. Nothing is imported here: ``io.record`` and
``io.atomic`` stay free of torch and SimpleITK for the Slicer GUI process.
"""
