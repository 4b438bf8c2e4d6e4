"""FusionINNLib: the pure-Python core of SlicerFusionINN (no ``slicer`` import anywhere).

Decomposable multimodal image fusion with an invertible normalizing flow (Kumar et al.,
FusionINN, arXiv 2403.15769). Public entry points:

- :mod:`.pipeline`: ``fuse_volumes``/``decompose_volume`` (arrays with geometry) and
  ``fuse_files``/``decompose_files`` (files);
- :mod:`.model`, :mod:`.checkpoint`: the flow and its checkpoint files;
- :mod:`.volume`, :mod:`.normalization`, :mod:`.engine`: I/O and geometry, intensity maps, the
  slice-wise batched runner;
- :mod:`.cli`: the ``fusioninn`` command line.
"""
__version__ = "0.1.0"
