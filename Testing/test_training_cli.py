"""The FusionINNTraining scripted CLI, checked the way 3D Slicer uses it, without Slicer.

* The XML description is parsed by ctk-cli (an independent parser of Slicer's CLI schema) without
  a single warning, and follows the rules Slicer's own parser enforces (identifiers, channels,
  contiguous indices, return values that are scalars).
* The script's argument parser accepts exactly what the XML declares: same names, option
  strings, types, choices, bounds and defaults; booleans are bare flags.
* ``--xml`` prints the file byte for byte; ``FusionINNLib`` is found next to the script when it
  is not on ``sys.path`` (installed-extension layout).
* A command line built from the ctk-cli description the way ``vtkSlicerCLIModuleLogic`` builds it
  (``--returnparameterfile`` first, then flagged parameters in XML order with booleans bare when
  true and absent when false, empty strings/paths left out, temporary ``.tsv``/``.nrrd`` paths for
  node outputs, then the indexed arguments in index order) trains for one epoch on phantom cases;
  the tables (with ``.schema.tsv`` types), the model, the preview volume, the return-parameter
  file and the progress protocol are checked.
* Bad data directories end with exit code 1 and one clear message, before PyTorch is loaded.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

import ctk_cli  # the independent parser of Slicer's CLI schema (test requirement in pyproject.toml)
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CLI_DIR = REPO / "FusionINNTraining"
SCRIPT = CLI_DIR / "FusionINNTraining.py"
XML_FILE = CLI_DIR / "FusionINNTraining.xml"
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# vtkSlicerCLIModuleLogic: node-backed types become temporary files with these default extensions
# (the first entry of fileExtensions overrides them). ctk-cli's own table default (.ctbl) differs.
SLICER_TEMPORARY_EXTENSIONS = {"image": ".nrrd", "table": ".tsv", "geometry": ".vtp", "transform": ".h5",
                               "measurement": ".csv", "pointfile": ".fcsv"}
# Types Slicer passes only when their value is not empty.
PASSED_WHEN_NOT_EMPTY = ("file", "directory", "string", "integer-vector", "float-vector", "double-vector",
                         "string-vector")
# The tags Slicer removes from the displayed output, in its order (RemoveProgressInfoFromProcessOutput).
SLICER_STRIPPED_TAGS = ("filter-progress", "filter-stage-progress", "filter-name", "filter-comment",
                        "filter-time", "filter-start", "filter-end")


# -- helpers ----------------------------------------------------------------------------------
def load_script_module():
    spec = importlib.util.spec_from_file_location("FusionINNTraining_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def parse_xml_with_ctk_cli() -> Tuple[object, List[logging.LogRecord]]:
    """The ctk-cli description and every warning ctk-cli logged while parsing it."""
    records: List[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("ctk_cli")
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        module = ctk_cli.CLIModule(str(XML_FILE))
    finally:
        logger.removeHandler(handler)
    return module, records


def is_return_parameter(parameter) -> bool:
    """Slicer's ModuleParameter::IsReturnParameter: scalar output without flag, longflag or index."""
    return (parameter.channel == "output" and not parameter.isExternalType() and parameter.index is None
            and not parameter.flag and not parameter.longflag)


def temporary_extension(parameter) -> str:
    return parameter.fileExtensions[0] if parameter.fileExtensions else SLICER_TEMPORARY_EXTENSIONS[parameter.typ]


def slicer_command_line(module, values: Dict[str, object], output_nodes: List[str], temporary: Path
                        ) -> Tuple[List[str], Dict[str, Path]]:
    """The arguments vtkSlicerCLIModuleLogic::ApplyTask passes to a command-line CLI.

    ``values`` holds what the user set (others keep the XML default); ``output_nodes`` names the
    node-backed outputs that have a node selected. Returns the arguments and the temporary file
    of each node-backed parameter.
    """
    arguments: List[str] = []
    files: Dict[str, Path] = {}
    if any(is_return_parameter(p) for p in module.parameters()):
        arguments += ["--returnparameterfile", str(temporary / f"{os.getpid()}_Abc123XyZ0.params")]
    for parameter in module.parameters():  # groups, then parameters, in document order
        if parameter.index is not None or is_return_parameter(parameter):
            continue
        flag = parameter.longflag or parameter.flag  # ctk-cli has already prefixed '--' / '-'
        if parameter.typ in SLICER_TEMPORARY_EXTENSIONS:
            if parameter.name in output_nodes:
                path = temporary / f"{os.getpid()}_{parameter.name}{temporary_extension(parameter)}"
                files[parameter.name] = path
                arguments += [flag, str(path)]
            continue
        value = values.get(parameter.name, parameter.default)
        if parameter.typ == "boolean":
            if value:
                arguments.append(flag)  # bare when true, absent when false
            continue
        if parameter.typ.endswith("-vector") and isinstance(value, (list, tuple)):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)  # Slicer keeps the text
        if parameter.typ in PASSED_WHEN_NOT_EMPTY:
            if value not in (None, ""):
                arguments += [flag, str(value)]
            continue
        arguments += [flag, str(value)]
    for parameter in sorted((p for p in module.parameters() if p.index is not None), key=lambda p: p.index):
        assert parameter.typ not in SLICER_TEMPORARY_EXTENSIONS, "node-backed indexed parameters not covered here"
        arguments.append(str(values[parameter.name]))
    return arguments, files


def read_typed_table(path: Path) -> Tuple[List[str], List[Dict[str, object]]]:
    """Rows of a TSV converted with its .schema.tsv (the sidecar Slicer reads for column types)."""
    schema_file = path.with_name(path.name[: -len(".tsv")] + ".schema.tsv")
    assert schema_file.is_file(), f"no schema sidecar next to {path.name}"
    schema_lines = schema_file.read_text(encoding="utf-8").splitlines()
    assert schema_lines[0].split("\t")[:2] == ["columnName", "type"]
    types = dict(line.split("\t")[:2] for line in schema_lines[1:])
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    assert header == list(types), "schema columns differ from the table's columns"
    assert set(types.values()) <= {"int", "double", "string"}
    convert = {"int": int, "double": float, "string": str}
    rows = []
    for line in lines[1:]:
        cells = line.split("\t")
        assert len(cells) == len(header)
        rows.append({name: convert[types[name]](cell) for name, cell in zip(header, cells)})
    return header, rows


def strip_like_slicer(stdout: str) -> str:
    for tag in SLICER_STRIPPED_TAGS:
        stdout = re.sub(rf"<{tag}>[^<]*</{tag}>[ \t\n\r]*", "", stdout)
    return stdout


def run_script(arguments: List[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True,
                          timeout=300, **kwargs)


# -- the XML ----------------------------------------------------------------------------------
def test_xml_parses_with_ctk_cli_without_warnings():
    module, warnings = parse_xml_with_ctk_cli()
    # ctk-cli's element-level check does not know Slicer's return values (scalar outputs without
    # flag or index, passed through --returnparameterfile): that one warning is expected for them.
    returns = {p.name for p in module.parameters() if is_return_parameter(p)}
    expected = {f"Parameter {name} cannot be passed (missing one of flag, longflag, or index)!" for name in returns}
    messages = [record.getMessage() for record in warnings]
    assert len(returns) == 5 and set(messages) == expected and len(messages) == len(expected), messages
    assert module.name == "FusionINNTraining" == SCRIPT.stem
    assert module.title and module.description and module.version and module.category
    assert [group.advanced for group in module].count(True) >= 1
    assert sum(1 for group in module if not group.advanced) >= 2
    names = [p.name for p in module.parameters()]
    expected = {"dataDir", "modality1", "modality2", "labels", "maxCases", "validationFraction", "seed",
                "blocks", "alpha", "lambdaSsim", "prior", "epochs", "batchSize", "learningRate", "patience",
                "device", "amp", "resume", "cropSize", "output", "historyTable", "metricsTable",
                "previewVolume", "bestEpoch", "bestValidationLoss", "meanDecompositionSSIM"}
    assert expected <= set(names)


def test_names_and_flags_follow_slicers_rules():
    """ModuleDescriptionParser: <name> and <longflag> (dashes stripped) are C identifiers, <flag>
    is one character; names are unique; indices run 0..n-1; each parameter can be passed."""
    root = ET.parse(XML_FILE).getroot()
    parameters = [element for group in root.findall("parameters") for element in group
                  if element.tag not in ("label", "description")]
    names, longflags, indices = [], [], []
    for element in parameters:
        name = element.findtext("name")
        assert name and IDENTIFIER.match(name), f"<name> {name!r} is not an identifier"
        names.append(name)
        longflag = element.findtext("longflag")
        if longflag is not None:
            assert IDENTIFIER.match(longflag.lstrip("-")), f"<longflag> {longflag!r} is not an identifier"
            longflags.append(longflag.lstrip("-"))
        flag = element.findtext("flag")
        if flag is not None:
            assert len(flag.lstrip("-")) == 1
        if element.findtext("index") is not None:
            indices.append(int(element.findtext("index")))
        assert element.findtext("label") and element.findtext("description"), f"{name}: label/description missing"
    assert len(names) == len(set(names)) and len(longflags) == len(set(longflags))
    assert sorted(indices) == list(range(len(indices)))


def test_every_path_parameter_has_a_channel_and_return_values_are_scalars():
    module, _ = parse_xml_with_ctk_cli()
    for parameter in module.parameters():
        if parameter.typ in ("image", "table", "file", "directory", "geometry", "transform", "measurement",
                             "pointfile"):
            assert parameter.channel in ("input", "output"), f"{parameter.name} has no channel"
        if parameter.typ == "table":
            assert parameter.fileExtensions == [".tsv"], "tables must reach the CLI as .tsv"
        if parameter.typ == "image":
            assert parameter.subtype == "scalar" and parameter.fileExtensions == [".nrrd"]
        if parameter.typ == "boolean":
            # Slicer omits a false boolean, so a true default could never be switched off.
            assert parameter.default is False, f"{parameter.name}: a boolean must default to false"
        has_route = parameter.index is not None or parameter.flag or parameter.longflag
        assert has_route or is_return_parameter(parameter), f"{parameter.name} cannot be passed"
    _, _, outputs = module.classifyParameters()
    assert [p.name for p in outputs] == ["bestEpoch", "bestValidationLoss", "meanDecompositionSSIM", "epochsRun",
                                         "skippedCases"]
    assert {p.typ for p in outputs} <= {"integer", "float", "double", "string", "boolean"}


def test_choices_agree_with_the_core():
    from FusionINNLib.core.engine import DEVICES
    from FusionINNLib.core.losses import LATENT_LOSSES, PRIORS
    from FusionINNLib.core.normalization import MODES
    from FusionINNLib.io.brats import MODALITY_ALIASES
    from FusionINNLib.train.training import DEFAULT_LABELS, TrainingConfig

    module, _ = parse_xml_with_ctk_cli()
    parameters = {p.name: p for p in module.parameters()}
    assert tuple(parameters["prior"].elements) == PRIORS
    assert tuple(parameters["device"].elements) == DEVICES
    assert tuple(parameters["normalization"].elements) == MODES
    assert tuple(parameters["latentLoss"].elements) == LATENT_LOSSES
    modalities = [m for m in MODALITY_ALIASES if m != "seg"]
    assert sorted(parameters["modality1"].elements) == sorted(modalities) == sorted(parameters["modality2"].elements)
    # The XML defaults are the library's (the paper's) defaults.
    defaults = TrainingConfig(data_dir="d", output="m.pt")
    assert (parameters["modality1"].default, parameters["modality2"].default) == defaults.modalities
    assert parameters["labels"].default == DEFAULT_LABELS == defaults.labels
    pairs = {"epochs": "epochs", "batchSize": "batch_size", "learningRate": "lr", "alpha": "alpha",
             "lambdaSsim": "lam", "blocks": "blocks", "prior": "prior", "latentLoss": "latent_loss",
             "validationFraction": "val_fraction", "seed": "seed", "device": "device", "amp": "amp",
             "patience": "patience", "normalization": "normalization"}
    for name, attribute in pairs.items():
        assert parameters[name].default == getattr(defaults, attribute), f"{name} default differs from the library"


# -- the script's parser against the XML -------------------------------------------------------
@pytest.fixture(scope="module")
def script_module():
    return load_script_module()


@pytest.fixture(scope="module")
def parser(script_module):
    return script_module.build_parser()


def _action(parser: argparse.ArgumentParser, option: str) -> argparse.Action:
    matches = [a for a in parser._actions if option in a.option_strings]
    assert len(matches) == 1, f"{option} is not an option of the script"
    return matches[0]


def _parses(parser: argparse.ArgumentParser, arguments: List[str]):
    try:
        return parser.parse_args(arguments)
    except SystemExit:
        return None


def test_parser_has_exactly_the_xml_parameters(parser):
    module, _ = parse_xml_with_ctk_cli()
    arguments, options, outputs = module.classifyParameters()
    script_options = {s for a in parser._actions for s in a.option_strings}
    xml_options = {p.longflag for p in options} | {p.flag for p in options if p.flag}
    builtin = {"-h", "--help", "--xml", "--version", "--returnparameterfile"}
    assert script_options - builtin == xml_options
    positionals = [a.dest for a in parser._actions if not a.option_strings]
    assert positionals == [p.name for p in arguments]
    for parameter in options:
        assert _action(parser, parameter.longflag).dest == parameter.name


def test_defaults_and_types_match_the_xml(parser):
    module, _ = parse_xml_with_ctk_cli()
    _, options, _ = module.classifyParameters()
    namespace = parser.parse_args(["data", "model.pt"])  # what the script uses for omitted options
    assert (namespace.dataDir, namespace.output) == ("data", "model.pt")
    for parameter in options:
        value = getattr(namespace, parameter.name)
        action = _action(parser, parameter.longflag)
        if parameter.typ == "boolean":
            assert action.nargs == 0 and action.const is True and value is False
            assert getattr(parser.parse_args(["d", "m.pt", parameter.longflag]), parameter.name) is True
            assert _parses(parser, ["d", "m.pt", parameter.longflag, "true"]) is None  # Slicer never sends a value
        elif parameter.isExternalType():
            assert value is None, f"{parameter.name}: an omitted path must mean 'not given'"
            given = parser.parse_args(["d", "m.pt", parameter.longflag, "/some/where.x"])
            assert getattr(given, parameter.name) == "/some/where.x"
        else:
            assert value == parameter.default and type(value) is type(parameter.default), parameter.name
            # The XML default, passed as Slicer passes it, parses to the same value.
            text = XML_DEFAULTS[parameter.name]
            assert getattr(parser.parse_args(["d", "m.pt", parameter.longflag, text]), parameter.name) == value
        if parameter.typ == "integer":
            assert getattr(parser.parse_args(["d", "m.pt", parameter.longflag, "5"]), parameter.name) == 5
            assert _parses(parser, ["d", "m.pt", parameter.longflag, "2.5"]) is None
        if parameter.typ in ("float", "double"):
            assert _parses(parser, ["d", "m.pt", parameter.longflag, "abc"]) is None
            assert _parses(parser, ["d", "m.pt", parameter.longflag, "nan"]) is None
        if parameter.elements:
            assert list(action.choices) == parameter.elements
            for element in parameter.elements:
                assert getattr(parser.parse_args(["d", "m.pt", parameter.longflag, element]), parameter.name) == element
            assert _parses(parser, ["d", "m.pt", parameter.longflag, "bogus"]) is None
        if parameter.constraints is not None:
            low, high = float(parameter.constraints.minimum), float(parameter.constraints.maximum)
            assert getattr(parser.parse_args(["d", "m.pt", parameter.longflag, str(high)]), parameter.name) == high
            assert getattr(parser.parse_args(["d", "m.pt", parameter.longflag, str(low)]), parameter.name) == low
            assert _parses(parser, ["d", "m.pt", parameter.longflag, str(high + 0.01)]) is None
            assert _parses(parser, ["d", "m.pt", parameter.longflag, str(low - 0.01)]) is None


XML_DEFAULTS = {element.findtext("name"): element.findtext("default")
                for group in ET.parse(XML_FILE).getroot().findall("parameters") for element in group
                if element.findtext("default") is not None}


@pytest.mark.parametrize("option, value, message", [
    ("--epochs", "0", "epochs must be >= 1"),
    ("--batchSize", "-4", "batchSize must be >= 1"),
    ("--learningRate", "0", "learningRate must be greater than 0"),
    ("--maxCases", "-1", "maxCases must be >= 0"),
    ("--validationFraction", "0.95", "validationFraction must be [0, 0.9]"),
])
def test_out_of_range_values_are_refused_by_name(parser, option, value, message, capsys):
    assert _parses(parser, ["d", "m.pt", option, value]) is None
    assert message in capsys.readouterr().err


def test_help_lists_every_option_with_its_default():
    completed = run_script(["--help"])
    assert completed.returncode == 0
    module, _ = parse_xml_with_ctk_cli()
    _, options, _ = module.classifyParameters()
    for parameter in options:
        assert parameter.longflag in completed.stdout
    assert "(default: 400)" in completed.stdout and "(default: 2,1|3)" in completed.stdout


def test_xml_flag_prints_the_file_exactly():
    completed = subprocess.run([sys.executable, str(SCRIPT), "--xml"], capture_output=True, timeout=60)
    assert completed.returncode == 0
    assert completed.stdout == XML_FILE.read_bytes()
    # ctk-cli's executable mode (run with --xml) reads the same description.
    parsed = ctk_cli.CLIModule(stream=io.BytesIO(completed.stdout))
    assert [p.name for p in parsed.parameters()] == [p.name for p in ctk_cli.CLIModule(str(XML_FILE)).parameters()]


def test_first_line_is_a_shebang_and_cmake_builds_the_cli():
    assert SCRIPT.read_text(encoding="utf-8").splitlines()[0] == "#!/usr/bin/env python-real"
    cmake = (CLI_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    if "set(MODULE_NAME FusionINNTraining)" in cmake:
        cmake = cmake.replace("${MODULE_NAME}", "FusionINNTraining")
    assert re.search(r"slicerMacroBuildScriptedCLI\(\s*NAME\s+FusionINNTraining\s*\)", cmake, re.IGNORECASE)


def test_library_is_found_next_to_the_script_in_an_installed_layout(tmp_path):
    """lib/Slicer-X.Y/cli-modules/<script> finds lib/Slicer-X.Y/qt-scripted-modules/FusionINNLib.
    ``python -S`` leaves site-packages (and with it the editable install) off the path."""
    lib = tmp_path / "lib" / "Slicer-5.8"
    (lib / "cli-modules").mkdir(parents=True)
    shutil.copy2(SCRIPT, lib / "cli-modules" / SCRIPT.name)
    shutil.copy2(XML_FILE, lib / "cli-modules" / XML_FILE.name)
    shutil.copytree(REPO / "FusionINN" / "FusionINNLib", lib / "qt-scripted-modules" / "FusionINNLib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import runpy, sys\n"
            f"namespace = runpy.run_path({str(lib / 'cli-modules' / SCRIPT.name)!r})\n"
            "assert 'FusionINNLib' not in sys.modules\n"
            "print(namespace['ensure_library_importable']())\n"
            "import FusionINNLib\n"
            "print(FusionINNLib.__file__)\n")
    # nor PYTHONPATH: a developer's (or a training run's) path to the library would make the helper a no-op
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                               timeout=60, env=env)
    assert completed.returncode == 0, completed.stderr
    added, imported = completed.stdout.split()
    assert Path(added) == lib / "qt-scripted-modules"
    assert Path(imported).is_relative_to(lib / "qt-scripted-modules")


def test_module_gui_passes_parameters_the_cli_declares():
    """FusionINN.py runs this CLI with slicer.cli.run(module, None, {name: value}); Slicer silently
    ignores a name the XML does not declare, so every name used there must be a parameter."""
    import ast

    module, _ = parse_xml_with_ctk_cli()
    declared = {p.name: p for p in module.parameters()}
    tree = ast.parse((REPO / "FusionINN" / "FusionINN.py").read_text(encoding="utf-8"))
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FusionINNWidget")
    methods = {n.name: n for n in widget.body if isinstance(n, ast.FunctionDef)}
    start = methods["onStartTrainingButton"]
    dictionaries = [n for n in ast.walk(start) if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "parameters" for t in n.targets)]
    assert len(dictionaries) == 1 and isinstance(dictionaries[0].value, ast.Dict)
    passed = {ast.literal_eval(key) for key in dictionaries[0].value.keys}
    assert passed <= set(declared), f"unknown CLI parameters: {sorted(passed - set(declared))}"
    assert {p.name for p in declared.values() if p.index is not None} <= passed, "indexed arguments are required"
    calls = [n for n in ast.walk(start) if isinstance(n, ast.Call) and ast.unparse(n.func) == "slicer.cli.run"]
    waits = [ast.literal_eval(k.value) for k in calls[0].keywords if k.arg == "wait_for_completion"] if calls else []
    assert waits == [False], "the GUI must not block while training"
    read_back = {ast.literal_eval(n.args[0]) for method in methods.values() for n in ast.walk(method)
                 if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("GetParameterAsString")}
    assert read_back and read_back <= {p.name for p in declared.values() if is_return_parameter(p)}


# -- progress reporting -----------------------------------------------------------------------
def test_progress_is_monotone_and_throttled(script_module):
    stdout, stderr = io.StringIO(), io.StringIO()
    now = [0.0]
    reporter = script_module.Reporter(stdout, stderr, clock=lambda: now[0])
    reporter.start("start <with> brackets")
    for step in range(1, 20001):
        now[0] += 0.001
        reporter.progress(step / 20000, f"step {step}")
    reporter.progress(0.5, "going back is ignored")
    now[0] += 60
    reporter.progress(1.0, "slow step")  # no fraction change, but a minute has passed
    reporter.end()
    text = stdout.getvalue()
    fractions = [float(f) for f in re.findall(r"<filter-progress>([^<]*)</filter-progress>", text)]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert len(fractions) <= 1 / script_module.PROGRESS_RESOLUTION + 5  # one line per 0.1 %, not per step
    assert "<with>" not in text and "(with)" in text  # a '<' inside a tag would break Slicer's parsing
    assert strip_like_slicer(text).strip() == ""
    assert text.count("<filter-comment>slow step</filter-comment>") == 1


def test_sigterm_asks_the_training_to_stop_and_a_second_one_stops_at_once():
    code = ("import signal, runpy\n"
            f"namespace = runpy.run_path({str(SCRIPT)!r})\n"
            "flag = namespace['CancelFlag']()\n"
            "flag.install()\n"
            "print(flag())\n"
            "signal.raise_signal(signal.SIGTERM)\n"
            "print(flag())\n"
            "try:\n"
            "    signal.raise_signal(signal.SIGTERM)\n"
            "    print('still running')\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted')\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.stdout.split() == ["False", "True", "interrupted"], completed.stderr


# -- errors -----------------------------------------------------------------------------------
def _one_case_without_flair(root: Path) -> Path:
    from FusionINNLib.io.phantom import write_phantom_cases

    (case,) = write_phantom_cases(root, cases=1, shape=(16, 32, 32), seed=2)
    for file in case.iterdir():
        if "flair" in file.name:
            file.unlink()
    return root


@pytest.mark.parametrize("layout, message", [
    ("missing", "data directory not found"),
    ("empty", "is empty: expected one sub-folder per case"),
    ("no_flair", "no case with t1ce + flair found"),
])
def test_bad_data_directories_fail_with_one_clear_message(tmp_path, layout, message):
    data = tmp_path / "data"
    if layout == "empty":
        data.mkdir()
    elif layout == "no_flair":
        _one_case_without_flair(data)
    model = tmp_path / "out" / "model.pt"
    completed = run_script([str(data), str(model)])
    assert completed.returncode == 1
    errors = [line for line in completed.stderr.splitlines() if "FusionINNTraining: error:" in line]
    assert len(errors) == 1 and message in errors[0], completed.stderr
    assert str(data) in errors[0]
    assert "Traceback" not in completed.stderr
    if layout == "no_flair":
        assert "no flair image" in completed.stderr  # the reason for the skipped folder, in the error
    assert not model.exists()


def test_non_ansi_paths_on_a_cp1252_stdout_do_not_crash(tmp_path):
    """Windows gives a CLI's pipes the ANSI code page: the script must still report a path with other
    characters (it writes UTF-8, escaping nothing it can encode)."""
    data = tmp_path / "données 数据 Ω"
    data.mkdir()
    completed = subprocess.run([sys.executable, str(SCRIPT), str(data), str(tmp_path / "m.pt")], capture_output=True,
                               timeout=120, env=dict(os.environ, PYTHONIOENCODING="cp1252", PYTHONUTF8="0"))
    stderr = completed.stderr.decode("utf-8")
    assert completed.returncode == 1, stderr
    assert "UnicodeEncodeError" not in stderr and "Traceback" not in stderr
    assert f"data directory {data} is empty" in stderr


def test_library_is_found_in_multi_config_build_trees(script_module, tmp_path):
    """Visual Studio/Xcode build trees put the CLI in cli-modules/<CONFIG>/, the library stays in
    qt-scripted-modules/ (SlicerMacroBuildScriptedCLI.cmake, CMAKE_CFG_INTDIR)."""
    lib = tmp_path / "lib" / "Slicer-5.8"
    script = lib / "cli-modules" / "Release" / "FusionINNTraining.py"
    script.parent.mkdir(parents=True)
    script.write_text("")
    (lib / "qt-scripted-modules" / "FusionINNLib").mkdir(parents=True)
    folders = script_module.library_search_paths(script)
    assert folders[0] == lib / "qt-scripted-modules"
    single = lib / "cli-modules" / "FusionINNTraining.py"
    assert script_module.library_search_paths(single)[0] == lib / "qt-scripted-modules"


def test_data_directory_errors_come_before_pytorch_is_loaded(tmp_path):
    """The quick checks run before the (slow) PyTorch import, so a typo fails in a fraction of a second."""
    code = ("import runpy, sys\n"
            f"namespace = runpy.run_path({str(SCRIPT)!r})\n"
            f"code = namespace['main']([{str(tmp_path / 'missing')!r}, {str(tmp_path / 'm.pt')!r}])\n"
            "print(code, 'torch' in sys.modules)\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.stdout.split()[-2:] == ["1", "False"], completed.stderr


def test_invalid_arguments_exit_with_usage_code(tmp_path):
    completed = run_script([str(tmp_path), str(tmp_path / "m.pt"), "--epochs", "0"])
    assert completed.returncode == 2 and "epochs must be >= 1" in completed.stderr
    completed = run_script([str(tmp_path), str(tmp_path / "m.pt"), "--modality1", "flair"])
    assert completed.returncode == 1 and "choose two different modalities" in completed.stderr


# -- a whole run, as Slicer starts it ---------------------------------------------------------
@pytest.fixture(scope="module")
def slicer_run(tmp_path_factory):
    """Two usable phantom cases plus one folder without FLAIR; one epoch with tiny settings."""
    from FusionINNLib.io.phantom import write_phantom_cases

    root = tmp_path_factory.mktemp("training_cli")
    data = root / "BraTS"
    folders = write_phantom_cases(data, cases=3, shape=(16, 64, 64), seed=0)
    for file in folders[2].iterdir():
        if "flair" in file.name:
            file.unlink()
    temporary = root / "SlicerTemp"
    temporary.mkdir()
    module, _ = parse_xml_with_ctk_cli()
    values = {"dataDir": str(data), "output": str(root / "models" / "my model.pt"),
              "epochs": 1, "batchSize": 8, "cropSize": 32, "maxValidationSlices": 4, "validationFraction": 0.5,
              "device": "cpu", "amp": True, "seed": 3, "blocks": 2, "learningRate": 0.0005, "alpha": 0.6,
              "lambdaSsim": 0.7, "patience": 3, "cacheDir": str(root / "cache"), "resume": ""}
    arguments, files = slicer_command_line(module, values, ["historyTable", "metricsTable", "previewVolume"],
                                           temporary)
    completed = run_script(arguments)
    return {"module": module, "values": values, "arguments": arguments, "files": files, "completed": completed,
            "root": root, "temporary": temporary}


def test_slicer_command_line_shape(slicer_run):
    arguments = slicer_run["arguments"]
    assert arguments[0] == "--returnparameterfile" and arguments[1].endswith(".params")
    assert arguments[-2:] == [slicer_run["values"]["dataDir"], slicer_run["values"]["output"]]
    assert "--amp" in arguments and arguments[arguments.index("--amp") + 1].startswith("--")  # bare flag
    assert "--resume" not in arguments and "--runDir" not in arguments  # empty paths are left out
    assert arguments[arguments.index("--historyTable") + 1].endswith(".tsv")
    assert arguments[arguments.index("--previewVolume") + 1].endswith(".nrrd")


def test_slicer_run_succeeds_and_reports_the_skipped_case(slicer_run):
    completed = slicer_run["completed"]
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Slicer's CLI logic reports any stderr output as an error: a successful run writes none.
    assert completed.stderr == "", completed.stderr[-3000:]
    assert "BraTS2021_Phantom_00002: no flair image" in completed.stdout  # the skipped-case report
    assert "AMP is only used on CUDA" in completed.stdout  # the bare --amp reached the training


def test_slicer_run_progress_protocol(slicer_run):
    stdout = slicer_run["completed"].stdout
    assert stdout.startswith("<filter-start>") and stdout.rstrip().endswith("</filter-end>")
    fractions = [float(f) for f in re.findall(r"<filter-progress>([^<]*)</filter-progress>", stdout)]
    assert len(fractions) >= 3 and fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and 0.0 < fractions[len(fractions) // 2] <= 1.0
    assert "<filter-comment>epoch 1/1" in stdout
    notes = [line for line in strip_like_slicer(stdout).splitlines() if line.strip()]
    assert notes, "the log lines for people are on stdout"
    assert all(re.match(r"^\d\d:\d\d:\d\d ", line) for line in notes), notes[:5]  # time-stamped notes only


def test_slicer_run_tables_are_typed(slicer_run):
    assert slicer_run["completed"].returncode == 0
    header, history = read_typed_table(slicer_run["files"]["historyTable"])
    assert len(history) == 1 and history[0]["epoch"] == 1 and history[0]["best"] == 1
    assert {"train_loss", "val_loss", "train_dec_ssim", "lr", "seconds"} <= set(header)
    # the columns the FusionINN module plots (FusionINNWidget._plotTrainingHistory)
    assert {f"{split}_{part}" for split in ("train", "val") for part in ("loss", "fusion", "dec")} <= set(header)
    assert isinstance(history[0]["val_loss"], float) and math.isfinite(history[0]["val_loss"])
    assert history[0]["lr"] == pytest.approx(0.0005)
    header, metrics = read_typed_table(slicer_run["files"]["metricsTable"])
    assert [row["case"] for row in metrics] == ["BraTS2021_Phantom_00000", "mean"] or \
        [row["case"] for row in metrics] == ["BraTS2021_Phantom_00001", "mean"]
    assert {"decomposition_ssim_t1ce", "decomposition_ssim_flair", "fusion_ssim_t1ce"} <= set(header)
    for name in header[4:]:
        assert isinstance(metrics[-1][name], float) and math.isfinite(metrics[-1][name])
    assert -1.0 <= metrics[-1]["decomposition_ssim_t1ce"] <= 1.0


def test_slicer_run_return_parameters(slicer_run):
    assert slicer_run["completed"].returncode == 0
    module = slicer_run["module"]
    path = Path(slicer_run["arguments"][1])
    lines = path.read_text(encoding="utf-8").splitlines()
    values = {}
    for line in lines:
        name, separator, value = line.partition(" = ")
        assert separator, f"not a 'name = value' line: {line!r}"
        values[name] = value
    _, _, outputs = module.classifyParameters()
    assert set(values) == {p.name for p in outputs}
    typed = {p.name: p.parseValue(values[p.name]) for p in outputs}  # typed as the XML declares
    assert typed["bestEpoch"] == 1 and typed["epochsRun"] == 1 and typed["skippedCases"] == 1
    _, history = read_typed_table(slicer_run["files"]["historyTable"])
    assert typed["bestValidationLoss"] == pytest.approx(history[0]["val_loss"], rel=1e-6)
    _, metrics = read_typed_table(slicer_run["files"]["metricsTable"])
    mean_ssim = (metrics[-1]["decomposition_ssim_t1ce"] + metrics[-1]["decomposition_ssim_flair"]) / 2
    assert typed["meanDecompositionSSIM"] == pytest.approx(mean_ssim, rel=1e-6)


def test_slicer_run_model_is_loadable_with_the_chosen_settings(slicer_run):
    from FusionINNLib.io.checkpoint import load_checkpoint

    assert slicer_run["completed"].returncode == 0
    values = slicer_run["values"]
    loaded = load_checkpoint(values["output"])
    assert loaded.config.blocks == 2
    assert loaded.metadata["modalities"] == ["t1ce", "flair"]
    config = loaded.metadata["training"]["config"]
    assert config["epochs"] == 1 and config["lr"] == pytest.approx(0.0005) and config["alpha"] == pytest.approx(0.6)
    assert config["lam"] == pytest.approx(0.7) and config["seed"] == 3 and config["amp"] is True
    assert config["crop_size"] == 32 and config["early_stopping"] is None and config["max_cases"] is None
    assert config["labels"] == "2,1|3" and config["patience"] == 3
    run_dir = Path(values["output"]).with_name("my model_run")
    assert (run_dir / "last.pt").is_file() and (run_dir / "split.json").is_file()


def test_slicer_run_preview_volume(slicer_run):
    import SimpleITK as sitk

    assert slicer_run["completed"].returncode == 0
    path = slicer_run["files"]["previewVolume"]
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    assert array.shape == (16, 64, 64) and np.isfinite(array).all()
    assert 0.0 <= array.min() and array.max() <= 1.0 and array.std() > 0
    assert "FusionINN_record" in image.GetMetaDataKeys()
    assert not path.with_name(path.stem + ".fusioninn.json").exists()  # nothing extra in Slicer's temp folder


def test_warnings_and_library_notes_of_a_successful_run_stay_off_stderr(tmp_path):
    """Slicer reports any stderr output of a CLI as an error: a warning or a note a library prints
    to sys.stderr during a successful run goes to stdout; errors still go to stderr."""
    code = ("import runpy, sys, warnings\n"
            f"namespace = runpy.run_path({str(SCRIPT)!r})\n"
            "def fake_run(args, reporter, cancel):\n"
            "    warnings.warn('a library warning', stacklevel=2)\n"
            "    print('a note printed to sys.stderr', file=sys.stderr)\n"
            "    reporter.log('a log line')\n"
            "    if args.epochs == 7:\n"
            "        raise ValueError('bad data')\n"
            "    return {}\n"
            "namespace['main'].__globals__['run'] = fake_run\n"
            "sys.exit(namespace['main'](sys.argv[1:]))\n")
    arguments = [sys.executable, "-c", code, str(tmp_path), str(tmp_path / "m.pt")]
    completed = subprocess.run(arguments, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    for text in ("a library warning", "a note printed", "a log line"):
        assert text in completed.stdout
    completed = subprocess.run(arguments + ["--epochs", "7"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert completed.stderr.strip().endswith("FusionINNTraining: error: bad data")


def test_a_successful_run_with_a_non_ansi_path_on_a_cp1252_stdout(tmp_path):
    """What Windows gives a CLI started by Slicer: a cp1252 pipe. The whole run (log lines naming the
    data folder, progress, return values) works and stderr stays empty."""
    from FusionINNLib.io.phantom import write_phantom_cases

    data = tmp_path / "données Ω 数据"
    write_phantom_cases(data, cases=2, shape=(16, 48, 48), seed=1)
    returns = tmp_path / "r.params"
    arguments = [sys.executable, str(SCRIPT), "--returnparameterfile", str(returns), "--epochs", "1",
                 "--batchSize", "8", "--cropSize", "32", "--maxValidationSlices", "2", "--validationFraction", "0.5",
                 "--device", "cpu", str(data), str(tmp_path / "modèle.pt")]
    completed = subprocess.run(arguments, capture_output=True, timeout=600,
                               env=dict(os.environ, PYTHONIOENCODING="cp1252", PYTHONUTF8="0", OMP_NUM_THREADS="1"))
    stdout, stderr = completed.stdout.decode("utf-8"), completed.stderr.decode("utf-8")
    assert completed.returncode == 0, stderr[-2000:]
    assert stderr == ""
    assert str(data) in stdout and "</filter-end>" in stdout
    assert (tmp_path / "modèle.pt").is_file() and "bestEpoch = 1" in returns.read_text(encoding="utf-8")
