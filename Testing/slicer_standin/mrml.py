"""MRML STAND-IN (not 3D Slicer): the few MRML node classes and scene calls that
InvarianceExplorer.py uses, with Slicer's semantics, built on the real vtk wheel.

Only what the module calls is here, each with the behaviour Slicer documents:
node IDs ``<class><n>``, attributes, a scene that adds, finds and removes nodes, scalar
volumes holding a real ``vtkImageData`` and an IJK-to-RAS ``vtkMatrix4x4``, sequences storing *copies* of data nodes, a browser whose
proxy nodes the sequences logic creates, tables holding a real ``vtkTable``, plot series and
charts, markups control points, box ROIs (one control point, at the centre, once sized),
labelmap volumes, segmentations whose segments hold a binary labelmap with its geometry (and
the segmentations logic's labelmap import), the subject hierarchy's parent links, scene
observers (NodeAddedEvent, NodeRemovedEvent), and the volume archetype storage node writing
NRRD in LPS (as Slicer's writer does) through SimpleITK. As in Slicer, removing a node leaves
its display and storage nodes in the scene.
"""

from __future__ import annotations

import itertools

import numpy as np
import vtk
from vtk.util import numpy_support


class vtkMRMLNode:
    def __init__(self):
        self._id = None
        self._name = ""
        self._scene = None
        self._attributes = {}
        self._references = {}

    @classmethod
    def _classNames(cls):
        return [c.__name__ for c in cls.__mro__ if c.__name__.startswith("vtkMRML")]

    def GetClassName(self):
        return type(self).__name__

    def IsA(self, className):
        return className in self._classNames()

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetName(self, name):
        self._name = name

    def GetScene(self):
        return self._scene

    def SetAttribute(self, name, value):
        """As vtkMRMLNode::SetAttribute(const char*, const char*): a string, or None to remove."""
        if value is None:
            self._attributes.pop(name, None)
            return
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"SetAttribute takes strings (name {name!r}, value {value!r})")
        self._attributes[name] = value

    def GetAttribute(self, name):
        return self._attributes.get(name)

    def RemoveAttribute(self, name):
        self._attributes.pop(name, None)

    def GetAttributeNames(self):
        return list(self._attributes)

    def UnRegister(self, owner):
        pass

    def SetNodeReferenceID(self, role, nodeID):
        self._references[role] = nodeID

    def GetNodeReferenceID(self, role):
        return self._references.get(role)

    def GetNodeReference(self, role):
        nodeID = self.GetNodeReferenceID(role)
        return self._scene.GetNodeByID(nodeID) if nodeID and self._scene is not None else None

    def _copyFrom(self, other):
        self._attributes = dict(other._attributes)


class vtkMRMLColorTableNode(vtkMRMLNode):
    """A colour table; the stand-in holds colours only for the tables it is asked for."""

    def __init__(self, colors=()):
        super().__init__()
        self._colors = [tuple(float(c) for c in color) for color in colors]

    def GetNumberOfColors(self):
        return len(self._colors)

    def GetColor(self, index, color):
        """As the real one: fills ``color`` (RGBA) in place, returns whether ``index`` exists."""
        if not 0 <= index < len(self._colors):
            return False
        color[:] = [*self._colors[index], 1.0]
        return True


class vtkMRMLScalarVolumeDisplayNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._auto, self._window, self._level, self._color = True, 256.0, 128.0, "vtkMRMLColorTableNodeGrey"

    def SetAutoWindowLevel(self, on):
        self._auto = bool(on)

    def GetAutoWindowLevel(self):
        return self._auto

    def SetWindowLevel(self, window, level):
        self._window, self._level = float(window), float(level)

    def GetWindow(self):
        return self._window

    def GetLevel(self):
        return self._level

    def SetAndObserveColorNodeID(self, colorNodeID):
        self._color = colorNodeID

    def GetColorNodeID(self):
        return self._color


class vtkMRMLScalarVolumeNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._image = None
        self._ijkToRAS = vtk.vtkMatrix4x4()
        self._display = None
        self._storage = None

    def GetImageData(self):
        return self._image

    def SetAndObserveImageData(self, image):
        self._image = image

    def GetIJKToRASMatrix(self, matrix):
        matrix.DeepCopy(self._ijkToRAS)

    def SetIJKToRASMatrix(self, matrix):
        self._ijkToRAS.DeepCopy(matrix)

    def GetRASToIJKMatrix(self, matrix):
        vtk.vtkMatrix4x4.Invert(self._ijkToRAS, matrix)

    def GetParentTransformNode(self):
        return None

    def CreateDefaultDisplayNodes(self):
        if self._display is None and self._scene is not None:
            self._display = self._scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")

    def GetDisplayNode(self):
        return self._display

    def GetNumberOfDisplayNodes(self):
        return 0 if self._display is None else 1

    def GetNthDisplayNode(self, n):
        return self._display if n == 0 else None

    def AddDefaultStorageNode(self):
        """As vtkMRMLStorableNode::AddDefaultStorageNode: a volume archetype storage node, added
        to the scene (where it stays when the volume is removed)."""
        if self._storage is None and self._scene is not None:
            self._storage = self._scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        return True

    def GetStorageNode(self):
        return self._storage

    def GetNumberOfStorageNodes(self):
        return 0 if self._storage is None else 1

    def GetNthStorageNode(self, n):
        return self._storage if n == 0 else None

    def _copyFrom(self, other):
        super()._copyFrom(other)
        image = vtk.vtkImageData()
        if other._image is not None:
            image.DeepCopy(other._image)
        self._image = image
        self._ijkToRAS.DeepCopy(other._ijkToRAS)


class vtkMRMLMarkupsFiducialNode(vtkMRMLNode):
    """A point list whose control points have a position status, as in vtkMRMLMarkupsNode:
    placed points are defined; the point following the mouse in place mode is a preview
    (ResetNthControlPointPosition); UnsetNthControlPointPosition makes one undefined.
    GetNumberOfControlPoints counts them all."""

    PositionUndefined, PositionPreview, PositionDefined, PositionMissing = 0, 1, 2, 3

    def __init__(self):
        super().__init__()
        self._points, self._status = [], []

    def AddControlPoint(self, x, y=None, z=None):
        self._points.append(tuple(float(v) for v in ((x, y, z) if y is not None else x)))
        self._status.append(self.PositionDefined)
        return len(self._points) - 1

    def GetNumberOfControlPoints(self):
        return len(self._points)

    def GetNumberOfDefinedControlPoints(self, includePreview=False):
        wanted = {self.PositionDefined, self.PositionPreview} if includePreview else {self.PositionDefined}
        return sum(status in wanted for status in self._status)

    def GetNthControlPointPositionStatus(self, index):
        return self._status[index]

    def GetNthControlPointIndexByPositionStatus(self, n, status):
        found = [i for i, s in enumerate(self._status) if s == status]
        return found[n] if 0 <= n < len(found) else -1

    def UnsetNthControlPointPosition(self, index):
        self._status[index] = self.PositionUndefined

    def ResetNthControlPointPosition(self, index):
        self._status[index] = self.PositionPreview

    def GetNthControlPointPositionWorld(self, index, out):
        out[:] = self._points[index]


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    """As in Slicer, a subclass of the scalar volume (a selector of scalar volumes lists it unless
    its showChildNodeTypes is off)."""


class vtkMRMLMarkupsROINode(vtkMRMLNode):
    """A box ROI (Slicer's default ROI type): centre and size in RAS (no parent transform here, so
    node = world coordinates). As in Slicer, a box ROI has one control point, at its centre, once
    its size is non-zero (vtkMRMLMarkupsROINode::UpdateControlPointsFromBoxROI); before that it
    has none (an ROI created but not placed yet)."""

    ROITypeBox, ROITypeBoundingBox = 0, 1

    def __init__(self):
        super().__init__()
        self._center, self._size = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]

    @staticmethod
    def _xyz(args):
        return [float(v) for v in (args[0] if len(args) == 1 else args)]

    def SetCenter(self, *args):
        self._center = self._xyz(args)

    SetCenterWorld = SetCenter

    def GetCenter(self, out):
        out[:] = self._center

    GetCenterWorld = GetCenter

    def SetSize(self, *args):
        self._size = self._xyz(args)

    SetSizeWorld = SetSize

    def GetSize(self):
        return tuple(self._size)

    def GetNumberOfControlPoints(self):
        return 1 if any(self._size) else 0

    def GetNthControlPointPositionWorld(self, index, out):
        if index >= self.GetNumberOfControlPoints():
            raise IndexError(index)
        out[:] = self._center


class vtkSegment:
    """A segment: name, colour, label value and its binary labelmap representation (a (k, j, i)
    array with its IJK-to-RAS matrix; None for an empty segment)."""

    def __init__(self):
        self._name, self._color, self._label = "", (0.5, 0.5, 0.5), 1
        self._labelmap, self._ijkToRAS = None, None

    def GetName(self):
        return self._name

    def SetName(self, name):
        self._name = name

    def GetColor(self):
        return self._color

    def SetColor(self, *args):
        self._color = tuple(float(v) for v in (args[0] if len(args) == 1 else args))

    def GetLabelValue(self):
        return self._label

    def SetLabelValue(self, value):
        self._label = int(value)


class vtkSegmentation:
    """The segments of a segmentation node, in order, by ID (IDs made unique from the name)."""

    def __init__(self):
        self._segments = {}

    def _uniqueID(self, base):
        base = base or "Segment"
        if base not in self._segments:
            return base
        return next(f"{base}_{i}" for i in itertools.count(1) if f"{base}_{i}" not in self._segments)

    def AddSegment(self, segment, segmentId="", insertBeforeSegmentId=""):
        segmentId = segmentId or self._uniqueID(segment.GetName())
        self._segments[segmentId] = segment
        return True

    def AddEmptySegment(self, segmentId="", segmentName="", color=None):
        segment = vtkSegment()
        segment.SetName(segmentName or segmentId or "Segment")
        if color is not None:
            segment.SetColor(color)
        segmentId = segmentId or self._uniqueID(segment.GetName())
        self._segments[segmentId] = segment
        return segmentId

    def RemoveSegment(self, segmentId):
        self._segments.pop(segmentId, None)

    def GetNumberOfSegments(self):
        return len(self._segments)

    def GetNthSegmentID(self, index):
        return list(self._segments)[index]

    def GetNthSegment(self, index):
        return list(self._segments.values())[index]

    def GetSegment(self, segmentId):
        return self._segments.get(segmentId)

    def GetSegmentIdBySegmentName(self, name):
        return next((i for i, s in self._segments.items() if s.GetName() == name), "")


class vtkMRMLSegmentationDisplayNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._visible = True

    def SetVisibility(self, visible):
        self._visible = bool(visible)

    def GetVisibility(self):
        return int(self._visible)


class vtkMRMLSegmentationNode(vtkMRMLNode):
    REFERENCE_ROLE = "referenceImageGeometryRef"

    def __init__(self):
        super().__init__()
        self._segmentation = vtkSegmentation()
        self._display = None

    @staticmethod
    def GetReferenceImageGeometryReferenceRole():
        return vtkMRMLSegmentationNode.REFERENCE_ROLE

    def GetSegmentation(self):
        return self._segmentation

    def CreateDefaultDisplayNodes(self):
        if self._display is None and self._scene is not None:
            self._display = self._scene.AddNewNodeByClass("vtkMRMLSegmentationDisplayNode")

    def GetDisplayNode(self):
        return self._display

    def GetNumberOfDisplayNodes(self):
        return 0 if self._display is None else 1

    def GetNthDisplayNode(self, n):
        return self._display if n == 0 else None

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode):
        """Slicer also stores the volume's geometry as a string parameter; the reference is what
        slicer.util.arrayFromSegmentBinaryLabelmap reads."""
        self.SetNodeReferenceID(self.REFERENCE_ROLE, volumeNode.GetID() if volumeNode else None)


class vtkSlicerSegmentationsModuleLogic:
    """``slicer.modules.segmentations.logic()`` (its import is static in Slicer)."""

    @staticmethod
    def ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode, insertBeforeSegmentId="", userMessages=None):
        """As Slicer's: one segment per non-zero label value, holding the labelmap in its geometry;
        the segment is named by the labelmap's colour table if it has one, else, when there is a
        single label, after the labelmap node, else ``Label_<value>``. Returns False for a
        labelmap without image data."""
        if segmentationNode is None or labelmapNode is None or labelmapNode.GetImageData() is None:
            return False
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        image = labelmapNode.GetImageData()
        nx, ny, nz = image.GetDimensions()
        voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx).copy()
        matrix = vtk.vtkMatrix4x4()
        labelmapNode.GetIJKToRASMatrix(matrix)
        labels = [int(v) for v in np.unique(voxels) if v != 0]
        for label in labels:
            segment = vtkSegment()
            segment.SetLabelValue(label)
            segment.SetName(labelmapNode.GetName() if len(labels) == 1 else f"Label_{label}")
            segment._labelmap = voxels
            segment._ijkToRAS = vtk.vtkMatrix4x4()
            segment._ijkToRAS.DeepCopy(matrix)
            segmentationNode.GetSegmentation().AddSegment(segment, "", insertBeforeSegmentId)
        return True


class vtkMRMLSequenceNode(vtkMRMLNode):
    NumericIndex = 0

    def __init__(self):
        super().__init__()
        self._items = []  # (index value, node copy)
        self._indexName, self._indexUnit = "time", "s"

    def SetIndexName(self, name):
        self._indexName = name

    def GetIndexName(self):
        return self._indexName

    def SetIndexUnit(self, unit):
        self._indexUnit = unit

    def GetIndexUnit(self):
        return self._indexUnit

    def SetDataNodeAtValue(self, node, value):
        """Stores a copy of ``node`` (Slicer copies the data node into the sequence's own scene)."""
        copy = type(node)()
        copy._copyFrom(node)
        copy._name = node.GetName()
        self._items = [(v, n) for v, n in self._items if v != value] + [(value, copy)]
        return copy

    def GetNumberOfDataNodes(self):
        return len(self._items)

    def GetNthDataNode(self, index):
        return self._items[index][1]

    def GetNthIndexValue(self, index):
        return self._items[index][0]

    def GetDataNodeAtValue(self, value):
        return next((n for v, n in self._items if v == value), None)


class vtkMRMLSequenceBrowserNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._sequenceIDs = []  # master first
        self._proxyIDs = {}
        self._selected = -1

    def _modified(self):
        """Slicer's sequences logic observes every browser node: any change updates (and
        first creates) the proxy nodes from the selected item of each sequence."""
        if self._scene is not None:
            vtkMRMLSequencesLogic(self._scene).UpdateProxyNodesFromSequences(self)

    def SetAndObserveMasterSequenceNodeID(self, sequenceNodeID):
        self._sequenceIDs = [sequenceNodeID] if sequenceNodeID else []
        self._proxyIDs = {}
        self._modified()

    def GetMasterSequenceNode(self):
        return self._scene.GetNodeByID(self._sequenceIDs[0]) if self._sequenceIDs else None

    def AddSynchronizedSequenceNodeID(self, sequenceNodeID):
        if sequenceNodeID not in self._sequenceIDs:
            self._sequenceIDs.append(sequenceNodeID)
        self._modified()
        return sequenceNodeID

    def IsSynchronizedSequenceNodeID(self, sequenceNodeID, includeMasterNode=False):
        ids = self._sequenceIDs if includeMasterNode else self._sequenceIDs[1:]
        return sequenceNodeID in ids

    def GetNumberOfSynchronizedSequenceNodes(self, includeMasterNode=False):
        return len(self._sequenceIDs) - (0 if includeMasterNode else 1)

    def SetSelectedItemNumber(self, index):
        self._selected = int(index)
        self._modified()

    def GetSelectedItemNumber(self):
        return self._selected

    def GetProxyNode(self, sequenceNode):
        proxyID = self._proxyIDs.get(sequenceNode.GetID())
        return self._scene.GetNodeByID(proxyID) if proxyID and self._scene else None


class vtkMRMLSequencesLogic:
    """``slicer.modules.sequences.logic()``: proxy nodes show the selected item of each sequence."""

    def __init__(self, scene):
        self._scene = scene

    def UpdateProxyNodesFromSequences(self, browser):
        """As vtkSlicerSequencesLogic: the item at the selected index value (index value "0"
        while nothing is selected) is copied into each proxy with CopyContent, which replaces
        the proxy's attributes by the item's (the proxy keeps its name and ID). A new proxy
        gets its default display and storage nodes, as the logic gives it
        (CreateDefaultSequenceDisplayNodes, AddDefaultStorageNode)."""
        index = browser.GetSelectedItemNumber()
        for sequenceID in browser._sequenceIDs:
            sequence = self._scene.GetNodeByID(sequenceID)
            if sequence is None:
                continue
            proxy = browser.GetProxyNode(sequence)
            value = sequence.GetNthIndexValue(index) if 0 <= index < sequence.GetNumberOfDataNodes() else "0"
            item = sequence.GetDataNodeAtValue(value)
            if item is None:
                continue
            if proxy is None:
                proxy = self._scene.AddNewNodeByClass(item.GetClassName(), sequence.GetName())
                browser._proxyIDs[sequenceID] = proxy.GetID()
                for default in ("CreateDefaultDisplayNodes", "AddDefaultStorageNode"):
                    if hasattr(proxy, default):
                        getattr(proxy, default)()
            proxy._copyFrom(item)


class vtkMRMLTableNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._table = vtk.vtkTable()

    def GetTable(self):
        return self._table


class vtkMRMLPlotSeriesNode(vtkMRMLNode):
    PlotTypeLine, PlotTypeBar, PlotTypeScatter, PlotTypeScatterBar = range(4)

    def __init__(self):
        super().__init__()
        self._table = self._x = self._y = None
        self._type = self.PlotTypeLine
        self._color = (0.0, 0.0, 0.0)  # as vtkMRMLPlotSeriesNode's constructor: every series black

    def SetColor(self, *rgb):
        self._color = tuple(float(c) for c in (rgb[0] if len(rgb) == 1 else rgb))

    def GetColor(self):
        return self._color

    def SetUniqueColor(self, colorTableNodeID=None):
        """As vtkMRMLPlotSeriesNode::SetUniqueColor: the first colour of the table (default the
        random one) that no other series in the scene has (each channel 0.1 apart), else the
        colour at (number of series) modulo the table's size."""
        scene = self.GetScene()
        table = scene.GetNodeByID(colorTableNodeID or "vtkMRMLColorTableNodeRandom") if scene else None
        if table is None or not table.GetNumberOfColors():
            return
        others = [n.GetColor() for n in scene.GetNodes() if n.IsA("vtkMRMLPlotSeriesNode") and n is not self]
        color = [0.0] * 4
        for index in range(table.GetNumberOfColors()):
            table.GetColor(index, color)
            if all(any(abs(a - b) >= 0.1 for a, b in zip(other, color[:3])) for other in others):
                break
        else:
            table.GetColor((len(others) + 1) % table.GetNumberOfColors(), color)
        self.SetColor(color[:3])

    def SetAndObserveTableNodeID(self, tableNodeID):
        self._table = tableNodeID

    def GetTableNodeID(self):
        return self._table

    def SetXColumnName(self, name):
        self._x = name

    def GetXColumnName(self):
        return self._x

    def SetYColumnName(self, name):
        self._y = name

    def GetYColumnName(self):
        return self._y

    def SetPlotType(self, plotType):
        self._type = plotType

    def GetPlotType(self):
        return self._type


class vtkMRMLPlotChartNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._series = []
        self._titles = {"": None, "x": None, "y": None}

    def SetTitle(self, title):
        self._titles[""] = title

    def GetTitle(self):
        return self._titles[""]

    def SetXAxisTitle(self, title):
        self._titles["x"] = title

    def SetYAxisTitle(self, title):
        self._titles["y"] = title

    def AddAndObservePlotSeriesNodeID(self, seriesNodeID):
        self._series.append(seriesNodeID)

    def GetNumberOfPlotSeriesNodes(self):
        return len(self._series)

    def GetNthPlotSeriesNodeID(self, index):
        return self._series[index]


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    pass


class vtkMRMLVolumeArchetypeStorageNode(vtkMRMLNode):
    """Writes and reads a scalar volume as Slicer does: NRRD in the LPS frame (RAS negated on x
    and y)."""

    def __init__(self):
        super().__init__()
        self._fileName, self._compress = None, True

    def SetFileName(self, name):
        self._fileName = name

    def UseCompressionOff(self):
        self._compress = False

    def WriteData(self, volumeNode):
        import SimpleITK as sitk

        image = volumeNode.GetImageData()
        nx, ny, nz = image.GetDimensions()
        voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx)
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
        spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
        out = sitk.GetImageFromArray(voxels.copy())
        out.SetSpacing(tuple(float(s) for s in spacing))
        out.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
        out.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).ravel()))
        sitk.WriteImage(out, self._fileName, useCompression=self._compress)
        return 1

    def ReadData(self, volumeNode):
        """Load the file into ``volumeNode``: voxels and IJK-to-RAS (from the file's LPS geometry)."""
        import SimpleITK as sitk

        image = sitk.ReadImage(self._fileName)
        voxels = sitk.GetArrayFromImage(image)
        lps = np.eye(4)
        lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())[None, :]
        lps[:3, 3] = image.GetOrigin()
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        data = vtk.vtkImageData()
        data.SetDimensions(tuple(reversed(voxels.shape)))
        data.AllocateScalars(numpy_support.get_vtk_array_type(voxels.dtype), 1)
        numpy_support.vtk_to_numpy(data.GetPointData().GetScalars())[:] = voxels.ravel()
        volumeNode.SetAndObserveImageData(data)
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, float(ras[r, c]))
        volumeNode.SetIJKToRASMatrix(matrix)
        return 1


class vtkMRMLSubjectHierarchyNode:
    """Items with parents; every node added to the scene gets an item under the scene item."""

    _byScene = {}

    @classmethod
    def GetSubjectHierarchyNode(cls, scene):
        return cls._byScene.setdefault(id(scene), cls(scene))

    def __init__(self, scene):
        self._scene = scene
        self._next = itertools.count(2)
        self._parent = {}  # item -> parent item
        self._node = {}  # item -> node ID
        self._name = {}

    def GetSceneItemID(self):
        return 1

    def GetItemByDataNode(self, node):
        if node is None or node.GetScene() is not self._scene:
            return 0
        for item, nodeID in self._node.items():
            if nodeID == node.GetID():
                return item
        item = next(self._next)
        self._node[item], self._parent[item] = node.GetID(), 1
        return item

    def CreateFolderItem(self, parent, name):
        item = next(self._next)
        self._parent[item], self._name[item] = parent, name
        return item

    CreateStudyItem = CreateFolderItem

    def GetItemParent(self, item):
        return self._parent.get(item, 0)

    def SetItemParent(self, item, parent):
        self._parent[item] = parent

    def _forget(self, nodeID):
        for item in [i for i, n in self._node.items() if n == nodeID]:
            del self._node[item], self._parent[item]


NODE_CLASSES = {cls.__name__: cls for cls in (
    vtkMRMLNode, vtkMRMLColorTableNode, vtkMRMLScalarVolumeDisplayNode, vtkMRMLScalarVolumeNode,
    vtkMRMLMarkupsFiducialNode, vtkMRMLSequenceNode, vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsROINode,
    vtkMRMLSegmentationNode, vtkMRMLSegmentationDisplayNode, vtkMRMLSequenceBrowserNode, vtkMRMLTableNode,
    vtkMRMLPlotSeriesNode, vtkMRMLPlotChartNode, vtkMRMLScriptedModuleNode, vtkMRMLVolumeArchetypeStorageNode)}

#: Colour tables every Slicer scene holds (a few of them; only the random one, which plot
#: series pick their colours from, has colours here: fixed pseudo-random ones).
DEFAULT_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeGrey", "vtkMRMLColorTableNodeFileInferno.txt",
                          "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
                          "vtkMRMLColorTableNodeFileDivergingBlueRed.txt", "vtkMRMLColorTableNodeRandom")


class vtkMRMLScene:
    NodeAddedEvent, NodeRemovedEvent = 0x2001, 0x2003  # as in vtkMRMLScene::SceneEventType
    StartCloseEvent, EndCloseEvent = 0x2103, 0x2203  # StateEvent | Start/EndEvent | CloseState

    def __init__(self):
        self._nodes = {}
        self._counters = {}
        self._observers = {}  # tag -> (event, callback)
        self._tags = itertools.count(1)
        self._addDefaults()

    def AddObserver(self, event, callback, priority=0.0):
        """Observers are called as VTK calls Python observers: ``callback(caller, event)``."""
        tag = next(self._tags)
        self._observers[tag] = (event, callback)
        return tag

    def RemoveObserver(self, tag):
        self._observers.pop(tag, None)

    def _invoke(self, event):
        for observed, callback in list(self._observers.values()):
            if observed == event:
                callback(self, event)

    def _addDefaults(self):
        random = [tuple(c) for c in np.random.default_rng(0).uniform(size=(256, 3))]
        for colorID in DEFAULT_COLOR_NODE_IDS:
            node = vtkMRMLColorTableNode(random if colorID.endswith("Random") else ())
            node._id, node._name, node._scene = colorID, colorID, self
            self._nodes[colorID] = node

    def CreateNodeByClass(self, className):
        return NODE_CLASSES[className]()

    def AddNode(self, node):
        cls = node.GetClassName()
        n = self._counters[cls] = self._counters.get(cls, 0) + 1
        node._id, node._scene = f"{cls}{n}", self
        if not node.GetName():
            node.SetName(self.GenerateUniqueName(cls.replace("vtkMRML", "").replace("Node", "")))
        self._nodes[node._id] = node
        self._invoke(self.NodeAddedEvent)
        return node

    def AddNewNodeByClass(self, className, name=""):
        node = self.CreateNodeByClass(className)
        node.SetName(name)
        return self.AddNode(node)

    def GenerateUniqueName(self, base):
        names = {n.GetName() for n in self._nodes.values()}
        if base not in names:
            return base
        return next(f"{base}_{i}" for i in itertools.count(1) if f"{base}_{i}" not in names)

    def RemoveNode(self, node):
        if node is None or self._nodes.get(node.GetID()) is not node:
            return
        del self._nodes[node.GetID()]
        vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self)._forget(node.GetID())
        node._scene = None  # as vtkMRMLScene::RemoveNode: its display nodes stay in the scene
        self._invoke(self.NodeRemovedEvent)

    def GetNodeByID(self, nodeID):
        return self._nodes.get(nodeID)

    def GetNodes(self):
        return list(self._nodes.values())

    def GetFirstNodeByClass(self, className):
        return next((n for n in self._nodes.values() if n.IsA(className)), None)

    def GetNumberOfNodes(self):
        return len(self._nodes)

    def Clear(self, removeSingletons=False):
        """As vtkMRMLScene::Clear: StartCloseEvent, every node removed but the default colour
        tables and (unless ``removeSingletons``) the singletons, which are reset instead (a
        scripted module's parameter node keeps its place and loses its values), EndCloseEvent."""
        self._invoke(self.StartCloseEvent)
        for node in list(self._nodes.values()):
            if node.IsA("vtkMRMLColorTableNode"):
                continue
            if node.IsA("vtkMRMLScriptedModuleNode") and not removeSingletons:
                node._values = {}
                continue
            self.RemoveNode(node)
        self._invoke(self.EndCloseEvent)
