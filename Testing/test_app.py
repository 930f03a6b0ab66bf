"""``invariance-explorer gui``: the standalone app reads sample results folders, shows the
samples with a slider, and builds the `sample` command from its file pickers (real Qt, offscreen)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

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
    assert view.sampleLabel.text() == "x~3 (4 / 5)" and "mean |f(x~) - f(x)| = 0.30 HU" in view.numbersLabel.text()
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
    # a real engine process: it refuses the unknown model folder, and the panel shows why
    assert window.panel.start()
    wait_until(lambda: not window.panel.running)
    assert "no-model: neither a model folder nor a bundled denoiser name" in window.panel.errorText()
    assert window.panel.lastEvent["kind"] == "input" and window.panel.runButton.text() == RUN_TEXT
    assert not window.outDir.exists()
    (tmp_path / "results" / "x").mkdir()
    assert unique_folder(tmp_path / "results", "x").name == "x-2"
    (tmp_path / "a file").write_text("kept")
    window.resultsEdit.setText(str(tmp_path / "a file"))  # a results "folder" that is a file: said so, kept
    assert not window.panel.start() and "is a file: choose a folder" in window.panel.errorText()
    assert (tmp_path / "a file").read_text() == "kept"


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


def test_app_shows_the_analysis_of_a_results_folder(app, tmp_path):
    """A folder analysed by `analyze`: one sample holds an added disc (300 HU); the app draws
    method A's regions of the shown sample and method B's regions, with their numbers."""
    from InvarianceExplorerLib.analysis_folder import analyze_folder
    from InvarianceExplorerLib.result_folder import FILES, read_volume

    folder = tmp_path / "run"
    write_sample_folder(folder, make_volume((3, 64, 64)), (32, 32, 1), patch=48, count=6)
    stack = read_volume(folder / FILES["invariances"])
    rows, cols = np.mgrid[:48, :48]
    disc = (rows - 20) ** 2 + (cols - 26) ** 2 <= 36
    samples = stack.array.copy()
    samples[2][disc] += 300.0
    write_nrrd(stack, folder / FILES["invariances"], array=samples)
    x = read_volume(folder / FILES["input"]).array[0]
    null = x[None] + np.random.default_rng(1).normal(0.0, 20.0, (8, 48, 48)).astype(np.float32)
    analyze_folder(folder, null=null, null_source="given")

    window = MainWindow(tmp_path / "results")
    items = window.openResults(folder)
    view = window.view
    assert not view.analysisImages[0].isHidden() and not view.analysisImages[1].isHidden()
    assert any(label.startswith("analysis figure:") for label, _ in items)
    assert view.analysisCaptions[1].text().startswith("x with method B's significant regions (yellow):")
    view.sampleSlider.setValue(2)
    assert "rank 1 of 6" in view.analysisCaptions[0].text()
    image = view.analysisImages[0].pixmap().toImage().scaled(48, 48)
    red = [image.pixelColor(c, r) for r, c in zip(*np.nonzero(disc))]
    assert np.mean([p.red() > p.blue() + 60 for p in red]) > 0.8  # the added disc is drawn red
    view.sampleSlider.setValue(0)
    assert "0 regions" in view.analysisCaptions[0].text()
    # a folder without analysis hides the analysis views
    write_sample_folder(tmp_path / "plain", make_volume((3, 64, 64)), (32, 32, 1), patch=16, count=3)
    window.openResults(tmp_path / "plain")
    assert view.analysisImages[0].isHidden() and view.analysis is None


def test_a_damaged_or_foreign_folder_is_said_so_and_the_shown_result_kept(app, results, tmp_path, monkeypatch):
    """Opening a folder whose numbers.json lacks per-sample figures, or whose analysis/ is of
    another run, shows the error in the panel and keeps the result on screen (a traceback and
    a half-replaced view before); a sample without figures says so instead of keeping the last."""
    import json
    import shutil

    window = MainWindow(tmp_path / "results")
    window.openResults(results)
    shown = window.view.result
    damaged = tmp_path / "damaged"
    shutil.copytree(results, damaged)
    numbers = json.loads((damaged / "numbers.json").read_text())
    (damaged / "numbers.json").write_text(json.dumps({**numbers, "samples": [{"mean_abs_change_hu": 1.0}]}))
    monkeypatch.setattr(qt.QFileDialog, "getExistingDirectory", staticmethod(lambda *args: str(damaged)))
    window.browseOpenResults()
    assert "lacks a number" in window.panel.errorText() and window.view.result is shown
    (damaged / "numbers.json").write_text(json.dumps(numbers))
    analysis = damaged / "analysis"
    analysis.mkdir()
    (analysis / "analysis.json").write_text(json.dumps({"count": 3, "samples": []}))
    window.browseOpenResults()
    assert "belongs to another run" in window.panel.errorText() and window.view.result is shown
    shutil.rmtree(analysis)
    window.panel.seedSpin.setValue(7)
    window.panel.countSpin.setValue(9)
    window.panel.setDenoiser("redcnn")
    window.browseOpenResults()
    assert window.view.result.folder == damaged and not window.panel.errorText()
    # the run's settings are recalled, to sample it again (e.g. with another seed)
    recalled = window.panel.settings()
    assert (recalled["model"], recalled["count"], recalled["seed"]) == (numbers["model"], numbers["count"],
                                                                          numbers["seed"])
    assert list(window.center()) == numbers["center_ijk"]
    window.view.result.numbers["samples"] = window.view.result.numbers["samples"][:2]
    window.view.showSample(3)
    assert window.view.numbersLabel.text() == "numbers.json has no figures for this sample"
