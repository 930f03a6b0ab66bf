"""One name for Qt, inside and outside 3D Slicer.

``qt`` is Slicer's PythonQt module when it can be imported (inside Slicer), otherwise a
module assembled from Qt.py's ``QtCore``, ``QtGui`` and ``QtWidgets`` (over PySide6), so
that ``qt.QPushButton``, ``qt.QTimer`` and ``qt.Qt.AlignLeft`` mean the same in both.

Code that uses the shim keeps to what both bindings share: setter methods
(``setText``, not PythonQt's ``.text =`` properties), new-style ``signal.connect(callable)``
with callables that accept any arguments, and no Python-defined signals (PythonQt cannot
define them; callbacks are plain Python attributes instead).
"""

from __future__ import annotations

import types

try:  # 3D Slicer (PythonQt)
    import qt  # type: ignore[import-not-found]

    BINDING = "PythonQt" if not hasattr(qt, "__binding__") else qt.__binding__
except ImportError:  # standalone: Qt.py over PySide6 (the "gui" extra)
    from Qt import QtCore, QtGui, QtWidgets  # type: ignore[import-not-found]
    import Qt as _QtPy  # type: ignore[import-not-found]

    qt = types.ModuleType("qt", "Qt classes under one flat namespace (Qt.py over " + _QtPy.__binding__ + ")")
    for _module in (QtWidgets, QtGui, QtCore):
        for _name in dir(_module):
            if _name.startswith("Q") and not hasattr(qt, _name):
                setattr(qt, _name, getattr(_module, _name))
    qt.Qt = QtCore.Qt
    qt.__binding__ = _QtPy.__binding__
    BINDING = _QtPy.__binding__

__all__ = ["qt", "BINDING", "application"]


def application():
    """The running ``QApplication``, created (with no arguments) if there is none yet."""
    app = qt.QApplication.instance()
    if app is None:
        app = qt.QApplication([])
    return app


def prop(obj, name: str):
    """Read the Qt property ``name`` of ``obj`` in either binding: PythonQt exposes Qt
    properties as attributes (``label.text``), PySide6 as getter methods (``label.text()``)."""
    value = getattr(obj, name)
    return value() if callable(value) else value
