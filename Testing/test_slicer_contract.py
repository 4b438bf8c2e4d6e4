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

# What the Slicer-side files (FusionINN.py, FusionINNSlicerLib/) may import from the core: only
# modules that import no torch (Slicer's process runs no compute; the worker does).
PUBLIC_API = {
    "slicer_support": None,  # the module's own plain-data helpers: any public name
    "worker_client": {"WorkerClient", "WorkerCancelled", "WorkerError"},
    "io.volume": {"Volume"},
    "metrics": {"METRIC_DESCRIPTIONS", "FUSION_METRIC_NAMES"},  # the package exports them from metrics.quality
}
SLICER_LIB_DIR = MODULE_DIR / "FusionINNSlicerLib"
SLICER_SIDE_FILES = [MODULE_FILE] + sorted(SLICER_LIB_DIR.glob("*.py"))

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
    files = [MODULE_FILE] + sorted(LIB_DIR.rglob("*.py")) + sorted(SLICER_LIB_DIR.glob("*.py"))
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
    from FusionINNLib.core.engine import DEVICES, PRIORS
    from FusionINNLib.core.normalization import MODES

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
    on_disk_scripts = {"FusionINN.py"} | {p.relative_to(MODULE_DIR).as_posix() for folder in (LIB_DIR, SLICER_LIB_DIR)
                                          for p in folder.rglob("*.py")}
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
            else:  # the module's path below FusionINNLib, e.g. "io.volume"
                found += [(".".join(parts[1:]), alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("FusionINNLib"):
                    found.append((alias.name.split(".", 1)[1] if "." in alias.name else "", "*module*"))
    return found


@pytest.mark.parametrize("path", SLICER_SIDE_FILES, ids=lambda p: p.name)
def test_slicer_side_imports_only_torch_free_core_modules(path):
    imports = _core_imports(ast.parse(path.read_text(encoding="utf-8")))
    if path.name != "__init__.py":
        assert ("slicer_support", "*module*") in imports
    for module, name in imports:
        assert module in PUBLIC_API, f"{path.name} imports FusionINNLib.{module}, which is not torch-free"
        allowed = PUBLIC_API[module]
        if name == "*module*":
            assert allowed is None, f"import the public functions of FusionINNLib.{module}, not the module"
            continue
        assert not name.startswith("_"), f"FusionINN.py imports the private {module}.{name}"
        assert allowed is None or name in allowed, f"{module}.{name} is not in the public API list"
        source = LIB_DIR / f"{module.replace('.', '/')}.py"
        if not source.is_file():  # a package: the names its __init__ defines or exports
            source = LIB_DIR / module.replace(".", "/") / "__init__.py"
        if source.is_file():
            body = ast.parse(source.read_text(encoding="utf-8")).body
            defined = {n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {t.id for n in body if isinstance(n, (ast.Assign, ast.AnnAssign))
                        for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
            defined |= {alias.asname or alias.name for n in body if isinstance(n, ast.ImportFrom) for alias in n.names}
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
    core = next(n for n in ast.parse((SLICER_LIB_DIR / "logic.py").read_text(encoding="utf-8")).body
                if isinstance(n, ast.ClassDef) and n.name == "FusionINNCoreLogic")
    logic_methods = {n.name for cls in (logic, core) for n in cls.body if isinstance(n, ast.FunctionDef)}
    assert {"fuse", "decompose", "score", "loadPhantomSample", "ensureDependencies"} <= logic_methods


def test_module_classes_and_training_stub():
    tree = _module_tree()
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes["FusionINN"] == ["ScriptedLoadableModule"]
    assert classes["FusionINNWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes["FusionINNLogic"] == ["ScriptedLoadableModuleLogic", "FusionINNCoreLogic"]
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "def onTrainButton(self)" in source and "not available" in source
    # the sample is plain files (file:// URIs): SampleData's downloadFromSource ignores customDownloader
    assert "registerCustomSampleDataSource" in source and "uris=phantomSampleURIs()" in source
    assert "customDownloader=" not in source
    assert "tryWithErrorDisplay" in source and "PyTorchUtils" in source and "pip_install" in source
