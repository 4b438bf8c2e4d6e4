"""Contract between the Slicer module files, checked without Slicer.

Slicer cannot run here, so these tests read the module's files the way Slicer would use them:

* every Python file parses with Python 3.9 grammar (Slicer 5.8 ships Python 3.9);
* every ``self.ui.X`` the module uses exists in the .ui with a widget class that has the
  attribute used, and every button is connected;
* every ``SlicerParameterName`` in the .ui names a parameter-node field whose type the parameter
  node wrapper can connect to that widget class (the rules of
  ``slicer/parameterNodeWrapper/guiConnectors.py``: exact widget class, ``Choice`` for combo
  boxes, bounded floats for sliders, node classes for node combo boxes), and every field has a widget;
* every file of ``FusionINNLib`` and every resource is listed in the module's CMakeLists.txt
  (computed from the folder, so a new file without a CMake entry fails);
* the module imports only public functions of ``FusionINNLib`` and does no numpy math itself;
* the extension CMakeLists.txt and the ExtensionsIndex JSON have the required metadata.
"""
from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "FusionINN"
MODULE_FILE = MODULE_DIR / "FusionINN.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "FusionINN.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
EXTENSION_CMAKE = REPO / "CMakeLists.txt"
INDEX_JSON = REPO / "Resources" / "FusionINN.json"
LIB_DIR = MODULE_DIR / "FusionINNLib"

# Files listed in CMake that other engineers are still creating. slicerMacroBuildScriptedModule
# fails at configure time on a missing file, so this set must be empty at release.
PENDING_FILES: set = set()

# What FusionINN.py may import from the core: public entry points only.
PUBLIC_API = {
    "slicer_support": None,  # the module's own plain-data helpers: any public name
    "pipeline": {"fuse_volumes", "decompose_volume"},
    "checkpoint": {"resolve_model", "bundled_model_path"},
    "engine": {"describe_devices", "Cancelled"},
    "volume": {"Volume"},
    "metrics": {"fusion_metrics", "decomposition_metrics", "METRIC_DESCRIPTIONS", "FUSION_METRIC_NAMES"},
    "baselines": {"classical_fusion"},
    "explain": {"explain_volumes", "jacobian_volumes", "parse_slices"},
    "phantom": {"make_phantom_case"},
    "batch": {"run_batch", "score_volumes", "baseline_fusions", "align_to_reference", "difference_volume"},
}

# Widget class -> parameter types the GUI connectors accept (exact class match, as in Slicer).
CONNECTOR_TYPES = {
    "QCheckBox": {"bool"},
    "QPushButton": {"bool"},
    "QSpinBox": {"int"},
    "QSlider": {"int"},
    "QDoubleSpinBox": {"float"},
    "ctkSliderWidget": {"float"},
    "QComboBox": {"int", "float", "str", "bool"},
    "QLineEdit": {"str"},
    "QTextEdit": {"str"},
    "ctkPathLineEdit": {"pathlib.Path", "Path"},
    "ctkDirectoryButton": {"pathlib.Path", "Path"},
    "qMRMLNodeComboBox": {"node"},
}

# Attributes/methods the module uses on widgets, per class (Qt/CTK/MRML API).
_COMMON = {"enabled", "toolTip", "setVisible", "visible", "setEnabled", "connect", "text"}
WIDGET_ATTRIBUTES = {
    "QPushButton": _COMMON | {"clicked", "checked"},
    "QLabel": _COMMON,
    "QProgressBar": _COMMON | {"value", "setValue", "maximum", "minimum"},
    "QCheckBox": _COMMON | {"checked"},
    "QSpinBox": _COMMON | {"value"},
    "QDoubleSpinBox": _COMMON | {"value"},
    "ctkSliderWidget": _COMMON | {"value", "valueChanged"},
    "QComboBox": _COMMON | {"currentText", "currentIndex"},
    "QLineEdit": _COMMON,
    "ctkPathLineEdit": _COMMON | {"currentPath"},
    "ctkDirectoryButton": _COMMON | {"directory"},
    "qMRMLNodeComboBox": _COMMON | {"currentNode", "setCurrentNode"},
    "ctkCollapsibleButton": _COMMON | {"collapsed"},
    "ctkCollapsibleGroupBox": _COMMON | {"collapsed"},
}

ACCEPTED_CATEGORIES = {"Filtering", "Image Synthesis", "Segmentation", "Utilities", "Training", "Examples",
                       "Registration", "Quantification", "Informatics"}


# -- helpers ----------------------------------------------------------------------------------
def _module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def _ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets() -> Dict[str, str]:
    """objectName -> class of every widget in the .ui."""
    return {w.get("name"): w.get("class") for w in _ui_root().iter("widget")}


def ui_parameter_bindings() -> List[Tuple[str, str, str]]:
    """(parameter name, widget name, widget class) for every SlicerParameterName property."""
    bindings = []
    for widget in _ui_root().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings.append((prop.findtext("string"), widget.get("name"), widget.get("class")))
    return bindings


def _widget_property(name: str, prop_name: str) -> Optional[ET.Element]:
    for widget in _ui_root().iter("widget"):
        if widget.get("name") == name:
            for prop in widget.findall("property"):
                if prop.get("name") == prop_name:
                    return prop
    return None


class Field:
    def __init__(self, name: str, annotation: ast.expr, default: Optional[ast.expr]):
        self.name = name
        self.default = default
        self.validators: Dict[str, ast.Call] = {}
        base = annotation
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Annotated", "typing.Annotated"):
            elements = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
            base = elements[0]
            for extra in elements[1:]:
                if isinstance(extra, ast.Call):
                    self.validators[ast.unparse(extra.func)] = extra
        self.base = ast.unparse(base)

    @property
    def kind(self) -> str:
        return "node" if self.base.startswith("vtkMRML") else self.base

    def choices(self) -> list:
        return ast.literal_eval(self.validators["Choice"].args[0])

    def default_value(self):
        return None if self.default is None else ast.literal_eval(self.default)


def parameter_fields() -> Dict[str, Field]:
    for node in _module_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == "FusionINNParameterNode":
            decorators = [ast.unparse(d) for d in node.decorator_list]
            assert "parameterNodeWrapper" in decorators
            return {item.target.id: Field(item.target.id, item.annotation, item.value)
                    for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("FusionINNParameterNode class not found in FusionINN.py")


def ui_uses() -> Dict[str, Set[str]]:
    """widget name -> attributes used as ``self.ui.<name>.<attribute>`` (plus bare uses)."""
    uses: Dict[str, Set[str]] = {}
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            inner = node.value
            if isinstance(inner.value, ast.Name) and inner.value.id == "self" and inner.attr == "ui":
                uses.setdefault(node.attr, set())
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Attribute)):
            ui = node.value.value
            if isinstance(ui.value, ast.Name) and ui.value.id == "self" and ui.attr == "ui":
                uses.setdefault(node.value.attr, set()).add(node.attr)
    return uses


def cmake_list(text: str, variable: str) -> List[str]:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return match.group(1).split()


def cmake_variable(text: str, variable: str) -> Optional[str]:
    match = re.search(r'set\(\s*' + variable + r'\s+"([^"]*)"\s*\)', text)
    return match.group(1) if match else None


# -- Python grammar ---------------------------------------------------------------------------
def _python_files() -> List[Path]:
    files = [MODULE_FILE] + sorted(LIB_DIR.glob("*.py"))
    files += sorted((REPO / "FusionINNTraining").glob("*.py"))
    return files


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_files_parse_with_python_3_9_grammar(path):
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def test_module_file_needs_no_newer_runtime_typing():
    """FusionINN.py has no ``from __future__ import annotations`` (the parameter node wrapper
    evaluates its annotations), so ``X | Y`` or builtin generics there would fail on 3.9."""
    tree = _module_tree()
    future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert not future
    for node in ast.walk(tree):
        if isinstance(node, (ast.AnnAssign, ast.arg)) and getattr(node, "annotation", None) is not None:
            for sub in ast.walk(node.annotation):
                assert not isinstance(sub, ast.BinOp), f"'|' in an annotation: {ast.unparse(node.annotation)}"


# -- .ui <-> module ---------------------------------------------------------------------------
def test_every_ui_widget_used_by_the_module_exists_with_a_plausible_class():
    widgets = ui_widgets()
    uses = ui_uses()
    assert len(uses) >= 20
    for name, attributes in uses.items():
        assert name in widgets, f"self.ui.{name} is used in FusionINN.py but missing from FusionINN.ui"
        cls = widgets[name]
        allowed = WIDGET_ATTRIBUTES.get(cls)
        assert allowed is not None, f"{name}: widget class {cls} is not expected in this module"
        unexpected = attributes - allowed
        assert not unexpected, f"self.ui.{name} ({cls}) used with {sorted(unexpected)}"


def test_every_button_is_connected_to_a_handler():
    source = MODULE_FILE.read_text(encoding="utf-8")
    buttons = [name for name, cls in ui_widgets().items() if cls == "QPushButton"]
    assert len(buttons) >= 13
    for name in buttons:
        match = re.search(r"self\.ui\." + name + r'\.connect\("clicked\(bool\)", self\.(\w+)\)', source)
        assert match, f"button {name} is not connected"
        assert re.search(r"def " + match.group(1) + r"\(self", source), f"handler {match.group(1)} missing"


def test_every_parameter_binding_is_a_compatible_field():
    fields = parameter_fields()
    bindings = ui_parameter_bindings()
    names = [parameter for parameter, _, _ in bindings]
    assert len(names) == len(set(names)), "two widgets bound to the same parameter"
    for parameter, widget, cls in bindings:
        assert parameter in fields, f"{widget}: SlicerParameterName {parameter!r} is not a parameter-node field"
        field = fields[parameter]
        assert cls in CONNECTOR_TYPES, f"{widget}: no parameter-node GUI connector for {cls}"
        assert field.kind in CONNECTOR_TYPES[cls], f"{widget} ({cls}) cannot represent {parameter}: {field.base}"
        if cls == "QComboBox":
            assert "Choice" in field.validators, f"{parameter}: a QComboBox needs a Choice annotation"
        if cls in ("ctkSliderWidget", "QSlider"):
            assert "WithinRange" in field.validators, f"{parameter}: a slider needs a bounded (WithinRange) value"
        if cls == "qMRMLNodeComboBox":
            types = _widget_property(widget, "nodeTypes").findall("stringlist/string")
            assert [t.text for t in types] == [field.base], f"{widget}: nodeTypes do not match {field.base}"


def test_every_option_is_reachable_in_the_ui():
    bound = {parameter for parameter, _, _ in ui_parameter_bindings()}
    missing = set(parameter_fields()) - bound
    assert not missing, f"parameter-node fields without a widget: {sorted(missing)}"


def test_issue_options_are_all_persisted():
    """The options the issue lists, by name."""
    expected = {"inputVolume1", "inputVolume2", "modelSource", "modelPath", "device", "keepLatent",
                "fusedVolume", "useKeptLatent", "samples", "seed", "temperature", "prior", "metricsTable",
                "maskVolume", "paperCompatible", "overlayVolume", "overlayOpacity", "overlayColormap",
                "linkViews", "explainSlices", "batchInputDirectory", "batchOutputDirectory", "batchModality1",
                "batchModality2", "batchKeepLatent", "batchMetrics", "batchPattern1", "batchPattern2"}
    assert expected <= set(parameter_fields())


def test_choices_agree_with_the_core():
    from FusionINNLib import slicer_support as support
    from FusionINNLib.engine import DEVICES, PRIORS
    from FusionINNLib.normalization import MODES

    fields = parameter_fields()
    assert tuple(fields["prior"].choices()) == PRIORS
    assert tuple(fields["device"].choices()) == DEVICES == support.DEVICE_CHOICES
    assert tuple(fields["normalization"].choices()) == MODES
    assert tuple(fields["modelSource"].choices()) == support.MODEL_SOURCES
    assert fields["overlayColormap"].choices() == list(support.OVERLAY_COLORMAPS)
    assert tuple(fields["compareOrientation"].choices()) == support.ORIENTATIONS
    assert fields["axis"].choices() == [0, 1, 2]


def test_defaults_are_valid():
    for field in parameter_fields().values():
        if not field.validators:
            continue
        value = field.default_value()
        if "Choice" in field.validators:
            assert value in field.choices(), f"{field.name}: default {value!r} not among the choices"
        if "WithinRange" in field.validators:
            low, high = (ast.literal_eval(a) for a in field.validators["WithinRange"].args)
            assert low <= value <= high, f"{field.name}: default {value} outside [{low}, {high}]"


def test_ui_spin_box_ranges_match_the_parameter_ranges():
    fields = parameter_fields()
    for parameter, widget, cls in ui_parameter_bindings():
        if cls not in ("QSpinBox", "ctkSliderWidget", "QDoubleSpinBox"):
            continue
        low, high = (float(ast.literal_eval(a)) for a in fields[parameter].validators["WithinRange"].args)
        for prop, expected in (("minimum", low), ("maximum", high)):
            element = _widget_property(widget, prop)
            assert element is not None, f"{widget}: no {prop} in the .ui"
            assert float(element[0].text) == expected, f"{widget}: {prop} differs from the parameter range"


def test_ui_is_loadable_designer_xml():
    root = _ui_root()
    assert root.tag == "ui" and root.findtext("class") == "FusionINN"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {cls for cls in ui_widgets().values() if cls.startswith(("ctk", "qMRML"))}
    assert used <= declared, f"custom widgets used but not declared: {used - declared}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    combos = {name for name, cls in ui_widgets().items() if cls == "qMRMLNodeComboBox"}
    assert combos == receivers, "every node combo box must receive the scene"
    sections = [w.findtext("property/string") for w in root.iter("widget") if w.get("class") == "ctkCollapsibleButton"]
    assert sections == ["Fuse", "Decompose", "Score", "Explain", "Compare", "Batch", "Train"]


# -- CMake ------------------------------------------------------------------------------------
def test_every_lib_file_and_resource_is_listed_in_cmake():
    text = MODULE_CMAKE.read_text(encoding="utf-8").replace("${MODULE_NAME}", "FusionINN")
    scripts = set(cmake_list(text, "MODULE_PYTHON_SCRIPTS"))
    resources = set(cmake_list(text, "MODULE_PYTHON_RESOURCES"))
    on_disk_scripts = {"FusionINN.py"} | {f"FusionINNLib/{p.name}" for p in LIB_DIR.glob("*.py")}
    missing = on_disk_scripts - scripts
    assert not missing, f"Python files not listed in MODULE_PYTHON_SCRIPTS: {sorted(missing)}"
    on_disk_resources = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                         if p.is_file() and not p.name.startswith(".")}
    missing = on_disk_resources - resources
    assert not missing, f"resources not listed in MODULE_PYTHON_RESOURCES: {sorted(missing)}"
    absent = {entry for entry in scripts | resources if not (MODULE_DIR / entry).is_file()}
    unexpected = sorted(absent - PENDING_FILES)
    assert not unexpected, f"listed in CMake but missing (configure would fail): {unexpected}"
    assert "Resources/Icons/FusionINN.png" in resources and "Resources/UI/FusionINN.ui" in resources


def test_module_cmake_builds_and_tests_the_module():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert re.search(r"set\(MODULE_NAME FusionINN\)", text)
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1).split()
    assert macro[:2] == ["NAME", "${MODULE_NAME}"] and "WITH_GENERIC_TESTS" in macro
    assert "SCRIPTS" in macro and "RESOURCES" in macro
    assert re.search(r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text)
    assert "add_subdirectory(Testing)" in text
    assert "add_subdirectory(Python)" in (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_extension_cmake_has_complete_metadata():
    text = EXTENSION_CMAKE.read_text(encoding="utf-8")
    assert re.search(r"cmake_minimum_required\(VERSION [\d.]+", text)
    project = re.search(r"project\((\w+)\)", text).group(1)
    assert project == "FusionINN" == INDEX_JSON.stem
    assert not project.startswith("Slicer")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert cmake_variable(text, variable), f"{variable} is not set"
    assert "PyTorch" in cmake_variable(text, "EXTENSION_DEPENDS").split()
    icon = cmake_variable(text, "EXTENSION_ICONURL")
    assert icon.startswith("https://raw.githubusercontent.com/") and icon.endswith(".png")
    assert (REPO / icon.split("/main/", 1)[1]).is_file(), "the icon URL must point at a file of this repository"
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(FusionINN)",
             "add_subdirectory(FusionINNTraining)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
             "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.find(item) for item in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), "extension CMake steps out of order"
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert "SlicerFusionINN contributors" in (REPO / "LICENSE").read_text(encoding="utf-8")


def test_extensions_index_entry_follows_the_schema():
    entry = json.loads(INDEX_JSON.read_text(encoding="utf-8"))
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert re.search(r"slicer-extension-catalog-entry-schema-v1\.0\.[12]\.json#?$", entry["$schema"])
    assert entry["category"] in ACCEPTED_CATEGORIES
    assert entry["category"] == cmake_variable(EXTENSION_CMAKE.read_text(encoding="utf-8"), "EXTENSION_CATEGORY")
    assert entry.get("tier", 5) in (1, 3, 5)
    assert entry.get("scm_type", "git") in ("git", "local")
    assert entry["scm_url"].startswith("https://") and "SlicerFusionINN" in entry["scm_url"]
    depends = cmake_variable(EXTENSION_CMAKE.read_text(encoding="utf-8"), "EXTENSION_DEPENDS").split()
    assert entry["build_dependencies"] == depends


# -- imports ----------------------------------------------------------------------------------
def _core_imports(tree: ast.AST) -> List[Tuple[str, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("FusionINNLib"):
            parts = node.module.split(".")
            if len(parts) == 1:
                found += [(alias.name, "*module*") for alias in node.names]
            else:
                found += [(parts[1], alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("FusionINNLib"):
                    found.append((alias.name.split(".")[1] if "." in alias.name else "", "*module*"))
    return found


def test_module_imports_only_public_core_functions():
    imports = _core_imports(_module_tree())
    assert ("slicer_support", "*module*") in imports
    assert ("pipeline", "fuse_volumes") in imports and ("pipeline", "decompose_volume") in imports
    for module, name in imports:
        assert module in PUBLIC_API, f"FusionINN.py imports FusionINNLib.{module}, which is not a public entry point"
        allowed = PUBLIC_API[module]
        if name == "*module*":
            assert allowed is None, f"import the public functions of FusionINNLib.{module}, not the module"
            continue
        assert not name.startswith("_"), f"FusionINN.py imports the private {module}.{name}"
        assert allowed is None or name in allowed, f"{module}.{name} is not in the public API list"
        source = LIB_DIR / f"{module}.py"
        if source.is_file():
            defined = {n.name for n in ast.parse(source.read_text(encoding="utf-8")).body
                       if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {t.id for n in ast.parse(source.read_text(encoding="utf-8")).body
                        if isinstance(n, (ast.Assign, ast.AnnAssign))
                        for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
            assert name in defined, f"FusionINNLib.{module} does not define {name}"
        else:
            assert f"FusionINNLib/{module}.py" in PENDING_FILES, f"FusionINNLib/{module}.py does not exist"


def test_module_uses_no_private_core_attributes():
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "support":
            assert not node.attr.startswith("_"), f"support.{node.attr} is private"


def test_module_file_does_no_math():
    """numpy/torch/scipy/SimpleITK are not imported at module level and numpy is used only by the tests."""
    tree = _module_tree()
    heavy = {"numpy", "torch", "scipy", "SimpleITK", "skimage"}
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & heavy
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] not in heavy
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name != "FusionINNTest"):
        for node in ast.walk(cls):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {str(n).split(".")[0] for n in names} & heavy, f"{cls.name} imports a math library"
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Sub, ast.Div, ast.MatMult, ast.Pow)):
                text = ast.unparse(node)
                assert "array" not in text.lower(), f"{cls.name} computes on arrays: {text}"


def test_slicer_support_is_importable_without_slicer():
    tree = ast.parse((LIB_DIR / "slicer_support.py").read_text(encoding="utf-8"))
    forbidden = {"slicer", "vtk", "qt", "ctk", "torch", "SimpleITK"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & forbidden
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            assert node.module.split(".")[0] not in forbidden


# -- self-tests -------------------------------------------------------------------------------
def test_self_test_exercises_fuse_decompose_and_metrics():
    tree = _module_tree()
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FusionINNTest")
    assert [ast.unparse(b) for b in test_class.bases] == ["ScriptedLoadableModuleTest"]
    methods = {n.name: n for n in test_class.body if isinstance(n, ast.FunctionDef)}
    run_calls = {ast.unparse(c.func) for c in ast.walk(methods["runTest"]) if isinstance(c, ast.Call)}
    tests = [name for name in methods if name.startswith("test_")]
    assert tests and all(f"self.{name}" in run_calls for name in tests), "runTest must run every test_ method"
    calls = {ast.unparse(c.func) for name in tests for c in ast.walk(methods[name]) if isinstance(c, ast.Call)}
    for required in ("logic.fuse", "logic.decompose", "logic.score", "logic.loadPhantomSample"):
        assert required in calls, f"the self-test does not call {required}"
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FusionINNLogic")
    logic_methods = {n.name for n in logic.body if isinstance(n, ast.FunctionDef)}
    assert {"fuse", "decompose", "score", "loadPhantomSample", "ensureDependencies"} <= logic_methods


def test_module_classes_and_training_stub():
    tree = _module_tree()
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes["FusionINN"] == ["ScriptedLoadableModule"]
    assert classes["FusionINNWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes["FusionINNLogic"] == ["ScriptedLoadableModuleLogic"]
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "def onTrainButton(self)" in source and "not available" in source
    assert "registerCustomSampleDataSource" in source and "customDownloader=" in source
    assert "tryWithErrorDisplay" in source and "PyTorchUtils" in source and "pip_install" in source


# -- the logic, run against a minimal fake of the Slicer API ----------------------------------
# Only what FusionINNLogic touches is faked, each with the signature of the real Slicer/VTK call;
# anything else raises AttributeError. This runs the module's real code paths (MRML <-> Volume,
# calls into FusionINNLib with their keyword arguments, all-or-nothing node creation, provenance,
# table filling), which the static checks above cannot.
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
import unittest  # noqa: E402

import numpy as np  # noqa: E402


class _FakeMatrix:
    def __init__(self):
        self.array = np.eye(4)


class _FakeDisplayNode:
    def __init__(self):
        self.color_node_id = None
        self.window_level = None
        self.auto_window_level = True

    def SetAndObserveColorNodeID(self, node_id):
        self.color_node_id = node_id

    def GetColorNodeID(self):
        return self.color_node_id

    def SetAutoWindowLevel(self, flag):
        self.auto_window_level = bool(flag)

    def SetWindowLevel(self, window, level):
        self.window_level = (window, level)


class _FakeNode:
    _count = 0

    def __init__(self, scene, class_name, name):
        _FakeNode._count += 1
        self.scene, self.class_name, self.name = scene, class_name, name
        self.node_id = f"{class_name}{_FakeNode._count}"
        self.attributes, self.references = {}, {}

    def GetID(self):
        return self.node_id

    def GetName(self):
        return self.name

    def GetClassName(self):
        return self.class_name

    def GetScene(self):
        return self.scene if self in self.scene.nodes else None

    def SetAttribute(self, key, value):
        assert isinstance(key, str) and isinstance(value, str), "MRML attributes are strings"
        self.attributes[key] = value

    def GetAttribute(self, key):
        return self.attributes.get(key)

    def SetNodeReferenceID(self, role, node_id):
        self.references[role] = node_id

    def GetNodeReference(self, role):
        node_id = self.references.get(role)
        return next((n for n in self.scene.nodes if n.node_id == node_id), None)


class _FakeVolumeNode(_FakeNode):
    def __init__(self, scene, class_name, name, array, ijk_to_ras):
        super().__init__(scene, class_name, name)
        self.array = np.array(array)
        self.ijk_to_ras = np.array(ijk_to_ras, dtype=float)
        self.display = None

    def GetImageData(self):
        return object()

    def GetIJKToRASMatrix(self, matrix):
        matrix.array = self.ijk_to_ras.copy()

    def GetParentTransformNode(self):
        return None

    def GetDisplayNode(self):
        return self.display

    def CreateDefaultDisplayNodes(self):
        self.display = self.display or _FakeDisplayNode()


class _FakeArray:
    def __init__(self, kind):
        self.kind, self.name, self.values = kind, None, []

    def SetName(self, name):
        self.name = name

    def SetNumberOfValues(self, count):
        self.values = [None] * count

    def GetDataTypeAsString(self):
        return {"string": "string", "double": "double", "int": "int", "bit": "bit"}[self.kind]

    def SetValue(self, index, value):
        expected = str if self.kind == "string" else float
        assert isinstance(value, expected), f"{self.kind} column got {value!r}"
        self.values[index] = value


class _FakeTable:
    def __init__(self):
        self.columns = []

    def AddColumn(self, array):
        self.columns.append(array)

    def GetColumnByName(self, name):
        return next((c for c in self.columns if c.name == name), None)


class _FakeTableNode(_FakeNode):
    def __init__(self, scene, name):
        super().__init__(scene, "vtkMRMLTableNode", name)
        self.table, self.descriptions, self.locked, self.column_header = _FakeTable(), {}, False, False

    def StartModify(self):
        return 0

    def EndModify(self, state):
        pass

    def Modified(self):
        pass

    def RemoveAllColumns(self):
        self.table.columns = []

    def SetUseColumnNameAsColumnHeader(self, flag):
        self.column_header = bool(flag)

    def GetTable(self):
        return self.table

    def SetColumnDescription(self, name, text):
        self.descriptions[name] = text

    def SetLocked(self, flag):
        self.locked = bool(flag)

    def GetNumberOfRows(self):
        return len(self.table.columns[0].values) if self.table.columns else 0

    def GetNumberOfColumns(self):
        return len(self.table.columns)

    def GetColumnName(self, index):
        return self.table.columns[index].name


class _FakeScene:
    StartCloseEvent, EndCloseEvent = "StartCloseEvent", "EndCloseEvent"

    def __init__(self):
        self.nodes = []

    def GenerateUniqueName(self, name):
        names = {n.name for n in self.nodes}
        candidate, index = name, 1
        while candidate in names:
            index += 1
            candidate = f"{name}_{index}"
        return candidate

    def AddNewNodeByClass(self, class_name, name=""):
        assert class_name == "vtkMRMLTableNode"
        node = _FakeTableNode(self, name)
        self.nodes.append(node)
        return node

    def RemoveNode(self, node):
        self.nodes.remove(node)

    def Clear(self, removeSingletons=0):
        self.nodes = []

    def GetNumberOfNodesByClass(self, class_name):
        return sum(n.class_name == class_name for n in self.nodes)

    def GetFirstNodeByClass(self, class_name):
        return next((n for n in self.nodes if n.class_name == class_name), None)


class _Base:
    def __init__(self, *args, **kwargs):
        pass


class _FakeWidget:
    """Any widget of the .ui: plain attributes, recorded signal connections."""

    def __init__(self, name, cls):
        self.name, self.cls, self.connections = name, cls, {}
        self.enabled, self.text, self.toolTip, self.value, self.visible = True, "", "", 0, True

    def connect(self, signal, slot):
        assert callable(slot)
        self.connections[signal] = slot

    def setVisible(self, visible):
        self.visible = bool(visible)

    def setMRMLScene(self, scene):
        self.scene = scene


class _FakeTimer:
    def __init__(self):
        self.active, self.interval, self.slot = False, None, None

    def setInterval(self, milliseconds):
        self.interval = milliseconds

    def connect(self, signal, slot):
        assert signal == "timeout()"
        self.slot = slot

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


def _fake_slicer_modules(scene, calls):
    slicer = types.ModuleType("slicer")
    slicer.mrmlScene = scene
    slicer.vtkMRMLScalarVolumeNode = type("vtkMRMLScalarVolumeNode", (), {})
    slicer.vtkMRMLTableNode = type("vtkMRMLTableNode", (), {})
    slicer.app = types.SimpleNamespace(connect=lambda *a: None, testingEnabled=lambda: True, layoutManager=lambda: None)

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")

    class _Validator:
        def __init__(self, *args):
            self.args = args

    wrapper.Choice = type("Choice", (_Validator,), {})
    wrapper.WithinRange = type("WithinRange", (_Validator,), {})

    def parameterNodeWrapper(cls):
        fields = dict(cls.__annotations__)

        def __init__(self, node=None):
            for name in fields:
                setattr(self, name, getattr(cls, name, None))

        def connectGui(self, ui):
            bound = {parameter for parameter, _, _ in ui_parameter_bindings()}
            assert bound <= set(fields), "connectGui would fail on an unknown SlicerParameterName"
            return "gui-tag"

        def disconnectGui(self, tag):
            assert tag == "gui-tag"

        return type(cls.__name__, (), {"__init__": __init__, "__doc__": cls.__doc__, "connectGui": connectGui,
                                       "disconnectGui": disconnectGui})

    wrapper.parameterNodeWrapper = parameterNodeWrapper

    loadable = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic(_Base):
        def getParameterNode(self):
            return None

    class ScriptedLoadableModuleWidget(_Base):
        def __init__(self, parent=None):
            self.parent = types.SimpleNamespace(isEntered=True)

        def setup(self):
            self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

        def resourcePath(self, relative):
            return str(MODULE_DIR / "Resources" / relative)

    loadable.ScriptedLoadableModule = type("ScriptedLoadableModule", (_Base,), {})
    loadable.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    loadable.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            calls.append(("delayDisplay", message))

    loadable.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest

    util = types.ModuleType("slicer.util")

    class VTKObservationMixin:
        def __init__(self):
            self.observations = []

        def addObserver(self, obj, event, callback):
            self.observations.append((obj, event, callback))

        def removeObserver(self, obj, event, callback):
            self.observations.remove((obj, event, callback))

        def removeObservers(self):
            self.observations = []

    util.VTKObservationMixin = VTKObservationMixin

    def loadUI(path):
        assert Path(path) == UI_FILE
        return _FakeWidget("FusionINN", "qMRMLWidget")

    def childWidgetVariables(widget):
        return types.SimpleNamespace(**{name: _FakeWidget(name, cls) for name, cls in ui_widgets().items()})

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as error:  # the real one shows a dialog and swallows the exception
            calls.append(("error", f"{message} {error}"))

    util.loadUI, util.childWidgetVariables, util.tryWithErrorDisplay = loadUI, childWidgetVariables, tryWithErrorDisplay
    util.errorDisplay = lambda text, **kwargs: calls.append(("error", text))
    util.warningDisplay = lambda text, **kwargs: calls.append(("warning", text))
    util.setSliceViewerLayers = lambda **kwargs: calls.append(("setSliceViewerLayers", kwargs))
    util.selectModule = lambda name: calls.append(("selectModule", name))
    util.arrayFromVolume = lambda node: node.array
    util.arrayFromVTKMatrix = lambda matrix: matrix.array.copy()

    def addVolumeFromArray(narray, ijkToRAS=None, name=None, nodeClassName=None):
        assert isinstance(ijkToRAS, np.ndarray) and ijkToRAS.shape == (4, 4)
        node = _FakeVolumeNode(scene, nodeClassName or "vtkMRMLScalarVolumeNode", name, narray, ijkToRAS)
        node.CreateDefaultDisplayNodes()
        scene.nodes.append(node)
        calls.append(("addVolumeFromArray", name))
        return node

    util.addVolumeFromArray = addVolumeFromArray
    util.loadTable = lambda path: _FakeTableNode(scene, Path(path).stem)
    slicer.util, slicer.i18n, slicer.parameterNodeWrapper = util, i18n, wrapper
    slicer.ScriptedLoadableModule = loadable

    vtk = types.ModuleType("vtk")
    vtk.vtkMatrix4x4 = _FakeMatrix
    for kind in ("string", "double", "int", "bit"):
        setattr(vtk, f"vtk{kind.capitalize()}Array", lambda kind=kind: _FakeArray(kind))
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent=33)
    qt = types.ModuleType("qt")
    qt.QTimer = _FakeTimer
    slicer.modules = types.SimpleNamespace()
    return {"slicer": slicer, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
            "slicer.ScriptedLoadableModule": loadable, "slicer.util": util, "vtk": vtk,
            "qt": qt, "ctk": types.ModuleType("ctk")}


@pytest.fixture
def fake_slicer(monkeypatch):
    scene, calls = _FakeScene(), []
    for name, module in _fake_slicer_modules(scene, calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("FusionINN_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return types.SimpleNamespace(module=module, scene=scene, calls=calls)


def _volume_node(fake, array, name, ijk_to_ras=None):
    matrix = np.diag([-1.0, -1.0, 1.0, 1.0]) if ijk_to_ras is None else ijk_to_ras
    node = _FakeVolumeNode(fake.scene, "vtkMRMLScalarVolumeNode", name, array, matrix)
    fake.scene.nodes.append(node)
    return node


def test_logic_fuse_decompose_score_with_fake_slicer(fake_slicer, monkeypatch):
    from FusionINNLib import slicer_support as support
    from FusionINNLib.metrics import FUSION_METRIC_NAMES

    module = fake_slicer.module
    logic = module.FusionINNLogic()
    assert logic.ensureDependencies(askConfirmation=False)
    t1ce, flair, seg = logic.loadPhantomSample(shape=(16, 32, 32), seed=4)
    assert [n.class_name for n in (t1ce, flair, seg)] == ["vtkMRMLScalarVolumeNode"] * 2 + ["vtkMRMLLabelMapVolumeNode"]
    p = module.FusionINNParameterNode(None)
    p.inputVolume1, p.inputVolume2, p.device, p.batchSize = t1ce, flair, "cpu", 4

    fused_nodes = logic.fuse(p)
    fused, latent = fused_nodes["fused"], fused_nodes["latent"]
    assert p.fusedVolume is fused and fused.name == "FusionINNPhantom_T1ce + FusionINNPhantom_FLAIR fused"
    assert fused.array.shape == (16, 32, 32) and 0 <= fused.array.min() and fused.array.max() <= 1
    np.testing.assert_allclose(fused.ijk_to_ras, t1ce.ijk_to_ras)
    assert latent.class_name == "vtkMRMLVectorVolumeNode" and latent.array.shape[-1] == 2
    assert logic.latentNodeOf(fused) is latent and fused.GetNodeReference(support.REFERENCE_INPUT1) is t1ce
    assert logic.recordOf(fused)["inputs"] == ["FusionINNPhantom_T1ce", "FusionINNPhantom_FLAIR"]

    exact = logic.decompose(p)
    for node, source in ((exact["decomposed1"], t1ce), (exact["decomposed2"], flair)):
        np.testing.assert_allclose(node.array, source.array, atol=1e-3 * np.ptp(source.array))
        assert node.GetAttribute(support.ATTRIBUTE_PREFIX + "Mode") == "exact"
        assert node.GetNodeReference(support.REFERENCE_FUSED) is fused
    assert exact["decomposed1"].name.endswith("decomposed FusionINNPhantom_T1ce")

    p.useKeptLatent, p.samples = False, 2
    sampled = logic.decompose(p)
    assert sampled["std1"].display.color_node_id == support.OVERLAY_COLORMAPS[support.STD_COLORMAP]
    assert sampled["std1"].GetAttribute(support.ATTRIBUTE_PREFIX + "Samples") == "2"

    p.maskVolume, p.keepBaselineVolumes = seg, True
    before = len(fake_slicer.scene.nodes)
    table = logic.score(p, baselines=True)["table"]
    columns = {c.name: c for c in table.table.columns}
    assert list(columns) == ["Metric", "FusionINN", "mean", "max", "weighted", "Description"]
    assert columns["FusionINN"].kind == "double" and columns["Metric"].kind == "string"
    rows = columns["Metric"].values
    assert rows[:len(FUSION_METRIC_NAMES)] == list(FUSION_METRIC_NAMES)
    assert any(r.startswith("Decomposed 1 SSIM") for r in rows)  # sampled decompositions are scored too
    assert table.locked and table.column_header and p.metricsTable is table
    assert table.GetAttribute(support.ROLE_ATTRIBUTE) == "metrics"
    assert len(fake_slicer.scene.nodes) == before + 1 + 3  # the table and the three baseline volumes

    differences = logic.makeDifferenceMaps(p)
    assert len(differences) == 2 and differences[0].display.window_level[1] == 0.0


def test_logic_geometry_round_trip_with_fake_slicer(fake_slicer):
    module = fake_slicer.module
    logic = module.FusionINNLogic()
    matrix = np.array([[0.0, -1.2, 0.0, 10.0], [0.9, 0.0, 0.0, -4.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1.0]])
    node = _volume_node(fake_slicer, np.arange(60, dtype=np.float32).reshape(3, 4, 5), "oblique", matrix)
    volume = logic.volumeFromNode(node)
    assert volume.array is not node.array  # detached copy for the worker thread
    with logic._allOrNothing() as created:
        copy = logic.addVolumeNode(volume, "copy", created)
    np.testing.assert_allclose(copy.ijk_to_ras, matrix, atol=1e-12)
    np.testing.assert_array_equal(copy.array, node.array)


def test_logic_creates_all_outputs_or_none(fake_slicer):
    module = fake_slicer.module
    logic = module.FusionINNLogic()
    t1ce, flair, _seg = logic.loadPhantomSample(shape=(16, 32, 32), seed=5)
    p = module.FusionINNParameterNode(None)
    p.inputVolume1, p.inputVolume2, p.device = t1ce, flair, "cpu"
    request = logic.prepareFuse(p)
    output = logic.computeFuse(request)
    output.latent = np.zeros((3, 1, 1, 1))  # malformed: refused after the fused node was made
    before = list(fake_slicer.scene.nodes)
    with pytest.raises(ValueError, match="latent"):
        logic.finishFuse(request, output)
    assert fake_slicer.scene.nodes == before


def test_logic_refuses_missing_inputs_and_model_file(fake_slicer):
    module = fake_slicer.module
    logic = module.FusionINNLogic()
    p = module.FusionINNParameterNode(None)
    with pytest.raises(ValueError, match="input volume"):
        logic.prepareFuse(p)
    p.inputVolume1 = p.inputVolume2 = _volume_node(fake_slicer, np.ones((16, 16, 16), np.float32), "v")
    p.modelSource = "file"
    with pytest.raises(ValueError, match="model file"):
        logic.prepareFuse(p)
    with pytest.raises(ValueError, match="fused volume"):
        logic.prepareDecompose(p)
    p.fusedVolume = p.inputVolume1
    with pytest.raises(ValueError, match="no kept latent"):
        logic.prepareDecompose(p)


def test_logic_batch_with_fake_slicer(fake_slicer, tmp_path):
    from FusionINNLib.phantom import write_phantom_cases

    module = fake_slicer.module
    logic = module.FusionINNLogic()
    write_phantom_cases(tmp_path / "in", cases=2, shape=(16, 32, 32), seed=1)
    p = module.FusionINNParameterNode(None)
    p.batchInputDirectory, p.batchOutputDirectory, p.device = tmp_path / "in", tmp_path / "out", "cpu"
    request = logic.prepareBatch(p)
    progress = []
    result = logic.computeBatch(request, progress.append, lambda: False, lambda message: None)
    assert result.succeeded == 2 and progress[-1] == 1.0
    assert "Q_SSIM" in result.summary_path.read_text(encoding="utf-8").splitlines()[0].split("\t")
    p.batchInputDirectory = tmp_path / "missing"
    with pytest.raises(ValueError, match="input folder"):
        logic.prepareBatch(p)


def _run_job(widget, timeout=120.0):
    """Drive the widget's QTimer by hand until its background job has been collected."""
    import time

    deadline = time.monotonic() + timeout
    while widget._job is not None:
        assert widget._jobTimer.active, "a running job must be polled by the timer"
        widget._jobTimer.slot()
        assert time.monotonic() < deadline, "background job did not finish"
        time.sleep(0.02)
    assert not widget._jobTimer.active


def test_widget_runs_jobs_in_the_background_with_fake_slicer(fake_slicer):
    module = fake_slicer.module
    widget = module.FusionINNWidget()
    widget.setup()
    ui, p = widget.ui, widget._parameterNode
    assert all(ui.__dict__[name].connections for name in ("fuseButton", "cancelButton", "trainButton"))
    assert not ui.fuseButton.enabled and not ui.progressBar.visible  # nothing selected yet

    t1ce, flair, _seg = widget.logic.loadPhantomSample(shape=(16, 32, 32), seed=6)
    p.inputVolume1, p.inputVolume2, p.device, p.batchSize = t1ce, flair, "cpu", 4
    widget.updateGuiState()
    assert ui.fuseButton.enabled and ("UNTRAINED" in ui.modelInfoLabel.text or "Bundled" in ui.modelInfoLabel.text)

    ui.fuseButton.connections["clicked(bool)"]()
    assert widget._job is not None and ui.progressBar.visible and ui.cancelButton.enabled
    assert not ui.decomposeButton.enabled and not ui.fuseButton.enabled  # one job at a time
    _run_job(widget)
    errors = [c for c in fake_slicer.calls if c[0] == "error"]
    assert not errors, errors
    assert p.fusedVolume is not None and "finished" in ui.statusLabel.text and not ui.progressBar.visible
    assert "Kept latent found" in ui.latentStatusLabel.text and ui.decomposeButton.enabled
    assert "Devices found: cpu" in ui.deviceInfoLabel.text

    ui.decomposeButton.connections["clicked(bool)"]()
    _run_job(widget)
    assert p.decomposedVolume1 is not None and p.decomposedVolume2 is not None
    ui.scoreBaselinesButton.connections["clicked(bool)"]()
    _run_job(widget)
    assert p.metricsTable is not None and [c.name for c in p.metricsTable.table.columns][2:5] == [
        "mean", "max", "weighted"]
    ui.differenceMapsButton.connections["clicked(bool)"]()
    assert "2 difference map" in ui.statusLabel.text
    p.explainSlices = "7:8"
    ui.explainButton.connections["clicked(bool)"]()
    _run_job(widget)
    assert p.overlayVolume is not None and p.overlayVolume.name.endswith("guidance")
    assert not [c for c in fake_slicer.calls if c[0] == "error"]

    # cancel: a job stopped by the user adds no node
    big1, big2, _ = widget.logic.loadPhantomSample(shape=(64, 64, 64), seed=7)
    p.inputVolume1, p.inputVolume2, p.batchSize = big1, big2, 1
    before = list(fake_slicer.scene.nodes)
    ui.fuseButton.connections["clicked(bool)"]()
    ui.cancelButton.connections["clicked(bool)"]()
    _run_job(widget)
    assert "cancelled" in ui.statusLabel.text and fake_slicer.scene.nodes == before
    assert not [c for c in fake_slicer.calls if c[0] == "error"]

    # errors while preparing are shown, not raised; the training stub reports the missing module
    p.inputVolume2 = None
    widget.onFuseButton()
    assert [c for c in fake_slicer.calls if c[0] == "error"] and widget._job is None
    widget.onTrainButton()
    assert any(kind == "warning" and "not available" in text for kind, text in fake_slicer.calls)
    fake_slicer.module.slicer.modules.fusioninntraining = object()
    widget.onTrainButton()
    assert ("selectModule", "FusionINNTraining") in fake_slicer.calls
    widget.cleanup()


def test_in_slicer_self_tests_pass_with_fake_slicer(fake_slicer):
    """The FusionINNTest methods themselves (their checks and tolerances) against the fake API."""
    test = fake_slicer.module.FusionINNTest("runTest")
    test.runTest()
    shown = [text for kind, text in fake_slicer.calls if kind == "delayDisplay"]
    assert "Fuse, decompose and score passed" in shown and "Cancel passed" in shown
    assert "Geometry round trip passed" in shown


def test_logic_explain_and_jacobian_with_fake_slicer(fake_slicer):
    from FusionINNLib import slicer_support as support

    module = fake_slicer.module
    logic = module.FusionINNLogic()
    t1ce, flair, _seg = logic.loadPhantomSample(shape=(16, 32, 32), seed=9)
    p = module.FusionINNParameterNode(None)
    p.inputVolume1, p.inputVolume2, p.device, p.explainSlices = t1ce, flair, "cpu", "7:8"
    nodes = logic.explain(p)
    guidance1, rgb = nodes["guidance1"], nodes["rgb"]
    assert guidance1.array.shape == (16, 32, 32) and not guidance1.array[:7].any() and guidance1.array[7].any()
    assert not guidance1.array[8:].any()
    assert rgb.class_name == "vtkMRMLVectorVolumeNode" and rgb.array.shape == (16, 32, 32, 3)
    assert guidance1.GetAttribute(support.ATTRIBUTE_PREFIX + "Slices") == "[7, 8]"
    assert guidance1.display.color_node_id == support.OVERLAY_COLORMAPS[support.GUIDANCE_COLORMAP]

    centre_ras = (t1ce.ijk_to_ras @ [16, 16, 8, 1.0])[:3]
    request = logic.prepareJacobian(p, centre_ras)
    assert request["index"] == (16, 16, 8)
    jacobians = logic.finishJacobian(request, logic.computeJacobian(request))
    assert jacobians["jacobian1"].array.shape[0] == 1 and jacobians["jacobian1"].name.endswith("ijk 16,16,8")
    with pytest.raises(ValueError, match="outside the volume"):
        logic.prepareJacobian(p, (1000.0, 0.0, 0.0))
    p.explainSlices = "9:7"
    with pytest.raises(ValueError, match="slice range"):
        logic.prepareExplain(p)
