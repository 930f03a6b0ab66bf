"""The sampling panel and its process plumbing: the only part of the engine package that uses Qt.

* :mod:`.qtshim` picks the Qt binding: ``qt`` (PythonQt) inside 3D Slicer, else Qt.py over
  PySide6, exposed under the same flat class names (``qt.QPushButton``, ``qt.QTimer``).
* :mod:`.process` runs the engine CLI in a child process (its own process group) and reads
  its JSON-lines progress (:mod:`InvarianceExplorerLib.progress`) without blocking the GUI.
* :mod:`.panel` is the one panel (Inputs / Sampling / Outputs) used by the Slicer module
  and by the standalone app.
* :mod:`.app` is the standalone app, ``invariance-explorer gui``.

Nothing outside this subpackage imports it, and importing it does not import torch.
"""
