"""WIDGET STAND-INS (not 3D Slicer): the MRML widgets the module's Widget plugs into the panel,
as small PySide6 widgets with the same calls and signals, and the ScriptedLoadableModuleWidget base (a ``layout`` in its parent, observers)."""

from __future__ import annotations

from Qt.QtCore import Signal

from InvarianceExplorerLib.ui.qtshim import qt


class qMRMLNodeComboBox(qt.QComboBox):
    """Lists the scene's nodes of ``nodeTypes`` (and "None" when ``noneEnabled``)."""

    currentNodeChanged = Signal(object)

    def __init__(self, parent=None):
        qt.QComboBox.__init__(self, parent)
        self.nodeTypes, self.addEnabled, self.removeEnabled, self.noneEnabled = [], True, True, False
        self._scene, self._nodes = None, []
        self.currentIndexChanged.connect(lambda *args: self.currentNodeChanged.emit(self.currentNode()))

    def setMRMLScene(self, scene):
        self._scene = scene
        self.refresh()

    def refresh(self):
        current = self.currentNode() if self._nodes else None
        self.blockSignals(True)
        self.clear()
        self._nodes = ([None] if self.noneEnabled else []) + [
            n for n in self._scene.GetNodes() if any(n.IsA(t) for t in self.nodeTypes)]
        for node in self._nodes:
            self.addItem("None" if node is None else node.GetName())
        self.blockSignals(False)
        if current in self._nodes:
            self.setCurrentIndex(self._nodes.index(current))

    def currentNode(self):
        index = self.currentIndex()
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def setCurrentNode(self, node):
        self.refresh()
        self.setCurrentIndex(self._nodes.index(node) if node in self._nodes else (0 if self.noneEnabled else -1))


class _PlaceWidget:
    def __init__(self):
        self.placeMultipleMarkups = None

    def setPlaceMultipleMarkups(self, mode):
        self.placeMultipleMarkups = mode


class qSlicerMarkupsPlaceWidget:
    ForcePlaceSingleMarkup, ForcePlaceMultipleMarkups, RestorePlaceMultipleMarkups = range(3)


class qSlicerSimpleMarkupsWidget(qt.QWidget):
    """A point list selector; the user's clicks add control points to the selected node."""

    markupsNodeChanged = Signal()

    def __init__(self, parent=None):
        qt.QWidget.__init__(self, parent)
        self._scene, self._node, self._place = None, None, _PlaceWidget()

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
    """Slicer's base: ``self.parent`` (a widget), ``self.layout`` in it, VTK observers."""

    def __init__(self, parent=None):
        self.parent = parent if parent is not None else qt.QWidget()
        self.parent.isEntered = True
        self.layout = self.parent.layout() or qt.QVBoxLayout(self.parent)
        self.observers = []

    def setup(self):
        pass

    def addObserver(self, obj, event, callback):
        self.observers.append((obj, event, callback))

    def removeObservers(self):
        self.observers = []
