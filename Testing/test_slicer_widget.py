"""The FusionINN widget's job handling (FusionINN.py), with real MRML, a real worker and stand-ins for Qt.

What stands in for what:

* ``qt``, ``ctk``: ``QTimer`` is a recorder (the test calls the widget's timer callback itself, as
  Qt's event loop would every ``interval`` ms); widgets are ``FakeWidget`` objects named after the
  ``.ui`` file's widgets, with their ``SlicerParameterName`` properties;
* ``slicer.parameterNodeWrapper``: a class with the declared fields and ``connectParametersToGui`` /
  ``disconnectGui`` that record their tags (Slicer's own wrapper needs Slicer's application);
* ``slicer.ScriptedLoadableModule``: minimal base classes; ``slicer.app``: testing mode, no main window,
  this process's environment as Slicer's startup environment, no PythonSlicer (so the worker runs
  with this Python);
* dialogs (``errorDisplay``, ``tryWithErrorDisplay`` ...) record what they would show.

The scene, volume, crosshair and table nodes are real (slicer-core), and every job runs in a real
worker process. Skipped where slicer-core is not installed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import vtk

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the slicer module here is not slicer-core", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
MODULE_FILE = REPO / "FusionINN" / "FusionINN.py"
UI_FILE = REPO / "FusionINN" / "Resources" / "UI" / "FusionINN.ui"


class FakeWidget:
    """Stands in for a Qt widget: plain attributes, recorded connections and visibility."""

    def __init__(self, name="", parameter=None):
        self.name, self._parameter = name, parameter
        self.connections = {}
        self.visible, self.enabled, self.text, self.toolTip, self.value = True, True, "", "", 0
        self.directory, self.currentPath = ".", ""

    def connect(self, signal, handler):
        self.connections[signal] = handler

    def property(self, key):
        return self._parameter if key == "SlicerParameterName" else None

    def setVisible(self, visible):
        self.visible = bool(visible)

    def setMRMLScene(self, scene):
        self.scene = scene

    def addWidget(self, widget):
        pass


class FakeTimer:
    """Stands in for qt.QTimer: remembers its callback and whether it runs."""

    def __init__(self):
        self.callback, self.interval, self.active = None, None, False

    def setInterval(self, interval):
        self.interval = interval

    def connect(self, signal, callback):
        self.callback = callback

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    @staticmethod
    def singleShot(delay, callback):
        callback()


def _ui_namespace():
    root = ET.parse(UI_FILE).getroot()
    ui = types.SimpleNamespace()
    for widget in root.iter("widget"):
        parameter = next((p.find("string").text for p in widget.findall("property")
                          if p.get("name") == "SlicerParameterName"), None)
        setattr(ui, widget.get("name"), FakeWidget(widget.get("name"), parameter))
    return ui


def _fake_parameter_node_wrapper():
    module = types.ModuleType("slicer.parameterNodeWrapper")

    def marker(*args, **kwargs):
        return None

    def parameterNodeWrapper(cls):
        import typing

        names = list(typing.get_type_hints(cls, include_extras=True))

        class Wrapper:
            connected = {}
            next_tag = [0]

            def __init__(self, node=None):
                for name in names:
                    object.__setattr__(self, name, getattr(cls, name, None))
                self._observers = {}

            def connectParametersToGui(self, mapping):
                Wrapper.next_tag[0] += 1
                Wrapper.connected[Wrapper.next_tag[0]] = dict(mapping)
                return Wrapper.next_tag[0]

            def disconnectGui(self, tag):
                Wrapper.connected.pop(tag, None)

            def AddObserver(self, event, callback, priority=0.0):
                tag = len(self._observers) + 1
                self._observers[tag] = callback
                return tag

            def RemoveObserver(self, tag):
                self._observers.pop(tag, None)

        Wrapper.__name__ = cls.__name__
        return Wrapper

    module.parameterNodeWrapper = parameterNodeWrapper
    module.Choice = module.WithinRange = marker
    return module


def _fake_scripted_loadable_module():
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=True)
            self.layout = FakeWidget("layout")

        def setup(self):
            pass

        def resourcePath(self, path):
            return str(REPO / "FusionINN" / "Resources" / path)

    class ScriptedLoadableModuleLogic:
        def __init__(self):
            pass

        def getParameterNode(self):
            return None

    class ScriptedLoadableModuleTest:
        pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    return module


@pytest.fixture
def widget(monkeypatch, tmp_path):
    scene = slicer.vtkMRMLScene()
    shown = {"errors": [], "warnings": []}
    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    for name, module in (("qt", qt), ("ctk", types.ModuleType("ctk")), ("slicer.i18n", i18n),
                         ("slicer.parameterNodeWrapper", _fake_parameter_node_wrapper()),
                         ("slicer.ScriptedLoadableModule", _fake_scripted_loadable_module())):
        monkeypatch.setitem(sys.modules, name, module)
    environment = types.SimpleNamespace(keys=lambda: list(os.environ), value=lambda key: os.environ[key])
    app = types.SimpleNamespace(testingEnabled=lambda: True, layoutManager=lambda: None, connect=lambda *a: None,
                                temporaryPath=str(tmp_path), slicerHome=str(tmp_path / "no-slicer"),
                                startupEnvironment=lambda: environment)  # QProcessEnvironment: this process's
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(), raising=False)

    @contextlib.contextmanager
    def tryWithErrorDisplay(message="", waitCursor=False):
        try:
            yield
        except Exception as error:  # noqa: BLE001 - recorded like the dialog would show it
            shown["errors"].append(f"{message} {error}")

    for name, value in (("loadUI", lambda path: FakeWidget("ui")), ("childWidgetVariables", lambda w: _ui_namespace()),
                        ("tryWithErrorDisplay", tryWithErrorDisplay),
                        ("errorDisplay", lambda text, **kw: shown["errors"].append(text)),
                        ("warningDisplay", lambda text, **kw: shown["warnings"].append(text)),
                        ("setSliceViewerLayers", lambda **kw: None)):
        monkeypatch.setattr(slicer.util, name, value, raising=False)
    spec = importlib.util.spec_from_file_location("FusionINN_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    w = module.FusionINNWidget()
    w.setup()
    w.shown, w.scene, w.module = shown, scene, module
    yield w
    w.cleanup()


def _inputs(widget, shape=(16, 48, 48)):
    from FusionINNLib.io.phantom import make_phantom_case
    from FusionINNLib.io.volume import Volume

    case = make_phantom_case(shape, seed=5)
    nodes = []
    with widget.logic.allOrNothing() as created:
        for key in ("t1ce", "flair"):
            nodes.append(widget.logic.addVolumeNode(Volume(case[key]), key, created))
    p = widget._parameterNode
    p.inputVolume1, p.inputVolume2, p.device, p.batchSize = nodes[0], nodes[1], "cpu", 4
    return nodes


def _run_event_loop(widget, timeout=300.0):
    """What Qt's event loop does for the widget: call the QTimer's callback every interval."""
    start = time.monotonic()
    while widget._jobTimer.active:
        time.sleep(widget._jobTimer.interval / 1000.0)
        widget._jobTimer.callback()
        assert time.monotonic() - start < timeout
    return time.monotonic() - start


def test_fuse_then_decompose_from_the_buttons(widget):
    t1ce, _ = _inputs(widget)
    p = widget._parameterNode
    widget.updateGuiState()
    assert widget.ui.fuseButton.enabled and not widget.ui.cancelButton.enabled
    widget.ui.fuseButton.connections["clicked(bool)"]()
    assert widget.shown["errors"] == []
    assert widget._job is not None and widget._jobTimer.active and widget.ui.progressBar.visible
    assert widget.ui.cancelButton.enabled and not widget.ui.fuseButton.enabled
    _run_event_loop(widget)
    assert widget.shown["errors"] == []
    assert p.fusedVolume is not None and p.fusedVolume.GetScene() is widget.scene
    assert "Fusion finished" in widget.ui.statusLabel.text and not widget.ui.progressBar.visible
    assert not any(widget.logic.worker().root.glob("job-*")), "the job folder is removed once read"
    widget.ui.decomposeButton.connections["clicked(bool)"]()
    _run_event_loop(widget)
    source = slicer.util.arrayFromVolume(t1ce).astype(np.float64)
    error = np.abs(slicer.util.arrayFromVolume(p.decomposedVolume1) - source).max()
    assert error < 1e-3 * np.ptp(source)


def test_cancel_from_the_button_ends_within_a_second_and_adds_nothing(widget):
    _inputs(widget, shape=(48, 96, 96))
    widget._parameterNode.batchSize = 1
    widget.logic.runJob("ping", {})  # a started worker, as after entering the module
    before = widget.scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")
    widget.onFuseButton()
    time.sleep(0.3)
    widget._jobTimer.callback()
    widget.onCancelButton()
    assert "cancelling" in widget.ui.statusLabel.text
    assert _run_event_loop(widget) < 1.0
    assert "cancelled; nothing was added" in widget.ui.statusLabel.text
    assert widget.scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == before
    assert widget._parameterNode.fusedVolume is None and widget.shown["errors"] == []


def test_a_failing_job_shows_one_clear_message(widget):
    _inputs(widget)
    far = widget.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "far away")
    slicer.util.updateVolumeFromArray(far, np.ones((4, 4, 4), np.float32))
    far.SetOrigin(1e5, 1e5, 1e5)
    widget._parameterNode.inputVolume2 = far
    widget.onFuseButton()
    _run_event_loop(widget)
    assert len(widget.shown["errors"]) == 1
    message = widget.shown["errors"][0]
    assert "overlap" in message and "\n" not in message and "Traceback" not in message
    assert "Fusion failed" in widget.ui.statusLabel.text


def test_live_jacobian_follows_the_crosshair(widget):
    t1ce, _ = _inputs(widget)
    crosshair = widget.scene.AddNewNodeByClass("vtkMRMLCrosshairNode")
    ijk_to_ras = widget.logic.worldIJKToRAS(t1ce)
    crosshair.SetCrosshairRAS(*(ijk_to_ras @ [20, 20, 8, 1])[:3])
    widget.onJacobianButton()
    assert widget._liveJacobian and widget._jobTimer.interval == widget.module.LIVE_POLL_INTERVAL_MS
    _run_event_loop(widget)
    first = widget._parameterNode.overlayVolume
    assert first is not None and "ijk 20,20,8" in first.GetName()
    count = widget.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    for i in (21, 22, 23, 30):  # moves while a job runs are coalesced: only the last one is computed next
        crosshair.SetCrosshairRAS(*(ijk_to_ras @ [i, 25, 8, 1])[:3])
    _run_event_loop(widget)
    assert widget._parameterNode.overlayVolume is first, "the same nodes are refilled"
    assert "ijk 30,25,8" in first.GetName()
    assert widget.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == count
    crosshair.SetCrosshairRAS(1e4, 0, 0)  # outside the volume: said, no job
    assert widget._job is None and "outside the volume" in widget.ui.statusLabel.text
    widget.onJacobianButton()  # the toggle stops it
    assert not widget._liveJacobian and widget.shown["errors"] == []


def test_entering_twice_keeps_one_gui_connection(widget):
    wrapper = type(widget._parameterNode)
    assert len(wrapper.connected) == 1
    for _ in range(3):
        widget.exit()
        assert wrapper.connected == {}
        widget.enter()
        assert len(wrapper.connected) == 1
    (mapping,) = wrapper.connected.values()
    assert mapping["inputVolume1"] is widget.ui.inputVolume1Selector


def test_training_checks_the_folder_and_resumes_a_killed_run(widget, monkeypatch, tmp_path):
    """Train button: an unset ctkDirectoryButton (".") is refused; with an unfinished run of the same
    model the CLI gets --resume (slicer.cli.run stands in for Slicer's CLI runner, returning a real
    vtkMRMLCommandLineModuleNode whose status the test sets as the CLI logic would)."""
    calls = []

    widget.scene.RegisterNodeClass(slicer.vtkMRMLCommandLineModuleNode())  # done by Slicer's CLI modules

    def run(module, node, parameters, wait_for_completion=False):
        calls.append(dict(parameters))
        cli_node = widget.scene.AddNewNodeByClass("vtkMRMLCommandLineModuleNode")
        cli_node.SetStatus(cli_node.Scheduled)
        return cli_node

    class ProgressBar(FakeWidget):
        def setCommandLineModuleNode(self, node):
            self.node = node

    monkeypatch.setattr(slicer, "cli", types.SimpleNamespace(run=run), raising=False)
    monkeypatch.setattr(slicer, "qSlicerCLIProgressBar", ProgressBar, raising=False)
    monkeypatch.setattr(slicer.modules, "fusioninntraining", object(), raising=False)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kw: True, raising=False)

    widget.ui.trainDataDirectoryButton.directory = "."  # what an unset ctkDirectoryButton returns
    widget.ui.trainOutputModelPathLineEdit.currentPath = str(tmp_path / "model.pt")
    widget.onStartTrainingButton()
    assert calls == [] and "Choose the folder holding the BraTS-style cases" in widget.shown["errors"][-1]

    data = tmp_path / "data"
    data.mkdir()
    widget.ui.trainDataDirectoryButton.directory = str(data)
    widget.ui.trainEpochsSpinBox.value = 3
    last = tmp_path / "model_run" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"a finished epoch")
    widget.onStartTrainingButton()
    assert calls and calls[-1]["resume"] == str(last) and calls[-1]["dataDir"] == str(data)
    node = widget._trainingNode
    node.SetStatus(node.Running)
    assert widget.ui.startTrainingButton.text == "Cancel training"
    node.SetStatus(node.Cancelled)  # Slicer killed the CLI (SIGKILL)
    assert "press Train again to resume it from" in widget.ui.statusLabel.text and str(last) in \
        widget.ui.statusLabel.text
    assert widget.ui.startTrainingButton.text == "Train"
    # a second run that completes: its history is plotted with plot nodes, the status says so
    widget.onStartTrainingButton()
    node = widget._trainingNode
    history = widget._trainingOutputs["history"]
    table = history.GetTable()
    for name, values in (("epoch", [1, 2]), ("train_loss", [2.0, 1.0]), ("val_loss", [2.5, 1.5])):
        array = vtk.vtkDoubleArray() if name != "epoch" else vtk.vtkIntArray()
        array.SetName(name)
        for value in values:
            array.InsertNextValue(value)
        table.AddColumn(array)
    shown_charts = []
    plots = types.SimpleNamespace(logic=lambda: types.SimpleNamespace(ShowChartInLayout=shown_charts.append))
    monkeypatch.setattr(slicer.modules, "plots", plots, raising=False)
    node.SetStatus(node.Running)
    node.SetStatus(node.Completed)
    assert "Training finished" in widget.ui.statusLabel.text
    assert len(shown_charts) == 1 and shown_charts[0].GetNumberOfPlotSeriesNodes() == 2


def test_live_jacobian_recovers_when_the_worker_drops_its_session(widget, tmp_path):
    """A replaced model file (same path) makes the worker drop the inputs it held; the next update
    sends them again instead of failing."""
    import shutil

    t1ce, _ = _inputs(widget)
    model = tmp_path / "model.pt"
    shutil.copy(REPO / "FusionINN" / "Resources" / "Models" / "fusioninn_default.pt", model)
    p = widget._parameterNode
    p.modelSource, p.modelPath = "file", model
    crosshair = widget.scene.AddNewNodeByClass("vtkMRMLCrosshairNode")
    ijk_to_ras = widget.logic.worldIJKToRAS(t1ce)
    crosshair.SetCrosshairRAS(*(ijk_to_ras @ [20, 20, 8, 1])[:3])
    widget.onJacobianButton()
    _run_event_loop(widget)
    stamp = model.stat().st_mtime
    os.utime(model, (stamp + 10, stamp + 10))
    crosshair.SetCrosshairRAS(*(ijk_to_ras @ [25, 22, 8, 1])[:3])
    _run_event_loop(widget)
    assert widget.shown["errors"] == [] and widget._liveJacobian
    assert "ijk 25,22,8" in p.overlayVolume.GetName()
    widget.onJacobianButton()
