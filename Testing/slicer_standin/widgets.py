"""WIDGET STAND-INS (not 3D Slicer): the MRML widgets the module's Widget plugs into the panel,
as small PySide6 widgets with the same calls and signals, and the ScriptedLoadableModuleWidget base (a ``layout`` in its parent, observers)."""

from __future__ import annotations

import warnings

from Qt.QtCore import Signal

from InvarianceExplorerLib.ui.qtshim import qt


class qMRMLSortFilterProxyModel:
    """The filter of a node combo box (``comboBox.sortFilterProxyModel()``): the parts of
    qMRMLSortFilterProxyModel::filterAcceptsNode the module relies on — ``hiddenNodeIDs`` first,
    then the node types, ``showChildNodeTypes`` / ``hideChildNodeTypes`` and attribute filters."""

    def __init__(self, combo):
        self._combo = combo
        self._hidden = []
        self.nodeTypes, self.showChildNodeTypes, self.hideChildNodeTypes, self.attributes = [], True, [], {}

    @property
    def hiddenNodeIDs(self):
        return list(self._hidden)

    @hiddenNodeIDs.setter
    def hiddenNodeIDs(self, nodeIDs):
        self._hidden = [str(n) for n in nodeIDs]
        self._combo.refresh()

    def setHiddenNodeIDs(self, nodeIDs):
        self.hiddenNodeIDs = nodeIDs

    def filterAcceptsNode(self, node):
        if node.GetID() in self._hidden:
            return False
        for nodeType in self.nodeTypes:
            if not node.IsA(nodeType):
                continue
            if not self.showChildNodeTypes and node.GetClassName() != nodeType:
                continue
            if self.showChildNodeTypes and any(node.IsA(t) for t in self.hideChildNodeTypes):
                return False
            if nodeType in self.attributes:
                name, value = self.attributes[nodeType]
                if node.GetAttribute(name) is None or (value is not None and node.GetAttribute(name) != str(value)):
                    return False
            return True
        return False


class qMRMLNodeComboBox(qt.QComboBox):
    """Lists the scene's nodes that its filter accepts ("None" first when ``noneEnabled``), kept up
    to date with the scene (nodes added and removed), as the real combo box's scene model is."""

    currentNodeChanged = Signal(object)

    def __init__(self, parent=None):
        qt.QComboBox.__init__(self, parent)
        self._proxy = qMRMLSortFilterProxyModel(self)
        self.addEnabled, self.removeEnabled, self.renameEnabled, self.noneEnabled = True, True, False, False
        self._scene, self._nodes, self._tags = None, [], []
        self.currentIndexChanged.connect(lambda *args: self.currentNodeChanged.emit(self.currentNode()))

    # properties that re-filter, as in qMRMLNodeComboBox (they set the proxy model's)
    nodeTypes = property(lambda self: self._proxy.nodeTypes, lambda self, v: self._setFilter("nodeTypes", list(v)))
    showChildNodeTypes = property(lambda self: self._proxy.showChildNodeTypes,
                                  lambda self, v: self._setFilter("showChildNodeTypes", bool(v)))
    hideChildNodeTypes = property(lambda self: self._proxy.hideChildNodeTypes,
                                  lambda self, v: self._setFilter("hideChildNodeTypes", list(v)))

    def _setFilter(self, name, value):
        setattr(self._proxy, name, value)
        self.refresh()

    def addAttribute(self, nodeType, attributeName, attributeValue=None):
        self._proxy.attributes[nodeType] = (attributeName, attributeValue)
        self.refresh()

    def sortFilterProxyModel(self):
        return self._proxy

    def setMRMLScene(self, scene):
        for tag in self._tags:
            self._scene.RemoveObserver(tag)
        self._scene = scene
        self._tags = [scene.AddObserver(event, lambda caller, event: self.refresh())
                      for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent)]
        self.refresh()

    def refresh(self):
        if self._scene is None:
            return
        current = self.currentNode() if self._nodes else None
        self.blockSignals(True)
        self.clear()
        self._nodes = ([None] if self.noneEnabled else []) + [
            n for n in self._scene.GetNodes() if self._proxy.filterAcceptsNode(n)]
        for node in self._nodes:
            self.addItem("None" if node is None else node.GetName())
        index = self._nodes.index(current) if current in self._nodes else (0 if self._nodes else -1)
        self.setCurrentIndex(index)
        self.blockSignals(False)
        if self.currentNode() is not current:
            self.currentNodeChanged.emit(self.currentNode())

    def nodeCount(self):
        return len(self._nodes) - (1 if self.noneEnabled else 0)

    def nodeFromIndex(self, index):
        index += 1 if self.noneEnabled else 0
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def currentNode(self):
        index = self.currentIndex()
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def setCurrentNode(self, node):
        self.refresh()
        self.setCurrentIndex(self._nodes.index(node) if node in self._nodes else (0 if self.noneEnabled else -1))


class qSlicerMarkupsPlaceWidget(qt.QWidget):
    """The place button of a markups node (clicking it lets the user place the node in a view)."""

    ForcePlaceSingleMarkup, ForcePlaceMultipleMarkups, RestorePlaceMultipleMarkups = range(3)

    def __init__(self, parent=None):
        qt.QWidget.__init__(self, parent)
        self._scene, self._node, self.placeMultipleMarkups, self.placeModeEnabled = None, None, None, False
        self.buttonsVisible = True

    def setMRMLScene(self, scene):
        self._scene = scene

    def setPlaceMultipleMarkups(self, mode):
        self.placeMultipleMarkups = mode

    def setButtonsVisible(self, visible):
        self.buttonsVisible = bool(visible)

    def setCurrentNode(self, node):
        self._node = node

    def currentNode(self):
        return self._node

    currentMarkupsNode = currentNode

    def setPlaceModeEnabled(self, enabled):
        self.placeModeEnabled = bool(enabled)


class qSlicerSimpleMarkupsWidget(qt.QWidget):
    """A point list selector; the user's clicks add control points to the selected node."""

    markupsNodeChanged = Signal()

    def __init__(self, parent=None):
        qt.QWidget.__init__(self, parent)
        self._scene, self._node, self._place = None, None, qSlicerMarkupsPlaceWidget()

    def setMRMLScene(self, scene):
        self._scene = scene

    def markupsPlaceWidget(self):
        return self._place

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.markupsNodeChanged.emit()


class ScriptedLoadableModuleWidget:
    """Slicer's base: ``self.parent`` (a widget), ``self.layout`` in it. Like Slicer's, it has
    no VTK observer methods (those come from :class:`VTKObservationMixin`)."""

    def __init__(self, parent=None):
        self.parent = parent if parent is not None else qt.QWidget()
        self.parent.isEntered = True
        self.layout = self.parent.layout() or qt.QVBoxLayout(self.parent)

    def setup(self):
        pass


class VTKObservationMixin:
    """slicer.util.VTKObservationMixin: ``addObserver(obj, event, method)`` ->
    ``obj.AddObserver`` (once per method), ``removeObservers(method=None)``, ``hasObserver``."""

    def __init__(self):
        super().__init__()
        self.__observations = {}  # {obj: {event: {method: (group, tag, priority)}}}

    def addObserver(self, obj, event, method, group="none", priority=0.0):
        methods = self.__observations.setdefault(obj, {}).setdefault(event, {})
        if method in methods:
            warnings.warn("already has observer")
            return
        methods[method] = group, obj.AddObserver(event, method, priority), priority

    def removeObservers(self, method=None):
        for obj, events in self.__observations.items():
            for methods in events.values():
                for m in [m for m in methods if method is None or m == method]:
                    obj.RemoveObserver(methods.pop(m)[1])
        if method is None:
            self.__observations.clear()

    def hasObserver(self, obj, event, method):
        return method in self.__observations.get(obj, {}).get(event, {})
