"""The core layer: the flow, the slice-wise engine, intensity normalization, the training losses,
the fixed choices and the typed errors.

Imports nothing else of FusionINNLib (no files, no jobs), so each module here can be read and
tested on its own. Nothing is imported here: ``core.choices`` and ``core.errors`` stay free of
torch for the Slicer GUI process, which imports them before anything heavy.
"""
