"""FusionINN: decomposable multimodal MRI fusion with an invertible flow, as a 3D Slicer module.

This file is the thin Slicer layer: module metadata, the parameter node, the widget, the self-tests
and a logic class that adds Slicer's module-logic base to :class:`FusionINNSlicerLib.FusionINNCoreLogic`
(MRML ⇄ :class:`FusionINNLib.io.volume.Volume`, worker jobs, output nodes; Qt-free, tested on real MRML).

Every heavy job (fuse, decompose, score, explain, Jacobian, difference maps, batch) runs in the
FusionINN **worker**, a separate process running the same ``FusionINNLib`` code as the
``fusioninn`` command line (:mod:`FusionINNLib.worker`). Slicer's process only converts nodes to
temporary ``.npy`` files and back and polls the worker's pipe from a ``QTimer``: it stays
responsive, loads no torch and changes no process-wide state (see docs/slicer.md).

Reference: N. Kumar, P. Gumhold et al., "FusionINN: Decomposable Image Fusion for Brain Tumor
Monitoring", arXiv:2403.15769 (2024).
"""
import logging
import os
import pathlib
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
from FusionINNSlicerLib.logic import (
    PHANTOM_SAMPLE_NAME,
    SAMPLE_FILES,
    FusionINNCoreLogic,
    phantomSampleChecksums,
    phantomSampleURIs,
)

TRAINING_MODULE_NAME = "FusionINNTraining"
POLL_INTERVAL_MS = 100
LIVE_POLL_INTERVAL_MS = 15  # while the Jacobian follows the crosshair


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
        slicer.app.connect("startupCompleted()", connectFileHooks)


def registerSampleData():
    """The phantom (T1-Gd, FLAIR, tumour labels) ships with the module as files: the Sample Data module
    copies them from their ``file://`` URIs into its cache and loads them. No torch, no network, and
    ``SampleData.downloadSample("FusionINNPhantom")`` works too (Slicer's ``downloadFromSource``
    ignores a custom downloader, so the sample must not depend on one)."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="FusionINN",
        sampleName=PHANTOM_SAMPLE_NAME,
        thumbnailFileName=os.path.join(iconsPath, "FusionINN.png"),
        uris=phantomSampleURIs(),
        checksums=phantomSampleChecksums(),
        fileNames=[fileName for fileName, _nodeName, _className in SAMPLE_FILES],
        nodeNames=[nodeName for _fileName, nodeName, _className in SAMPLE_FILES],
        loadFileTypes=["VolumeFile"] * len(SAMPLE_FILES),
    )


def connectFileHooks():
    """Keep the fusion record with fused files: write its sidecar when a fused volume is saved, adopt
    the record of a fused file when it is loaded (qSlicerCoreIOManager's fileSaved/newFileLoaded)."""
    ioManager = slicer.app.coreIOManager()
    logic = FusionINNLogic()
    ioManager.fileSaved.connect(logic.onFileSaved)
    ioManager.newFileLoaded.connect(logic.onNewFileLoaded)
    slicer.modules.FusionINNFileHooksLogic = logic  # keep the handlers alive


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
        self._liveJacobian = False
        self._jacobianPending = False

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
        self._stopLiveJacobian()
        if self._job is not None:
            self._job.cancel()
        if self._jobTimer is not None:
            self._jobTimer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.shutdownWorker()

    def enter(self):
        self.initializeParameterNode()
        # Start the worker now (torch loads while the user picks volumes); only once torch exists.
        if self.logic.isModuleAvailable("torch") and not support.torch_too_old(support.installed_version("torch")):
            with slicer.util.tryWithErrorDisplay(_("The FusionINN worker could not start.")):
                self.logic.startWorker()

    def exit(self):
        self._stopLiveJacobian()
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self._stopLiveJacobian()
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

    def _connectGui(self, parameterNode):
        """``connectParametersToGui`` with the widgets ``connectGui`` would find: it returns the tag on
        Slicer 5.8 too (5.8's ``connectGui`` returns None, so ``disconnectGui`` could not undo it
        and every module entry would add another set of connections)."""
        mapping = support.gui_parameter_mapping(vars(self.ui), lambda widget, name: widget.property(name))
        return parameterNode.connectParametersToGui(mapping)

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._connectGui(self._parameterNode)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiState)
            self.updateGuiState()

    def updateGuiState(self, caller=None, event=None):
        """Enable what can run, explain what cannot (tooltips and status lines)."""
        p = self._parameterNode
        if p is None:
            return
        idle = self._job is None or self._liveJacobian
        haveInputs = p.inputVolume1 is not None and p.inputVolume2 is not None
        haveTriple = haveInputs and p.fusedVolume is not None
        modelReady = p.modelSource == "bundled" or not support.unset_path(p.modelPath)
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
        self.ui.jacobianButton.enabled = (idle or self._liveJacobian) and haveInputs
        self.ui.compareLayoutButton.enabled = haveTriple
        self.ui.overlayButton.enabled = p.fusedVolume is not None and p.overlayVolume is not None
        self.ui.differenceMapsButton.enabled = idle and haveInputs and (
            p.decomposedVolume1 is not None or p.decomposedVolume2 is not None)
        inputDirectory = str(p.batchInputDirectory)
        self.ui.batchButton.enabled = idle and modelReady and not support.unset_path(inputDirectory) and \
            os.path.isdir(inputDirectory) and not support.unset_path(p.batchOutputDirectory)
        self.ui.cancelButton.enabled = self._job is not None and not self._liveJacobian

    def _modelDescription(self, p):
        if p.modelSource == "file":
            path = str(p.modelPath)
            if support.unset_path(path):
                return _("Choose a checkpoint file (.pt).")
            return _("Model file: {path}").format(path=path) if os.path.isfile(path) else _(
                "Model file not found: {path}").format(path=path)
        bundled = self.resourcePath("Models/fusioninn_default.pt")
        if os.path.isfile(bundled):
            return _("Bundled model: {name}").format(name=os.path.basename(bundled))
        return _("Bundled model not installed: an UNTRAINED model will be used (results are not meaningful).")

    # -- jobs in the worker ------------------------------------------------------------------
    def _startJob(self, title, job, finish, interval=POLL_INTERVAL_MS):
        """Poll ``job`` (a worker job) from a QTimer; ``finish(result)`` runs here once it is done."""
        self._jobTitle = title
        self._jobFinish = finish
        self._job = job
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(not self._liveJacobian)
        if not self._liveJacobian:
            self.ui.statusLabel.text = _("{title}: running...").format(title=title)
            self.ui.notesLabel.text = ""
        self._jobTimer.setInterval(interval)
        self._jobTimer.start()
        self.updateGuiState()

    def _pollJob(self):
        job = self._job
        if job is None:
            self._jobTimer.stop()
            return
        status = job.poll()  # reads the worker's pipe without blocking
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
            elif status.error is not None and self._liveJacobian and "session expired" in str(status.error):
                # the worker restarted or its model changed: send the inputs again with the next update
                self.logic.forgetJacobianSession()
                self._jacobianPending = True
            elif status.error is not None:
                self._showError(title, status.error)
            else:
                with slicer.util.tryWithErrorDisplay(_("{title}: could not create the outputs.").format(title=title),
                                                     waitCursor=not self._liveJacobian):
                    notes = finish(status.result) or []
                    if not self._liveJacobian:
                        self.ui.statusLabel.text = _("{title} finished in {seconds:.1f} s.").format(
                            title=title, seconds=status.elapsed)
                        self.ui.notesLabel.text = "\n".join(notes)
        finally:
            job.cleanup()  # the job's temporary folder
            self.updateGuiState()
            if self._liveJacobian and self._jacobianPending:
                self._requestJacobian()

    def _showError(self, title, error):
        """One clear message; the worker's traceback goes to the details and the log."""
        message = support.first_line(error)
        self.ui.statusLabel.text = _("{title} failed: {message}").format(title=title, message=message)
        details = getattr(error, "details", "") or ""
        if details:
            logging.error(details)
        if self._liveJacobian:
            self._stopLiveJacobian()
        slicer.util.errorDisplay(_("{title} failed: {message}").format(title=title, message=message),
                                 detailedText=details or None, windowTitle=_("FusionINN"))

    def onCancelButton(self):
        if self._job is not None:
            self._job.cancel()  # the worker stops at its next check, or is killed within a second
            self.ui.statusLabel.text = _("{title}: cancelling...").format(title=self._jobTitle)

    def _runInWorker(self, title, prepare, op, paramsOf, finish, watchFolders=()):
        """prepare() reads the nodes here, the worker computes, finish() creates the nodes here."""
        self._stopLiveJacobian()  # one job at a time: another job ends the live Jacobian
        if self._job is not None:
            slicer.util.warningDisplay(_("Another FusionINN job is running; wait for it or cancel it."))
            return
        with slicer.util.tryWithErrorDisplay(_("{title} could not start.").format(title=title), waitCursor=True):
            if not self.logic.ensureDependencies():
                self.ui.statusLabel.text = _("{title}: required Python packages are missing.").format(title=title)
                return
            request = prepare()
            job = self.logic.submit(op, paramsOf(request), watch_folders=watchFolders, title=title)
            self._startJob(title, job, lambda result: finish(request, result))

    # -- actions -----------------------------------------------------------------------------
    def onFuseButton(self):
        p = self._parameterNode

        def finish(request, result):
            nodes = self.logic.finishFuse(request, result)
            p.fusedVolume = nodes["fused"]
            slicer.util.setSliceViewerLayers(background=nodes["fused"], fit=True)
            return nodes["notes"]

        self._runInWorker(_("Fusion"), lambda: self.logic.prepareFuse(p), "job", self.logic.fuseParams, finish)

    def onDecomposeButton(self):
        p = self._parameterNode

        def finish(request, result):
            nodes = self.logic.finishDecompose(request, result)
            p.decomposedVolume1, p.decomposedVolume2 = nodes["decomposed1"], nodes["decomposed2"]
            if nodes.get("std1") is not None:
                p.overlayVolume = nodes["std1"]
            slicer.util.setSliceViewerLayers(background=nodes["decomposed1"], fit=True)
            return nodes["notes"]

        self._runInWorker(_("Decomposition"), lambda: self.logic.prepareDecompose(p), "job",
                          self.logic.decomposeParams, finish)

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

        self._runInWorker(_("Scoring"), lambda: self.logic.prepareScore(p, baselines), "job",
                          self.logic.scoreParams, finish)

    def onExplainButton(self):
        p = self._parameterNode

        def finish(request, result):
            nodes = self.logic.finishExplain(request, result)
            p.overlayVolume = nodes["guidance1"]
            return nodes["notes"]

        self._runInWorker(_("Guidance maps"), lambda: self.logic.prepareExplain(p), "job",
                          self.logic.explainParams, finish)

    # -- live Jacobian -------------------------------------------------------------------------
    def onJacobianButton(self, checked=False):
        """Toggle: while on, the Jacobian of the fused voxel under the crosshair follows it."""
        if self._liveJacobian:
            self._stopLiveJacobian()
            return
        with slicer.util.tryWithErrorDisplay(_("Jacobian could not start."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
            if crosshair is None:
                raise ValueError(_("No crosshair in the scene."))
            self._liveJacobian = True
            self.ui.jacobianButton.text = _("Stop Jacobian")
            self.addObserver(crosshair, vtk.vtkCommand.ModifiedEvent, self._onCrosshairMoved)
            self.ui.statusLabel.text = _("Jacobian: follows the crosshair (Shift + mouse move).")
            self._requestJacobian()

    def _stopLiveJacobian(self):
        if not self._liveJacobian:
            return
        self._liveJacobian = False
        self._jacobianPending = False
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is not None:
            self.removeObserver(crosshair, vtk.vtkCommand.ModifiedEvent, self._onCrosshairMoved)
        self.ui.jacobianButton.text = _("Jacobian at crosshair")
        self.updateGuiState()

    def _onCrosshairMoved(self, caller=None, event=None):
        if not self._liveJacobian:
            return
        if self._job is not None:
            self._jacobianPending = True  # coalesce: only the latest position is computed next
            return
        self._requestJacobian()

    def _requestJacobian(self):
        self._jacobianPending = False
        p = self._parameterNode
        try:
            request = self.logic.prepareJacobian(p, self.logic.crosshairRAS())
        except ValueError as error:  # crosshair outside the volume: say so and wait for the next move
            self.ui.statusLabel.text = _("Jacobian: {message}").format(message=support.first_line(error))
            return

        def finish(result):
            nodes = self.logic.finishJacobian(request, result)
            if p.overlayVolume is not nodes["jacobian1"]:
                p.overlayVolume = nodes["jacobian1"]
            self.ui.statusLabel.text = _("Jacobian at voxel {index}.").format(index=list(request["index"]))
            return []

        job = self.logic.submit("jacobian", request["params"], title=_("Jacobian"))
        self._startJob(_("Jacobian"), job, finish, LIVE_POLL_INTERVAL_MS)

    # -- compare, overlay, difference, batch ---------------------------------------------------
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
        p = self._parameterNode

        def finish(request, result):
            nodes = self.logic.finishDifference(request, result)
            if nodes:
                p.overlayVolume = nodes[0]
            return [_("Created {count} difference map(s).").format(count=len(nodes))]

        self._runInWorker(_("Difference maps"), lambda: self.logic.prepareDifference(p), "difference",
                          lambda request: {"pairs": request["pairs"]}, finish)

    def onBatchButton(self):
        p = self._parameterNode

        def finish(request, result):
            nodes = self.logic.finishBatch(request, result)
            self.logic.showTable(nodes["table"])
            return nodes["notes"]

        self._runInWorker(_("Batch"), lambda: self.logic.prepareBatch(p), "job", self.logic.batchParams, finish,
                          watchFolders=[str(p.batchOutputDirectory)])

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
            # An unset ctkDirectoryButton returns "." (the current folder), not "".
            if support.unset_path(dataDirectory) or not os.path.isdir(dataDirectory):
                raise ValueError(_("Choose the folder holding the BraTS-style cases (one sub-folder per case)."))
            outputModel = self.ui.trainOutputModelPathLineEdit.currentPath
            if support.unset_path(outputModel):
                raise ValueError(_("Choose where to save the trained model (.pt file)."))
            if not outputModel.lower().endswith(".pt"):
                outputModel += ".pt"
            resume = support.resumable_checkpoint(outputModel)
            if resume is not None and not slicer.util.confirmYesNoDisplay(
                    _("An unfinished training run of {model} exists ({path}). Resume it? (No starts a new run, "
                      "which replaces it.)").format(model=outputModel, path=resume), windowTitle=_("FusionINN")):
                resume = None
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
                "dataDir": dataDirectory,  # the Slicer names of FusionINNLib.train.options (DATA_DIR, --output)
                "output": outputModel,
                "epochs": int(self.ui.trainEpochsSpinBox.value),
                "device": p.device if p is not None else "auto",
                "amp": bool(p.amp) if p is not None else False,
                "historyTable": outputs["history"],
                "metricsTable": outputs["metrics"],
                "previewVolume": outputs["preview"],
            }
            if resume is not None:
                parameters["resume"] = resume
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
            # Slicer stops a CLI with SIGKILL: the run folder keeps last.pt of the last finished epoch.
            resume = support.resumable_checkpoint(outputs.get("model") or "")
            self.ui.statusLabel.text = (
                _("Training cancelled; press Train again to resume it from {path}.").format(path=resume)
                if resume is not None else _("Training cancelled before its first epoch ended; nothing to resume."))
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
        """The loss curves as Slicer plot nodes (Slicer's Python has no matplotlib), shown in the layout."""
        chart = self.logic.plotTrainingHistory(historyTable)
        if chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chart)
        return chart


#
# FusionINNLogic
#
class FusionINNLogic(ScriptedLoadableModuleLogic, FusionINNCoreLogic):
    """Slicer's module-logic base (parameter node) + the Qt-free logic in ``FusionINNSlicerLib``.

    Dependencies (installed into Slicer's Python, which the worker shares) and the parts that need
    Slicer's GUI application (layout manager, table view) are here; everything else is in
    :class:`FusionINNSlicerLib.logic.FusionINNCoreLogic`.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        FusionINNCoreLogic.__init__(self)

    def getParameterNode(self):
        return FusionINNParameterNode(super().getParameterNode())

    # -- dependencies ------------------------------------------------------------------------
    @staticmethod
    def isModuleAvailable(name):
        import importlib.util

        return importlib.util.find_spec(name) is not None

    def ensureDependencies(self, askConfirmation=True, torch=True):
        """PyTorch (>= 2.5) through the PyTorch extension, then the other packages with pip.
        ``torch=False``: only what the sample data needs. False if the user declined."""
        import importlib

        askConfirmation = askConfirmation and not slicer.app.testingEnabled()
        if torch:
            installed = support.installed_version("torch") if self.isModuleAvailable("torch") else None
            if installed is None or support.torch_too_old(installed):
                try:
                    import PyTorchUtils
                except ModuleNotFoundError:
                    raise RuntimeError(_("FusionINN needs PyTorch {requirement}. Install the 'PyTorch' extension with "
                                         "the Extensions Manager, restart Slicer and try again.").format(
                                             requirement=support.TORCH_REQUIREMENT)) from None
                if installed is not None and askConfirmation and not slicer.util.confirmOkCancelDisplay(
                        _("FusionINN needs PyTorch {requirement}, but {version} is installed. Upgrade it now?").format(
                            requirement=support.TORCH_REQUIREMENT, version=installed),
                        windowTitle=_("FusionINN: PyTorch")):
                    return False
                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if torchLogic.installTorch(askConfirmation=askConfirmation and installed is None,
                                           torchVersionRequirement=support.TORCH_REQUIREMENT) is None:
                    return False
                if support.torch_too_old(support.installed_version("torch")):
                    raise RuntimeError(_("PyTorch {version} is still installed; FusionINN needs {requirement}. "
                                         "Restart Slicer and try again.").format(
                                             version=support.installed_version("torch"),
                                             requirement=support.TORCH_REQUIREMENT))
                self.shutdownWorker()  # a running worker holds the old torch
        requirements = support.PYTHON_REQUIREMENTS if torch else support.SAMPLE_DATA_REQUIREMENTS
        missing = support.missing_requirements(self.isModuleAvailable, requirements)
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("FusionINN needs these Python packages, which will be downloaded and installed now:\n\n"
                      "{packages}\n\nThis can take a few minutes.").format(packages="\n".join(missing)),
                    windowTitle=_("FusionINN: install Python packages")):
                return False
            for requirement in missing:
                slicer.util.pip_install(requirement)
            importlib.invalidate_caches()
            stillMissing = support.missing_requirements(self.isModuleAvailable, requirements)
            if stillMissing:
                raise RuntimeError(_("Installing {packages} failed; see the Python console.").format(
                    packages=", ".join(stillMissing)))
        return True

    # -- views (need Slicer's main window) ---------------------------------------------------------
    @staticmethod
    def showTable(tableNode):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # no main window (e.g. --no-main-window tests)
            return
        layoutManager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layoutManager.layout))
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetActiveTableID(tableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    def showCompareLayout(self, p):
        """Inputs, fused and decompositions side by side, linked, with the crosshair shown; a changed
        orientation re-orients the existing views."""
        if p.inputVolume1 is None or p.inputVolume2 is None or p.fusedVolume is None:
            raise ValueError(_("Select input 1, input 2 and a fused volume to compare."))
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            raise RuntimeError(_("The compare layout needs Slicer's main window."))
        hasDecomposition = p.decomposedVolume1 is not None and p.decomposedVolume2 is not None
        views = support.compare_views(hasDecomposition)
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()

        def sliceNodeOf(name):
            sliceWidget = layoutManager.sliceWidget(name)
            return sliceWidget.mrmlSliceNode() if sliceWidget is not None else self.sliceNodeByName(name)

        self.applyCompareLayout(layoutNode, views, p.compareOrientation, sliceNodeOf)
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


#
# FusionINNTest
#
class FusionINNTest(ScriptedLoadableModuleTest):
    """Self-tests in Slicer (Reload & Test, the Self Tests module, or ctest ``py_FusionINN``).

    The phantom sample is fused (latent kept) in the worker, decomposed exactly and by sampling,
    scored against the baselines, compared and differenced, all through the logic the GUI uses;
    a running fusion is cancelled and must leave no node.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_GeometryRoundTrip()
        self.setUp()
        self.test_FuseDecomposeScore()
        self.setUp()
        self.test_WorkerJobCancel()

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
        with logic.allOrNothing() as created:
            copy = logic.addVolumeNode(volume, "geometry copy", created)
        np.testing.assert_allclose(logic.worldIJKToRAS(copy), ijkToRAS, atol=1e-9)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy), array)
        self.delayDisplay("Geometry round trip passed")

    def test_FuseDecomposeScore(self):
        import numpy as np

        self.delayDisplay("Fuse, decompose and score the phantom in the worker")
        logic = FusionINNLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        try:
            t1ce, flair, seg = logic.loadPhantomSample()
            p = logic.getParameterNode()
            p.inputVolume1, p.inputVolume2 = t1ce, flair
            p.device, p.keepLatent, p.batchSize = "cpu", True, 4

            fusedNodes = logic.fuse(p)
            fused = fusedNodes["fused"]
            fusedArray = slicer.util.arrayFromVolume(fused)
            self.assertEqual(fusedArray.shape, slicer.util.arrayFromVolume(t1ce).shape)
            self.assertTrue(0.0 <= float(fusedArray.min()) and float(fusedArray.max()) <= 1.0)
            self.assertIsNotNone(fusedNodes["latent"])
            self.assertEqual(fused.GetAttribute(support.ROLE_ATTRIBUTE), "fused")
            self.assertIsNotNone(logic.recordOf(fused))

            p.useKeptLatent = True
            exact = logic.decompose(p)
            for node, source in ((exact["decomposed1"], t1ce), (exact["decomposed2"], flair)):
                sourceArray = slicer.util.arrayFromVolume(source).astype(np.float64)
                error = np.abs(slicer.util.arrayFromVolume(node) - sourceArray).max()
                self.assertLess(float(error), 1e-3 * float(np.ptp(sourceArray)), "exact decomposition is not exact")

            p.useKeptLatent, p.samples, p.seed = False, 2, 3
            sampled = logic.decompose(p)
            self.assertIsNotNone(sampled["std1"])

            p.maskVolume = seg
            p.metricsTable = None
            table = logic.score(p, baselines=True)["table"]
            header = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
            for column in ("Metric", "FusionINN", "mean", "max", "weighted", "Description"):
                self.assertIn(column, header)
            self.assertEqual(table.GetTable().GetColumnByName("FusionINN").GetDataTypeAsString(), "double")

            self.assertEqual(len(logic.makeDifferenceMaps(p)), 2)
            if slicer.app.layoutManager() is not None:
                self.assertEqual(len(logic.showCompareLayout(p)), 5)
        finally:
            logic.shutdownWorker()
        self.delayDisplay("Fuse, decompose and score passed")

    def test_WorkerJobCancel(self):
        """Cancelling a running fusion in the worker ends it within a second and creates no node."""
        import time

        self.delayDisplay("Cancel a fusion in the worker")
        logic = FusionINNLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        try:
            t1ce, flair, _seg = logic.loadPhantomSample()
            p = logic.getParameterNode()
            p.inputVolume1, p.inputVolume2, p.device, p.batchSize = t1ce, flair, "cpu", 1
            before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
            job = logic.submit("job", logic.fuseParams(logic.prepareFuse(p)))
            time.sleep(0.2)
            job.cancel()
            start = time.monotonic()
            self.assertTrue(job.wait(5))
            self.assertLess(time.monotonic() - start, 1.0)
            self.assertTrue(job.poll().cancelled)
            self.assertFalse(job.folder.exists(), "the cancelled job left its temporary folder")
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), before)
        finally:
            logic.shutdownWorker()
        self.delayDisplay("Cancel passed")
