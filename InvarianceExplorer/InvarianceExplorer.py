"""3D Slicer module: sample and analyse the invariances of low-dose CT denoising networks.

The science lives in the engine package InvarianceExplorerLib (numpy, torch, MONAI; no
slicer). This file is the thin Slicer layer. It must stay cheap to import: Slicer imports
it at start-up, so torch (and the engine's torch modules) are imported only when used.
"""

import importlib
import importlib.util
import logging
import os
import sys

import ctk
import qt

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

PAPER_DOI_URL = "https://doi.org/10.1002/mp.17413"


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


#
# InvarianceExplorer
#


class InvarianceExplorer(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Invariance Explorer")
        self.parent.categories = ["Filtering.Denoising"]
        self.parent.dependencies = []
        self.parent.contributors = ["InvarianceExplorer developers"]
        self.parent.helpText = _("""
A low-dose CT denoising network is <i>invariant</i> to the properties of its input that it ignores:
changing them leaves the denoised image unchanged, which is wanted for noise but dangerous for anatomy
such as a small lesion.
This module samples images that a denoiser cannot tell apart from the input and measures how they differ,
following E. Eulig et al., "Reconstructing and analyzing the invariances of low-dose CT image denoising
networks", Medical Physics 52(1):188-200, 2025, <a href="{url}">doi:10.1002/mp.17413</a>.
""").format(url=PAPER_DOI_URL)
        self.parent.acknowledgementText = _("""
The method is by E. Eulig, F. Jäger, J. Maier, B. Ommer and M. Kachelrieß
(<a href="{url}">doi:10.1002/mp.17413</a>); this module is an independent implementation.
It builds on 3D Slicer, PyTorch, MONAI and FrEIA.
""").format(url=PAPER_DOI_URL)
        # The base class looks for the icon next to this file only, which misses the source tree.
        self.parent.icon = qt.QIcon(os.path.join(resourcesDir(), "Icons", "InvarianceExplorer.png"))

    def resourcePath(self, filename):
        """Return the absolute path of ``filename`` inside the Resources directory."""
        return os.path.join(resourcesDir(), filename)


#
# InvarianceExplorerWidget
#


class InvarianceExplorerWidget(ScriptedLoadableModuleWidget):
    """Module panel. The sampling panel arrives with the engine; for now it shows what the module is."""

    def resourcePath(self, filename):
        """Return the absolute path of ``filename`` inside the Resources directory."""
        return os.path.join(resourcesDir(), filename)

    def setup(self):
        """Build the panel: an About section and the state of the engine's dependencies."""
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = InvarianceExplorerLogic()

        aboutSection = ctk.ctkCollapsibleButton()
        aboutSection.text = _("About")
        self.layout.addWidget(aboutSection)
        aboutLayout = qt.QVBoxLayout(aboutSection)

        description = qt.QLabel(_(
            "Samples images that a low-dose CT denoiser maps to (almost) the same output as the input, "
            "and shows what the denoiser ignores. Method: Eulig et al., Medical Physics 2025, "
            '<a href="{url}">doi:10.1002/mp.17413</a>.').format(url=PAPER_DOI_URL))
        description.wordWrap = True
        description.openExternalLinks = True
        aboutLayout.addWidget(description)

        status = qt.QLabel(self.logic.engineStatusText())
        status.wordWrap = True
        aboutLayout.addWidget(status)

        self.layout.addStretch(1)


#
# InvarianceExplorerLogic
#


class InvarianceExplorerLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: translates between MRML nodes and the engine (InvarianceExplorerLib)."""

    @staticmethod
    def engineAvailable():
        """Return True if the engine package and PyTorch can be imported (checked without importing them)."""
        return all(importlib.util.find_spec(name) is not None for name in ("InvarianceExplorerLib", "torch"))

    def engineStatusText(self):
        """Return a one-line, user-facing description of the engine's state."""
        if importlib.util.find_spec("torch") is None:
            return _("PyTorch is not installed: install the PyTorch extension in the Extensions Manager, "
                     "then restart Slicer.")
        if not self.engineAvailable():
            return _("The InvarianceExplorerLib engine package is missing from this installation.")
        return _("Engine and PyTorch found. The sampling panel arrives with the engine.")


#
# InvarianceExplorerTest
#


class InvarianceExplorerTest(ScriptedLoadableModuleTest):
    """Self-test, run in Slicer (Developer mode: Reload and Test; or ctest)."""

    def setUp(self):
        """Reset the scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run all tests."""
        self.setUp()
        self.test_Resources()
        self.setUp()
        self.test_EngineImportIsLight()

    def test_Resources(self):
        """The Resources directory is found and the module icon loads."""
        iconPath = os.path.join(resourcesDir(), "Icons", "InvarianceExplorer.png")
        self.assertTrue(os.path.isfile(iconPath), iconPath)
        self.assertFalse(qt.QIcon(iconPath).isNull())
        self.assertFalse(slicer.modules.invarianceexplorer.icon.isNull())
        self.delayDisplay("Resources found")

    def test_EngineImportIsLight(self):
        """Importing this module and the engine package does not import torch."""
        if "torch" in sys.modules:
            logging.warning("torch was imported before this test (by another module): import check skipped")
            return
        engine = importlib.import_module("InvarianceExplorerLib")
        self.assertNotIn("torch", sys.modules, "importing InvarianceExplorerLib imported torch")
        self.delayDisplay(f"InvarianceExplorerLib {engine.__version__} imports without torch")
