"""End to end: the real ``invariance-explorer sample`` in a child process, read back by the
standalone app and by the Slicer layer (under the SLICER STAND-IN), with a tiny randomly
initialised denoiser + cVAE + cINN folder (fast); and the README's screenshots (docs/gui.png,
docs/panel.png), from a run of the REAL bundled CNN-10 invariance models on the bundled sample
CT (a few seconds)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import slicer_standin  # noqa: E402
from InvarianceExplorerLib import sampler  # noqa: E402
from InvarianceExplorerLib.io import write_nrrd  # noqa: E402
from InvarianceExplorerLib.ui.qtshim import application  # noqa: E402
from ui_helpers import make_model, make_volume, screenshot_path, wait_until  # noqa: E402

#: The README's screenshots: the bundled denoiser, its voxel of the sample CT (a lung nodule, as
#: ``make demo``), count and seed.
SCREENSHOT_RUN = {"model": "cnn10", "center": (368, 283, 1), "count": 16, "seed": 0}


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
    window.resize(1000, 640)
    window.show()
    application().processEvents()
    assert not window.grab().isNull()  # (the README's screenshot is of a real run: test below)
    window.close()


def test_screenshots_of_the_app_after_a_run_of_the_bundled_models(tmp_path, monkeypatch):
    """docs/gui.png and docs/panel.png (``INVARIANCE_EXPLORER_SCREENSHOTS=docs``; else tmp_path):
    the standalone app after sampling 16 invariances of the bundled CNN-10 with its bundled cVAE
    + cINN around a lung nodule of the bundled sample CT, as a user runs it from the repository
    (``invariance-explorer gui --input Resources/SampleData/... --results results/gui``)."""
    from InvarianceExplorerLib.denoisers import bundled_models_dir
    from InvarianceExplorerLib.sample_data import sample_ct_path
    from InvarianceExplorerLib.ui.app import MainWindow

    shots = {name: screenshot_path(name, tmp_path).resolve() for name in ("gui.png", "panel.png")}
    application()
    # the paths the window shows are the README's: run in a folder that looks like the repository
    work = tmp_path / "work"
    (work / "Resources" / "SampleData").mkdir(parents=True)
    ct = Path("Resources/SampleData") / sample_ct_path().name
    (work / ct).symlink_to(sample_ct_path())
    monkeypatch.chdir(work)
    window = MainWindow(Path("results/gui"), models_dir=bundled_models_dir())
    window.inputEdit.setText(str(ct))
    window.setCenter(*SCREENSHOT_RUN["center"])
    window.panel.setDenoiser(SCREENSHOT_RUN["model"])
    window.panel.countSpin.setValue(SCREENSHOT_RUN["count"])
    window.panel.seedSpin.setValue(SCREENSHOT_RUN["seed"])
    window.panel.deviceCombo.setCurrentIndex(1)  # CPU
    window.panel.analyzeCheck.setChecked(True)  # and find anatomy changes
    assert window.panel.denoiserCombo.currentText() == "CNN-10"  # bundled weights found
    assert window.panel.start(), window.panel.errorText()
    wait_until(lambda: not window.panel.running, timeout=300)
    assert window.panel.errorLabel.isHidden(), window.panel.errorText()
    assert window.panel.progressBar.value() == 100
    result = window.view.result
    assert result is not None and result.count == SCREENSHOT_RUN["count"]
    assert result.numbers["center_ijk"] == list(SCREENSHOT_RUN["center"]) and result.numbers["model"] == "cnn10"
    assert 0 < result.numbers["consistency"] < 1  # f moves less than its input does
    changes = [s["mean_abs_change_hu"] for s in result.numbers["samples"]]
    assert min(changes) > 0 and np.ptp(result.volumes["invariances"].array, axis=0).max() > 0  # samples differ
    labels = window.panel.outputLabels()
    assert "invariances: invariances.nrrd" in labels and "std: std.nrrd" in labels
    ranks = {a["rank"]: a["index"] for a in window.view.analysis["numbers"]["samples"]}
    window.view.sampleSlider.setValue(ranks[1])  # the sample method A ranks first
    from InvarianceExplorerLib.figures import std_top

    top = std_top(result.volumes["std"].array[0])  # the scale of the sample folder's figure.png too
    assert window.view.captionLabels[3].text() == f"std of x~ (black 0, white {top:.2g} HU)"
    assert window.view.analysis is not None and not window.view.analysisImages[0].isHidden()
    assert "rank " in window.view.analysisCaptions[0].text()
    window.resize(1100, 900)
    window.show()
    application().processEvents()
    assert window.grab().save(str(shots["gui.png"]), "PNG")
    panel = window.panel
    assert panel.grab().save(str(shots["panel.png"]), "PNG")
    window.close()
    assert all(shot.stat().st_size > 20000 for shot in shots.values())


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
