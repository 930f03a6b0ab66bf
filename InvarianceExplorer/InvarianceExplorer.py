"""3D Slicer module: sample and analyse the invariances of low-dose CT denoising networks.

The science lives in the engine package InvarianceExplorerLib (numpy, torch, MONAI; no
slicer). This file is the thin Slicer layer: it exports the input volume to a temporary
NRRD, runs the engine CLI (``invariance-explorer sample``) in a PythonSlicer child process
(InvarianceExplorerLib.ui.process), and turns the folder it writes back into MRML nodes,
with the geometry and table logic in plain functions (InvarianceExplorerLib.result_folder).
It must stay cheap to import: Slicer imports it at start-up, so torch (and the engine's
torch modules) are not imported in Slicer's own process (the PyTorch extension's installer
does import torch once it has installed it on first use).
"""

import importlib
import importlib.util
import logging
import os
import pathlib
import sys
import tempfile
import time
import unittest
from typing import Annotated

import qt
import vtk

import slicer
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

PAPER_DOI_URL = "https://doi.org/10.1002/mp.17413"

#: Attributes that mark a node as a result of this module, for the input volume of that ID.
#: The input-volume selector hides the volumes that carry them (they are no inputs).
RESULT_INPUT_ATTRIBUTE = "InvarianceExplorer.InputVolumeID"
RESULT_ROLE_ATTRIBUTE = "InvarianceExplorer.Role"

#: Result roles of the analysis (``sample --analyze``) -> name suffix after the input's name
#: (the engine's result_folder.RESULT_ROLES name the others).
ANALYSIS_ROLES = {"anatomy_changes": "anatomy changes", "change_maps": "change maps (method A, z)",
                  "significance": "significance (method B, -log10 q)"}

#: Segments of the anatomy-change segmentation: (analysis output, label value, segment name, colour).
#: Method A's altered regions (label 1: brighter in the invariance, structure added; 2: darker,
#: structure removed) are merged over all invariances; method B's regions exist only when it ran.
ANATOMY_SEGMENTS = (
    ("altered_regions", 1, "structure added (method A, any invariance)", (1.0, 0.55, 0.0)),
    ("altered_regions", 2, "structure removed (method A, any invariance)", (0.2, 0.6, 1.0)),
    ("significant_regions", 1, "significant change (method B)", (1.0, 0.0, 1.0)),
)

#: Outputs listed in the panel, each with its own Show button, in this order (roles).
OUTPUT_ROLES = ("invariances", "denoised_invariances", "crop", "denoised", "reconstruction", "std", "table", "chart",
                "anatomy_changes", "change_maps", "significance")

#: Colour tables of the maps, first one the scene has: heat (std, method B's -log10 q) and
#: diverging (method A's signed z-scores: blue darker, red brighter in the invariance).
HEAT_COLOURS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
DIVERGING_COLOURS = ("vtkMRMLColorTableNodeFileDivergingBlueRed.txt", "vtkMRMLColorTableNodeFileColdToHotRainbow.txt")

#: Results shown as a coloured overlay: role -> (role of the background it goes over, or None
#: to keep the current one; foreground opacity).
OVERLAYS = {"std": (None, 0.4), "change_maps": ("invariances_proxy", 0.5), "significance": ("crop", 0.5)}

#: Packages the engine needs in Slicer's Python (import name -> pip requirement). torch comes
#: from the PyTorch extension (PyTorchUtils) when it is installed.
ENGINE_REQUIREMENTS = {
    "monai": "monai>=1.4",
    "FrEIA": "FrEIA>=0.2",
    "safetensors": "safetensors>=0.4",
    "scipy": "scipy>=1.10",
    "pydicom": "pydicom>=2.4",
    "tqdm": "tqdm>=4.60",
    "PIL": "Pillow>=9.0",
    "yaml": "PyYAML>=6.0",
    "pylibjpeg": "pylibjpeg>=2.0",
    "libjpeg": "pylibjpeg-libjpeg>=2.1",
}
TORCH_REQUIREMENT = "torch>=2.2"


def resourcesDir():
    """Return the extension's Resources directory.

    Built or installed by CMake, Resources/ sits next to this file, in the
    qt-scripted-modules directory (see InvarianceExplorer/CMakeLists.txt). Loaded from the
    source tree (module path <repo>/InvarianceExplorer), it is <repo>/Resources.
    """
    moduleDir = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(moduleDir, "Resources"), os.path.join(os.path.dirname(moduleDir), "Resources")):
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(f"No Resources directory next to or above {moduleDir}")


def _vtkMatrix(array):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def _numpyMatrix(vtkMatrix):
    import numpy as np

    return np.array([[vtkMatrix.GetElement(r, c) for c in range(4)] for r in range(4)])


#
# InvarianceExplorer
#


class InvarianceExplorer(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Invariance Explorer")
        # translated level by level (the module menu splits the path at "."), as Slicer's own categories
        self.parent.categories = [".".join(translate("qSlicerAbstractCoreModule", level)
                                           for level in ("Filtering", "Denoising"))]
        # Slicer modules whose logic or widgets this module uses directly
        self.parent.dependencies = ["Markups", "Sequences", "Segmentations", "SubjectHierarchy", "Plots", "Tables"]
        self.parent.contributors = ["InvarianceExplorer developers"]
        self.parent.helpText = _("""
A low-dose CT denoising network is <i>invariant</i> to the properties of its input that it ignores:
changing them leaves the denoised image unchanged, which is wanted for noise but dangerous for anatomy
such as a small lesion.
This module samples images that a denoiser cannot tell apart from the input and measures how they differ,
following E. Eulig et al., "Reconstructing and analyzing the invariances of low-dose CT image denoising
networks", Medical Physics 52(1):188-200, 2025, <a href="{url}">doi:10.1002/mp.17413</a>.
<p>Choose the centre with a markups point or an ROI (its centre): the crop is the denoiser's patch
(128 x 128 pixels for the bundled denoisers) around that centre, in the slice that contains it; the ROI's
size is not used. Each output has its own <i>Show</i> button.</p>
""").format(url=PAPER_DOI_URL)
        self.parent.acknowledgementText = _("""
The method is by E. Eulig, F. Jäger, J. Maier, B. Ommer and M. Kachelrieß
(<a href="{url}">doi:10.1002/mp.17413</a>); this module is an independent implementation.
It builds on 3D Slicer, PyTorch, MONAI and FrEIA.
""").format(url=PAPER_DOI_URL)
        # The base class looks for the icon next to this file only, which misses the source tree.
        self.parent.icon = qt.QIcon(os.path.join(resourcesDir(), "Icons", "InvarianceExplorer.png"))
        slicer.app.connect("startupCompleted()", registerSampleData)

    def resourcePath(self, filename):
        """Return the absolute path of ``filename`` inside the Resources directory."""
        return os.path.join(resourcesDir(), filename)


def _engineImport(name):
    """Import a torch-free engine module (the module directory is on sys.path in Slicer)."""
    moduleDir = os.path.dirname(os.path.abspath(__file__))
    if moduleDir not in sys.path:
        sys.path.insert(0, moduleDir)
    return importlib.import_module(f"InvarianceExplorerLib.{name}")


def registerSampleData():
    """Register the bundled low-dose chest CT with the SampleData module (no network needed)."""
    import SampleData

    sampleData = _engineImport("sample_data").SAMPLE_CT
    path = os.path.join(resourcesDir(), sampleData["file"])
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="InvarianceExplorer",
        sampleName=sampleData["name"],
        thumbnailFileName=os.path.join(resourcesDir(), "Icons", "InvarianceExplorer.png"),
        uris=pathlib.Path(path).resolve().as_uri(),  # percent-encoded, as SampleData's urlretrieve needs
        fileNames=os.path.basename(path),
        checksums="SHA256:" + sampleData["sha256"],
        nodeNames=sampleData["name"],
    )


#
# Parameter node
#


@parameterNodeWrapper
class InvarianceExplorerParameterNode:
    """The module's settings, saved with the scene.

    inputVolume - the low-dose CT (HU). centerFrom - "point" or "roi": what gives the centre of
    the crop (and its slice): point - its first control point; roi - its centre. denoiser - a
    bundled name (cnn10, redcnn, wganvgg, dugan) or "custom" with customModelFolder.
    sampleCount, seed, device - as in the CLI's ``sample``; refine - the model folder's
    consistency refinement (off: ``sample --refine 0,0``); analyze - ``sample --analyze``.
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    centerFrom: Annotated[str, Choice(["point", "roi"])] = "point"
    point: slicer.vtkMRMLMarkupsFiducialNode
    roi: slicer.vtkMRMLMarkupsROINode
    denoiser: str = "cnn10"
    customModelFolder: str = ""
    sampleCount: Annotated[int, WithinRange(1, 1024)] = 32
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    refine: bool = True
    analyze: bool = False


def removeNode(node):
    """Remove ``node`` with its display and storage nodes from its scene (vtkMRMLScene::RemoveNode
    leaves them behind; the sequences logic gives every proxy node one of each); nothing when
    it is no longer in a scene."""
    scene = node.GetScene() if node is not None else None
    if scene is None:
        return
    owned = []
    for kind in ("Display", "Storage"):
        if hasattr(node, f"GetNumberOf{kind}Nodes"):
            get = getattr(node, f"GetNth{kind}Node")
            owned += [get(n) for n in range(getattr(node, f"GetNumberOf{kind}Nodes")())]
    scene.RemoveNode(node)
    for other in owned:
        if other is not None and other.GetScene() is not None:
            scene.RemoveNode(other)


def resultNodeNames(inputName):
    """Names of the result nodes of an input named ``inputName``, by role (the engine's and the
    analysis's)."""
    names = _engineImport("result_folder").result_node_names(inputName)
    names.update({role: f"{inputName} {suffix}" for role, suffix in ANALYSIS_ROLES.items()})
    return names


#
# InvarianceExplorerWidget
#


class InvarianceExplorerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel (InvarianceExplorerLib.ui.panel.SamplingPanel) with MRML node selectors plugged in."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # scene observers (addObserver / removeObservers)

    def resourcePath(self, filename):
        """Return the absolute path of ``filename`` inside the Resources directory."""
        return os.path.join(resourcesDir(), filename)

    def setup(self):
        """Build the panel: node selectors for the inputs, the shared sampling panel below them."""
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = InvarianceExplorerLogic()
        self._parameterNode = None
        panelModule = _engineImport("ui.panel")

        self.volumeSelector = slicer.qMRMLNodeComboBox()
        self.volumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.volumeSelector.showChildNodeTypes = False  # no labelmaps
        self.volumeSelector.addEnabled = False
        self.volumeSelector.removeEnabled = False
        self.volumeSelector.noneEnabled = True
        self.volumeSelector.setMRMLScene(slicer.mrmlScene)
        self.volumeSelector.setToolTip(_("The low-dose CT to analyse (HU); this module's results are not listed"))

        # the centre: a markups point, or the centre of a markups ROI
        self.centerFromPointButton = qt.QRadioButton(_("Point"))
        self.centerFromPointButton.setToolTip(_("Centre the crop on a markups point"))
        self.centerFromROIButton = qt.QRadioButton(_("ROI centre"))
        self.centerFromROIButton.setToolTip(_("Centre the crop on the centre of a markups ROI (its size is not used)"))
        self.centerFromPointButton.setChecked(True)
        self.pointWidget = slicer.qSlicerSimpleMarkupsWidget()
        self.pointWidget.setMRMLScene(slicer.mrmlScene)
        self.pointWidget.markupsPlaceWidget().setPlaceMultipleMarkups(
            slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup)
        self.pointWidget.setToolTip(_("Click in a slice view to place the point to sample around (e.g. in a lung)"))
        self.roiSelector = slicer.qMRMLNodeComboBox()
        self.roiSelector.nodeTypes = ["vtkMRMLMarkupsROINode"]
        self.roiSelector.addEnabled = True
        self.roiSelector.removeEnabled = True
        self.roiSelector.renameEnabled = True
        self.roiSelector.noneEnabled = True
        self.roiSelector.setMRMLScene(slicer.mrmlScene)
        self.roiSelector.setToolTip(_("A markups ROI: the crop is centred on its centre, in the slice containing it"))
        self.roiPlaceWidget = slicer.qSlicerMarkupsPlaceWidget()
        self.roiPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.roiPlaceWidget.setPlaceMultipleMarkups(slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup)
        self.roiPlaceWidget.setToolTip(_("Place the ROI in a slice view"))
        self.centerWidget = self._centerWidget()

        self.panel = panelModule.SamplingPanel(models_dir=os.path.join(resourcesDir(), "Models"))
        self.panel.addInputRow(_("Input volume:"), self.volumeSelector)
        self.panel.addInputRow(_("Centre:"), self.centerWidget)
        self.panel.prepareJob = self.prepareJob
        self.panel.collectResults = self.collectResults
        self.layout.addWidget(self.panel)
        self.statusLabel = qt.QLabel(self.logic.engineStatusText())
        self.statusLabel.setWordWrap(True)
        self.layout.addWidget(self.statusLabel)
        self.layout.addStretch(1)

        self.roiSelector.currentNodeChanged.connect(lambda *args: self.roiPlaceWidget.setCurrentNode(
            self.roiSelector.currentNode()))
        self.centerFromROIButton.toggled.connect(lambda *args: self._updateCenterRows())
        for signal in (self.volumeSelector.currentNodeChanged, self.pointWidget.markupsNodeChanged,
                       self.roiSelector.currentNodeChanged, self.centerFromROIButton.toggled,
                       self.panel.countSpin.valueChanged, self.panel.seedSpin.valueChanged,
                       self.panel.deviceCombo.currentIndexChanged, self.panel.denoiserCombo.currentIndexChanged,
                       self.panel.customFolderEdit.textChanged, self.panel.refineCheck.toggled,
                       self.panel.analyzeCheck.toggled):
            signal.connect(lambda *args: self.updateParameterNodeFromGUI())
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # result volumes get their marking attributes once all are made: filter after the import,
        # once per burst of added nodes (loading a scene adds thousands)
        self.filterTimer = qt.QTimer()
        self.filterTimer.setSingleShot(True)
        self.filterTimer.setInterval(0)
        self.filterTimer.timeout.connect(self.updateVolumeSelectorFilter)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.updateVolumeSelectorFilter()
        self.initializeParameterNode()

    def _centerWidget(self):
        """The Centre row: point or ROI centre, their selectors, and what the crop is."""
        widget = qt.QWidget()
        layout = qt.QVBoxLayout(widget)
        layout.setContentsMargins(0, 0, 0, 0)
        choice = qt.QHBoxLayout()
        choice.addWidget(self.centerFromPointButton)
        choice.addWidget(self.centerFromROIButton)
        choice.addStretch(1)
        layout.addLayout(choice)
        layout.addWidget(self.pointWidget)
        self.roiRow = qt.QWidget()
        roiLayout = qt.QHBoxLayout(self.roiRow)
        roiLayout.setContentsMargins(0, 0, 0, 0)
        roiLayout.addWidget(self.roiSelector, 1)
        roiLayout.addWidget(self.roiPlaceWidget)
        layout.addWidget(self.roiRow)
        self.patchNote = qt.QLabel(_("The crop is the denoiser's patch (128 x 128 pixels for the bundled denoisers) "
                                     "around this centre, in the slice that contains it."))
        self.patchNote.setWordWrap(True)
        layout.addWidget(self.patchNote)
        self._updateCenterRows()
        return widget

    def _updateCenterRows(self):
        useROI = self.centerFromROIButton.isChecked()
        self.pointWidget.setVisible(not useROI)
        self.roiRow.setVisible(useROI)

    def centerNode(self):
        """The node that gives the centre: the ROI or the point, as chosen."""
        if self.centerFromROIButton.isChecked():
            return self.roiSelector.currentNode()
        return self.pointWidget.currentNode()

    def onNodeAdded(self, caller, event):
        self.filterTimer.start()  # restarts a pending one: one filter update per burst

    def updateVolumeSelectorFilter(self):
        """Hide this module's result volumes from the input selector (the combo box's filter
        model, as qMRMLSortFilterProxyModel.hiddenNodeIDs)."""
        self.volumeSelector.sortFilterProxyModel().hiddenNodeIDs = self.logic.resultVolumeIDs()

    def cleanup(self):
        """Called when the module is closed or reloaded: stop a running job."""
        self.panel.cancel()
        self.filterTimer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event):
        self.panel.cancel()
        self._parameterNode = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self._parameterNode = self.logic.getParameterNode()
        if not self._parameterNode.inputVolume:
            hidden = set(self.logic.resultVolumeIDs())
            first = next((n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                          if n.GetClassName() == "vtkMRMLScalarVolumeNode" and n.GetID() not in hidden), None)
            if first is not None:
                self._parameterNode.inputVolume = first
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self):
        p = self._parameterNode
        if p is None:
            return
        self._updatingGUI = True
        try:
            self._setGUI(p)
        finally:
            self._updatingGUI = False

    def _setGUI(self, p):
        self.volumeSelector.setCurrentNode(p.inputVolume)
        if p.point:
            self.pointWidget.setCurrentNode(p.point)
        self.roiSelector.setCurrentNode(p.roi)
        (self.centerFromROIButton if p.centerFrom == "roi" else self.centerFromPointButton).setChecked(True)
        self._updateCenterRows()
        self.panel.refineCheck.setChecked(bool(p.refine))
        self.panel.analyzeCheck.setChecked(bool(p.analyze))
        self.panel.setDenoiser(p.customModelFolder if p.denoiser == "custom" else p.denoiser)
        self.panel.countSpin.setValue(p.sampleCount)
        self.panel.seedSpin.setValue(p.seed)
        devices = [value for value, _ in _engineImport("ui.panel").DEVICES]
        self.panel.deviceCombo.setCurrentIndex(devices.index(p.device))

    def updateParameterNodeFromGUI(self, *args):
        p = self._parameterNode
        if p is None or getattr(self, "_updatingGUI", False):
            return
        settings = self.panel.settings()
        p.inputVolume = self.volumeSelector.currentNode()
        p.point = self.pointWidget.currentNode()
        p.roi = self.roiSelector.currentNode()
        p.centerFrom = "roi" if self.centerFromROIButton.isChecked() else "point"
        p.refine, p.analyze = settings["refine"], settings["analyze"]
        bundled = [name for name, _ in _engineImport("ui.panel").DENOISERS]
        p.denoiser = settings["model"] if settings["model"] in bundled else "custom"
        p.customModelFolder = "" if p.denoiser != "custom" else settings["model"]
        p.sampleCount, p.seed, p.device = settings["count"], settings["seed"], settings["device"]

    def prepareJob(self, settings):
        """Panel hook: check inputs and dependencies, export the input, build the engine job."""
        volume, center = self.volumeSelector.currentNode(), self.centerNode()
        if volume is None:
            raise ValueError(_("Select the input volume (a low-dose CT in HU)."))
        if self.centerFromROIButton.isChecked():
            if center is None or center.GetNumberOfControlPoints() < 1:
                raise ValueError(_("Select an ROI and place it in the image: its centre is where to sample."))
        elif center is None or center.GetNumberOfDefinedControlPoints() < 1:  # placed, not a preview
            raise ValueError(_("Place a point in the image (where to sample), e.g. in a lung."))
        if not self.logic.installDependencies(askUser=True, forceCPU=settings["device"] == "cpu"):
            raise RuntimeError(_("The engine's Python packages are missing: ") + self.logic.dependencyHint())
        job = self.logic.prepareSampling(volume, settings["model"], center, settings["count"], settings["seed"],
                                         device=settings["device"], analyze=settings["analyze"],
                                         refine=settings["refine"])
        self._jobVolume = volume
        return job

    def collectResults(self, outputs, job):
        """Panel hook: the engine finished: create the nodes, show them, list them in Outputs
        (one row per output, each with its own Show button)."""
        volume = self._jobVolume
        nodes = self.logic.importResults(volume, job.outDir)
        self.updateVolumeSelectorFilter()
        self.logic.showResults(nodes)
        return self.outputItems(nodes)

    def outputItems(self, nodes):
        """The panel's Outputs rows for result ``nodes``: (node name, show it) in OUTPUT_ROLES order."""
        return [(nodes[role].GetName(), lambda r=role: self.logic.showResult(nodes, r))
                for role in OUTPUT_ROLES if role in nodes]


#
# InvarianceExplorerLogic
#


class InvarianceExplorerLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: translates between MRML nodes and the engine (InvarianceExplorerLib).

    Console scripting::

        logic = slicer.util.getModuleLogic("InvarianceExplorer")
        volume = slicer.util.getNode("InvarianceExplorerChestLD")
        nodes = logic.sampleInvariances(volume, "cnn10", (-78.75, -19.25, 0.0), count=16, seed=1)  # a nodule
        print(nodes["invariances"].GetNumberOfDataNodes(), nodes["table"].GetTable().GetNumberOfRows())
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return InvarianceExplorerParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------- dependencies

    def engineStatusText(self):
        """Return a one-line, user-facing description of the engine's state."""
        missing = self.missingDependencies()
        if missing:
            return _("Python packages to install on first use (you will be asked): ") + ", ".join(missing)
        return _("Engine and its Python packages found.")

    @staticmethod
    def missingDependencies():
        """pip requirements of the engine that Slicer's Python lacks (found without importing them)."""
        missing = [] if importlib.util.find_spec("torch") is not None else [TORCH_REQUIREMENT]
        return missing + [req for name, req in ENGINE_REQUIREMENTS.items() if importlib.util.find_spec(name) is None]

    def dependencyHint(self):
        """How to install the missing packages by hand (e.g. offline, from a local wheel folder)."""
        missing = self.missingDependencies()
        return _("install them in Slicer's Python console with slicer.util.pip_install('{packages}') or "
                 "from a terminal with PythonSlicer -m pip install {packages}").format(packages=" ".join(missing))

    @staticmethod
    def confirmInstall(missing):
        """Ask the user whether to download and install the ``missing`` requirements."""
        return slicer.util.confirmOkCancelDisplay(
            _("Invariance Explorer needs these Python packages, which will be downloaded and installed now "
              "(a few minutes, several hundred MB): ") + ", ".join(missing))

    def installDependencies(self, askUser=True, forceCPU=False):
        """Install what :meth:`missingDependencies` lists, after asking; return True when all are present.

        torch comes from the PyTorch extension (PyTorchUtils) when it is installed, else from
        pip; the rest from pip (``slicer.packaging.pip_ensure`` on Slicer 5.11+,
        ``slicer.util.pip_install`` before). Offline, the error names the exact packages.
        """
        missing = self.missingDependencies()
        if not missing:
            return True
        if askUser and not self.confirmInstall(missing):
            return False
        try:
            if TORCH_REQUIREMENT in missing:
                self._installTorch(forceCPU)
            rest = [req for req in missing if req != TORCH_REQUIREMENT]
            if rest:
                try:  # Slicer 5.11+; slicer/__init__ does not import it
                    import slicer.packaging as packaging
                except ImportError:
                    packaging = None
                if packaging is not None and hasattr(packaging, "pip_ensure"):
                    # already asked above; the self-test (testing mode) needs them installed too
                    packaging.pip_ensure(rest, prompt_install=False, skip_in_testing=False,
                                         requester="Invariance Explorer")
                else:
                    slicer.util.pip_install(" ".join(rest))
        except Exception as exc:
            raise RuntimeError(_("Installing {packages} failed ({error}). Without internet access, {hint}.").format(
                packages=", ".join(missing), error=exc, hint=self.dependencyHint())) from exc
        importlib.invalidate_caches()
        return not self.missingDependencies()

    @staticmethod
    def _installTorch(forceCPU):
        """torch is missing (:meth:`missingDependencies`): install it through the PyTorch
        extension when present (it picks the build for the GPU; its installer then imports
        torch into Slicer's process, the only time this module lets that happen), else pip."""
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.pip_install(TORCH_REQUIREMENT)
            return
        backend = "cpu" if forceCPU else None
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, forceComputationBackend=backend,
                torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):]) is None:  # raises on failure, too
            raise RuntimeError("the PyTorch extension could not install torch")

    # ---------------------------------------------------------------- inputs

    def pointRAS(self, point):
        """The RAS position of ``point``: a markups ROI (its centre), a markups point list (its
        first placed control point: not one still being placed, nor one whose position was
        unset) or 3 numbers."""
        if hasattr(point, "IsA") and point.IsA("vtkMRMLMarkupsROINode"):
            if point.GetNumberOfControlPoints() < 1:
                raise ValueError(_("The ROI {name} is not placed yet; place it.").format(name=point.GetName()))
            center = [0.0, 0.0, 0.0]
            point.GetCenterWorld(center)
            return tuple(center)
        if hasattr(point, "GetNumberOfControlPoints"):
            index = point.GetNthControlPointIndexByPositionStatus(0, point.PositionDefined)
            if index < 0:
                raise ValueError(_("The markups node {name} has no placed point; place one.").format(
                    name=point.GetName()))
            ras = [0.0, 0.0, 0.0]
            point.GetNthControlPointPositionWorld(index, ras)
            return tuple(ras)
        if point is None or len(point) != 3:
            raise ValueError(_("Give the point as a markups node or as three RAS coordinates (mm)."))
        return tuple(float(v) for v in point)

    def centerIJK(self, volumeNode, point):
        """The voxel (i, j, k) of ``volumeNode`` nearest to ``point`` (RAS), checked to lie inside."""
        resultFolder = _engineImport("result_folder")
        if volumeNode.GetParentTransformNode() is not None:
            raise ValueError(_("{name} is under a transform; harden the transform first (Data module).").format(
                name=volumeNode.GetName()))
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        center = resultFolder.ras_to_ijk_index(self.pointRAS(point), _numpyMatrix(ijkToRAS))
        resultFolder.check_center(center, slicer.util.arrayFromVolume(volumeNode).shape)
        return center

    @staticmethod
    def exportVolume(volumeNode, path):
        """Write ``volumeNode`` to the NRRD ``path`` without touching the scene (the node keeps its
        storage node and file name: a storage node outside the scene writes it, as Slicer's
        AI extensions do)."""
        storageNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storageNode.SetFileName(str(path))
            storageNode.UseCompressionOff()
            if not storageNode.WriteData(volumeNode):
                raise RuntimeError(f"could not write {volumeNode.GetName()} to {path}")
        finally:
            storageNode.UnRegister(None)
        return str(path)

    # ---------------------------------------------------------------- running

    def prepareSampling(self, volumeNode, denoiser, point, count=32, seed=0, device="auto", batchSize=None,
                        python=None, analyze=False, refine=True):
        """Export the input to a new temporary folder and return the engine job (not started).

        The job runs ``invariance-explorer sample`` into ``job.outDir`` inside its temporary
        folder; ``job.cancel()`` or ``job.cleanup()`` remove the folder.
        """
        process = _engineImport("ui.process")
        center = self.centerIJK(volumeNode, point)
        tempDir = tempfile.mkdtemp(prefix="InvarianceExplorer-")
        try:
            source = self.exportVolume(volumeNode, os.path.join(tempDir, "input.nrrd"))
            outDir = os.path.join(tempDir, "result")
            args = process.sample_args(model=denoiser, input_path=source, center_ijk=center, count=count, seed=seed,
                                       device=device, batch_size=batchSize, out_dir=outDir, analyze=analyze,
                                       refine=refine)
            job = process.EngineJob(args, python=python, temp_dir=tempDir)
        except Exception:
            import shutil

            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        job.outDir, job.centerIJK = outDir, center
        return job

    def sampleInvariances(self, volumeNode, denoiser, point, count=32, seed=0, device="auto", batchSize=None,
                          progressCallback=None, confirmReplace=None, python=None, analyze=False, refine=True):
        """Sample ``count`` invariances of ``denoiser`` around ``point`` and return the created nodes.

        Args:
            volumeNode: the low-dose CT (scalar volume, HU).
            denoiser: bundled name (cnn10, redcnn, wganvgg, dugan) or a model folder.
            point: markups point (first control point), markups ROI (its centre) or RAS
                coordinates in mm; the crop is the model's patch around it, in its slice.
            count, seed, device, batchSize: as the CLI's ``sample`` (batchSize None: the
                engine's default for the device).
            analyze: also run the analysis (``sample --analyze``): adds ``anatomy_changes``.
            refine: sample with the model folder's consistency refinement (the bundled
                models': ``Refinement(5, 1)``); False: ``--refine 0,0``, the samples as drawn.
            progressCallback: called with each progress event (dict) of the engine.
        Returns:
            dict role -> node (see :meth:`importResults`). Raises RuntimeError with the engine's
            message when it fails; the scene is then unchanged.

        Slicer stays responsive (events are processed while the engine process runs).
        """
        job = self.prepareSampling(volumeNode, denoiser, point, count, seed, device, batchSize, python, analyze,
                                   refine)
        try:
            job.start()
            final = None
            while final is None:
                for event in job.poll():
                    if event["event"] in ("done", "error", "cancelled"):
                        final = event
                    elif progressCallback is not None:
                        progressCallback(event)
                if final is None:
                    slicer.app.processEvents()
                    time.sleep(0.05)
            if final["event"] != "done":
                raise RuntimeError(final.get("message", "the engine failed"))
            return self.importResults(volumeNode, job.outDir, confirmReplace=confirmReplace)
        except BaseException:
            if job.running:
                job.cancel()
            raise
        finally:
            job.cleanup()

    # ---------------------------------------------------------------- results as nodes

    @staticmethod
    def _proxies(found):
        """role + "_proxy" -> the proxy volume of each result sequence in ``found`` (role ->
        node), from the result browser: Slicer's sequences logic replaces a proxy's attributes
        by those of the shown item whenever the browser changes, so a proxy cannot carry the
        result attributes itself."""
        browser = found.get("browser")
        if browser is None:
            return {}
        proxies = {}
        for role, node in found.items():
            if node.IsA("vtkMRMLSequenceNode"):
                proxy = browser.GetProxyNode(node)
                if proxy is not None:
                    proxies[role + "_proxy"] = proxy
        return proxies

    def _resultsByInput(self):
        """The result nodes in the scene: input volume ID -> (role -> node), the sequences'
        proxy volumes found through the result browser (:meth:`_proxies`)."""
        byInput = {}
        for node in slicer.util.getNodesByClass("vtkMRMLNode"):
            if node.GetAttribute(RESULT_INPUT_ATTRIBUTE):
                byInput.setdefault(node.GetAttribute(RESULT_INPUT_ATTRIBUTE), {})[
                    node.GetAttribute(RESULT_ROLE_ATTRIBUTE)] = node
        for found in byInput.values():
            found.update(self._proxies(found))
        return byInput

    def resultVolumeIDs(self):
        """IDs of the volumes that are results of this module (for any input)."""
        return [node.GetID() for found in self._resultsByInput().values() for node in found.values()
                if node.IsA("vtkMRMLScalarVolumeNode")]

    def resultNodes(self, volumeNode):
        """The result nodes of ``volumeNode`` in the scene: dict role -> node."""
        return self._resultsByInput().get(volumeNode.GetID(), {})

    def removeResults(self, volumeNode, confirmReplace=None):
        """Remove the previous results of ``volumeNode``. If the user renamed some of them,
        ``confirmReplace(names)`` (default: :meth:`askReplaceRenamed`, a dialog) is asked first;
        when it says no, they are kept as the user's own nodes (no longer results of this
        module) and nothing is removed. Pass ``lambda names: True`` to replace without asking."""
        names = resultNodeNames(volumeNode.GetName())
        previous = self.resultNodes(volumeNode)
        renamed = [node.GetName() for role, node in previous.items()
                   if node.GetName() != names.get(role[:-len("_proxy")] if role.endswith("_proxy") else role)]
        if renamed and not (confirmReplace or self.askReplaceRenamed)(renamed):
            for node in previous.values():
                node.RemoveAttribute(RESULT_INPUT_ATTRIBUTE)
                node.RemoveAttribute(RESULT_ROLE_ATTRIBUTE)
            return
        for node in previous.values():
            removeNode(node)

    @staticmethod
    def askReplaceRenamed(renamed):
        """Ask the user whether renamed results of an earlier run may be replaced."""
        return slicer.util.confirmYesNoDisplay(
            _("Replace the previous results of this input? You renamed: ") + ", ".join(renamed))

    def importResults(self, volumeNode, folder, confirmReplace=None):
        """Create the nodes of a ``sample`` results folder for ``volumeNode`` (see result_folder.py).

        Every volume gets the crop's geometry (IJK-to-RAS of the crop, from input.nrrd's LPS
        geometry). Creates: ``crop`` (x), ``denoised`` (f(x)), ``reconstruction``, ``std``
        (colour map), the sequences ``invariances`` (x~_k) and ``denoised_invariances``
        (f(x~_k)) in one browser (``browser``) with their proxy volumes, the per-sample
        ``table`` and a ``chart`` with its two ``series_*``; when the folder holds the analysis
        (``sample --analyze``: ``analysis/``), ``anatomy_changes``, a segmentation of its
        anatomy-change labelmaps (:data:`ANATOMY_SEGMENTS`), ``change_maps``, method A's z-score
        maps as a third sequence of the browser (sample k's map beside x~_k; diverging colours,
        symmetric window), and, when method B ran, ``significance``, its -log10 q map (a volume
        with a colour map). The previous results of the same
        input are replaced; on any failure the new nodes are removed again, so the scene is
        either updated whole or left as it was.
        """
        import numpy as np

        resultFolder = _engineImport("result_folder")
        result = resultFolder.load_result(folder)
        analysis = self._loadAnalysis(folder)
        names = resultNodeNames(volumeNode.GetName())
        ijkToRAS = _vtkMatrix(result.crop_ijk_to_ras())
        created = {}
        scene = slicer.mrmlScene

        def add(role, className):
            node = scene.AddNewNodeByClass(className, names[role])
            created[role] = node
            return node

        def lungWindow(node):
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            display.SetAutoWindowLevel(False)
            centre, width = _engineImport("figures").LUNG_WINDOW  # HU, as in the paper
            display.SetWindowLevel(width, centre)
            return display

        def volume(role, array):
            node = add(role, "vtkMRMLScalarVolumeNode")
            slicer.util.updateVolumeFromArray(node, array)
            node.SetIJKToRASMatrix(ijkToRAS)
            lungWindow(node)
            return node

        def colourMap(node, colourIDs, low, high):
            display = node.GetDisplayNode()
            colour = next((c for c in map(scene.GetNodeByID, colourIDs) if c is not None), None)
            if colour is not None:
                display.SetAndObserveColorNodeID(colour.GetID())
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(high - low, (high + low) / 2.0)

        def sequence(role, frames):
            node = add(role, "vtkMRMLSequenceNode")
            node.SetIndexName("sample")
            node.SetIndexUnit("")
            frame = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "frame")
            try:
                for k, array in enumerate(frames):
                    slicer.util.updateVolumeFromArray(frame, array)
                    frame.SetIJKToRASMatrix(ijkToRAS)
                    node.SetDataNodeAtValue(frame, str(k))
            finally:
                removeNode(frame)
            return node

        try:
            for role, name in (("crop", "input"), ("denoised", "denoised"), ("reconstruction", "reconstruction")):
                if name in result.volumes:
                    volume(role, result.volumes[name].array)
            if "std" in result.volumes:
                std = volume("std", result.volumes["std"].array)
                colourMap(std, HEAT_COLOURS, 0.0, _engineImport("figures").std_top(result.volumes["std"].array))
            invariances = sequence("invariances", result.frames("invariances"))
            browser = add("browser", "vtkMRMLSequenceBrowserNode")
            browser.SetAndObserveMasterSequenceNodeID(invariances.GetID())
            sequences = [invariances]
            if "denoised_invariances" in result.volumes:
                sequences.append(sequence("denoised_invariances", result.frames("denoised_invariances")))
            if analysis is not None and "change_maps" in analysis:
                sequences.append(sequence("change_maps", resultFolder.stack_frames(analysis["change_maps"])))
            for seq in sequences[1:]:
                browser.AddSynchronizedSequenceNodeID(seq.GetID())
            browser.SetSelectedItemNumber(0)
            slicer.modules.sequences.logic().UpdateProxyNodesFromSequences(browser)
            for seq in sequences:  # the volumes the slice views show, one sample at a time
                role = next(r for r, n in created.items() if n is seq)
                proxy = browser.GetProxyNode(seq)
                if proxy is not None:
                    proxy.SetName(names[role])
                    created[role + "_proxy"] = proxy
                    lungWindow(proxy)
                    if role == "change_maps":
                        top = max(float(np.abs(analysis["change_maps"].array).max()), 1.0)
                        colourMap(proxy, DIVERGING_COLOURS, -top, top)
            columns = result.table()
            table = add("table", "vtkMRMLTableNode")
            slicer.util.updateTableFromArray(table, list(columns.values()), list(columns.keys()))
            chart = add("chart", "vtkMRMLPlotChartNode")
            chart.SetTitle(names["chart"])
            chart.SetXAxisTitle("sample")
            chart.SetYAxisTitle("mean absolute difference (HU)")
            xName = resultFolder.TABLE_COLUMNS[0][0]
            for role, (column, _key) in zip(("series_change", "series_output_change"), resultFolder.TABLE_COLUMNS[1:]):
                series = add(role, "vtkMRMLPlotSeriesNode")
                series.SetAndObserveTableNodeID(table.GetID())
                series.SetXColumnName(xName)
                series.SetYColumnName(column)
                series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                series.SetUniqueColor()  # new series are all black
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
            if analysis is not None:
                segmentation = add("anatomy_changes", "vtkMRMLSegmentationNode")
                self._fillAnatomySegmentation(segmentation, analysis, ijkToRAS, created["crop"])
                if "significance" in analysis:
                    significance = volume("significance", analysis["significance"].array)
                    colourMap(significance, HEAT_COLOURS, 0.0, max(float(analysis["significance"].array.max()), 1.0))
        except Exception:  # remove what was made, including the proxies Slicer made for the browser
            for node in list(dict.fromkeys(list(created.values()) + list(self._proxies(created).values()))):
                removeNode(node)
            raise

        # all new nodes exist: now replace the previous results and file the new ones
        self.removeResults(volumeNode, confirmReplace)
        for role, node in created.items():
            node.SetAttribute(RESULT_INPUT_ATTRIBUTE, volumeNode.GetID())
            node.SetAttribute(RESULT_ROLE_ATTRIBUTE, role)
        created["table"].SetAttribute("InvarianceExplorer.Consistency", str(result.numbers.get("consistency", "")))
        self._placeInStudy(volumeNode, created.values())
        return created

    @staticmethod
    def _loadAnalysis(folder):
        """The analysis in a sample folder (analysis_folder.load_analysis), or None without one."""
        analysisFolder = _engineImport("analysis_folder")
        if not os.path.isdir(os.path.join(str(folder), analysisFolder.ANALYSIS_DIR)):
            return None
        return analysisFolder.load_analysis(folder)

    @staticmethod
    def _fillAnatomySegmentation(segmentation, analysis, ijkToRAS, referenceVolume):
        """One segment per entry of ANATOMY_SEGMENTS whose labelmap the analysis holds, imported
        through a temporary labelmap volume with the crop's geometry (Segmentations logic); an
        empty region gives an empty segment, so that "nothing found" shows as such."""
        import numpy as np

        scene = slicer.mrmlScene
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        segments = segmentation.GetSegmentation()
        for output, value, name, colour in ANATOMY_SEGMENTS:
            if output not in analysis:
                continue
            mask = (np.asarray(analysis[output].array) == value).any(axis=0)[None].astype(np.uint8)
            if not mask.any():
                segments.AddEmptySegment("", name, colour)
                continue
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
            try:
                slicer.util.updateVolumeFromArray(labelmap, mask)
                labelmap.SetIJKToRASMatrix(ijkToRAS)
                before = segments.GetNumberOfSegments()
                if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation):
                    raise RuntimeError(f"could not import {name} into a segmentation")
            finally:
                removeNode(labelmap)
            segment = segments.GetNthSegment(before)
            segment.SetName(name)
            segment.SetColor(*colour)

    @staticmethod
    def _placeInStudy(volumeNode, nodes):
        """Put ``nodes`` next to the input in the subject hierarchy (its study, if any)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode))
        for node in nodes:
            item = shNode.GetItemByDataNode(node)
            if item:
                shNode.SetItemParent(item, parent)

    def showResults(self, nodes):
        """Show a run's results (GUI only): the current sample (the invariances' proxy volume)
        with the std map as a coloured overlay, the sequence browser in the toolbar, the chart in
        the plot view, and the anatomy changes when there are any."""
        for role in ("invariances", "std", "chart", "anatomy_changes"):
            if role in nodes:
                self.showResult(nodes, role)

    def showResult(self, nodes, role):
        """Bring the result ``nodes[role]`` into the views (what its Show button does): the
        maps as coloured overlays (:data:`OVERLAYS`), other sequences through their proxy
        volume, other volumes as the background, sequences' browser in the toolbar, the table
        in a table view, the chart in the plot view, the segmentation made visible."""
        node = nodes[role]
        shown = nodes.get(role + "_proxy", node)
        if role in OVERLAYS:
            under, opacity = OVERLAYS[role]
            layers = dict(foreground=shown, foregroundOpacity=opacity)
            if under is not None:
                layers.update(background=nodes.get(under), fit=True)
            slicer.util.setSliceViewerLayers(**layers)
        elif node.IsA("vtkMRMLScalarVolumeNode") or role + "_proxy" in nodes:
            slicer.util.setSliceViewerLayers(background=shown, fit=True)
        elif node.IsA("vtkMRMLPlotChartNode"):
            slicer.modules.plots.logic().ShowChartInLayout(node)
        elif node.IsA("vtkMRMLTableNode"):
            layoutManager = slicer.app.layoutManager()
            layoutManager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layoutManager.layout))
            applicationLogic = slicer.app.applicationLogic()
            applicationLogic.GetSelectionNode().SetActiveTableID(node.GetID())
            applicationLogic.PropagateTableSelection()
        elif node.IsA("vtkMRMLSegmentationNode"):
            if "invariances_proxy" in nodes or "crop" in nodes:
                slicer.util.setSliceViewerLayers(background=nodes.get("invariances_proxy") or nodes["crop"], fit=True)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetVisibility(True)
        if node.IsA("vtkMRMLSequenceNode") and nodes.get("browser") is not None:
            toolbar = slicer.modules.sequences.toolBar()
            toolbar.setActiveBrowserNode(nodes["browser"])
            toolbar.setVisible(True)


#
# InvarianceExplorerTest
#


class InvarianceExplorerTest(ScriptedLoadableModuleTest):
    """Self-test, run in Slicer (Developer mode: Reload and Test; or
    ``Slicer --python-code "slicer.selfTests['InvarianceExplorer']()"``).

    The sampling checks run the first bundled denoiser that has invariance models (cVAE + cINN)
    on the sample CT, with a few samples each (seconds on a CPU): at a markups point (and again
    at its RAS coordinates, to check replace-not-duplicate), at the centre of a markups ROI, and
    with the analysis, whose anatomy changes become a segmentation on the crop's grid.
    """

    #: Voxel (i, j, k) of the sample CT to sample around: a lung nodule (as ``make demo``).
    CENTER_IJK = (368, 283, 1)

    def setUp(self):
        """Reset the scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run all tests. Reload and Test and ``slicer.selfTests`` call this directly, without a
        unittest runner, so a skipped check is reported here instead of failing the run."""
        for test in (self.test_Resources, self.test_EngineImportIsLight, self.test_SampleInvariances,
                     self.test_SampleInvariancesAtROICentre, self.test_AnatomyChangesSegmentation):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as exc:
                self.delayDisplay(f"{test.__name__} skipped: {exc}")

    def test_Resources(self):
        """The Resources directory is found, the module icon loads, the sample CT matches its SHA-256."""
        iconPath = os.path.join(resourcesDir(), "Icons", "InvarianceExplorer.png")
        self.assertTrue(os.path.isfile(iconPath), iconPath)
        self.assertFalse(qt.QIcon(iconPath).isNull())
        self.assertFalse(slicer.modules.invarianceexplorer.icon.isNull())
        import hashlib

        sample = _engineImport("sample_data").SAMPLE_CT
        with open(os.path.join(resourcesDir(), sample["file"]), "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), sample["sha256"])
        self.delayDisplay("Resources found")

    def test_EngineImportIsLight(self):
        """Importing this module and the engine package does not import torch."""
        if "torch" in sys.modules:
            logging.warning("torch was imported before this test (by another module): import check skipped")
            return
        engine = importlib.import_module("InvarianceExplorerLib")
        self.assertNotIn("torch", sys.modules, "importing InvarianceExplorerLib imported torch")
        self.delayDisplay(f"InvarianceExplorerLib {engine.__version__} imports without torch")

    # ---------------------------------------------------------------- helpers of the sampling checks

    @staticmethod
    def _modelMetadata(denoiser):
        import json

        with open(os.path.join(resourcesDir(), "Models", denoiser, "metadata.json")) as f:
            return json.load(f)

    def _bundledDenoiserWithInvarianceModels(self):
        """The first bundled denoiser whose folder holds a cVAE and a cINN (read from its
        metadata.json: the engine's own check would import torch into Slicer), or None."""
        panel = _engineImport("ui.panel")
        modelsDir = os.path.join(resourcesDir(), "Models")
        for name, _label in panel.DENOISERS:
            if panel.bundled_denoiser_available(name, modelsDir):
                metadata = self._modelMetadata(name)
                if "invariance" in metadata and {"cvae", "cinn"} <= set(metadata.get("weights", {})):
                    return name
        return None

    #: Set to 1 to let the self-test install the engine's packages under ctest (testing mode).
    INSTALL_VARIABLE = "INVARIANCE_EXPLORER_TEST_INSTALL"

    def _sampleCTAndDenoiser(self):
        """Load the sample CT (SampleData, no network) and make sure the engine's packages are
        there; return (volume, denoiser, logic), or None when no bundled denoiser has invariance
        models yet (the sampling checks are then skipped).

        Missing packages are installed after asking (Reload and Test); under ctest (testing
        mode) only when :data:`INSTALL_VARIABLE` is 1, as ``slicer.packaging`` skips installs
        in testing (torch is several GB). Otherwise, and offline, the sampling checks are
        skipped with the packages to install."""
        import SampleData

        registerSampleData()
        sample = _engineImport("sample_data").SAMPLE_CT
        volume = SampleData.downloadSample(sample["name"])
        self.assertIsNotNone(volume)
        denoiser = self._bundledDenoiserWithInvarianceModels()
        if denoiser is None:
            self.delayDisplay("No bundled denoiser with invariance models (cVAE + cINN) yet: sampling check skipped")
            return None
        logic = InvarianceExplorerLogic()
        missing = logic.missingDependencies()
        if missing:
            if slicer.app.testingEnabled():
                if os.environ.get(self.INSTALL_VARIABLE) != "1":
                    self._skipSampling(f"the engine's packages are missing and are not installed in testing mode "
                                       f"(set {self.INSTALL_VARIABLE}=1 to install them); {logic.dependencyHint()}")
            elif not logic.confirmInstall(missing):
                self._skipSampling("the engine's packages were not installed; " + logic.dependencyHint())
            try:
                logic.installDependencies(askUser=False)
            except RuntimeError as exc:  # no package index (offline): cannot check, say so
                self._skipSampling(f"engine packages could not be installed: {exc}")
        if logic.missingDependencies():
            self.fail("engine dependencies missing after installing them: " + logic.dependencyHint())
        return volume, denoiser, logic

    def _skipSampling(self, reason):
        self.delayDisplay(f"Sampling checks skipped: {reason}")
        self.skipTest(reason)

    @staticmethod
    def _voxelRAS(volume, ijk):
        """The RAS position (mm) of voxel ``ijk`` of ``volume``."""
        import numpy as np

        ijkToRAS = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRAS)
        return tuple(float(v) for v in (_numpyMatrix(ijkToRAS) @ np.array([*ijk, 1.0]))[:3])

    def _checkCrop(self, nodes, volume, ras):
        """The crop is one slice of the input, cut out around the voxel at ``ras``: its centre
        voxel lies there, its voxels are the input's, and the invariances' frames share its
        grid. Return the crop's first voxel (i, j, k) in the input and its side (pixels)."""
        import numpy as np

        crop = slicer.util.arrayFromVolume(nodes["crop"])
        self.assertEqual(crop.shape[0], 1)
        self.assertEqual(crop.shape[1], crop.shape[2])
        cropMatrix = vtk.vtkMatrix4x4()
        nodes["crop"].GetIJKToRASMatrix(cropMatrix)
        cropIJKToRAS = _numpyMatrix(cropMatrix)
        half = np.array([crop.shape[2] // 2, crop.shape[1] // 2, 0, 1.0])
        np.testing.assert_allclose((cropIJKToRAS @ half)[:3], ras, atol=1e-3)
        rasToIJK = vtk.vtkMatrix4x4()
        volume.GetRASToIJKMatrix(rasToIJK)
        i0, j0, k0 = (int(round(v)) for v in (_numpyMatrix(rasToIJK) @ cropIJKToRAS[:, 3])[:3])
        side = crop.shape[1]
        np.testing.assert_allclose(crop[0], slicer.util.arrayFromVolume(volume)[k0, j0:j0 + side, i0:i0 + side])
        frame = nodes["invariances"].GetNthDataNode(0)
        frameMatrix = vtk.vtkMatrix4x4()
        frame.GetIJKToRASMatrix(frameMatrix)
        np.testing.assert_allclose(_numpyMatrix(frameMatrix), cropIJKToRAS, atol=1e-6)
        self.assertEqual(slicer.util.arrayFromVolume(frame).shape, crop.shape)
        return (i0, j0, k0), side

    def _checkConsistency(self, nodes, denoiser):
        """The run's consistency figure (mean |f(x~) - f(x)| / mean |x~ - x|) lies below the
        bar of the model's metadata when the model met that bar on held-out data; a model that
        missed it (its model card says so) must at least change its output less than its input."""
        consistency = nodes["table"].GetAttribute("InvarianceExplorer.Consistency")
        self.assertTrue(consistency)
        consistency = float(consistency)
        invariance = self._modelMetadata(denoiser).get("invariance", {})
        bar = invariance.get("fidelity", {}).get("bars", {}).get("consistency", {})
        if bar.get("met") and bar.get("max") is not None:
            self.assertLess(consistency, float(bar["max"]))
        else:
            logging.warning(f"{denoiser}'s invariance models miss their consistency bar on held-out data "
                            f"({bar.get('value')} vs {bar.get('max')}); checked only that it is below 1")
            self.assertLess(consistency, 1.0)
        return consistency

    # ---------------------------------------------------------------- sampling checks

    def test_SampleInvariances(self):
        """Load the sample CT, sample 4 invariances at a lung nodule (a markups point) with the first
        bundled denoiser, and check the nodes: count, crop shape and geometry, consistency, and
        replace-not-duplicate on a re-run (the point given as RAS coordinates)."""
        setup = self._sampleCTAndDenoiser()
        if setup is None:
            return
        volume, denoiser, logic = setup
        ras = self._voxelRAS(volume, self.CENTER_IJK)
        point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "InvarianceExplorerTestPoint")
        point.AddControlPoint(*ras)
        nodes = logic.sampleInvariances(volume, denoiser, point, count=4, seed=0, device="cpu")
        self.assertEqual(nodes["invariances"].GetNumberOfDataNodes(), 4)
        self.assertEqual(nodes["denoised_invariances"].GetNumberOfDataNodes(), 4)
        self.assertEqual(nodes["table"].GetTable().GetNumberOfRows(), 4)
        self.assertNotIn("anatomy_changes", nodes)
        self._checkCrop(nodes, volume, ras)
        self._checkConsistency(nodes, denoiser)
        # re-running replaces, not duplicates
        again = logic.sampleInvariances(volume, denoiser, ras, count=4, seed=1, device="cpu")
        self.assertEqual(set(again), set(nodes))
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSequenceBrowserNode")), 1)
        self.assertIsNone(nodes["invariances"].GetScene())
        self.delayDisplay("Invariances sampled and checked")

    def test_SampleInvariancesAtROICentre(self):
        """A markups ROI gives the centre: not placed yet, it is refused and the scene keeps no
        results; placed (its centre inside the nodule's voxel, any size), the crop is centred on
        that voxel; the ROI stays the user's."""
        setup = self._sampleCTAndDenoiser()
        if setup is None:
            return
        volume, denoiser, logic = setup
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "InvarianceExplorerTestROI")
        with self.assertRaises(ValueError):  # no control point yet: an ROI is placed once it has a size
            logic.sampleInvariances(volume, denoiser, roi, count=2, seed=0, device="cpu")
        self.assertEqual(logic.resultNodes(volume), {})
        ras = self._voxelRAS(volume, self.CENTER_IJK)
        roi.SetCenter([ras[0] + 0.2, ras[1] - 0.2, ras[2] + 0.2])  # inside the voxel (0.7 x 0.7 x 2 mm)
        roi.SetSize([30.0, 20.0, 6.0])  # the size is not used: the crop is the denoiser's patch
        self.assertEqual(logic.centerIJK(volume, roi), self.CENTER_IJK)
        nodes = logic.sampleInvariances(volume, denoiser, roi, count=2, seed=0, device="cpu")
        self.assertEqual(nodes["invariances"].GetNumberOfDataNodes(), 2)
        self.assertEqual(nodes["table"].GetTable().GetNumberOfRows(), 2)
        self._checkCrop(nodes, volume, ras)
        self.assertIsNotNone(roi.GetScene())
        self.assertNotIn(roi, nodes.values())
        self.delayDisplay("Invariances sampled at the ROI's centre and checked")

    def test_AnatomyChangesSegmentation(self):
        """With the analysis (``analyze=True``), the anatomy changes are a segmentation: method
        A's two segments (structure added / removed, over all invariances), no method B without
        a noise-only ensemble; every segment lies on the crop's grid, in the crop's voxels of
        the input (exported onto the crop and onto the whole input); method A's change maps
        are a sequence in the invariances' browser."""
        import numpy as np

        setup = self._sampleCTAndDenoiser()
        if setup is None:
            return
        volume, denoiser, logic = setup
        ras = self._voxelRAS(volume, self.CENTER_IJK)
        stages = []
        nodes = logic.sampleInvariances(volume, denoiser, ras, count=8, seed=0, device="cpu", analyze=True,
                                        progressCallback=lambda event: stages.append(event.get("stage")))
        self.assertIn("method A", stages)
        segmentationNode = nodes["anatomy_changes"]
        self.assertTrue(segmentationNode.IsA("vtkMRMLSegmentationNode"))
        self.assertEqual(segmentationNode.GetName(), resultNodeNames(volume.GetName())["anatomy_changes"])
        self.assertEqual(segmentationNode.GetAttribute(RESULT_ROLE_ATTRIBUTE), "anatomy_changes")
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
        methodA = [name for output, _value, name, _colour in ANATOMY_SEGMENTS if output == "altered_regions"]
        self.assertEqual(names, methodA)
        (i0, j0, k0), side = self._checkCrop(nodes, volume, ras)
        crop = slicer.util.arrayFromVolume(nodes["crop"])
        found = 0
        for n, name in enumerate(names):
            segmentId = segmentation.GetNthSegmentID(n)
            onCrop = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, nodes["crop"])
            self.assertEqual(onCrop.shape, crop.shape)
            onInput = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume)
            inside = onInput[k0, j0:j0 + side, i0:i0 + side]
            self.assertEqual(int(np.count_nonzero(onInput)), int(np.count_nonzero(inside)),
                             f"{name} reaches outside the crop")
            np.testing.assert_array_equal(inside != 0, onCrop[0] != 0, err_msg=name)
            found += int(np.count_nonzero(onCrop))
        # method A's change maps: one per invariance, in the browser, on the crop's grid; no method B map
        changes = nodes["change_maps"]
        self.assertEqual(changes.GetNumberOfDataNodes(), 8)
        self.assertTrue(nodes["browser"].IsSynchronizedSequenceNodeID(changes.GetID()))
        self.assertEqual(slicer.util.arrayFromVolume(nodes["change_maps_proxy"]).shape, crop.shape)
        self.assertNotIn("significance", nodes)
        self.delayDisplay(f"Anatomy changes: {len(names)} segments on the crop's grid, {found} voxels flagged; "
                          "8 change maps")
