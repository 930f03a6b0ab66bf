"""End to end: the real ``invariance-explorer sample`` in a child process, read back by the
standalone app and by the Slicer layer (under the SLICER STAND-IN), with a tiny randomly
initialised denoiser + cVAE + cINN folder. Skipped while the engine's sampler is absent."""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6")
pytest.importorskip("vtk")
sampler = pytest.importorskip("InvarianceExplorerLib.sampler")

import slicer_standin  # noqa: E402
from InvarianceExplorerLib.cli import build_parser  # noqa: E402
from InvarianceExplorerLib.io import write_nrrd  # noqa: E402
from InvarianceExplorerLib.ui.qtshim import application  # noqa: E402
from ui_helpers import make_model, make_volume, screenshot_path, wait_until  # noqa: E402

if "sample" not in build_parser()._subparsers._group_actions[0].choices:  # noqa: SLF001
    pytest.skip("the engine has no `sample` command yet", allow_module_level=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random CNN-10 with a small cVAE and cINN (patch 32): enough to run the whole pipeline."""
    import torch

    from InvarianceExplorerLib.invariance_flow import InvarianceFlow
    from InvarianceExplorerLib.representation import Representation

    folder = make_model(tmp_path_factory.mktemp("model") / "cnn10")
    torch.manual_seed(0)
    representation = Representation(patch_size=32, z_dim=16, channels=(8, 16, 16, 32))
    flow = InvarianceFlow(z_dim=16, n_flows=4, hidden=32, embedding_dim=8, embedding_channels=(8, 8))
    return sampler.save_invariance_models(folder, representation, flow, {"training": {"steps": 0}})


def test_app_runs_sample_and_shows_the_samples(model, tmp_path):
    from InvarianceExplorerLib.ui.app import MainWindow

    application()
    ct = write_nrrd(make_volume((2, 48, 56)), tmp_path / "ld.nrrd")
    window = MainWindow(tmp_path / "results")
    window.inputEdit.setText(ct)
    window.setCenter(30, 20, 1)
    window.panel.countSpin.setValue(3)
    window.panel.setDenoiser(str(model))
    window.panel.deviceCombo.setCurrentIndex(1)  # CPU
    stages = []
    original = window.panel._onStage
    window.panel._onStage = lambda e: (stages.append(e["stage"]), original(e))
    assert window.panel.start(), window.panel.errorText()
    wait_until(lambda: not window.panel.running, timeout=120)
    assert window.panel.errorLabel.isHidden(), window.panel.errorText()
    assert stages == ["loading", "encoding", "sampling", "writing"]
    assert window.view.result is not None and window.view.result.count == 3
    assert window.view.result.numbers["center_ijk"] == [30, 20, 1]
    assert window.panel.progressBar.value() == 100 and window.outDir.is_dir()
    # screenshot of the standalone app (README); the networks are untrained, the images are not meaningful

    window.resize(1000, 640)
    window.show()
    application().processEvents()
    shot = screenshot_path("gui.png", tmp_path)
    assert window.grab().save(str(shot), "PNG")
    window.close()


def test_slicer_logic_samples_into_nodes(model, tmp_path, monkeypatch):
    slicer = slicer_standin.install()
    try:
        import importlib

        import vtk

        import InvarianceExplorer

        module = importlib.reload(InvarianceExplorer)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "PythonSlicer").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / "PythonSlicer").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "LD")
        slicer.util.updateVolumeFromArray(volume, make_volume((2, 48, 56)).array)
        matrix = vtk.vtkMatrix4x4()
        for r, row in enumerate([[-0.7, 0, 0, 20.0], [0, -0.7, 0, 15.0], [0, 0, 2.0, -4.0]]):
            for c, value in enumerate(row):
                matrix.SetElement(r, c, value)
        volume.SetIJKToRASMatrix(matrix)
        ras = (20.0 - 0.7 * 30, 15.0 - 0.7 * 20, -4.0 + 2.0)  # voxel (30, 20, 1)
        progress = []
        nodes = module.InvarianceExplorerLogic().sampleInvariances(volume, str(model), ras, count=3, seed=2,
                                                                   device="cpu", progressCallback=progress.append,
                                                                   analyze=True)
        assert {e["stage"] for e in progress} >= {"loading", "encoding", "sampling", "writing", "method A"}
        # sample --analyze: method A's regions as a segmentation on the crop's grid (method B: no null here)
        segmentation = nodes["anatomy_changes"].GetSegmentation()
        names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
        assert names == [name for output, _, name, _ in module.ANATOMY_SEGMENTS if output == "altered_regions"]
        assert slicer.util.arrayFromSegmentBinaryLabelmap(nodes["anatomy_changes"], segmentation.GetNthSegmentID(0),
                                                          nodes["crop"]).shape == (1, 32, 32)
        assert nodes["invariances"].GetNumberOfDataNodes() == 3 and nodes["table"].GetTable().GetNumberOfRows() == 3
        crop = vtk.vtkMatrix4x4()
        nodes["crop"].GetIJKToRASMatrix(crop)
        corner = [crop.GetElement(r, 3) for r in range(3)]
        np.testing.assert_allclose(corner, (20.0 - 0.7 * 14, 15.0 - 0.7 * 4, -2.0), atol=1e-4)  # voxel (14, 4, 1)
        assert slicer.util.arrayFromVolume(nodes["crop"]).shape == (1, 32, 32)
        assert float(nodes["table"].GetAttribute("InvarianceExplorer.Consistency")) >= 0
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("InvarianceExplorer-")]
    finally:
        slicer_standin.uninstall()


def test_slicer_widget_runs_sample_and_shows_the_result_nodes(model, tmp_path, monkeypatch):
    slicer = slicer_standin.install()
    try:
        import importlib

        import InvarianceExplorer

        module = importlib.reload(InvarianceExplorer)
        application()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "PythonSlicer").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / "PythonSlicer").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "LD")
        slicer.util.updateVolumeFromArray(volume, make_volume((2, 48, 56)).array)
        point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
        point.AddControlPoint(30.0, 20.0, 1.0)  # identity IJK-to-RAS: voxel (30, 20, 1)
        widget = module.InvarianceExplorerWidget()
        widget.setup()
        widget.pointWidget.setCurrentNode(point)
        widget.panel.setDenoiser(str(model))
        widget.panel.countSpin.setValue(2)
        assert widget.panel.start(), widget.panel.errorText()
        wait_until(lambda: not widget.panel.running, timeout=120)
        assert widget.panel.errorLabel.isHidden(), widget.panel.errorText()
        nodes = widget.logic.resultNodes(volume)
        assert nodes["invariances"].GetNumberOfDataNodes() == 2
        assert "LD invariances" in widget.panel.outputLabels() and "LD std of invariances" in widget.panel.outputLabels()
        views = slicer.views
        assert views.layers["background"] is nodes["invariances_proxy"] and views.layers["foreground"] is nodes["std"]
        assert views.browser is nodes["browser"] and views.toolbarVisible and views.chart is nodes["chart"]
    finally:
        slicer_standin.uninstall()
