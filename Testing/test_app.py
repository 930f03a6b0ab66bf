"""``invariance-explorer gui``: the standalone app reads sample results folders, shows the
samples with a slider, and builds the `sample` command from its file pickers (real Qt, offscreen)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6")
pytest.importorskip("Qt")

from InvarianceExplorerLib.cli import main as cli_main  # noqa: E402
from InvarianceExplorerLib.io import write_nrrd  # noqa: E402
from InvarianceExplorerLib.ui.app import MainWindow, unique_folder  # noqa: E402
from InvarianceExplorerLib.ui.panel import RUN_TEXT  # noqa: E402
from InvarianceExplorerLib.ui.qtshim import application, qt  # noqa: E402
from ui_helpers import make_volume, wait_until, write_sample_folder  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return application()


@pytest.fixture()
def results(tmp_path):
    volume = make_volume()
    write_sample_folder(tmp_path / "run", volume, (20, 24, 2), patch=16, count=5)
    return tmp_path / "run"


def test_app_shows_a_results_folder_with_a_slider_over_the_samples(app, results, tmp_path):
    window = MainWindow(tmp_path / "results")
    items = window.openResults(results)
    assert [label.split(":")[0] for label, _ in items] == sorted(
        ["denoised", "denoised_invariances", "input", "invariances", "numbers", "reconstruction", "std"])
    view = window.view
    assert view.sampleSlider.isEnabled() and view.sampleSlider.maximum() == 4
    first = view.imageLabels[1].pixmap().toImage()
    view.sampleSlider.setValue(3)
    assert view.sampleLabel.text() == "4 / 5" and "mean |f(x~) - f(x)| = 0.30 HU" in view.numbersLabel.text()
    assert view.imageLabels[1].pixmap().toImage() != first  # another sample is shown
    assert all(not label.pixmap().isNull() for label in view.imageLabels)
    assert window.panel.outputLabels()[0].startswith("denoised:")


def test_app_builds_the_sample_command_and_shows_engine_errors(app, tmp_path):
    window = MainWindow(tmp_path / "results")
    assert not window.panel.start() and "Choose the input CT" in window.panel.errorText()
    ct = write_nrrd(make_volume((3, 40, 40)), tmp_path / "ld.nrrd")
    window.inputEdit.setText(ct)
    window.setCenter(20, 21, 1)
    window.panel.countSpin.setValue(4)
    window.panel.setDenoiser(str(tmp_path / "no-model"))
    job = window.prepareJob(window.panel.settings())
    args = job.command[3:]
    assert args[:2] == ["sample", "--model"] and args[args.index("--center") + 1] == "20,21,1"
    assert args[args.index("--count") + 1] == "4" and args[args.index("--out") + 1] == str(window.outDir)
    assert window.outDir.name == "ld_20-21-1_seed0_n4" and args[-2:] == ["--progress", "json"]
    # a real engine process: it refuses (an unknown model folder, or no `sample` command yet)
    assert window.panel.start()
    wait_until(lambda: not window.panel.running)
    assert window.panel.errorText() and window.panel.runButton.text() == RUN_TEXT
    assert not window.outDir.exists()
    (tmp_path / "results" / "x").mkdir()
    assert unique_folder(tmp_path / "results", "x").name == "x-2"


def test_gui_command_opens_and_closes(app, results, capsys):
    qt.QTimer.singleShot(200, app.quit)
    assert cli_main(["gui", "--open", str(results), "--results", str(results.parent / "r")]) == 0
    windows = [w for w in app.topLevelWidgets() if isinstance(w, MainWindow) and w.view.result is not None]
    assert windows and windows[-1].view.result.count == 5
    assert np.isclose(windows[-1].view.result.numbers["consistency"], 0.5)
    for w in windows:
        w.close()


def test_app_cancel_removes_the_partial_results_folder(app, tmp_path):
    window = MainWindow(tmp_path / "results")
    window.inputEdit.setText(write_nrrd(make_volume((3, 40, 40)), tmp_path / "ld.nrrd"))
    window.panel.setDenoiser(str(tmp_path / "no-model"))
    assert window.panel.start()
    job = window.panel.job
    window.outDir.mkdir()  # as if the engine had begun writing
    window.panel.runButton.click()  # Cancel
    wait_until(lambda: not window.panel.running, timeout=20)
    assert window.panel.statusLabel.text() == "Cancelled" and window.panel.errorLabel.isHidden()
    assert job.returncode is not None and not window.outDir.exists()
