#!/usr/bin/env python-real
"""FusionINN Training: a 3D Slicer scripted CLI that trains a FusionINN model on BraTS-style cases.

The parameters are declared once, in ``FusionINNTraining.xml`` next to this file; the argument
parser is built from that description, so Slicer's generated GUI, ``--help`` and what the script
accepts cannot drift apart. Slicer runs this file with its ``python-real`` and builds the command
line from the XML (``Base/QTCLI/vtkSlicerCLIModuleLogic.cxx``)::

    FusionINNTraining.py [--returnparameterfile R.params] [--flag value ...] [--amp] DATA_DIR MODEL.pt

- flagged parameters first, in XML order, then the indexed ones (``dataDirectory``,
  ``outputModel``) in index order;
- a boolean is a bare flag when true and absent when false;
- ``file``/``directory``/``string`` values are passed only when non-empty;
- ``<table>``/``<image>`` outputs are temporary ``.tsv``/``.nrrd`` paths that Slicer loads into
  the chosen nodes afterwards; each table gets a ``.schema.tsv`` sidecar so its numbers load as
  numbers;
- the return values (best epoch, best validation loss, mean decomposition SSIM, epochs run,
  skipped case folders) go to the ``--returnparameterfile`` as ``name = value`` lines.

Progress uses Slicer's protocol on stdout (``<filter-start>``, ``<filter-progress>F</filter-progress>``
with F a fraction in [0, 1] and ``<filter-comment>`` with the current step, ``<filter-end>``); the
log lines for people go to stdout too, and only errors to stderr (Slicer reports any stderr
output as an error). Both streams are UTF-8. The same command works outside Slicer with any Python
that has the extension's requirements (see ``docs/training_cli.md``).

Exit codes: 0 success, 1 error (one clear message on stderr), 2 invalid arguments, 130 cancelled.

The training itself is :func:`FusionINNLib.train.training.train`; this file only translates arguments,
reports and writes the return values. ``FusionINNLib`` is found on ``sys.path`` or, as Slicer does
not always put an extension's scripted-module folder on the CLI's path, next to this file
(``../qt-scripted-modules`` in an installed extension or build tree, ``../FusionINN`` in a source
checkout).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import signal
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

MODULE_NAME = "FusionINNTraining"
XML_PATH = Path(__file__).with_name(MODULE_NAME + ".xml")
LIBRARY_PACKAGE = "FusionINNLib"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own code for invalid arguments
EXIT_CANCELLED = 130  # the shell convention for "terminated by Ctrl-C"

# The parameters, their bounds and what 0 means come from the one table of training options,
# FusionINNLib.train.options (the XML is generated from it). Bounds are checked while parsing so that
# a bad value is reported with the parameter's own name; XML <constraints> exist only for bounded
# fractions (they turn Slicer's spin boxes into sliders, which do not suit epoch counts).

SCALAR_TAGS = ("integer", "float", "double", "boolean", "string")
PATH_TAGS = ("file", "directory", "image", "table", "geometry", "transform", "measurement", "pointfile")

# At most this many <filter-progress> lines per run, plus one per PROGRESS_MIN_INTERVAL_S: Slicer
# keeps the whole stdout and strips every tag with one string erase each at the end, which costs
# O(lines x output size), so one line per training step would make long runs slow to finish.
PROGRESS_RESOLUTION = 0.001
PROGRESS_MIN_INTERVAL_S = 10.0


class CLIError(Exception):
    """A problem to report in one clear message (exit code 1)."""


# ------------------------------------------------------------------------------------------------
# The XML description and the argument parser built from it
# ------------------------------------------------------------------------------------------------
@dataclass
class Parameter:
    """One parameter of the XML description, with the fields Slicer uses to build the command line."""

    tag: str
    name: str
    label: str
    description: str
    group: str
    advanced: bool
    longflag: Optional[str] = None
    flag: Optional[str] = None
    index: Optional[int] = None
    default: Optional[str] = None
    channel: Optional[str] = None
    elements: List[str] = field(default_factory=list)
    minimum: Optional[str] = None
    maximum: Optional[str] = None
    file_extensions: List[str] = field(default_factory=list)

    @property
    def is_return_value(self) -> bool:
        """Slicer's rule (``ModuleParameter::IsReturnParameter``): a scalar output without flag or index."""
        return (self.channel == "output" and self.tag in SCALAR_TAGS and self.index is None
                and not self.longflag and not self.flag)

    @property
    def option_strings(self) -> List[str]:
        options = []
        if self.longflag:
            options.append("--" + self.longflag)
        if self.flag:
            options.append("-" + self.flag)
        return options


def _text(element: ET.Element, tag: str) -> Optional[str]:
    child = element.find(tag)
    if child is None:
        return None
    return (child.text or "").strip()


def read_parameters(xml_path: Path = XML_PATH) -> List[Parameter]:
    """Every parameter of the XML description, in document order."""
    try:
        root = ET.parse(str(xml_path)).getroot()
    except FileNotFoundError:
        raise CLIError(f"{xml_path.name} not found next to {Path(__file__).name}; the module is "
                       "incompletely installed") from None
    except ET.ParseError as error:
        raise CLIError(f"{xml_path}: invalid XML ({error})") from None
    parameters = []
    for group in root.findall("parameters"):
        advanced = group.get("advanced", "false").lower() == "true"
        group_label = _text(group, "label") or ""
        for element in group:
            if element.tag in ("label", "description"):
                continue
            index = _text(element, "index")
            constraints = element.find("constraints")
            extensions = element.get("fileExtensions", "")
            parameters.append(Parameter(
                tag=element.tag,
                name=_text(element, "name") or "",
                label=_text(element, "label") or "",
                description=" ".join((_text(element, "description") or "").split()),
                group=group_label,
                advanced=advanced,
                longflag=(_text(element, "longflag") or "").lstrip("-") or None,
                flag=(_text(element, "flag") or "").lstrip("-") or None,
                index=int(index) if index else None,
                default=_text(element, "default"),
                channel=_text(element, "channel"),
                elements=[(e.text or "").strip() for e in element.findall("element")],
                minimum=_text(constraints, "minimum") if constraints is not None else None,
                maximum=_text(constraints, "maximum") if constraints is not None else None,
                file_extensions=[e.strip() for e in extensions.split(",") if e.strip()],
            ))
    return parameters


def _table_bounds() -> Dict[str, Tuple[Optional[float], Optional[float], bool, bool]]:
    """Slicer name → (minimum, maximum, exclusive minimum, 0 = unset) from FusionINNLib.train.options,
    or nothing when the library cannot be found yet (the training then reports that)."""
    try:
        ensure_library_importable()
        from FusionINNLib.train.options import slicer_bounds
    except (CLIError, ImportError):
        return {}
    return slicer_bounds()


def _bounds(parameter: Parameter) -> Tuple[Optional[float], Optional[float]]:
    low, high, _, zero_unset = _table_bounds().get(parameter.name, (None, None, False, False))
    if zero_unset and low is not None and low > 0:
        low = 0  # Slicer passes 0 for "not set"
    if parameter.minimum not in (None, ""):
        low = float(parameter.minimum)
    if parameter.maximum not in (None, ""):
        high = float(parameter.maximum)
    return low, high


def _number_parser(parameter: Parameter) -> Callable[[str], Any]:
    """argparse ``type=`` for an integer/float/double parameter, with its bounds in the message."""
    integer = parameter.tag == "integer"
    low, high = _bounds(parameter)
    _, _, exclusive, zero_unset = _table_bounds().get(parameter.name, (None, None, False, False))
    positive = exclusive and not zero_unset  # > 0, not just >= 0

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise argparse.ArgumentTypeError(f"{parameter.name} must be {kind}, got {text!r}") from None
        if not integer and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{parameter.name} must be a finite number, got {text!r}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"{parameter.name} must be greater than 0, got {text}")
        if (low is not None and value < low) or (high is not None and value > high):
            limits = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"{parameter.name} must be {limits}, got {text}")
        return value

    parse.__name__ = parameter.tag  # argparse names the type in some messages
    return parse


def _default_value(parameter: Parameter) -> Any:
    """The value the script uses when Slicer leaves the parameter off the command line."""
    if parameter.tag in PATH_TAGS:
        return parameter.default or None
    if parameter.tag == "boolean":
        return False  # absent flag = false; a true default could never be switched off by Slicer
    if parameter.default is None:
        return "" if parameter.tag in ("string", "string-enumeration") else None
    if parameter.tag in ("integer", "float", "double"):
        return _number_parser(parameter)(parameter.default)
    if parameter.tag == "float-vector":
        return _vector_parser(parameter)(parameter.default)
    return parameter.default


def _vector_parser(parameter: Parameter) -> Callable[[str], Any]:
    """argparse ``type=`` for a ``float-vector`` (Slicer passes "0.5,0.5"): a list of floats, bounds checked."""
    low, _ = _bounds(parameter)

    def parse(text: str):
        try:
            values = [float(part) for part in str(text).split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{parameter.name} must be numbers separated by commas, got {text!r}") \
                from None
        if not all(math.isfinite(v) for v in values) or (low is not None and min(values) < low):
            raise argparse.ArgumentTypeError(f"{parameter.name} must be finite numbers >= {low:g}, got {text}")
        return values

    parse.__name__ = "float-vector"
    return parse


class _PrintXML(argparse.Action):
    """``--xml``: print the description file byte for byte (Slicer and ctk-cli read it this way)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.flush()
        sys.stdout.buffer.write(XML_PATH.read_bytes())
        sys.stdout.buffer.flush()
        parser.exit(EXIT_OK)


def build_parser(parameters: Optional[Sequence[Parameter]] = None, xml_path: Path = XML_PATH
                 ) -> argparse.ArgumentParser:
    """The command-line parser, one argument per XML parameter (return values excluded)."""
    if parameters is None:
        parameters = read_parameters(xml_path)
    root = ET.parse(str(xml_path)).getroot()
    parser = argparse.ArgumentParser(
        prog=Path(__file__).name,
        description=f"{_text(root, 'title')}: {' '.join((_text(root, 'description') or '').split())}",
        epilog="Documentation: " + (_text(root, "documentation-url") or ""),
    )
    parser.add_argument("--xml", action=_PrintXML, help="print the Slicer module description (XML) and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_text(root, 'version')}")
    parser.add_argument("--returnparameterfile", dest="returnParameterFile", metavar="FILE", default=None,
                        help="write the return values (name = value lines) to FILE (Slicer sets this)")
    groups: Dict[str, argparse._ArgumentGroup] = {}
    indexed = sorted((p for p in parameters if p.index is not None), key=lambda p: p.index)
    for parameter in [p for p in parameters if p.index is None and not p.is_return_value] + indexed:
        title = parameter.group + (" (advanced)" if parameter.advanced else "")
        group = groups.setdefault(title, parser.add_argument_group(title))
        help_text = f"{parameter.label}. {parameter.description}".replace("%", "%%")  # argparse formats help
        if parameter.index is not None:
            group.add_argument(parameter.name, metavar=parameter.name, help=help_text)
            continue
        if not parameter.option_strings:
            raise CLIError(f"{xml_path.name}: parameter {parameter.name} has neither flag, longflag nor index")
        options: Dict[str, Any] = {"dest": parameter.name, "default": _default_value(parameter)}
        if parameter.tag == "boolean":
            options["action"] = "store_true"
        elif parameter.tag in ("integer", "float", "double"):
            options["type"] = _number_parser(parameter)
            options["metavar"] = parameter.tag.upper()
        elif parameter.tag == "float-vector":
            options["type"] = _vector_parser(parameter)
            options["metavar"] = "X,Y"
        elif parameter.tag.endswith("-enumeration"):
            options["choices"] = parameter.elements
        else:
            options["metavar"] = "PATH" if parameter.tag in PATH_TAGS else "TEXT"
        if parameter.tag != "boolean" and options["default"] not in (None, ""):
            help_text += " (default: %(default)s)"
        group.add_argument(*parameter.option_strings, help=help_text, **options)
    return parser


# ------------------------------------------------------------------------------------------------
# Finding FusionINNLib
# ------------------------------------------------------------------------------------------------
def library_search_paths(script: Optional[Path] = None) -> List[Path]:
    """Folders that may hold ``FusionINNLib`` relative to this script, most specific first.

    ``lib/Slicer-X.Y/cli-modules/<this>`` → ``lib/Slicer-X.Y/qt-scripted-modules`` (installed
    extension and build tree: SlicerMacroBuildScriptedCLI and slicerMacroBuildScriptedModule put
    the two folders side by side), ``lib/Slicer-X.Y/cli-modules/<CONFIG>/<this>`` → the same
    ``qt-scripted-modules`` (multi-config build trees); ``<repo>/FusionINNTraining/<this>`` → ``<repo>/FusionINN``
    (source checkout). Both the path as given and with symbolic links resolved are tried.
    """
    script = Path(script if script is not None else __file__)
    folders = []
    for location in (script.absolute(), script.resolve()):
        candidates = [location.parent.parent / "qt-scripted-modules", location.parent.parent / "FusionINN"]
        if location.parent.parent.name == "cli-modules":
            # Multi-config build trees (Visual Studio, Xcode): SlicerMacroBuildScriptedCLI copies the
            # script to cli-modules/<CONFIG>/, while scripted modules stay in qt-scripted-modules/.
            candidates.insert(0, location.parent.parent.parent / "qt-scripted-modules")
        for candidate in candidates:
            if candidate not in folders:
                folders.append(candidate)
    return folders


def ensure_library_importable(script: Optional[Path] = None) -> Optional[Path]:
    """Make ``import FusionINNLib`` work; returns the folder added to ``sys.path`` (None if not needed)."""
    if importlib.util.find_spec(LIBRARY_PACKAGE) is not None:
        return None
    searched = library_search_paths(script)
    for folder in searched:
        if (folder / LIBRARY_PACKAGE / "__init__.py").is_file() or (folder / LIBRARY_PACKAGE).is_dir():
            sys.path.insert(0, str(folder))
            importlib.invalidate_caches()
            return folder
    raise CLIError(f"the {LIBRARY_PACKAGE} package was not found on the Python path nor in "
                   f"{', '.join(str(f) for f in searched)}; install the FusionINN extension, or run this "
                   "script from a source checkout")


def _import_training():
    """The training module, or a clear message naming the missing package (usually PyTorch)."""
    try:
        from FusionINNLib.train import training
    except ModuleNotFoundError as error:
        raise CLIError(f"the Python package '{error.name}' is missing in {sys.executable}; in Slicer, open the "
                       "FusionINN module once (it installs PyTorch through the PyTorch extension and the other "
                       "requirements), otherwise pip install the requirements listed in docs/training_cli.md") \
            from None
    return training


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------
class Reporter:
    """Slicer's progress protocol and the human-readable log lines on ``stdout``; only errors on ``stderr``.

    Slicer's CLI logic reports everything a CLI writes to stderr as an error, whatever the exit
    code (``vtkSlicerCLIModuleLogic``), so progress notes must not go there.
    """

    def __init__(self, stdout: TextIO, stderr: TextIO, clock: Callable[[], float] = time.monotonic):
        self.stdout = stdout
        self.stderr = stderr
        self.clock = clock
        self.started = clock()
        self.last_fraction = -1.0
        self.last_time = -math.inf

    @staticmethod
    def _tag_text(message: str) -> str:
        # Slicer finds tags with "<tag>[^<]*</tag>": no '<' inside, and keep it on one short line.
        return " ".join(message.replace("<", "(").replace(">", ")").split())[:200]

    def _emit(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def start(self, comment: str) -> None:
        self._emit(f"<filter-start>\n<filter-name>{MODULE_NAME}</filter-name>\n"
                   f"<filter-comment>{self._tag_text(comment)}</filter-comment>\n</filter-start>")
        self.progress(0.0, comment, force=True)

    def progress(self, fraction: float, message: str = "", force: bool = False) -> None:
        """Report ``fraction`` of the whole run (clamped to [0, 1], never decreasing)."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = self.clock()
        due = (fraction >= self.last_fraction + PROGRESS_RESOLUTION
               or now - self.last_time >= PROGRESS_MIN_INTERVAL_S)
        if not (force or due) or fraction < self.last_fraction:
            return
        self.last_fraction, self.last_time = fraction, now
        text = f"<filter-progress>{fraction:.4f}</filter-progress>"
        if message:
            text += f"\n<filter-comment>{self._tag_text(message)}</filter-comment>"
        self._emit(text)

    def end(self) -> None:
        self.progress(1.0, "done", force=True)
        self._emit(f"<filter-end>\n<filter-name>{MODULE_NAME}</filter-name>\n"
                   f"<filter-time>{self.clock() - self.started:.1f}</filter-time>\n</filter-end>")

    def log(self, message: str) -> None:
        self._write(self.stdout, message)

    def error(self, message: str) -> None:
        self._write(self.stderr, message)

    @staticmethod
    def _write(stream: TextIO, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        for line in str(message).splitlines() or [""]:
            stream.write(f"{stamp} {line}\n")
        stream.flush()


class CancelFlag:
    """Set by SIGTERM; polled by the training loop, which then stops cleanly after the current step
    (last.pt keeps the last finished epoch). A second SIGTERM stops at once, e.g. while the slices of
    a large data set are being cached, when no step runs to notice the first.

    This serves ``kill``/Ctrl-C in a terminal and ``torchrun``. Slicer's Cancel does not send SIGTERM:
    ``vtkSlicerCLIModuleLogic`` calls ``itksysProcess_Kill``, which is SIGKILL on POSIX (and
    TerminateProcess on Windows), so no handler runs. What such a run leaves: ``last.pt`` of the last
    finished epoch (written atomically after every epoch, so never half-written), the history up to
    that epoch and ``split.json``; no output model unless an earlier epoch wrote ``best.pt``'s copy.
    Resume it with ``--resume RUN_DIR/last.pt`` (the FusionINN module offers this when Train is
    pressed again for the same output model)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            signal.signal(signal.SIGTERM, handler)
        except (ValueError, OSError):  # not the main thread, or a platform without SIGTERM handlers
            pass


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_discovery():
    """Silence the discovery's "skipped N case folder(s)" warning for the script's own look-ups:
    the training discovers the cases again and reports every skipped folder with its reason."""
    library_logger = logging.getLogger("FusionINNLib.io.brats")
    level = library_logger.level
    library_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        library_logger.setLevel(level)


def check_data_directory(path: str, modalities: Tuple[str, str]):
    """Fail fast, with the folder in the message, before PyTorch is loaded: missing, not a folder,
    empty, or no usable case. Returns the discovery (usable cases and skipped folders)."""
    from FusionINNLib.io.brats import discover_cases

    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"data directory not found: {folder}")
    if not folder.is_dir():
        raise CLIError(f"data directory {folder} is a file; give the folder that holds one sub-folder per case")
    try:
        entries = [entry for entry in os.listdir(folder) if not entry.startswith(".")]
    except OSError as error:
        raise CLIError(f"cannot read the data directory {folder}: {error.strerror or error}") from None
    if not entries:
        raise CLIError(f"data directory {folder} is empty: expected one sub-folder per case, e.g. "
                       f"BraTS2021_00000/BraTS2021_00000_{modalities[0]}.nii.gz and "
                       f"BraTS2021_00000_{modalities[1]}.nii.gz")
    with _quiet_discovery():
        return discover_cases(folder, modalities)


def training_config(args: argparse.Namespace, training) -> Any:
    """The :class:`TrainingConfig` for the parsed arguments, through the one option table
    (:func:`FusionINNLib.train.options.config_from_slicer`: 0 → unset where the table says so)."""
    from FusionINNLib.train.options import config_from_slicer

    values = config_from_slicer(vars(args))
    values["data_dir"] = str(Path(values["data_dir"]).expanduser())
    values["output"] = str(Path(values["output"]).expanduser())
    return training.TrainingConfig(**values)


def write_preview(model_path: Path, data_dir: str, output: str, device: str, log: Callable[[str], None]) -> str:
    """Fuse one validation case with the trained model into ``output`` (with the fusion record):
    the training job's preview (:func:`FusionINNLib.jobs.folders.write_preview`), a fuse job."""
    from FusionINNLib.jobs.folders import write_preview as preview

    return preview(model_path, data_dir, output, device, log)


def format_return_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.8g}"
    return str(value)


def write_return_parameters(path: str, values: Dict[str, Any]) -> None:
    """``name = value`` lines (Slicer's ``ModuleDescription::ReadParameterFile``), written atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{name} = {format_return_value(value)}\n" for name, value in values.items())
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def run(args: argparse.Namespace, reporter: Reporter, cancel: Callable[[], bool]) -> Dict[str, Any]:
    """Check the data, run the training job (training + preview); returns the return values."""
    modalities = (args.modality1, args.modality2)
    if modalities[0] == modalities[1]:
        raise CLIError(f"modality 1 and modality 2 are both {modalities[0]!r}; choose two different modalities")
    reporter.start(f"Training FusionINN on {args.dataDir}")
    discovery = check_data_directory(args.dataDir, modalities)
    reporter.log(f"{len(discovery.cases)} usable case(s) with {' + '.join(modalities)} under {discovery.root}"
                 + (f"; {len(discovery.skipped)} case folder(s) skipped (listed below)" if discovery.skipped else ""))

    training = _import_training()  # PyTorch is loaded only now, after the quick checks
    from FusionINNLib.core.process import allow_process_tuning

    allow_process_tuning()  # this CLI owns its process (the library never tunes Slicer's)
    config = training_config(args, training)
    from FusionINNLib.jobs import TrainRequest, run_train

    request = TrainRequest(config.to_dict(), preview_output=args.previewVolume or None)
    result = run_train(request, cancel=cancel, log=reporter.log,
                       status=lambda fraction, message: reporter.progress(fraction, message))
    if args.previewVolume:
        reporter.log(f"preview: case {result.preview_case} fused with the new model -> {args.previewVolume}")
    values = {
        "bestEpoch": int(result.best_epoch),
        "bestValidationLoss": float(result.best_val_loss),
        "meanDecompositionSSIM": float(result.mean_decomposition_ssim),
        "epochsRun": int(result.epochs_run),
        "skippedCases": len(discovery.skipped),
    }
    reporter.log(f"model: {result.model_path}; history: {result.history_path}; metrics: {result.metrics_path}; "
                 f"run folder: {result.run_dir}")
    reporter.log("results: " + ", ".join(f"{k} = {format_return_value(v)}" for k, v in values.items()))
    return values


def utf8_streams() -> None:
    """Write stdout/stderr as UTF-8 (unencodable text escaped, never an exception).

    On Windows a CLI's stdout is a pipe that Python encodes with the ANSI code page (cp1252 in
    western Europe): a data path with characters outside it made every print raise
    UnicodeEncodeError. Slicer keeps a CLI's output as bytes and shows it as UTF-8.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(encoding="utf-8", errors="backslashreplace")
            except (ValueError, OSError):  # pragma: no cover - a stream that cannot change any more
                pass


def _worded(error: BaseException) -> str:
    """The error for a Slicer user: typed library errors worded for the GUI (parameter labels,
    never ``fusioninn`` flags), others as their text."""
    try:
        from FusionINNLib.core.errors import FusionINNError
    except ImportError:
        return str(error) or type(error).__name__
    if isinstance(error, FusionINNError):
        return error.message("gui")
    return str(error) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    utf8_streams()
    # Library warnings are notes, not errors: stdout (Slicer reports stderr as errors).
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    reporter = Reporter(sys.stdout, sys.stderr)
    try:
        parser = build_parser()
    except CLIError as error:
        reporter.error(f"{MODULE_NAME}: error: {error}")
        return EXIT_ERROR
    args = parser.parse_args(argv)  # exits with EXIT_USAGE and a message on invalid arguments
    # From here on only the reporter's errors reach stderr: Python warnings and the notes libraries
    # print to sys.stderr are not errors, and Slicer would report them as such.
    saved_stderr, sys.stderr = sys.stderr, sys.stdout
    try:
        return _main(args, reporter)
    finally:
        sys.stderr = saved_stderr


def _main(args: argparse.Namespace, reporter: Reporter) -> int:
    cancel = CancelFlag()
    cancel.install()
    try:
        ensure_library_importable()
        values = run(args, reporter, cancel)
        if args.returnParameterFile:
            write_return_parameters(args.returnParameterFile, values)
        reporter.end()
        return EXIT_OK
    except KeyboardInterrupt:
        reporter.error(f"{MODULE_NAME}: cancelled; an interrupted run can be resumed from last.pt in its run folder")
        return EXIT_CANCELLED
    except Exception as error:  # noqa: BLE001 - every failure ends in one readable message and an exit code
        if type(error).__name__ == "Cancelled" and type(error).__module__.startswith(LIBRARY_PACKAGE):
            # FusionINNLib.core.engine.Cancelled: the training saw the SIGTERM flag
            reporter.error(f"{MODULE_NAME}: {error}")
            return EXIT_CANCELLED
        expected = isinstance(error, (CLIError, ValueError, OSError))
        if not expected:  # a bug rather than bad input: keep the trace for the report
            reporter.error("".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip())
        message = _worded(error)
        if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
            message = f"{error.filename}: {message}"
        reporter.error(f"{MODULE_NAME}: error: {message}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
