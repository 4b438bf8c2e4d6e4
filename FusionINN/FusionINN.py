"""FusionINN: decomposable multimodal MRI fusion with an invertible flow, as a 3D Slicer module.

This file is the thin Slicer layer: module metadata, the parameter node, the widget and a logic
that converts MRML volume nodes to and from :class:`FusionINNLib.volume.Volume` and calls the
public functions of ``FusionINNLib`` (the same ones the ``fusioninn`` command line uses). It
holds no image math; geometry conversion, naming, provenance and table layout are plain functions
in :mod:`FusionINNLib.slicer_support`, tested without Slicer.

Reference: N. Kumar, P. Gumhold et al., "FusionINN: Decomposable Image Fusion for Brain Tumor
Monitoring", arXiv:2403.15769 (2024).
"""
import contextlib
import importlib
import importlib.util
import logging
import os
import pathlib
import sys
import traceback
from typing import Annotated

import ctk  # noqa: F401 - makes the ctk widget classes known to the .ui loader and the GUI connectors
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from FusionINNLib import slicer_support as support

PHANTOM_SAMPLE_NAME = "FusionINNPhantom"
TRAINING_MODULE_NAME = "FusionINNTraining"
POLL_INTERVAL_MS = 100
VTK_ARRAY_CLASSES = {
    "string": vtk.vtkStringArray,
    "double": vtk.vtkDoubleArray,
    "int": vtk.vtkIntArray,
    "bit": vtk.vtkBitArray,
}


#
# FusionINN
#
class FusionINN(ScriptedLoadableModule):
    """Module metadata and sample-data registration."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FusionINN")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering")]
        # PyTorchUtils is not a hard dependency: the module must load (and pass the generic tests)
        # before PyTorch is installed; torch is obtained through it on first use.
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerFusionINN contributors"]
        self.parent.helpText = _("""
Fuse two co-registered MRI volumes (for example T1-Gd and FLAIR) into one with an invertible neural
network (FusionINN), and decompose a fused volume back into both sources, exactly with the kept
latent or by sampling (with per-voxel uncertainty). Score fusions with the metric suite of the
FusionINN paper against classical baselines, explain them with guidance maps and Jacobians, compare
everything side by side, and fuse whole folders of cases in batch.
See the <a href="https://github.com/SlicerFusionINN/SlicerFusionINN">extension documentation</a>.
""")
        self.parent.acknowledgementText = _("""
FusionINN was proposed by N. Kumar, P. Gumhold and colleagues (arXiv:2403.15769, 2024).
This extension is an independent implementation by the SlicerFusionINN contributors,
released under the MIT license. It uses PyTorch (through the PyTorch extension) and FrEIA.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """A phantom BraTS-style case (T1-Gd, FLAIR, tumour labels) generated locally: nothing is downloaded."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="FusionINN",
        sampleName=PHANTOM_SAMPLE_NAME,
        thumbnailFileName=os.path.join(iconsPath, "FusionINN.png"),
        # A single placeholder entry: the custom "downloader" generates the data, no URL is fetched.
        uris="generated-locally://FusionINN/phantom",
        fileNames=PHANTOM_SAMPLE_NAME,
        nodeNames=PHANTOM_SAMPLE_NAME,
        customDownloader=_generatePhantomSample,
    )


def _generatePhantomSample(source=None):
    with slicer.util.tryWithErrorDisplay(_("Failed to generate the FusionINN phantom."), waitCursor=True):
        logic = FusionINNLogic()
        if not logic.ensureDependencies():
            return []
        nodes = logic.loadPhantomSample()
        slicer.util.setSliceViewerLayers(background=nodes[0], fit=True)
        return list(nodes)
    return []


#
# FusionINNParameterNode
#
@parameterNodeWrapper
class FusionINNParameterNode:
    """Every option of the module, persisted in the scene.

    Fuse: inputVolume1/2, modelSource (bundled | file) and modelPath, device, keepLatent, axis,
    normalization, batchSize, amp. Decompose: fusedVolume, useKeptLatent, samples, seed,
    temperature, prior; decomposedVolume1/2 are set by Decompose. Score: maskVolume,
    paperCompatible, dataRange (0 = automatic), metricsTable, keepBaselineVolumes. Explain:
    explainSlices ("a:b" or empty). Compare: compareOrientation, linkViews, overlayVolume,
    overlayOpacity, overlayColormap. Batch: batchInputDirectory, batchOutputDirectory,
    batchModality1/2, batchPattern1/2, batchKeepLatent, batchMetrics.
    """

    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    modelSource: Annotated[str, Choice(["bundled", "file"])] = "bundled"
    modelPath: pathlib.Path = pathlib.Path()
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    keepLatent: bool = True
    axis: Annotated[int, Choice([0, 1, 2])] = 0
    normalization: Annotated[str, Choice(["volume", "slice"])] = "volume"
    batchSize: Annotated[int, WithinRange(1, 256)] = 8
    amp: bool = False

    fusedVolume: vtkMRMLScalarVolumeNode
    useKeptLatent: bool = True
    samples: Annotated[int, WithinRange(1, 256)] = 1
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    temperature: Annotated[float, WithinRange(0.0, 5.0)] = 1.0
    prior: Annotated[str, Choice(["normal", "zeros", "ones", "uniform"])] = "normal"
    decomposedVolume1: vtkMRMLScalarVolumeNode
    decomposedVolume2: vtkMRMLScalarVolumeNode

    maskVolume: vtkMRMLScalarVolumeNode
    paperCompatible: bool = False
    dataRange: Annotated[float, WithinRange(0.0, 1e9)] = 0.0
    metricsTable: vtkMRMLTableNode
    keepBaselineVolumes: bool = False

    explainSlices: str = ""

    compareOrientation: Annotated[str, Choice(["Axial", "Sagittal", "Coronal"])] = "Axial"
    linkViews: bool = True
    overlayVolume: vtkMRMLScalarVolumeNode
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    overlayColormap: Annotated[str, Choice(["Inferno", "Viridis", "Magma", "Plasma", "Hot", "Rainbow", "Red",
                                            "Green", "Grey", "Diverging blue-red"])] = "Inferno"

    batchInputDirectory: pathlib.Path = pathlib.Path()
    batchOutputDirectory: pathlib.Path = pathlib.Path()
    batchModality1: str = "t1ce"
    batchModality2: str = "flair"
    batchPattern1: str = ""
    batchPattern2: str = ""
    batchKeepLatent: bool = False
    batchMetrics: bool = True


#
# FusionINNWidget
#
class FusionINNWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: every option is bound to the parameter node through ``SlicerParameterName`` in the .ui."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobTitle = ""
        self._jobFinish = None
        self._jobTimer = None
        self._overlayActive = False

    # -- setup and parameter node ------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FusionINN.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FusionINNLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.fuseButton.connect("clicked(bool)", self.onFuseButton)
        self.ui.decomposeButton.connect("clicked(bool)", self.onDecomposeButton)
        self.ui.scoreButton.connect("clicked(bool)", self.onScoreButton)
        self.ui.scoreBaselinesButton.connect("clicked(bool)", self.onScoreBaselinesButton)
        self.ui.explainButton.connect("clicked(bool)", self.onExplainButton)
        self.ui.jacobianButton.connect("clicked(bool)", self.onJacobianButton)
        self.ui.compareLayoutButton.connect("clicked(bool)", self.onCompareLayoutButton)
        self.ui.overlayButton.connect("clicked(bool)", self.onOverlayButton)
        self.ui.differenceMapsButton.connect("clicked(bool)", self.onDifferenceMapsButton)
        self.ui.batchButton.connect("clicked(bool)", self.onBatchButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTrainingButton)
        self.ui.detectDevicesButton.connect("clicked(bool)", self.onDetectDevicesButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.overlayOpacitySliderWidget.connect("valueChanged(double)", self.onOverlayOpacityChanged)

        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(POLL_INTERVAL_MS)
        self._jobTimer.connect("timeout()", self._pollJob)
        self.ui.progressBar.setVisible(False)

        self.initializeParameterNode()

    def cleanup(self):
        if self._job is not None:
            self._job.cancel()
        if self._jobTimer is not None:
            self._jobTimer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        self._refreshDeviceInfo()

    def _refreshDeviceInfo(self):
        """Show the devices once torch is loaded anyway (importing it just for this takes seconds)."""
        if "torch" in sys.modules:
            self.ui.deviceInfoLabel.text = _("Devices found: {devices}").format(devices=self.logic.describeDevices())

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiState)

    def onSceneStartClose(self, caller, event):
        if self._job is not None:
            # The job's inputs belong to the scene being closed: stop it and drop whatever it returns.
            self._job.cancel()
            self._jobFinish = lambda result: [_("Result discarded: the scene was closed.")]
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume1:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and first.GetClassName() == "vtkMRMLScalarVolumeNode":
                self._parameterNode.inputVolume1 = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiState)
            self.updateGuiState()

    def updateGuiState(self, caller=None, event=None):
        """Enable what can run, explain what cannot (tooltips and status lines)."""
        p = self._parameterNode
        if p is None:
            return
        idle = self._job is None
        haveInputs = p.inputVolume1 is not None and p.inputVolume2 is not None
        haveTriple = haveInputs and p.fusedVolume is not None
        modelReady = p.modelSource == "bundled" or str(p.modelPath) not in ("", ".")
        self.ui.fuseButton.enabled = idle and haveInputs and modelReady
        self.ui.fuseButton.toolTip = (_("Fuse input 1 and input 2 into a new volume") if haveInputs and modelReady
                                      else _("Select both input volumes (and a model file when Model is 'file')"))
        self.ui.modelPathLineEdit.enabled = p.modelSource == "file"
        self.ui.modelInfoLabel.text = self._modelDescription(p)

        hasLatent = p.fusedVolume is not None and self.logic.latentNodeOf(p.fusedVolume) is not None
        self.ui.latentStatusLabel.text = (
            "" if p.fusedVolume is None
            else _("Kept latent found: exact decomposition available.") if hasLatent
            else _("No kept latent: decomposition samples latents (untick 'Use kept latent')."))
        exact = p.useKeptLatent and hasLatent
        for widget in (self.ui.samplesSpinBox, self.ui.seedSpinBox, self.ui.temperatureSliderWidget,
                       self.ui.priorComboBox):
            widget.enabled = not exact
        self.ui.decomposeButton.enabled = idle and p.fusedVolume is not None and (hasLatent or not p.useKeptLatent)

        self.ui.scoreInputsLabel.text = (
            _("Scores: {input1}, {input2} and fused {fused}.").format(
                input1=p.inputVolume1.GetName(), input2=p.inputVolume2.GetName(), fused=p.fusedVolume.GetName())
            if haveTriple else _("Select input 1, input 2 (Fuse) and a fused volume (Decompose) to score."))
        self.ui.scoreButton.enabled = idle and haveTriple
        self.ui.scoreBaselinesButton.enabled = idle and haveTriple

        self.ui.explainButton.enabled = idle and haveInputs
        self.ui.jacobianButton.enabled = idle and haveInputs
        self.ui.compareLayoutButton.enabled = haveTriple
        self.ui.overlayButton.enabled = p.fusedVolume is not None and p.overlayVolume is not None
        self.ui.differenceMapsButton.enabled = idle and haveInputs and (
            p.decomposedVolume1 is not None or p.decomposedVolume2 is not None)
        inputDirectory = str(p.batchInputDirectory)
        self.ui.batchButton.enabled = idle and modelReady and inputDirectory not in ("", ".") and os.path.isdir(
            inputDirectory) and str(p.batchOutputDirectory) not in ("", ".")
        self.ui.cancelButton.enabled = not idle

    def _modelDescription(self, p):
        if p.modelSource == "file":
            path = str(p.modelPath)
            if path in ("", "."):
                return _("Choose a checkpoint file (.pt).")
            return _("Model file: {path}").format(path=path) if os.path.isfile(path) else _(
                "Model file not found: {path}").format(path=path)
        bundled = self.resourcePath("Models/fusioninn_default.pt")
        if os.path.isfile(bundled):
            return _("Bundled model: {name}").format(name=os.path.basename(bundled))
        return _("Bundled model not installed: an UNTRAINED model will be used (results are not meaningful).")

    # -- background jobs ---------------------------------------------------------------------
    def _startJob(self, title, work, finish):
        """Run ``work(progress, isCancelled, log)`` on a worker thread; ``finish(result)`` runs here after."""
        if self._job is not None:
            raise RuntimeError(_("Another FusionINN job is running; wait for it or cancel it."))
        self._jobTitle = title
        self._jobFinish = finish
        self._job = support.BackgroundJob(work, title).start()
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = _("{title}: running...").format(title=title)
        self.ui.notesLabel.text = ""
        self._jobTimer.start()
        self.updateGuiState()

    def _pollJob(self):
        job = self._job
        if job is None:
            self._jobTimer.stop()
            return
        status = job.poll()
        self.ui.progressBar.value = int(round(100 * status.fraction))
        for message in status.messages:
            logging.info(f"FusionINN: {message}")
            self.ui.statusLabel.text = f"{self._jobTitle}: {message}"
        if not status.done:
            return
        self._jobTimer.stop()
        self._job = None
        finish, title = self._jobFinish, self._jobTitle
        self._jobFinish = None
        self.ui.progressBar.setVisible(False)
        try:
            if status.cancelled:
                self.ui.statusLabel.text = _("{title} cancelled; nothing was added to the scene.").format(title=title)
            elif status.error is not None:
                self.ui.statusLabel.text = _("{title} failed: {message}").format(
                    title=title, message=support.first_line(status.error))
                detail = "".join(traceback.format_exception(type(status.error), status.error,
                                                            status.error.__traceback__))
                logging.error(detail)
                slicer.util.errorDisplay(_("{title} failed: {message}").format(title=title, message=status.error),
                                         detailedText=detail)
            else:
                with slicer.util.tryWithErrorDisplay(_("{title}: could not create the outputs.").format(title=title),
                                                     waitCursor=True):
                    notes = finish(status.result) or []
                    self.ui.statusLabel.text = _("{title} finished in {seconds:.1f} s.").format(
                        title=title, seconds=status.elapsed)
                    self.ui.notesLabel.text = "\n".join(notes)
        finally:
            self.updateGuiState()
            self._refreshDeviceInfo()

    def onCancelButton(self):
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = _("{title}: cancelling...").format(title=self._jobTitle)

    def _runInBackground(self, title, prepare, compute, finish):
        """prepare() on the main thread (reads nodes), compute() on the worker, finish() back here."""
        with slicer.util.tryWithErrorDisplay(_("{title} could not start.").format(title=title), waitCursor=True):
            if not self.logic.ensureDependencies():
                self.ui.statusLabel.text = _("{title}: required Python packages are missing.").format(title=title)
                return
            request = prepare()
            self._startJob(title, lambda progress, isCancelled, log: compute(request, progress, isCancelled, log),
                           lambda result: finish(request, result))

    # -- actions -----------------------------------------------------------------------------
    def onFuseButton(self):
        p = self._parameterNode

        def finish(request, result):
            nodes = self.logic.finishFuse(request, result)
            p.fusedVolume = nodes["fused"]
            slicer.util.setSliceViewerLayers(background=nodes["fused"], fit=True)
            return nodes["notes"]

        self._runInBackground(_("Fusion"), lambda: self.logic.prepareFuse(p), self.logic.computeFuse, finish)

    def onDecomposeButton(self):
        p = self._parameterNode

        def finish(request, result):
            nodes = self.logic.finishDecompose(request, result)
            p.decomposedVolume1, p.decomposedVolume2 = nodes["decomposed1"], nodes["decomposed2"]
            if nodes.get("std1") is not None:
                p.overlayVolume = nodes["std1"]
            slicer.util.setSliceViewerLayers(background=nodes["decomposed1"], fit=True)
            return nodes["notes"]

        self._runInBackground(_("Decomposition"), lambda: self.logic.prepareDecompose(p),
                              self.logic.computeDecompose, finish)

    def onScoreButton(self):
        self._score(baselines=False)

    def onScoreBaselinesButton(self):
        self._score(baselines=True)

    def _score(self, baselines):
        p = self._parameterNode

        def finish(request, result):
            nodes = self.logic.finishScore(request, result)
            p.metricsTable = nodes["table"]
            self.logic.showTable(nodes["table"])
            return nodes["notes"]

        self._runInBackground(_("Scoring"), lambda: self.logic.prepareScore(p, baselines),
                              self.logic.computeScore, finish)

    def onExplainButton(self):
        p = self._parameterNode

        def finish(request, result):
            nodes = self.logic.finishExplain(request, result)
            p.overlayVolume = nodes["guidance1"]
            return nodes["notes"]

        self._runInBackground(_("Guidance maps"), lambda: self.logic.prepareExplain(p),
                              self.logic.computeExplain, finish)

    def onJacobianButton(self):
        p = self._parameterNode

        def finish(request, result):
            nodes = self.logic.finishJacobian(request, result)
            p.overlayVolume = nodes["jacobian1"]
            return nodes["notes"]

        self._runInBackground(_("Jacobian"), lambda: self.logic.prepareJacobian(p, self.logic.crosshairRAS()),
                              self.logic.computeJacobian, finish)

    def onCompareLayoutButton(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to show the compare layout."), waitCursor=True):
            self._overlayActive = False
            self.logic.showCompareLayout(self._parameterNode)

    def onOverlayButton(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to show the overlay."), waitCursor=True):
            self.logic.showOverlay(self._parameterNode)
            self._overlayActive = True

    def onOverlayOpacityChanged(self, value):
        if self._overlayActive:
            self.logic.setOverlayOpacity(value)

    def onDifferenceMapsButton(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the difference maps."), waitCursor=True):
            nodes = self.logic.makeDifferenceMaps(self._parameterNode)
            if nodes:
                self._parameterNode.overlayVolume = nodes[0]
            self.ui.statusLabel.text = _("Created {count} difference map(s).").format(count=len(nodes))

    def onBatchButton(self):
        p = self._parameterNode

        def finish(request, result):
            return self.logic.finishBatch(request, result)

        self._runInBackground(_("Batch"), lambda: self.logic.prepareBatch(p), self.logic.computeBatch, finish)

    def onDetectDevicesButton(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to detect compute devices."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self.ui.deviceInfoLabel.text = _("Devices found: {devices}").format(devices=self.logic.describeDevices())

    def onTrainButton(self):
        """Open the training module (a Slicer CLI shipped by this extension) when it is installed."""
        if not hasattr(slicer.modules, TRAINING_MODULE_NAME.lower()):
            slicer.util.warningDisplay(
                _("The training module ({name}) is not available: it is not installed or failed to load.").format(
                    name=TRAINING_MODULE_NAME), windowTitle=_("FusionINN"))
            return
        slicer.util.selectModule(TRAINING_MODULE_NAME)

    # -- train in the background (the FusionINNTraining CLI; see FusionINNTraining/FusionINNTraining.xml) --
    # Per-widget state of the training run, set when one starts (class-level defaults).
    _trainingNode = None  # vtkMRMLCommandLineModuleNode of the running/last training
    _trainingOutputs = None  # {"history", "metrics", "preview": nodes, "model": path}
    _trainingProgressBar = None  # qSlicerCLIProgressBar, created on first use

    def _isTraining(self):
        node = self._trainingNode
        return node is not None and node.GetScene() is not None and node.IsBusy()

    def onStartTrainingButton(self):
        """Start a training run with the FusionINN Training CLI in the background, or cancel the running one.

        The CLI is a separate process (``slicer.cli.run(..., wait_for_completion=False)``): the GUI
        stays responsive, ``qSlicerCLIProgressBar`` shows its ``<filter-progress>`` reports, and
        ``Cancel()`` stops it (the last finished epoch stays in the run folder's last.pt). Its history
        and metrics tables come back as table nodes (typed by their .schema.tsv sidecars).
        """
        if self._isTraining():
            self._trainingNode.Cancel()
            self.ui.statusLabel.text = _("Training: cancelling...")
            return
        cliModule = getattr(slicer.modules, TRAINING_MODULE_NAME.lower(), None)
        if cliModule is None:
            self.onTrainButton()  # explains that the module is not available
            return
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            dataDirectory = self.ui.trainDataDirectoryButton.directory
            if not dataDirectory or not os.path.isdir(dataDirectory):
                raise ValueError(_("Choose the folder holding the BraTS-style cases (one sub-folder per case)."))
            outputModel = self.ui.trainOutputModelPathLineEdit.currentPath
            if not outputModel:
                raise ValueError(_("Choose where to save the trained model (.pt file)."))
            if not outputModel.lower().endswith(".pt"):
                outputModel += ".pt"
            p = self._parameterNode
            scene = slicer.mrmlScene

            def newNode(className, name):
                return scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))

            outputs = {
                "history": newNode("vtkMRMLTableNode", "FusionINN training history"),
                "metrics": newNode("vtkMRMLTableNode", "FusionINN training metrics"),
                "preview": newNode("vtkMRMLScalarVolumeNode", "FusionINN training preview"),
                "model": outputModel,
            }
            parameters = {
                "dataDirectory": dataDirectory,
                "outputModel": outputModel,
                "epochs": int(self.ui.trainEpochsSpinBox.value),
                "device": p.device if p is not None else "auto",
                "amp": bool(p.amp) if p is not None else False,
                "historyTable": outputs["history"],
                "metricsTable": outputs["metrics"],
                "previewVolume": outputs["preview"],
            }
            node = slicer.cli.run(cliModule, None, parameters, wait_for_completion=False)
            self._trainingNode, self._trainingOutputs = node, outputs
            if self._trainingProgressBar is None:
                self._trainingProgressBar = slicer.qSlicerCLIProgressBar()
                self.layout.addWidget(self._trainingProgressBar)
            self._trainingProgressBar.setCommandLineModuleNode(node)
            self._trainingProgressBar.setVisible(True)
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self._onTrainingNodeModified)
            self.ui.startTrainingButton.text = _("Cancel training")
            self.ui.statusLabel.text = _("Training: running in the background (model: {path}).").format(
                path=outputModel)

    def _onTrainingNodeModified(self, node, event):
        if node.IsBusy() or node is not self._trainingNode:
            return
        self.removeObserver(node, vtk.vtkCommand.ModifiedEvent, self._onTrainingNodeModified)
        self.ui.startTrainingButton.text = _("Train")
        outputs = self._trainingOutputs or {}
        status = node.GetStatus()
        if status == node.Completed:
            # After the event: showing a dialog from inside a VTK observer callback is fragile.
            qt.QTimer.singleShot(0, lambda: self._finishTraining(node, outputs))
            return
        for key in ("history", "metrics", "preview"):  # nothing usable came back
            if outputs.get(key) is not None and outputs[key].GetScene() is not None:
                slicer.mrmlScene.RemoveNode(outputs[key])
        if status == node.Cancelled:
            self.ui.statusLabel.text = _("Training cancelled; it can be resumed from last.pt in the run folder "
                                         "(FusionINN Training module, Resume checkpoint).")
            return
        errorText = (node.GetErrorText() or "").strip()
        lastLines = "\n".join(errorText.splitlines()[-8:])
        self.ui.statusLabel.text = _("Training failed: {message}").format(
            message=(lastLines.splitlines() or [node.GetStatusString()])[-1])
        slicer.util.errorDisplay(_("Training failed.\n\n{message}").format(message=lastLines),
                                 detailedText=errorText, windowTitle=_("FusionINN"))

    def _finishTraining(self, node, outputs):
        """Show the preview fusion, plot the loss curves and offer the new model for fusion (the metrics
        table is in the scene, e.g. in the Tables module)."""
        bestEpoch = node.GetParameterAsString("bestEpoch")
        ssim = node.GetParameterAsString("meanDecompositionSSIM")
        self.ui.statusLabel.text = _("Training finished: best epoch {epoch}, mean decomposition SSIM {ssim}.").format(
            epoch=bestEpoch, ssim=ssim)
        preview = outputs.get("preview")
        if preview is not None and preview.GetScene() is not None and preview.GetImageData() is not None:
            slicer.util.setSliceViewerLayers(background=preview, fit=True)
        with slicer.util.tryWithErrorDisplay(_("Could not plot the training history."), waitCursor=True):
            self._plotTrainingHistory(outputs["history"])
        modelPath = outputs.get("model")
        if not (modelPath and os.path.isfile(modelPath) and self._parameterNode is not None):
            return
        if slicer.util.confirmYesNoDisplay(
                _("Training finished (best epoch {epoch}). Use the new model {path} for fusion?").format(
                    epoch=bestEpoch, path=modelPath), windowTitle=_("FusionINN")):
            self._parameterNode.modelSource = "file"
            self._parameterNode.modelPath = pathlib.Path(modelPath)

    def _plotTrainingHistory(self, historyTable):
        """One plot chart: total, fusion and decomposition loss per epoch, training solid and validation dashed."""
        table = historyTable.GetTable() if historyTable is not None else None
        if table is None or table.GetNumberOfRows() == 0:
            return None
        scene = slicer.mrmlScene
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName("FusionINN training losses"))
        chart.SetTitle(_("FusionINN training"))
        chart.SetXAxisTitle(_("epoch"))
        chart.SetYAxisTitle(_("loss"))
        colors = {"loss": (0.1, 0.1, 0.1), "fusion": (0.85, 0.35, 0.1), "dec": (0.1, 0.45, 0.8)}
        for part, color in colors.items():
            for split, lineStyle in (("train", slicer.vtkMRMLPlotSeriesNode.LineStyleSolid),
                                     ("val", slicer.vtkMRMLPlotSeriesNode.LineStyleDash)):
                column = f"{split}_{part}"
                if table.GetColumnByName(column) is None:
                    continue
                series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(column))
                series.SetAndObserveTableNodeID(historyTable.GetID())
                series.SetXColumnName("epoch")
                series.SetYColumnName(column)
                series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                series.SetLineStyle(lineStyle)
                series.SetColor(*color)
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        return chart


#
# FusionINNLogic
#
class FusionINNLogic(ScriptedLoadableModuleLogic):
    """MRML ⇄ :class:`~FusionINNLib.volume.Volume` conversion and calls into ``FusionINNLib``.

    Each long operation is split in three so that the GUI never freezes and never sees half-made
    nodes: ``prepareX`` (main thread: reads nodes into numpy copies and validates options),
    ``computeX`` (worker thread: pure ``FusionINNLib`` call, no MRML access) and ``finishX`` (main
    thread: creates all output nodes, or none if anything fails). ``x(parameterNode)`` runs the three
    in a row for scripts and self-tests.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._modelCache = {}

    def getParameterNode(self):
        return FusionINNParameterNode(super().getParameterNode())

    # -- dependencies ------------------------------------------------------------------------
    @staticmethod
    def isModuleAvailable(name):
        return importlib.util.find_spec(name) is not None

    def ensureDependencies(self, askConfirmation=True):
        """PyTorch through the PyTorch extension, then the other packages with pip. False if declined."""
        askConfirmation = askConfirmation and not slicer.app.testingEnabled()
        if not self.isModuleAvailable("torch"):
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(_("FusionINN needs PyTorch. Install the 'PyTorch' extension with the Extensions "
                                     "Manager, restart Slicer and try again.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=askConfirmation,
                                                torchVersionRequirement=support.TORCH_REQUIREMENT)
                if torch is None:
                    return False
        missing = support.missing_requirements(self.isModuleAvailable)
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("FusionINN needs these Python packages, which will be downloaded and installed now:\n\n"
                      "{packages}\n\nThis can take a few minutes.").format(packages="\n".join(missing)),
                    windowTitle=_("FusionINN: install Python packages")):
                return False
            for requirement in missing:
                slicer.util.pip_install(requirement)
            importlib.invalidate_caches()
            stillMissing = support.missing_requirements(self.isModuleAvailable)
            if stillMissing:
                raise RuntimeError(_("Installing {packages} failed; see the Python console.").format(
                    packages=", ".join(stillMissing)))
        return True

    def describeDevices(self):
        from FusionINNLib.engine import describe_devices

        return describe_devices()

    # -- MRML <-> Volume ---------------------------------------------------------------------
    @staticmethod
    def _matrixArray(vtkMatrix):
        return slicer.util.arrayFromVTKMatrix(vtkMatrix)

    def worldIJKToRAS(self, node):
        """The node's IJKToRAS including a linear parent transform (non-linear ones are refused)."""
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        ijkToRAS = self._matrixArray(matrix)
        parent = node.GetParentTransformNode()
        if parent is None:
            return ijkToRAS
        if not parent.IsTransformToWorldLinear():
            raise ValueError(_("{name} is under a non-linear transform; harden the transform first (Data "
                               "module: right-click the volume, 'Harden transform').").format(name=node.GetName()))
        parentToWorld = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(parentToWorld)
        return support.compose_transform(self._matrixArray(parentToWorld), ijkToRAS)

    def volumeFromNode(self, node):
        """A detached :class:`Volume` (numpy copy + ITK LPS geometry) of a scalar volume node."""
        from FusionINNLib.volume import Volume

        if node is None:
            raise ValueError(_("No volume selected."))
        if node.GetImageData() is None:
            raise ValueError(_("{name} has no image data.").format(name=node.GetName()))
        array = slicer.util.arrayFromVolume(node)
        if array.ndim != 3:
            raise ValueError(_("{name} is not a scalar volume (array shape {shape}).").format(
                name=node.GetName(), shape=array.shape))
        spacing, origin, direction = support.ijk_to_ras_to_itk_geometry(self.worldIJKToRAS(node))
        # A copy: the worker thread must not read VTK memory that the GUI may modify meanwhile.
        return Volume(array.copy(), spacing, origin, direction)

    def addVolumeNode(self, volume, name, created, attributes=None, nodeClassName="vtkMRMLScalarVolumeNode",
                      array=None):
        """A new volume node with ``volume``'s geometry; appended to ``created`` for all-or-nothing cleanup."""
        ijkToRAS = support.itk_geometry_to_ijk_to_ras(volume.spacing, volume.origin, volume.direction)
        node = slicer.util.addVolumeFromArray(volume.array if array is None else array, ijkToRAS=ijkToRAS,
                                              name=slicer.mrmlScene.GenerateUniqueName(name),
                                              nodeClassName=nodeClassName)
        created.append(node)
        for key, value in (attributes or {}).items():
            node.SetAttribute(key, value)
        return node

    @contextlib.contextmanager
    def _allOrNothing(self):
        """Collects the nodes created inside; removes them all if the block raises."""
        created = []
        try:
            yield created
        except Exception:
            for node in reversed(created):
                if node.GetScene() is not None:
                    slicer.mrmlScene.RemoveNode(node)
            raise

    @staticmethod
    def setColormap(node, colormapName, windowLevel=None):
        display = node.GetDisplayNode()
        if display is None:
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(support.OVERLAY_COLORMAPS[colormapName])
        if windowLevel is not None:
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(*windowLevel)

    @staticmethod
    def latentNodeOf(fusedNode):
        return fusedNode.GetNodeReference(support.REFERENCE_LATENT) if fusedNode is not None else None

    @staticmethod
    def recordOf(fusedNode):
        return support.record_from_attributes({support.RECORD_ATTRIBUTE: fusedNode.GetAttribute(
            support.RECORD_ATTRIBUTE)})

    # -- model -------------------------------------------------------------------------------
    def loadModel(self, modelSource, modelPath):
        """The chosen model, cached while its file is unchanged (worker thread; one job at a time)."""
        from FusionINNLib.checkpoint import bundled_model_path, resolve_model

        argument = support.model_argument(modelSource, modelPath)
        path = argument if argument is not None else str(bundled_model_path())
        stamp = os.path.getmtime(path) if os.path.isfile(path) else None
        key = (path, stamp)
        if key not in self._modelCache:
            self._modelCache = {key: resolve_model(argument)}
        return self._modelCache[key]

    # -- fuse --------------------------------------------------------------------------------
    def prepareFuse(self, p):
        if p.inputVolume1 is None or p.inputVolume2 is None:
            raise ValueError(_("Select input volume 1 and input volume 2."))
        support.model_argument(p.modelSource, p.modelPath)  # fail early on a missing model file
        return {
            "volume1": self.volumeFromNode(p.inputVolume1), "volume2": self.volumeFromNode(p.inputVolume2),
            "node1": p.inputVolume1, "node2": p.inputVolume2,
            "names": (p.inputVolume1.GetName(), p.inputVolume2.GetName()),
            "model": (p.modelSource, str(p.modelPath)),
            "options": {"axis": p.axis, "normalization": p.normalization, "keep_latent": p.keepLatent,
                        "device": p.device, "batch_size": p.batchSize, "amp": p.amp},
        }

    def computeFuse(self, request, progress=None, isCancelled=None, log=logging.info):
        from FusionINNLib.pipeline import fuse_volumes

        model = self.loadModel(*request["model"])
        return fuse_volumes(request["volume1"], request["volume2"], model, progress=progress, cancel=isCancelled,
                            log=log, input_names=request["names"], **request["options"])

    def finishFuse(self, request, output):
        name1, name2 = request["names"]
        with self._allOrNothing() as created:
            fused = self.addVolumeNode(output.fused, support.fused_volume_name(name1, name2), created,
                                       support.provenance_attributes("fused", output.record, inputs=(name1, name2)))
            fused.SetNodeReferenceID(support.REFERENCE_INPUT1, request["node1"].GetID())
            fused.SetNodeReferenceID(support.REFERENCE_INPUT2, request["node2"].GetID())
            latent = None
            if output.latent is not None:
                latent = self.addVolumeNode(
                    output.fused, support.latent_volume_name(fused.GetName()), created,
                    support.provenance_attributes("latent", output.record, inputs=(name1, name2)),
                    nodeClassName="vtkMRMLVectorVolumeNode", array=support.latent_to_vector_array(output.latent))
                fused.SetNodeReferenceID(support.REFERENCE_LATENT, latent.GetID())
        return {"fused": fused, "latent": latent, "notes": list(output.notes)}

    def fuse(self, p):
        request = self.prepareFuse(p)
        nodes = self.finishFuse(request, self.computeFuse(request))
        p.fusedVolume = nodes["fused"]
        return nodes

    # -- decompose ---------------------------------------------------------------------------
    def prepareDecompose(self, p):
        fusedNode = p.fusedVolume
        if fusedNode is None:
            raise ValueError(_("Select a fused volume."))
        record = self.recordOf(fusedNode)
        latent = None
        if p.useKeptLatent:
            latentNode = self.latentNodeOf(fusedNode)
            if latentNode is None:
                raise ValueError(_("{name} has no kept latent: fuse with 'Keep latent volume', or untick "
                                   "'Use kept latent' to sample.").format(name=fusedNode.GetName()))
            latent = support.vector_array_to_latent(slicer.util.arrayFromVolume(latentNode))
        options = {"device": p.device, "batch_size": p.batchSize}
        if latent is None:
            options.update(samples=p.samples, seed=p.seed, temperature=p.temperature, prior=p.prior)
        inputNames = (record or {}).get("inputs") or ()
        return {"fused": self.volumeFromNode(fusedNode), "fusedNode": fusedNode, "record": record,
                "latent": latent, "model": (p.modelSource, str(p.modelPath)), "options": options,
                "inputNames": tuple(inputNames)}

    def computeDecompose(self, request, progress=None, isCancelled=None, log=logging.info):
        from FusionINNLib.pipeline import decompose_volume

        model = self.loadModel(*request["model"])
        return decompose_volume(request["fused"], request["record"], model, latent=request["latent"],
                                progress=progress, cancel=isCancelled, log=log, **request["options"])

    def finishDecompose(self, request, output):
        fusedNode = request["fusedNode"]
        options = request["options"]
        details = {"mode": "exact" if request["latent"] is not None else "sampled",
                   "samples": options.get("samples"), "seed": options.get("seed"),
                   "temperature": options.get("temperature"), "prior": options.get("prior"),
                   "fusedVolume": fusedNode.GetName()}
        names = support.decomposed_volume_names(fusedNode.GetName(), request["inputNames"])
        record = request["record"]
        with self._allOrNothing() as created:
            nodes = {}
            for index, (volume, name) in enumerate(zip((output.source1, output.source2), names), start=1):
                node = self.addVolumeNode(volume, name, created,
                                          support.provenance_attributes("decomposed", record, **details))
                node.SetNodeReferenceID(support.REFERENCE_FUSED, fusedNode.GetID())
                nodes[f"decomposed{index}"] = node
            for index, (volume, name) in enumerate(zip((output.std1, output.std2),
                                                       support.std_volume_names(names)), start=1):
                if volume is None:
                    nodes[f"std{index}"] = None
                    continue
                node = self.addVolumeNode(volume, name, created,
                                          support.provenance_attributes("std", record, **details))
                node.SetNodeReferenceID(support.REFERENCE_FUSED, fusedNode.GetID())
                self.setColormap(node, support.STD_COLORMAP)
                nodes[f"std{index}"] = node
        nodes["notes"] = list(output.notes)
        return nodes

    def decompose(self, p):
        request = self.prepareDecompose(p)
        nodes = self.finishDecompose(request, self.computeDecompose(request))
        p.decomposedVolume1, p.decomposedVolume2 = nodes["decomposed1"], nodes["decomposed2"]
        return nodes

    # -- score -------------------------------------------------------------------------------
    def prepareScore(self, p, baselines):
        if p.inputVolume1 is None or p.inputVolume2 is None or p.fusedVolume is None:
            raise ValueError(_("Select input 1, input 2 and a fused volume to score."))
        record = self.recordOf(p.fusedVolume) or {}
        normalizations = record.get("normalization") or [{}]
        decomposed = []
        for index, node in enumerate((p.decomposedVolume1, p.decomposedVolume2), start=1):
            if node is not None and node.GetNodeReference(support.REFERENCE_FUSED) is p.fusedVolume:
                decomposed.append((index, self.volumeFromNode(node)))
        return {
            "volume1": self.volumeFromNode(p.inputVolume1), "volume2": self.volumeFromNode(p.inputVolume2),
            "fused": self.volumeFromNode(p.fusedVolume), "fusedNode": p.fusedVolume,
            "mask": self.volumeFromNode(p.maskVolume) if p.maskVolume is not None else None,
            "names": (p.inputVolume1.GetName(), p.inputVolume2.GetName()),
            "table": p.metricsTable, "baselines": bool(baselines), "keepBaselines": p.keepBaselineVolumes,
            "decomposed": decomposed,
            "options": {"paper_compatible": p.paperCompatible,
                        "data_range": p.dataRange if p.dataRange > 0 else None,
                        "axis": int(record.get("axis", p.axis))},
            "normalization": normalizations[0].get("mode", p.normalization),
        }

    def computeScore(self, request, progress=None, isCancelled=None, log=logging.info):
        from FusionINNLib.batch import align_to_reference, baseline_fusions, score_volumes
        from FusionINNLib.engine import Cancelled
        from FusionINNLib.metrics import decomposition_metrics

        def checkCancelled():
            if isCancelled is not None and isCancelled():
                raise Cancelled("cancelled by the user")

        volume1, volume2, options = request["volume1"], request["volume2"], request["options"]
        steps = 1 + (3 if request["baselines"] else 0) + len(request["decomposed"])
        done = [0]

        def step():
            done[0] += 1
            if progress is not None:
                progress(done[0] / steps)
            checkCancelled()

        scored = score_volumes(volume1, volume2, request["fused"], mask=request["mask"], **options)
        results = {"FusionINN": dict(scored["summary"])}
        notes = list(scored["notes"])
        step()
        baselineVolumes = {}
        if request["baselines"]:
            baselineVolumes = baseline_fusions(volume1, volume2, normalization=request["normalization"],
                                               axis=options["axis"])
            for method, volume in baselineVolumes.items():
                results[method] = dict(score_volumes(volume1, volume2, volume, mask=request["mask"],
                                                     **options)["summary"])
                step()
        decompositionRows = {}
        for index, decomposedVolume in request["decomposed"]:
            source = volume1 if index == 1 else align_to_reference(volume1, volume2)[0]
            aligned, _notes = align_to_reference(source, decomposedVolume)
            summary = decomposition_metrics(source.array, aligned.array, axis=options["axis"])["summary"]
            decompositionRows[index] = dict(summary)
            step()
        return {"results": results, "notes": notes, "baselineVolumes": baselineVolumes,
                "decompositionRows": decompositionRows}

    def finishScore(self, request, result):
        from FusionINNLib.metrics import FUSION_METRIC_NAMES, METRIC_DESCRIPTIONS

        results = {method: dict(values) for method, values in result["results"].items()}
        descriptions = dict(METRIC_DESCRIPTIONS)
        rows, rowDescriptions = support.decomposition_rows(result["decompositionRows"], METRIC_DESCRIPTIONS)
        results["FusionINN"].update(rows)
        descriptions.update(rowDescriptions)
        columns = support.metrics_table_columns(results, descriptions, FUSION_METRIC_NAMES)
        name1, name2 = request["names"]
        fusedNode = request["fusedNode"]
        with self._allOrNothing() as created:
            tableNode = request["table"]
            if tableNode is None:
                tableName = support.metrics_table_name(fusedNode.GetName())
                tableNode = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName(tableName))
                created.append(tableNode)
            self.fillTable(tableNode, columns)
            attributes = support.provenance_attributes("metrics", self.recordOf(fusedNode), inputs=(name1, name2),
                                                       fusedVolume=fusedNode.GetName(), **request["options"])
            for key, value in attributes.items():
                tableNode.SetAttribute(key, value)
            if request["keepBaselines"]:
                for method, volume in result["baselineVolumes"].items():
                    self.addVolumeNode(volume, support.baseline_volume_name(method, name1, name2), created,
                                       support.provenance_attributes("baseline", inputs=(name1, name2),
                                                                     method=method))
        return {"table": tableNode, "notes": list(result["notes"])}

    def score(self, p, baselines=False):
        request = self.prepareScore(p, baselines)
        nodes = self.finishScore(request, self.computeScore(request))
        p.metricsTable = nodes["table"]
        return nodes

    @staticmethod
    def fillTable(tableNode, columns):
        """Replace the table's content with typed columns (numbers stay numbers for sorting/plotting)."""
        wasModifying = tableNode.StartModify()
        try:
            tableNode.RemoveAllColumns()
            tableNode.SetUseColumnNameAsColumnHeader(True)
            table = tableNode.GetTable()
            for column in columns:
                array = VTK_ARRAY_CLASSES[column.type]()
                array.SetName(column.name)
                array.SetNumberOfValues(len(column.values))
                for row, value in enumerate(column.values):
                    array.SetValue(row, value)
                table.AddColumn(array)
                tableNode.SetColumnDescription(column.name, column.description)
            tableNode.SetLocked(True)
            tableNode.Modified()
        finally:
            tableNode.EndModify(wasModifying)

    @staticmethod
    def showTable(tableNode):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # no main window (e.g. --no-main-window tests)
            return
        layoutManager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layoutManager.layout))
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetActiveTableID(tableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    # -- explain -----------------------------------------------------------------------------
    def prepareExplain(self, p):
        from FusionINNLib.explain import parse_slices

        if p.inputVolume1 is None or p.inputVolume2 is None:
            raise ValueError(_("Select input volume 1 and input volume 2."))
        volume1 = self.volumeFromNode(p.inputVolume1)
        text = p.explainSlices.strip()
        slices = parse_slices(text, volume1.shape[p.axis]) if text else None
        return {"volume1": volume1, "volume2": self.volumeFromNode(p.inputVolume2),
                "names": (p.inputVolume1.GetName(), p.inputVolume2.GetName()),
                "model": (p.modelSource, str(p.modelPath)), "slices": slices,
                "options": {"axis": p.axis, "normalization": p.normalization, "device": p.device}}

    def computeExplain(self, request, progress=None, isCancelled=None, log=logging.info):
        from FusionINNLib.explain import explain_volumes

        model = self.loadModel(*request["model"])
        return explain_volumes(request["volume1"], request["volume2"], model, slices=request["slices"],
                               progress=progress, cancel=isCancelled, log=log, **request["options"])

    def finishExplain(self, request, output):
        name1, name2 = request["names"]
        names = support.guidance_volume_names(name1, name2)
        with self._allOrNothing() as created:
            attributes = support.provenance_attributes("guidance", inputs=(name1, name2), slices=list(output.slices),
                                                       axis=output.axis, exact=output.exact)
            guidance1 = self.addVolumeNode(output.guidance1, names[0], created, attributes)
            guidance2 = self.addVolumeNode(output.guidance2, names[1], created, attributes)
            rgb = self.addVolumeNode(output.guidance1, names[2], created, attributes,
                                     nodeClassName="vtkMRMLVectorVolumeNode", array=output.rgb)
            for node in (guidance1, guidance2):
                self.setColormap(node, support.GUIDANCE_COLORMAP)
        return {"guidance1": guidance1, "guidance2": guidance2, "rgb": rgb, "notes": list(output.notes)}

    def explain(self, p):
        request = self.prepareExplain(p)
        return self.finishExplain(request, self.computeExplain(request))

    @staticmethod
    def crosshairRAS():
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is None:
            raise ValueError(_("No crosshair in the scene."))
        return list(crosshair.GetCrosshairRAS())

    def prepareJacobian(self, p, ras):
        if p.inputVolume1 is None or p.inputVolume2 is None:
            raise ValueError(_("Select input volume 1 and input volume 2."))
        volume1 = self.volumeFromNode(p.inputVolume1)
        index = support.ras_to_ijk_index(self.worldIJKToRAS(p.inputVolume1), ras, volume1.shape)
        return {"volume1": volume1, "volume2": self.volumeFromNode(p.inputVolume2), "index": index,
                "names": (p.inputVolume1.GetName(), p.inputVolume2.GetName()),
                "model": (p.modelSource, str(p.modelPath)),
                "options": {"axis": p.axis, "normalization": p.normalization, "device": p.device}}

    def computeJacobian(self, request, progress=None, isCancelled=None, log=logging.info):
        from FusionINNLib.explain import jacobian_volumes

        model = self.loadModel(*request["model"])
        return jacobian_volumes(request["volume1"], request["volume2"], request["index"], model, log=log,
                                **request["options"])

    def finishJacobian(self, request, output):
        name1, name2 = request["names"]
        names = support.jacobian_volume_names(name1, name2, request["index"])
        with self._allOrNothing() as created:
            attributes = support.provenance_attributes("jacobian", inputs=(name1, name2),
                                                       pointIJK=list(request["index"]))
            nodes = [self.addVolumeNode(volume, name, created, attributes) for volume, name in zip(output, names)]
            for node in nodes:
                self.setColormap(node, support.GUIDANCE_COLORMAP)
        return {"jacobian1": nodes[0], "jacobian2": nodes[1], "notes": []}

    # -- compare -----------------------------------------------------------------------------
    def showCompareLayout(self, p):
        """Inputs, fused and decompositions side by side, linked, with the crosshair shown."""
        if p.inputVolume1 is None or p.inputVolume2 is None or p.fusedVolume is None:
            raise ValueError(_("Select input 1, input 2 and a fused volume to compare."))
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            raise RuntimeError(_("The compare layout needs Slicer's main window."))
        hasDecomposition = p.decomposedVolume1 is not None and p.decomposedVolume2 is not None
        views = support.compare_views(hasDecomposition)
        layoutXml = support.compare_layout_xml(views, p.compareOrientation)
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()
        if layoutNode.IsLayoutDescription(support.COMPARE_LAYOUT_ID):
            layoutNode.SetLayoutDescription(support.COMPARE_LAYOUT_ID, layoutXml)
        else:
            layoutNode.AddLayoutDescription(support.COMPARE_LAYOUT_ID, layoutXml)
        layoutManager.setLayout(support.COMPARE_LAYOUT_ID)
        volumes = {"input1": p.inputVolume1, "input2": p.inputVolume2, "fused": p.fusedVolume,
                   "decomposed1": p.decomposedVolume1, "decomposed2": p.decomposedVolume2}
        for view in views:
            sliceWidget = layoutManager.sliceWidget(view.name)
            if sliceWidget is None:
                continue
            composite = sliceWidget.sliceLogic().GetSliceCompositeNode()
            node = volumes[view.role]
            composite.SetBackgroundVolumeID(node.GetID() if node is not None else None)
            composite.SetForegroundVolumeID(None)
            composite.SetLinkedControl(p.linkViews)
            sliceWidget.sliceLogic().FitSliceToAll()
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is not None:
            crosshair.SetCrosshairMode(slicer.vtkMRMLCrosshairNode.ShowBasic)
        return views

    def _overlayCompositeNodes(self):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.layout == support.COMPARE_LAYOUT_ID:
            sliceWidget = layoutManager.sliceWidget(support.COMPARE_VIEWS[2].name)
            if sliceWidget is not None:
                return [sliceWidget.sliceLogic().GetSliceCompositeNode()]
        return list(slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"))

    def showOverlay(self, p):
        """Alpha-blend the overlay volume over the fused one (only the fused view in the compare layout)."""
        if p.fusedVolume is None or p.overlayVolume is None:
            raise ValueError(_("Select a fused volume and an overlay volume."))
        self.setColormap(p.overlayVolume, p.overlayColormap)
        for composite in self._overlayCompositeNodes():
            composite.SetBackgroundVolumeID(p.fusedVolume.GetID())
            composite.SetForegroundVolumeID(p.overlayVolume.GetID())
            composite.SetForegroundOpacity(p.overlayOpacity)

    def setOverlayOpacity(self, opacity):
        for composite in self._overlayCompositeNodes():
            composite.SetForegroundOpacity(opacity)

    def makeDifferenceMaps(self, p):
        """Decomposed − source for each available decomposition, with a diverging map centred on 0."""
        from FusionINNLib.batch import difference_volume

        pairs = [(node, source) for node, source in ((p.decomposedVolume1, p.inputVolume1),
                                                     (p.decomposedVolume2, p.inputVolume2))
                 if node is not None and source is not None]
        if not pairs:
            raise ValueError(_("Decompose first (or select decomposed volumes) and select both inputs."))
        nodes = []
        with self._allOrNothing() as created:
            for decomposedNode, sourceNode in pairs:
                difference = difference_volume(self.volumeFromNode(decomposedNode), self.volumeFromNode(sourceNode))
                node = self.addVolumeNode(difference, support.difference_volume_name(
                    decomposedNode.GetName(), sourceNode.GetName()), created, support.provenance_attributes(
                    "difference", inputs=(decomposedNode.GetName(), sourceNode.GetName())))
                self.setColormap(node, support.DIFFERENCE_COLORMAP, support.symmetric_window_level(difference.array))
                nodes.append(node)
        return nodes

    # -- batch -------------------------------------------------------------------------------
    def prepareBatch(self, p):
        inputDirectory, outputDirectory = str(p.batchInputDirectory), str(p.batchOutputDirectory)
        if inputDirectory in ("", ".") or not os.path.isdir(inputDirectory):
            raise ValueError(_("Choose an existing input folder."))
        if outputDirectory in ("", "."):
            raise ValueError(_("Choose an output folder."))
        patterns = (p.batchPattern1.strip() or None, p.batchPattern2.strip() or None)
        support.model_argument(p.modelSource, p.modelPath)
        return {"root": inputDirectory, "output": outputDirectory,
                "options": {"modalities": (p.batchModality1.strip(), p.batchModality2.strip()),
                            "pattern1": patterns[0], "pattern2": patterns[1], "keep_latent": p.batchKeepLatent,
                            "metrics": p.batchMetrics, "model": support.model_argument(p.modelSource, p.modelPath),
                            "device": p.device, "batch_size": p.batchSize, "axis": p.axis,
                            "normalization": p.normalization}}

    def computeBatch(self, request, progress=None, isCancelled=None, log=logging.info):
        from FusionINNLib.batch import run_batch

        return run_batch(request["root"], request["output"], progress=progress, cancel=isCancelled, log=log,
                         **request["options"])

    def finishBatch(self, request, result):
        """Load the summary TSV as a table and show it; the notes say how many cases failed."""
        tableNode = slicer.util.loadTable(str(result.summary_path))
        self.showTable(tableNode)
        return [result.describe()]

    # -- sample data -------------------------------------------------------------------------
    def loadPhantomSample(self, shape=(64, 128, 128), seed=0):
        """T1-Gd, FLAIR and tumour-label volumes of a synthetic BraTS-style case (1 mm, LPS-aligned)."""
        from FusionINNLib.phantom import make_phantom_case
        from FusionINNLib.volume import Volume

        case = make_phantom_case(shape, seed=seed)
        with self._allOrNothing() as created:
            nodes = [self.addVolumeNode(Volume(case[key]), f"{PHANTOM_SAMPLE_NAME}_{label}", created,
                                        nodeClassName=nodeClass)
                     for key, label, nodeClass in (("t1ce", "T1ce", "vtkMRMLScalarVolumeNode"),
                                                   ("flair", "FLAIR", "vtkMRMLScalarVolumeNode"),
                                                   ("seg", "seg", "vtkMRMLLabelMapVolumeNode"))]
        return nodes


#
# FusionINNTest
#
class FusionINNTest(ScriptedLoadableModuleTest):
    """Self-tests in Slicer (Reload & Test, the Self Tests module, or ctest ``py_FusionINN``).

    A small phantom is fused (latent kept), decomposed exactly and by sampling, scored against the
    baselines, compared and differenced, all through the logic that the GUI uses.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_GeometryRoundTrip()
        self.setUp()
        self.test_FuseDecomposeScore()
        self.setUp()
        self.test_BackgroundJobCancel()

    def test_GeometryRoundTrip(self):
        """A volume with spacing, origin and an oblique direction survives node → Volume → node."""
        import numpy as np

        self.delayDisplay("Geometry round trip")
        logic = FusionINNLogic()
        angle = np.deg2rad(20.0)
        ijkToRAS = np.eye(4)
        ijkToRAS[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0],
                                     [0.0, 0.0, 1.0]]) @ np.diag([0.9, 1.1, 2.5])
        ijkToRAS[:3, 3] = [10.0, -20.0, 30.0]
        array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
        node = slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRAS, name="geometry")
        volume = logic.volumeFromNode(node)
        self.assertEqual(volume.shape, (4, 5, 6))
        with logic._allOrNothing() as created:
            copy = logic.addVolumeNode(volume, "geometry copy", created)
        np.testing.assert_allclose(logic.worldIJKToRAS(copy), ijkToRAS, atol=1e-9)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy), array)
        self.delayDisplay("Geometry round trip passed")

    def test_FuseDecomposeScore(self):
        import numpy as np

        self.delayDisplay("Fuse, decompose and score a phantom")
        logic = FusionINNLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        t1ce, flair, seg = logic.loadPhantomSample(shape=(16, 64, 64), seed=1)
        p = logic.getParameterNode()
        p.inputVolume1, p.inputVolume2 = t1ce, flair
        p.device, p.keepLatent, p.batchSize = "cpu", True, 4

        fusedNodes = logic.fuse(p)
        fused = fusedNodes["fused"]
        fusedArray = slicer.util.arrayFromVolume(fused)
        self.assertEqual(fusedArray.shape, (16, 64, 64))
        self.assertTrue(0.0 <= float(fusedArray.min()) and float(fusedArray.max()) <= 1.0)
        self.assertIsNotNone(fusedNodes["latent"])
        self.assertEqual(fused.GetAttribute(support.ROLE_ATTRIBUTE), "fused")
        self.assertTrue(fused.GetAttribute(support.ATTRIBUTE_PREFIX + "ModelSHA256") is not None)
        self.assertIsNotNone(logic.recordOf(fused))

        p.useKeptLatent = True
        exact = logic.decompose(p)
        for node, source in ((exact["decomposed1"], t1ce), (exact["decomposed2"], flair)):
            sourceArray = slicer.util.arrayFromVolume(source)
            error = np.abs(slicer.util.arrayFromVolume(node) - sourceArray).max()
            self.assertLess(float(error), 1e-3 * float(np.ptp(sourceArray)), "exact decomposition is not exact")
        self.assertIsNone(exact["std1"])

        p.useKeptLatent, p.samples, p.seed = False, 2, 3
        sampled = logic.decompose(p)
        self.assertIsNotNone(sampled["std1"])
        self.assertEqual(sampled["std1"].GetDisplayNode().GetColorNodeID(),
                         support.OVERLAY_COLORMAPS[support.STD_COLORMAP])

        p.maskVolume = seg
        p.metricsTable = None
        table = logic.score(p, baselines=True)["table"]
        from FusionINNLib.metrics import FUSION_METRIC_NAMES

        self.assertGreaterEqual(table.GetNumberOfRows(), len(FUSION_METRIC_NAMES))
        header = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
        for column in ("Metric", "FusionINN", "mean", "max", "weighted", "Description"):
            self.assertIn(column, header)
        self.assertEqual(table.GetTable().GetColumnByName("FusionINN").GetDataTypeAsString(), "double")

        differences = logic.makeDifferenceMaps(p)
        self.assertEqual(len(differences), 2)
        if slicer.app.layoutManager() is not None:
            views = logic.showCompareLayout(p)
            self.assertEqual(len(views), 5)
        self.delayDisplay("Fuse, decompose and score passed")

    def test_BackgroundJobCancel(self):
        """Cancelling a running fusion raises Cancelled in the worker and creates no node."""
        import time

        self.delayDisplay("Cancel a background fusion")
        logic = FusionINNLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        t1ce, flair, _seg = logic.loadPhantomSample(shape=(32, 64, 64), seed=2)
        p = logic.getParameterNode()
        p.inputVolume1, p.inputVolume2, p.device, p.batchSize = t1ce, flair, "cpu", 1
        request = logic.prepareFuse(p)
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")

        def work(progress, isCancelled, log):
            return logic.computeFuse(request, progress, isCancelled, log)

        job = support.BackgroundJob(work).start()
        job.cancel()
        self.assertTrue(job.wait(60))
        status = job.poll()
        self.assertTrue(status.cancelled, f"expected a cancelled job, got error={status.error!r}")
        time.sleep(0.1)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), before)
        self.delayDisplay("Cancel passed")
