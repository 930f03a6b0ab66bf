"""SLICER STAND-IN (not 3D Slicer): just enough of ``slicer``, ``slicer.util``, MRML, ``qt`` and
``ctk`` (and of the SampleData module) to import InvarianceExplorer.py and run its Logic and
self-test in pytest.

3D Slicer cannot be installed on the project's machines, so the Slicer layer is tested
against this small stand-in, built on the real vtk wheel (image data, matrices, tables) and
the real Qt (``qt`` is the panel's own shim over PySide6; widgets.py has the MRML widgets). Each function copies the
behaviour of the Slicer call it stands for (see mrml.py); nothing here is used outside the
tests, and the module's self-test (InvarianceExplorerTest) is the check in real Slicer.

Use::

    import slicer_standin
    slicer = slicer_standin.install()     # registers the modules in sys.modules
    import InvarianceExplorer              # the real module file
"""

from __future__ import annotations

import sys
import types
import unittest
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import numpy as np

from . import mrml, widgets

MODULE_DIR = Path(__file__).resolve().parents[2] / "InvarianceExplorer"


# ----------------------------------------------------------------------------- slicer.util

def arrayFromVolume(volumeNode):
    """A numpy view (k, j, i) of the volume's voxels, as slicer.util.arrayFromVolume."""
    from vtk.util import numpy_support

    image = volumeNode.GetImageData()
    nx, ny, nz = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx)


def updateVolumeFromArray(volumeNode, narray):
    """Copy a (k, j, i) array into the volume's image data, as slicer.util.updateVolumeFromArray."""
    import vtk
    from vtk.util import numpy_support

    narray = np.asarray(narray)
    if narray.ndim != 3:
        raise RuntimeError("Unsupported numpy array shape: " + str(narray.shape))
    image = volumeNode.GetImageData()
    if not image:
        image = vtk.vtkImageData()
        volumeNode.SetAndObserveImageData(image)
    vtype = numpy_support.get_vtk_array_type(narray.dtype)
    if vtype == vtk.VTK_LONG_LONG:  # as Slicer: such volumes do not render
        raise RuntimeError("Unsupported numpy array type: long long")
    image.SetDimensions(tuple(reversed(narray.shape)))
    image.AllocateScalars(vtype, 1)
    arrayFromVolume(volumeNode)[:] = narray


def updateTableFromArray(tableNode, narrays, columnNames=None):
    """Replace the table's columns by the given arrays, as slicer.util.updateTableFromArray: a 1D
    array, the columns of a 2D array, or a tuple or list of numpy arrays (each raveled), stored
    as float (VTK_FLOAT) whatever their type."""
    import vtk
    from vtk.util import numpy_support

    if isinstance(narrays, np.ndarray) and narrays.ndim in (1, 2):
        columns = [narrays] if narrays.ndim == 1 else narrays.T
    elif isinstance(narrays, (tuple, list)):
        columns = narrays
    else:
        raise ValueError(f"Expected narrays is a numpy ndarray, or tuple or list of numpy ndarrays, got "
                         f"{type(narrays)} instead.")
    table = tableNode.GetTable()
    table.Initialize()
    names = [columnNames] if isinstance(columnNames, str) else list(columnNames or [])
    for index, column in enumerate(columns):
        array = numpy_support.numpy_to_vtk(np.ascontiguousarray(column.ravel()), deep=True, array_type=vtk.VTK_FLOAT)
        array.SetName(names[index] if index < len(names) else f"Column {index + 1}")
        table.AddColumn(array)
    return tableNode


def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None):
    """The segment's voxels (1 inside, 0 outside) on the reference volume's grid (default: the
    segmentation's reference geometry volume), as slicer.util.arrayFromSegmentBinaryLabelmap
    (which exports the segment resampled to that grid). The stand-in resamples only between
    aligned grids: the reference's axes and spacing equal the segment's and its voxels are the
    segment's shifted by whole voxels (e.g. a crop and the volume it was cut from), which is
    exact; any other geometry raises NotImplementedError."""
    if not referenceVolumeNode:
        referenceVolumeNode = segmentationNode.GetNodeReference(
            mrml.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        if not referenceVolumeNode:
            raise RuntimeError("No reference volume is found in the input segmentationNode, therefore a valid "
                               "referenceVolumeNode input is required.")
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise RuntimeError("Export of segment failed.")
    shape = arrayFromVolume(referenceVolumeNode).shape
    out = np.zeros(shape, np.uint8)
    if segment._labelmap is None:
        return out
    offset = _voxelOffset(segment._ijkToRAS, referenceVolumeNode)
    if offset is None:
        raise NotImplementedError("the Slicer stand-in resamples segments only onto an aligned grid "
                                  "(same axes and spacing, shifted by whole voxels)")
    mask = (segment._labelmap == segment.GetLabelValue()).astype(np.uint8)
    # segment voxel (k, j, i) lies at reference voxel (k, j, i) + offset; copy the overlap
    source, target = [], []
    for size, reference, shift in zip(mask.shape, shape, offset):
        first, last = max(0, -shift), min(size, reference - shift)
        if last <= first:
            return out
        source.append(slice(first, last))
        target.append(slice(first + shift, last + shift))
    out[tuple(target)] = mask[tuple(source)]
    return out


def _voxelOffset(ijkToRAS, referenceVolumeNode):
    """The whole-voxel shift (dk, dj, di) from a grid (its IJK-to-RAS ``vtkMatrix4x4``) to the
    reference volume's grid, or None when the two are not aligned."""
    import vtk

    rasToIJK = vtk.vtkMatrix4x4()
    referenceVolumeNode.GetRASToIJKMatrix(rasToIJK)
    product = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(rasToIJK, ijkToRAS, product)
    m = np.array([[product.GetElement(r, c) for c in range(4)] for r in range(4)])
    shift = np.round(m[:3, 3])
    if not (np.allclose(m[:3, :3], np.eye(3), atol=1e-6) and np.allclose(m[:3, 3], shift, atol=1e-4)):
        return None
    return tuple(int(v) for v in shift[::-1])


def getNodesByClass(className, scene=None):
    return [n for n in (scene or _state.scene).GetNodes() if n.IsA(className)]


def getNode(pattern):
    for node in _state.scene.GetNodes():
        if pattern in (node.GetID(), node.GetName()):
            return node
    raise KeyError(pattern)


class _Answers:
    """Replies of the stand-in's dialogs (tests set them); every question is recorded."""

    def __init__(self):
        self.reply, self.asked = True, []


def _confirm(message, *args, **kwargs):
    _state.answers.asked.append(message)
    return _state.answers.reply


class _Views:
    """What the module asked the views to show (slice layers, active browser, chart, table, layout)."""

    def __init__(self):
        self.layers, self.browser, self.toolbarVisible, self.chart = {}, None, False, None
        self.table, self.layout, self._activeTableID = None, 3, None  # 3: SlicerLayoutOneUpRedSliceView

    # qSlicerLayoutManager (slicer.app.layoutManager())
    def setLayout(self, layout):
        self.layout = layout

    # vtkSlicerTablesLogic (slicer.modules.tables.logic())
    @staticmethod
    def GetLayoutWithTable(currentLayout):
        """The stand-in's layouts hold no table view: always the four-up table layout, as Slicer
        returns for a layout without one."""
        return TABLE_LAYOUT

    # vtkMRMLSelectionNode and vtkSlicerApplicationLogic (slicer.app.applicationLogic())
    def GetSelectionNode(self):
        return self

    def SetActiveTableID(self, tableID):
        self._activeTableID = tableID

    def GetActiveTableID(self):
        return self._activeTableID

    def PropagateTableSelection(self):
        self.table = _state.scene.GetNodeByID(self._activeTableID) if self._activeTableID else None

    def setActiveBrowserNode(self, node):
        self.browser = node

    def setVisible(self, visible):
        self.toolbarVisible = bool(visible)

    def ShowChartInLayout(self, node):
        self.chart = node


#: vtkMRMLLayoutNode::SlicerLayoutFourUpTableView
TABLE_LAYOUT = 27


def setSliceViewerLayers(background="keep-current", foreground="keep-current", label="keep-current",
                         foregroundOpacity=None, labelOpacity=None, fit=False, rotateToVolumePlane=False):
    """Record the layers, as slicer.util.setSliceViewerLayers sets them in every slice view."""
    for name, value in (("background", background), ("foreground", foreground), ("label", label)):
        if value != "keep-current":
            _state.views.layers[name] = value
    if foregroundOpacity is not None:
        _state.views.layers["foregroundOpacity"] = foregroundOpacity


def pip_install(requirements):
    raise RuntimeError("the Slicer stand-in installs nothing")


# ----------------------------------------------------------------------------- parameter node wrapper

class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def check(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value} is not within [{self.minimum}, {self.maximum}]")


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)

    def check(self, value):
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {self.choices}")


def parameterNodeWrapper(cls):
    """Typed, defaulted attributes stored on the parameter node (values kept as Python objects here;
    real Slicer serialises them into the node), type-checked as Slicer's serializers do."""
    hints = get_type_hints(cls, include_extras=True)

    def make_property(name, hint):
        annotated = get_origin(hint) is not None
        base = get_args(hint)[0] if annotated else hint
        validators = [a for a in get_args(hint)[1:] if hasattr(a, "check")] if annotated else []
        default = getattr(cls, name, None)

        def type_check(value):  # Slicer's serializers: NotNone + IsInstance for int/float/str/bool, IsInstance for nodes
            if base in (int, float, str, bool):
                if value is None:
                    raise ValueError("Value must not be None")
                if not isinstance(value, (int, float) if base is float else base):
                    raise TypeError(f"Value must be of type '{base}', is type '{type(value)}' value '{value}'")
            elif isinstance(base, type) and value is not None and not isinstance(value, base):
                raise TypeError(f"Value must be of type '{base}', is type '{type(value)}' value '{value}'")

        def getter(self):  # a node reference to a node no longer in the scene reads as None, as in Slicer
            value = self.parameterNode._values.get(name, default)
            if isinstance(value, mrml.vtkMRMLNode) and value.GetScene() is not self.parameterNode.GetScene():
                return None
            return value

        def setter(self, value):
            type_check(value)
            for validator in validators:
                validator.check(value)
            self.parameterNode._values[name] = value

        return property(getter, setter)

    namespace = {"__init__": lambda self, parameterNode: setattr(self, "parameterNode", parameterNode),
                 "__doc__": cls.__doc__}
    for name, hint in hints.items():
        namespace[name] = make_property(name, hint)
    return type(cls.__name__, (), namespace)


# ----------------------------------------------------------------------------- ScriptedLoadableModule

class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


ScriptedLoadableModuleWidget = widgets.ScriptedLoadableModuleWidget


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__.replace("Logic", "")

    def getParameterNode(self):
        for node in getNodesByClass("vtkMRMLScriptedModuleNode"):
            if node.GetAttribute("ModuleName") == self.moduleName:
                return node
        node = mrml.vtkMRMLScriptedModuleNode()
        node._values = {}
        node.SetName(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        return _state.scene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=0):
        print(message)


# ----------------------------------------------------------------------------- SampleData

class SampleDataLogic:
    """The SampleData module's registry of custom sources (``SampleData.SampleDataLogic``)."""

    sources = {}

    @staticmethod
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                       nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                       loadFileTypes=None, loadFiles=None, loadFileProperties=None,
                                       checksums=None, loadFileType=None):
        SampleDataLogic.sources[sampleName] = {"category": category, "uris": uris, "fileNames": fileNames,
                                               "nodeNames": nodeNames, "checksums": checksums}


def downloadSample(sampleName):
    """Load a registered sample as SampleData.downloadSample does for a volume: the file (here a
    ``file://`` URI; no network) checked against its ``SHA256:`` checksum, as a scalar volume
    named after ``nodeNames``; returns the node."""
    import hashlib
    from urllib.parse import unquote, urlparse

    source = SampleDataLogic.sources[sampleName]
    uri = urlparse(source["uris"])
    if uri.scheme != "file":
        raise RuntimeError("the Slicer stand-in loads file:// samples only")
    path = unquote(uri.path)
    algorithm, _, digest = (source["checksums"] or "").partition(":")
    if digest:
        with open(path, "rb") as f:
            if hashlib.new(algorithm.lower(), f.read()).hexdigest() != digest.lower():
                raise RuntimeError(f"checksum mismatch for {path}")
    node = _state.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", source["nodeNames"])
    node.AddDefaultStorageNode()
    storage = node.GetStorageNode()
    storage.SetFileName(path)
    storage.ReadData(node)
    node.CreateDefaultDisplayNodes()
    return node


# ----------------------------------------------------------------------------- install

class _State:
    scene = None
    answers = None
    views = None


_state = _State()


class _App:
    #: slicer.app.testingEnabled(): Slicer was started with --testing (as under ctest)
    testing = False

    def testingEnabled(self):
        return self.testing

    def processEvents(self):
        from InvarianceExplorerLib.ui.qtshim import qt

        if qt.QApplication.instance() is not None:
            qt.QApplication.processEvents()

    def connect(self, signal, slot):
        pass

    def layoutManager(self):
        return _state.views

    def applicationLogic(self):
        return _state.views


def install():
    """Register the stand-in as ``slicer`` (and ``qt``, ``ctk``) in sys.modules; return ``slicer``.
    Each call starts a fresh scene."""
    from InvarianceExplorerLib.ui.qtshim import qt

    _state.scene = mrml.vtkMRMLScene()
    _state.answers = _Answers()
    _state.views = _Views()
    slicer = sys.modules.get("slicer")
    if slicer is None or not getattr(slicer, "IS_STANDIN", False):
        slicer = types.ModuleType("slicer", __doc__)
        slicer.IS_STANDIN = True
        util = types.ModuleType("slicer.util")
        for fn in (arrayFromVolume, updateVolumeFromArray, updateTableFromArray, getNodesByClass, getNode, pip_install,
                   setSliceViewerLayers, arrayFromSegmentBinaryLabelmap):
            setattr(util, fn.__name__, fn)
        util.confirmOkCancelDisplay = util.confirmYesNoDisplay = _confirm
        util.VTKObservationMixin = widgets.VTKObservationMixin
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        pnw = types.ModuleType("slicer.parameterNodeWrapper")
        pnw.parameterNodeWrapper, pnw.WithinRange, pnw.Choice = parameterNodeWrapper, WithinRange, Choice
        slm = types.ModuleType("slicer.ScriptedLoadableModule")
        for c in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                  ScriptedLoadableModuleTest):
            setattr(slm, c.__name__, c)
        slicer.util, slicer.i18n, slicer.parameterNodeWrapper, slicer.ScriptedLoadableModule = util, i18n, pnw, slm
        for name, cls in mrml.NODE_CLASSES.items():
            setattr(slicer, name, cls)
        slicer.vtkMRMLSubjectHierarchyNode = mrml.vtkMRMLSubjectHierarchyNode
        slicer.vtkSlicerSegmentationsModuleLogic = mrml.vtkSlicerSegmentationsModuleLogic
        for cls in (widgets.qMRMLNodeComboBox, widgets.qSlicerSimpleMarkupsWidget, widgets.qSlicerMarkupsPlaceWidget):
            setattr(slicer, cls.__name__, cls)
        slicer.app = _App()
        ctk = types.ModuleType("ctk")
        ctk.ctkCollapsibleButton = qt.QGroupBox
        sampleData = types.ModuleType("SampleData", "SLICER STAND-IN of the SampleData module (file:// sources)")
        sampleData.SampleDataLogic, sampleData.downloadSample = SampleDataLogic, downloadSample
        sys.modules.update({"slicer": slicer, "slicer.util": util, "slicer.i18n": i18n,
                            "slicer.parameterNodeWrapper": pnw, "slicer.ScriptedLoadableModule": slm,
                            "qt": qt, "ctk": ctk, "SampleData": sampleData})
    SampleDataLogic.sources = {}
    slicer.mrmlScene = _state.scene
    slicer.modules = types.SimpleNamespace(
        sequences=types.SimpleNamespace(logic=lambda: mrml.vtkMRMLSequencesLogic(_state.scene),
                                        toolBar=lambda: _state.views),
        plots=types.SimpleNamespace(logic=lambda: _state.views),
        tables=types.SimpleNamespace(logic=lambda: _state.views),
        segmentations=types.SimpleNamespace(logic=lambda: mrml.vtkSlicerSegmentationsModuleLogic()))
    slicer.answers, slicer.views = _state.answers, _state.views
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    return slicer


def uninstall():
    """Remove the stand-in from sys.modules (so that later tests see no ``slicer``)."""
    for name in ("slicer", "slicer.util", "slicer.i18n", "slicer.parameterNodeWrapper",
                 "slicer.ScriptedLoadableModule", "qt", "ctk", "SampleData", "InvarianceExplorer"):
        sys.modules.pop(name, None)
