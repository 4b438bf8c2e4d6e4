"""The FusionINN module's MRML side: the logic that turns nodes into worker jobs and results into nodes.

It imports ``slicer`` and ``vtk`` (MRML) but no ``qt``, so it runs on Slicer's Qt-free core (the
``slicer-core`` wheel) in the tests as well as inside Slicer. No compute happens here: every heavy
job runs in the FusionINN worker process (:mod:`FusionINNLib.worker`).
"""
from .logic import FusionINNCoreLogic  # noqa: F401
