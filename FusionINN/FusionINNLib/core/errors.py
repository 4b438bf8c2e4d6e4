"""Typed errors with fields, worded by each front end.

The library raises these with *what* went wrong as fields (which model, which option, which file);
how to fix it depends on who asks: the ``fusioninn`` command line names its flags, the Slicer
module its widgets, the worker process whatever its client shows. Every error therefore has

- ``str(error)``: the command-line wording (what the CLI prints, and what ``pytest.raises(match=)``
  sees), kept identical to the messages of earlier versions;
- :meth:`FusionINNError.message` ``(front_end)``: the wording for ``"cli"`` or ``"gui"`` (a GUI
  message never names a command-line flag) — or for a custom mapping of option names to labels;
- plain fields (:meth:`FusionINNError.to_dict`) so that a worker can send the error over a pipe and
  the receiving front end words it (:func:`error_from_dict`).

Each class also derives from the built-in exception the earlier code raised (``ValueError`` ...),
so existing ``except`` clauses keep working.

Option names in the fields are the *request field names* of :mod:`FusionINNLib.jobs` (``std1``,
``samples``, ``model``, ``allow_model_mismatch`` ...). :data:`CLI_OPTION_NAMES` and
:data:`GUI_OPTION_NAMES` say how each front end calls them.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

FrontEnd = Union[str, Mapping[str, str]]

# request field -> how the command line spells it
CLI_OPTION_NAMES: Dict[str, str] = {
    "model": "--model",
    "allow_model_mismatch": "--ignore-model-mismatch",
    "samples": "--samples",
    "latent": "--latent",
    "std1": "--std1",
    "std2": "--std2",
    "jacobian1": "--jacobian1",
    "jacobian2": "--jacobian2",
    "point_ijk": "--point i,j,k",
    "spacing": "--spacing",
    "approximate": "--approximate",
    "pattern1": "--pattern1",
    "pattern2": "--pattern2",
    "device": "--device",
    "lr": "--learning-rate",
    "grad_clip": "--grad-clip",
}
# request field -> what the Slicer module calls the control (never a flag)
GUI_OPTION_NAMES: Dict[str, str] = {
    "model": "the same model (Model section)",
    "allow_model_mismatch": "'Allow another model'",
    "samples": "Samples",
    "latent": "'Use kept latent'",
    "std1": "the standard-deviation output 1",
    "std2": "the standard-deviation output 2",
    "jacobian1": "Jacobian output 1",
    "jacobian2": "Jacobian output 2",
    "point_ijk": "a point (place the crosshair)",
    "spacing": "a lattice spacing",
    "approximate": "'Approximate'",
    "pattern1": "file pattern 1",
    "pattern2": "file pattern 2",
    "device": "Device",
    "lr": "'Learning rate'",
    "grad_clip": "'Gradient clipping'",
}


def _names(front_end: FrontEnd) -> Mapping[str, str]:
    if isinstance(front_end, Mapping):
        return front_end
    if front_end == "cli":
        return CLI_OPTION_NAMES
    if front_end == "gui":
        return GUI_OPTION_NAMES
    raise ValueError(f"unknown front end {front_end!r}; use 'cli', 'gui' or a mapping of option names")


class VolumeError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


class UsageError(ValueError):
    """Options that do not go together (the command line exits with 2, as for argparse's errors)."""


class FusionINNError(Exception):
    """Base of the typed errors: fields + per-front-end wording (see the module docstring)."""

    KIND = "error"
    FIELDS: Tuple[str, ...] = ()

    def __init__(self, **fields: Any):
        for name in self.FIELDS:
            setattr(self, name, fields.get(name))
        super().__init__(self.message("cli"))

    def message(self, front_end: FrontEnd = "cli") -> str:  # pragma: no cover - every subclass words itself
        raise NotImplementedError

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.KIND, **{name: getattr(self, name) for name in self.FIELDS}}


def _label(front_end: FrontEnd, option: str) -> str:
    names = _names(front_end)
    return names.get(option, option if front_end != "cli" else "--" + option.replace("_", "-"))


class ModelMismatchError(FusionINNError, ValueError):
    """A fused image made with one model is decomposed with another (or another architecture)."""

    KIND = "model_mismatch"
    FIELDS = ("recorded_sha256", "recorded_path", "used_sha256", "used_path", "same_architecture")

    def describe(self) -> str:
        return (f"the fused volume was made with model {(self.recorded_sha256 or '')[:12] or '(unsaved)'} "
                f"({self.recorded_path or '?'}) but decomposition uses "
                f"{(self.used_sha256 or '')[:12] or '(unsaved)'} ({self.used_path})"
                + ("" if self.same_architecture else ", a different architecture"))

    def message(self, front_end: FrontEnd = "cli") -> str:
        if front_end == "cli":
            return self.describe() + "; pass the same --model (or --ignore-model-mismatch)"
        return self.describe() + f"; choose {_label(front_end, 'model')} that made it"


class LatentMismatchError(FusionINNError, VolumeError):
    """A kept latent that does not belong to the fused image (fingerprint or grid)."""

    KIND = "latent_mismatch"
    FIELDS = ("path", "reason", "latent_shape", "expected_shape")

    def message(self, front_end: FrontEnd = "cli") -> str:
        if self.reason == "record":  # the fused image's record names another latent (SHA-256)
            head = (f"{self.path}: latent does not belong to this fused volume (the fused image's record names another "
                    "latent: written by another fusion, or changed since)")
            if front_end == "cli":
                return head + "; use the latent written with it, or decompose without a latent (--samples)"
            return head + f"; use the latent kept with it, or untick {_label(front_end, 'latent')} to sample"
        if self.reason == "shape":
            head = (f"{self.path}: latent of shape {tuple(self.latent_shape or ())} does not belong to this fused "
                    f"volume (expected {tuple(self.expected_shape or ())})")
            return head + "; use the latent written with it"
        head = (f"{self.path}: latent does not belong to this fused volume (it was written with a different fused "
                "image, or the fused image was changed since)")
        if front_end == "cli":
            return head + "; use the latent written with it, or decompose without a latent (--samples)"
        return head + f"; use the latent kept with it, or untick {_label(front_end, 'latent')} to sample"


class OptionError(FusionINNError, UsageError):
    """Request options that do not go together (``rule``: ``both``, ``one_of``, ``needs``, ``excludes``,
    ``at_least``); ``options`` are request field names."""

    KIND = "option"
    FIELDS = ("rule", "options", "value")

    def message(self, front_end: FrontEnd = "cli") -> str:
        names = [_label(front_end, o) for o in (self.options or ())]
        if self.rule == "both":
            return f"give both {names[0]} and {names[1]}, or neither"
        if self.rule == "one_of":
            return f"give either {names[0]} or {names[1]}, not both"
        if self.rule == "differ":
            return f"{names[0]} and {names[1]} must differ"
        if self.rule == "excludes":  # options[0] (set) takes no options[1]
            what = "an exact decomposition" if self.options[0] == "latent" else "this"
            return f"{what} ({names[0]}) takes no {names[1]}"
        if self.rule == "at_least":  # options[0] needs options[1] >= value
            if self.options[0].startswith("std"):
                return f"standard-deviation maps need {names[1]} {self.value} or more"
            return f"{names[0]} needs {names[1]} {self.value} or more"
        if self.rule == "needs":
            if self.options[0].startswith("jacobian"):
                return f"Jacobian images need {names[1]}"
            return f"{names[0]} needs {names[1]}"
        return f"invalid combination of {', '.join(names)}"


class DeviceUnavailableError(FusionINNError, ValueError):
    """The requested compute device does not exist on this machine."""

    KIND = "device_unavailable"
    FIELDS = ("device",)

    def message(self, front_end: FrontEnd = "cli") -> str:
        what = {"cuda": "device 'cuda' requested but no CUDA GPU is available",
                "mps": "device 'mps' requested but Apple MPS is not available"}.get(
            str(self.device), f"device {self.device!r} is not available")
        if front_end == "cli":
            return what + " (use --device cpu or auto)"
        return what + f" (choose cpu or auto as {_label(front_end, 'device')})"


class OutOfMemoryError(FusionINNError, RuntimeError):
    """The device ran out of memory even one slice at a time."""

    KIND = "out_of_memory"
    FIELDS = ("device",)

    def message(self, front_end: FrontEnd = "cli") -> str:
        head = f"out of memory on {self.device} even with batch size 1"
        if front_end == "cli":
            return head + "; use --device cpu"
        return head + f"; choose cpu as {_label(front_end, 'device')}"


class ModelNotFoundError(FusionINNError, FileNotFoundError):
    """No model file was chosen and the bundled default model is not installed."""

    KIND = "model_not_found"
    FIELDS = ("path",)

    def message(self, front_end: FrontEnd = "cli") -> str:
        if front_end == "cli":
            return f"{self.path}: bundled default model not found and no --model given"
        return f"{self.path}: the bundled default model is not installed; choose a model file"


class TrainingDivergedError(FusionINNError, RuntimeError):
    """A training run whose weights or losses became NaN/Inf (``detail`` says where)."""

    KIND = "training_diverged"
    FIELDS = ("detail",)

    def message(self, front_end: FrontEnd = "cli") -> str:
        return (f"{self.detail}; the training diverged (try a lower {_label(front_end, 'lr')} or set "
                f"{_label(front_end, 'grad_clip')}, or resume from the last good checkpoint)")


ERROR_CLASSES = {cls.KIND: cls for cls in (ModelMismatchError, LatentMismatchError, OptionError,
                                           DeviceUnavailableError, OutOfMemoryError, ModelNotFoundError,
                                           TrainingDivergedError)}


def user_message(error: BaseException, front_end: FrontEnd = "cli") -> str:
    """One line for a person: the typed wording for ``front_end``, else the exception's text."""
    if isinstance(error, FusionINNError):
        text = error.message(front_end)
    else:
        text = str(error)
    return " ".join(text.split()) or type(error).__name__


def error_from_dict(data: Mapping[str, Any]) -> Optional[FusionINNError]:
    """Rebuild a typed error sent as :meth:`FusionINNError.to_dict` (None for an unknown kind)."""
    cls = ERROR_CLASSES.get(str(data.get("kind")))
    if cls is None:
        return None
    return cls(**{name: data.get(name) for name in cls.FIELDS})


__all__ = ["FusionINNError", "ModelMismatchError", "LatentMismatchError", "OptionError", "DeviceUnavailableError",
           "OutOfMemoryError", "ModelNotFoundError", "TrainingDivergedError",
           "CLI_OPTION_NAMES", "GUI_OPTION_NAMES", "user_message", "error_from_dict"]

