"""The sampling panel under real Qt (PySide6 via Qt.py, offscreen), driving real engine
processes: button states, progress from a CLI subprocess, cancel, error display, one Show
button per output, rendering offscreen (the README's screenshot of the panel is taken after a
real sampling run, in test_ui_end_to_end.py).

The panel speaks the engine's JSON-lines protocol; these tests run ``invariance-explorer
denoise`` (same protocol, stage "denoising") with a tiny randomly initialised CNN-10.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from InvarianceExplorerLib.io import write_nrrd  # noqa: E402
from InvarianceExplorerLib.ui.panel import (ANALYSIS_STAGE_SPANS, CANCEL_TEXT, CUSTOM_MODEL,  # noqa: E402
                                            DEFAULT_COUNT, DENOISERS, RUN_TEXT, SamplingPanel, overall_percent)
from InvarianceExplorerLib.ui.process import EngineJob, engine_command, process_group_alive, sample_args  # noqa: E402
from InvarianceExplorerLib.ui.qtshim import application, prop, qt  # noqa: E402
from ui_helpers import make_model, make_volume, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app():
    return application()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model") / "cnn10")


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return write_nrrd(make_volume((3, 40, 40)), tmp_path_factory.mktemp("ct") / "ld.nrrd")


def denoise_job(model, ct, out, temp_dir, device="cpu", **kwargs):
    args = ["denoise", "--model", str(model), "--input", str(ct), "--output", str(out), "--device", device,
            "--batch-size", "1"]
    return EngineJob(args, temp_dir=temp_dir, **kwargs)


def test_panel_sections_defaults_and_custom_folder_row(app):
    panel = SamplingPanel()
    assert [prop(b, "title") for b in (panel.inputsBox, panel.samplingBox, panel.outputsBox)] == \
        ["Inputs", "Sampling", "Outputs"]
    combo = panel.denoiserCombo
    assert [combo.itemData(i) for i in range(combo.count())] == [n for n, _ in DENOISERS] + [CUSTOM_MODEL]
    assert combo.itemText(4) == "Custom model folder\u2026"
    assert [panel.deviceCombo.itemText(i) for i in range(panel.deviceCombo.count())] == ["Auto", "CPU", "CUDA"]
    assert panel.settings() == {"model": "cnn10", "count": DEFAULT_COUNT, "seed": 0, "device": "auto",
                                "refine": True, "analyze": False}
    panel.refineCheck.setChecked(False)
    assert panel.settings()["refine"] is False
    panel.refineCheck.setChecked(True)
    panel.analyzeCheck.setChecked(True)
    assert panel.settings()["analyze"] is True
    panel.analyzeCheck.setChecked(False)
    assert DEFAULT_COUNT == 32 and panel.runButton.text() == RUN_TEXT
    assert panel.customRow.isHidden() and panel.errorLabel.isHidden()
    panel.setDenoiser("/models/mine")
    assert not panel.customRow.isHidden()
    assert panel.settings()["model"] == "/models/mine"
    panel.customFolderEdit.setText("")
    assert not panel.start() and "model folder" in panel.errorText() and not panel.running
    panel.setDenoiser("dugan")
    assert panel.customRow.isHidden() and panel.settings()["model"] == "dugan"
    panel.markMissingDenoisers(ROOT / "Resources" / "Models")
    assert combo.itemText(0).startswith("CNN-10")
    # the stage spans of `sample` fill the bar in order
    assert overall_percent("loading", 0) == 0 and overall_percent("sampling", 0.5) == 51
    assert overall_percent("writing", 1.0) == 100 and overall_percent("denoising", 0.25) == 25
    # with the analysis, its stages follow the samples' and end the bar
    order = ["loading", "encoding", "sampling", "writing", "noise", "method A", "method B", "analysis writing"]
    ends = [overall_percent(stage, 1.0, ANALYSIS_STAGE_SPANS) for stage in order]
    assert ends == sorted(ends) and ends[-1] == 100 and overall_percent("writing", 1.0, ANALYSIS_STAGE_SPANS) < 100


def test_outputs_have_one_show_button_each(app):
    panel = SamplingPanel()
    assert panel.outputLabels() == [] and panel.outputButtons() == [] and not panel.outputsEmptyLabel.isHidden()
    shown = []
    panel.setOutputs([("x~ sequence", lambda: shown.append("x~")), ("std map", lambda: shown.append("std")),
                      ("figure.png (no viewer)", None)])
    assert panel.outputLabels() == ["x~ sequence", "std map", "figure.png (no viewer)"]
    buttons = panel.outputButtons()
    assert [b.text() for b in buttons] == ["Show"] * 3 and [b.isEnabled() for b in buttons] == [True, True, False]
    assert panel.outputsEmptyLabel.isHidden()
    buttons[1].click()
    buttons[0].click()
    buttons[2].click()
    assert shown == ["std", "x~"]
    # a new run's outputs replace the rows (no button of the old ones stays in the panel)
    panel.setOutputs([("f(x)", lambda: shown.append("f"))])
    app.processEvents()
    live = [b for b in panel.outputsBox.findChildren(qt.QPushButton) if b.text() == "Show" and b.isVisibleTo(panel)]
    assert live == panel.outputButtons() and len(live) == 1 and panel.outputLabels() == ["f(x)"]
    live[0].click()
    assert shown == ["std", "x~", "f"]
    panel.setOutputs([])
    assert panel.outputButtons() == [] and not panel.outputsEmptyLabel.isHidden()


def test_analysis_stages_move_the_bar_forward(app):
    panel = SamplingPanel()
    panel._spans = ANALYSIS_STAGE_SPANS
    values = []
    for stage in ("loading", "sampling", "writing", "noise", "method A", "writing"):
        panel._onStage({"event": "stage", "stage": stage})
        panel._onProgress({"event": "progress", "stage": stage, "fraction": 1.0, "done": 1, "total": 1})
        values.append(panel.progressBar.value())
    assert values == sorted(values) and values[-1] == 100 and values[2] < 100
    assert panel.statusLabel.text() == "Writing the analysis: 1 of 1"


def test_run_streams_progress_from_a_real_cli_process(app, model, ct, tmp_path):
    panel = SamplingPanel()
    picker = qt.QLineEdit(str(ct))
    panel.addInputRow("Input CT:", picker)
    assert panel.inputsForm.itemAt(0, qt.QFormLayout.FieldRole).widget() is picker
    out, temp = tmp_path / "denoised.nrrd", tmp_path / "job"
    seen, states = [], []
    panel.prepareJob = lambda settings: (seen.append(settings), temp.mkdir(), denoise_job(model, ct, out, temp))[-1]
    shown = []
    panel.collectResults = lambda outputs, job: [(f"{k}: {Path(v).name}", lambda: shown.append(k))
                                                 for k, v in outputs.items()]
    panel.onRunningChanged = states.append
    statuses = []
    original = panel._onProgress
    panel._onProgress = lambda e: (statuses.append(panel.progressBar.value()), original(e))
    panel.seedSpin.setValue(7)
    panel.runButton.click()
    assert panel.running and panel.runButton.text() == CANCEL_TEXT
    assert not panel.inputsBox.isEnabled() and not panel.countSpin.isEnabled()
    wait_until(lambda: not panel.running)
    assert seen == [{"model": "cnn10", "count": 32, "seed": 7, "device": "auto", "refine": True, "analyze": False}]
    assert panel.errorLabel.isHidden(), panel.errorText()
    assert panel.runButton.text() == RUN_TEXT and panel.inputsBox.isEnabled() and states == [True, False]
    assert panel.progressBar.value() == 100 and out.is_file() and not temp.exists()
    assert panel.lastEvent["event"] == "done" and panel.lastEvent["outputs"] == {"denoised": str(out)}
    assert panel.outputLabels() == ["denoised: denoised.nrrd"] and panel.outputButtons()[0].isEnabled()
    panel.outputButtons()[0].click()
    assert shown == ["denoised"]
    assert "denoised CT (cnn10" in panel.statusLabel.text()

    # it renders offscreen (the README's screenshot is of a real sampling run: test_ui_end_to_end.py)
    panel.resize(420, 640)
    panel.show()
    app.processEvents()
    shot = tmp_path / "panel.png"
    assert panel.grab().save(str(shot), "PNG") and shot.stat().st_size > 5000
    panel.close()


def test_cancel_kills_the_process_group_and_removes_the_temp_folder(app, model, tmp_path):
    # a long job: many slices, one per forward pass; a wrapper "python" first starts a child
    # (sleep) in the job's process group, so that cancel must stop more than one process
    ct = write_nrrd(make_volume((400, 96, 96)), tmp_path / "big.nrrd")
    pidfile = tmp_path / "child.pid"
    wrapper = tmp_path / "python-with-child"
    wrapper.write_text(f'#!/bin/sh\nsleep 600 &\necho $! > "{pidfile}"\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    out, temp = tmp_path / "out.nrrd", tmp_path / "job"
    temp.mkdir()
    (temp / "input.nrrd").write_bytes(b"exported input")
    job = denoise_job(model, ct, out, temp, python=str(wrapper))
    panel = SamplingPanel()
    panel.prepareJob = lambda settings: job
    cancelled = []
    panel.onCancelled = lambda: cancelled.append(True)
    assert panel.start()
    wait_until(lambda: panel.lastEvent is not None and panel.lastEvent["event"] == "progress", timeout=120)
    pgid = job.process.pid
    child = int(pidfile.read_text())
    assert process_group_alive(pgid) and panel.runButton.text() == CANCEL_TEXT
    panel.runButton.click()  # Cancel
    wait_until(lambda: not panel.running, timeout=20)
    assert cancelled == [True] and panel.runButton.text() == RUN_TEXT and panel.statusLabel.text() == "Cancelled"
    assert panel.errorLabel.isHidden() and panel.progressBar.value() == 0
    assert job.returncode is not None and not temp.exists() and not out.exists()
    deadline = time.monotonic() + 5
    while process_group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_group_alive(pgid), "a process of the job's group survived cancel"
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert panel.outputLabels() == []


def test_engine_errors_are_shown_and_the_panel_is_ready_again(app, model, ct, tmp_path):
    panel = SamplingPanel()
    temp = tmp_path / "job"
    # the engine reports a bad input on the protocol (kind "input") ...
    panel.prepareJob = lambda s: (temp.mkdir(), denoise_job(tmp_path, ct, tmp_path / "o.nrrd", temp))[-1]
    panel.start()
    wait_until(lambda: not panel.running)
    assert not panel.errorLabel.isHidden() and "not a denoiser model folder" in panel.errorText()
    assert panel.lastEvent["kind"] == "input" and panel.runButton.text() == RUN_TEXT and not temp.exists()
    assert panel.statusLabel.text() == "Failed" and panel.inputsBox.isEnabled()
    # ... a process that dies without a protocol line is reported from its exit status and stderr ...
    panel.prepareJob = lambda s: EngineJob(["no-such-command"])
    panel.runButton.click()
    wait_until(lambda: not panel.running)
    assert "exit status 2" in panel.errorText() and "invalid choice: 'no-such-command'" in panel.errorText()
    # ... and inputs that are not ready are explained before anything starts
    def not_ready(settings):
        raise ValueError("Place a point in the lung first.")
    panel.prepareJob = not_ready
    assert not panel.start() and panel.errorText() == "Place a point in the lung first." and not panel.running
    assert panel.runButton.text() == RUN_TEXT


def test_a_model_folder_whose_code_is_not_trusted_is_asked_about_then_trusted_and_run(app, ct, tmp_path):
    """The engine refuses a model folder whose code this machine does not trust (kind
    "untrusted"); the panel asks, and on yes has the engine trust it and runs again."""
    from imported_denoiser import changed_copy, imported_folder

    marker = tmp_path / "ran"
    theirs = changed_copy(imported_folder(tmp_path), tmp_path / "theirs", marker)
    panel, asked = SamplingPanel(), []
    panel.prepareJob = lambda s: denoise_job(theirs, ct, tmp_path / "o.nrrd", None)
    panel.confirmTrust = lambda message: asked.append(message) or False  # the user says no
    panel.start()
    wait_until(lambda: not panel.running, timeout=60)
    assert panel.lastEvent["kind"] == "untrusted" and panel.lastEvent["folder"] == str(theirs)
    assert len(asked) == 1 and f"{theirs} holds code that runs when it loads" in asked[0]
    assert asked[0] in panel.errorText() and not marker.exists() and not (tmp_path / "o.nrrd").exists()
    panel.confirmTrust = lambda message: asked.append(message) or True  # ... and now yes
    panel.start()
    wait_until(lambda: not panel.running and panel.lastEvent["event"] == "done", timeout=120)
    assert len(asked) == 2 and marker.exists() and (tmp_path / "o.nrrd").is_file() and not panel.errorText()


def test_engine_warnings_are_shown_as_notes(app, model, ct, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CUDA fall-back warning needs a machine without a GPU")
    panel = SamplingPanel()
    panel.prepareJob = lambda s: denoise_job(model, ct, tmp_path / "o.nrrd", None, device="cuda")
    assert panel.start()
    wait_until(lambda: not panel.running)
    assert panel.errorLabel.isHidden(), panel.errorText()
    assert "Note: device 'cuda' requested but no CUDA GPU is available; using the CPU" in panel.statusLabel.text()


def test_engine_command_runs_this_interpreter_outside_slicer():
    assert "slicer" not in sys.modules
    assert engine_command(["sample", "--count", 4]) == [sys.executable, "-m", "InvarianceExplorerLib", "sample",
                                                        "--count", "4"]
    job = EngineJob(["denoise"])
    assert job.command[-2:] == ["--progress", "json"]
    assert job.env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT / "InvarianceExplorer")


def test_sample_arguments_leave_the_batch_size_to_the_engine_unless_given():
    common = dict(model="cnn10", input_path="ct.nrrd", center_ijk=(4, 5, 6), count=32, seed=1, out_dir="out")
    args = sample_args(**common)
    assert "--batch-size" not in args and args[args.index("--center") + 1] == "4,5,6"
    given = sample_args(**common, batch_size=4)
    assert given[given.index("--batch-size") + 1] == "4"


def test_only_ui_uses_qt_and_importing_the_ui_does_not_import_torch():
    import ast
    import subprocess

    package = ROOT / "InvarianceExplorer" / "InvarianceExplorerLib"
    qt_names = ("Qt", "PySide6", "PySide2", "PyQt5", "PyQt6", "qt", "shiboken6")
    offenders = []
    for path in package.rglob("*.py"):
        if "ui" in path.relative_to(package).parts:
            continue
        tree = ast.parse(path.read_text())
        # the one entry into ui/: the `gui` command, importing the app when it runs
        allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                   and path.relative_to(package).as_posix() == "cli/admin.py" and f.name == "_cmd_gui"
                   for n in ast.walk(f)}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            level = getattr(node, "level", 0)
            for name in names:
                uses_ui = level > 0 and (name == "ui" or name.startswith("ui."))
                uses_qt = level == 0 and name.split(".")[0] in qt_names
                if (uses_ui or uses_qt) and id(node) not in allowed:
                    offenders.append(f"{path.name}:{node.lineno} imports {name}")
    assert not offenders, offenders
    code = ("import sys; import InvarianceExplorerLib.ui.app, InvarianceExplorerLib.ui.panel, "
            "InvarianceExplorerLib.result_folder; print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr
