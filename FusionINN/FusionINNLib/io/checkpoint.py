"""Checkpoint files: one format, loaded only with ``torch.load(weights_only=True)``.

Our format is a plain dict (nothing but tensors, numbers, strings, lists and dicts)::

    {"format": "fusioninn-checkpoint", "format_version": 1,
     "config": FusionINNConfig.to_dict(), "state_dict": {...reference keys...},
     "metadata": {"modalities": [...], "normalization": "volume", "data": ..., "metrics": ...}}

Also accepted, for the authors' files: ``{"model_state_dict": ...}`` (their training script, with
loss lists of NumPy scalars) and a bare state dict, both with or without DataParallel's ``module.``
prefix. Those were trained with the sigmoid output fed back, so they load with
``reverse_input="sigmoid"``. Nothing is ever unpickled beyond an allow-list of NumPy scalar types.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ..core.model import FusionFlow, FusionINNConfig
from .atomic import atomic_file

FORMAT_NAME = "fusioninn-checkpoint"
FORMAT_VERSION = 1
PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class LoadedModel:
    model: FusionFlow
    config: FusionINNConfig
    metadata: Dict[str, Any] = field(default_factory=dict)
    source: str = "random"
    sha256: str = ""
    origin: str = "fusioninn"  # "fusioninn", "reference" (the authors' layout) or "random"

    def describe(self) -> Dict[str, Any]:
        described = {"path": self.source, "sha256": self.sha256, "origin": self.origin,
                     "config": self.config.to_dict()}
        if self.sha256:  # a file: where decomposition finds it again from another folder
            described["absolute_path"] = os.path.abspath(self.source)
        return described


def _numpy_safe_globals() -> list:
    # The authors' checkpoints hold loss lists of NumPy float64 scalars. Allow exactly the globals
    # needed to rebuild such scalars (under their NumPy 1.x and 2.x module names), nothing else.
    scalar = np.core.multiarray.scalar if not hasattr(np, "_core") else np._core.multiarray.scalar
    allowed: list = [
        scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
    ]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType"):
        dtype_class = getattr(getattr(np, "dtypes", None), name, None)
        if dtype_class is not None:
            allowed.append(dtype_class)
    return allowed


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{path}: model file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a model file")
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5
        raise CheckpointError(f"PyTorch {torch.__version__} is too old to load model files safely: FusionINN needs "
                              "torch >= 2.5 (torch.serialization.safe_globals); upgrade torch")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        # torch names weights_only in every unpickling failure; "Unsupported operand" is plain garbage
        # (random bytes), everything else it refuses is a Python object a model file must not hold.
        # torch's own text (an essay on weights_only, or a bare opcode number) is never shown.
        if "unsupported operand" not in str(error).lower() and (
                "Unsupported global" in str(error) or "weights_only" in str(error).lower()):
            reason = "it contains Python objects that are not allowed in a model file (refused unsafe unpickling)"
        else:
            reason = f"not a readable PyTorch checkpoint ({_unreadable_kind(path)})"
        raise CheckpointError(f"{path}: {reason}") from None


def read_payload(path: PathLike) -> Any:
    """The object stored in a checkpoint file, read the one safe way (``weights_only=True``, the
    NumPy scalars of the authors' files allow-listed) with this module's one-line messages; for
    files that are not models, e.g. the training's resumable ``last.pt``."""
    return _read(Path(path))


def _unreadable_kind(path: Path) -> str:
    """Why torch could not read ``path``, from its first bytes (torch's messages say little)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as error:
        return (error.strerror or type(error).__name__).lower()
    if size == 0:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip, or its legacy pickle
        return "damaged or truncated file"
    return "the file holds something else, e.g. text or another format"


def _strip_prefix(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unpack(path: Path, payload: Any) -> tuple:
    """(config, state_dict, metadata, origin) from any accepted layout."""
    if isinstance(payload, dict) and "format_version" in payload:
        version = payload.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format_version {version!r} is newer than this software "
                f"understands ({FORMAT_VERSION}); update SlicerFusionINN"
            )
        try:
            config = FusionINNConfig.from_dict(dict(payload["config"]))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: invalid model configuration ({error})") from None
        state = payload.get("state_dict")
        if not _is_state_dict(state):
            raise CheckpointError(f"{path}: checkpoint has no valid state_dict")
        return config, _strip_prefix(state), dict(payload.get("metadata") or {}), "fusioninn"
    if isinstance(payload, dict) and "model_state_dict" in payload:
        payload = payload["model_state_dict"]
    if _is_state_dict(payload):
        # The authors' layout: their architecture, decomposed the way they trained it.
        return FusionINNConfig(reverse_input="sigmoid"), _strip_prefix(payload), {}, "reference"
    raise CheckpointError(f"{path}: not a FusionINN checkpoint (no format_version, model_state_dict or state dict)")


def non_finite_weights(state_dict: Dict[str, Any]) -> list:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [key for key, value in state_dict.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def load_checkpoint(path: PathLike, config_overrides: Optional[Dict[str, Any]] = None) -> LoadedModel:
    """Load a model from any accepted checkpoint layout (see module docstring), on the CPU."""
    path = Path(path)
    config, state_dict, metadata, origin = _unpack(path, _read(path))
    broken = non_finite_weights(state_dict)
    if broken:
        raise CheckpointError(f"{path}: {len(broken)} weight tensor(s) hold NaN/Inf values (e.g. {broken[0]}); "
                              "the training run that wrote it diverged, or the file is damaged")
    if config_overrides:
        config = replace(config, **config_overrides)
    model = FusionFlow(config)
    try:
        model.graph.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise CheckpointError(
            f"{path}: weights do not fit the model architecture (blocks={config.blocks}, "
            f"hidden_channels={config.hidden_channels}): {detail}"
        ) from None
    model.set_actnorm_data_init(False)
    model.eval()
    return LoadedModel(model, config, metadata, str(path), file_sha256(path), origin)


def save_checkpoint(path: PathLike, model: FusionFlow, metadata: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` in our format, atomically (temp file in the same folder, then rename).

    Weights with NaN/Inf (a diverged training run) are refused: such a file could only ever
    produce NaN images, and ``load_checkpoint`` refuses it too.
    """
    path = Path(path)
    broken = non_finite_weights(model.graph.state_dict())
    if broken:
        from ..core.errors import TrainingDivergedError

        class DivergedWeightsError(TrainingDivergedError, CheckpointError):
            pass

        raise DivergedWeightsError(detail=f"{path}: not written: {len(broken)} weight tensor(s) hold NaN/Inf values "
                                          f"(e.g. {broken[0]})")
    payload: Dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.graph.state_dict().items()},
        "metadata": plain_metadata(metadata or {}),
    }
    if extra:
        payload.update(extra)
    atomic_torch_save(payload, path)
    return path


def plain_metadata(metadata: Dict[str, Any]) -> Dict[str, Any]:
    """Metadata as plain JSON types, so ``weights_only`` loading accepts it: values such as
    ``torch.__version__`` (a ``TorchVersion``), paths or NumPy scalars become strings/floats."""

    def default(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        return str(value)

    return json.loads(json.dumps(metadata, default=default))


def atomic_torch_save(payload: Any, path: PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temp:
        torch.save(payload, temp)


def bundled_model_path() -> Path:
    """The default model shipped with the extension (``FusionINN/Resources/Models``)."""
    env = os.environ.get("FUSIONINN_DEFAULT_MODEL")
    if env:
        return Path(env)
    # FusionINN/FusionINNLib/io/checkpoint.py -> FusionINN/Resources
    return Path(__file__).resolve().parents[2] / "Resources" / "Models" / "fusioninn_default.pt"


def resolve_model(model: Optional[PathLike] = None, allow_random: bool = True) -> LoadedModel:
    """The model to use: an explicit file, else the bundled default, else (loudly) a random one."""
    if model is not None and str(model) not in ("", "default"):
        return load_checkpoint(model)
    default = bundled_model_path()
    if default.is_file():
        return load_checkpoint(default)
    if not allow_random:
        from ..core.errors import ModelNotFoundError

        raise ModelNotFoundError(path=str(default))
    flow = FusionFlow(FusionINNConfig())
    flow.eval()
    return LoadedModel(flow, flow.config, {"warning": "untrained random model"}, "random", "", "random")


def recorded_model(record: Optional[Dict[str, Any]], fused_path: Optional[PathLike] = None,
                   log: Optional[Any] = None) -> LoadedModel:
    """The model a fused image was made with, for a decomposition given no ``--model``.

    The record names the model's file and SHA-256: the bundled default when it matches, else the
    recorded file (absolute path, as given at fusion time, or next to the fused image) when its
    SHA-256 still matches. Otherwise the bundled default, which the record check then reports
    as a different model (with the path to pass as ``--model``).
    """
    described = (record or {}).get("model") or {}
    digest = described.get("sha256") or ""
    default = bundled_model_path()
    if not digest or described.get("origin") == "random" or (default.is_file() and file_sha256(default) == digest):
        return resolve_model()
    names = [described.get("absolute_path"), described.get("path")]
    candidates = [Path(name) for name in names if name]
    if fused_path is not None and described.get("path"):
        candidates.append(Path(fused_path).parent / Path(described["path"]).name)
    for candidate in candidates:
        if candidate.is_file() and file_sha256(candidate) == digest:
            if log is not None:
                log(f"decomposing with the model recorded at fusion: {candidate}")
            return load_checkpoint(candidate)
    return resolve_model()
