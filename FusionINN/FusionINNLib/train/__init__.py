"""The training layer: the option table (:mod:`.options`), the training loop (:mod:`.training`) and
what a run writes besides the loop's state: checkpoints (:mod:`.checkpoints`), the model's
metadata (:mod:`.metadata`) and the loss-curve plot (:mod:`.plot`).

Builds on :mod:`FusionINNLib.core`, :mod:`FusionINNLib.io` and :mod:`FusionINNLib.metrics`. Nothing
is imported here, so ``train.options`` (no torch) stays cheap for the command lines' parsers.
"""
