"""The model a job uses: loaded once per file and kept while the file is unchanged."""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from ..io.checkpoint import LoadedModel

# ..checkpoint (and so torch) is imported on first use, not with the package: the Slicer module's
# process imports FusionINNLib.jobs.codec to talk to its worker and must never load torch.


class ModelCache:
    """``get(model)`` → :class:`~FusionINNLib.io.checkpoint.LoadedModel` for a path (None = the bundled model).

    Keeps the last ``capacity`` models keyed by (path, modification time), so a long-lived worker
    loads a model once and notices when its file is replaced. Thread-safe.
    """

    def __init__(self, capacity: int = 1):
        self.capacity = max(1, int(capacity))
        self._models: Dict[Tuple[str, Optional[float]], LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, model: Any = None) -> LoadedModel:
        from ..io.checkpoint import LoadedModel, bundled_model_path, resolve_model

        if isinstance(model, LoadedModel):
            return model
        argument = None if model is None or str(model) in ("", "default") else str(model)
        path = argument if argument is not None else str(bundled_model_path())
        stamp = os.path.getmtime(path) if os.path.isfile(path) else None
        key = (path, stamp)
        with self._lock:
            if key in self._models:
                return self._models[key]
        loaded = resolve_model(argument)
        with self._lock:
            while len(self._models) >= self.capacity:
                self._models.pop(next(iter(self._models)))
            self._models[key] = loaded
        return loaded

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


DEFAULT_MODELS = ModelCache()
