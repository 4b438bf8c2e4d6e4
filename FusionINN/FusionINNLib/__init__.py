"""FusionINNLib: the pure-Python core of SlicerFusionINN (no ``slicer`` import anywhere).

Decomposable multimodal image fusion with an invertible normalizing flow (Kumar et al.,
FusionINN, arXiv 2403.15769). The layers, each importing only the ones listed before it:

- :mod:`.core`: the flow (``core.model``), the slice-wise engine, intensity normalization, the
  training losses, the fixed choices (``core.choices``) and the typed errors (``core.errors``);
- :mod:`.io`: images with geometry (``io.volume``), checkpoints, the fusion record, atomic
  writes, BraTS case discovery and the synthetic phantoms;
- :mod:`.metrics`: fusion and decomposition quality, the one scorer, baselines, artefacts;
- :mod:`.train`: the option table and the training loop with its checkpoints, metadata and plot;
- :mod:`.jobs`: the typed requests of every front end and the work they run: ``jobs.pipeline``
  (``fuse_volumes``/``decompose_volume`` on arrays with geometry, ``fuse_files``/``decompose_files``
  on files), ``jobs.explain``, ``jobs.batch``, ``jobs.demo``;
- the adapters at this level: :mod:`.cli` (the ``fusioninn`` command line), :mod:`.worker` and
  :mod:`.worker_client` (the Slicer module's worker process and its client), :mod:`.slicer_support`
  (plain-data helpers of the Slicer module).
"""
__version__ = "0.1.0"
