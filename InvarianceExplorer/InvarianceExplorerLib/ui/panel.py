"""The sampling panel: one Qt widget for 3D Slicer and for the standalone app.

Sections:

* **Inputs** — rows the host plugs in (Slicer: a volume selector and a markups point;
  standalone: file pickers), then the denoiser: the four bundled ones or a custom model
  folder.
* **Sampling** — sample count (default 32), seed, device (auto / CPU / CUDA), whether to
  analyse the samples for anatomy changes (``sample --analyze``), the "Sample invariances"
  button (it reads "Cancel" while a job runs), a progress bar and a message per stage, and
  the error of the last run.
* **Outputs** — what the last run created, one row each with its own "Show" button.

The panel knows the engine only through its JSON-lines protocol: the host sets
``prepareJob(settings) -> EngineJob`` (export the input, build the CLI arguments; raise
``ValueError`` with a message for the user when the inputs are not ready) and
``collectResults(outputs, job) -> [(label, show_callable or None), ...]`` (read the output
files back, e.g. into Slicer nodes); the panel starts the job in a child process
(:class:`~.process.ProcessRunner`), shows its stages, and lets the user cancel it.
Written against Qt class names that PythonQt and PySide6 share (see :mod:`.qtshim`).
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

from .process import EngineJob, ProcessRunner, engine_command
from .qtshim import prop, qt

#: The bundled denoisers: (CLI name, label).
DENOISERS: Tuple[Tuple[str, str], ...] = (("cnn10", "CNN-10"), ("redcnn", "RED-CNN"), ("wganvgg", "WGAN-VGG"),
                                          ("dugan", "DU-GAN"))
#: Combo entry for a user's own model folder.
CUSTOM_MODEL = "custom"
CUSTOM_MODEL_LABEL = "Custom model folder\u2026"
#: Devices: (CLI value, label).
DEVICES: Tuple[Tuple[str, str], ...] = (("auto", "Auto"), ("cpu", "CPU"), ("cuda", "CUDA"))
DEFAULT_COUNT = 32
MAX_COUNT = 1024

RUN_TEXT = "Sample invariances"
CANCEL_TEXT = "Cancel"

#: Share of the progress bar (start %, end %) of the ``sample`` command's stages.
STAGE_SPANS = {"loading": (0, 5), "encoding": (5, 10), "sampling": (10, 92), "writing": (92, 100)}
#: The same for ``sample --analyze``: the analysis's stages follow; its "writing" stage is
#: called "analysis writing" here (the panel renames it once an analysis stage was seen).
ANALYSIS_STAGE_SPANS = {"loading": (0, 5), "encoding": (5, 10), "sampling": (10, 75), "writing": (75, 80),
                        "noise": (80, 84), "simulating": (84, 86), "posterior": (84, 86), "method A": (86, 93),
                        "method B": (93, 97), "analysis writing": (97, 100)}
#: Stages of the analysis (after them, "writing" is the analysis's).
ANALYSIS_STAGES = ("noise", "simulating", "posterior", "method A", "method B")
#: Status text of a stage whose event has no message.
STAGE_TEXT = {"loading": "Loading the denoiser and the invariance networks", "encoding": "Encoding the input",
              "sampling": "Sampling invariances", "writing": "Writing the results", "denoising": "Denoising",
              "noise": "Measuring noise", "method A": "Method A: structure change per invariance",
              "method B": "Method B: ensemble test", "analysis writing": "Writing the analysis"}
SHOW_TEXT = "Show"


def bundled_denoiser_available(name: str, models_dir) -> bool:
    """True if the bundled denoiser ``name`` has weights in ``models_dir`` (``Resources/Models``)."""
    return models_dir is not None and os.path.isfile(os.path.join(os.fspath(models_dir), name, "metadata.json"))


def overall_percent(stage: str, fraction: float, spans=None) -> int:
    """Progress bar value (0-100) for ``fraction`` (0-1) of ``stage`` (see :data:`STAGE_SPANS`;
    :data:`ANALYSIS_STAGE_SPANS` for a run with the analysis)."""
    start, end = (STAGE_SPANS if spans is None else spans).get(stage, (0, 100))
    return int(round(start + (end - start) * min(max(float(fraction), 0.0), 1.0)))


class SamplingPanel(qt.QWidget):
    """The panel (see the module docstring). Callbacks set by the host:

    * ``prepareJob(settings: dict) -> EngineJob`` (required),
    * ``collectResults(outputs: dict, job: EngineJob) -> list of (label, callable or None)``,
    * ``onCancelled()`` and ``onRunningChanged(running: bool)`` (optional).

    ``settings`` holds ``model`` (bundled name or folder), ``count``, ``seed``, ``device``,
    ``refine`` (bool: the model folder's consistency refinement, or none) and ``analyze`` (bool).
    """

    def __init__(self, parent=None, models_dir=None):
        qt.QWidget.__init__(self, parent)
        self.prepareJob: Optional[Callable[[dict], EngineJob]] = None
        self.collectResults: Optional[Callable[[dict, EngineJob], Sequence]] = None
        self.onCancelled: Optional[Callable[[], None]] = None
        self.onRunningChanged: Optional[Callable[[bool], None]] = None
        #: Asked (with the engine's message) whether to trust a model folder's code; default: a dialog.
        self.confirmTrust: Callable[[str], bool] = self._askTrust
        self.runner = ProcessRunner()
        self.job: Optional[EngineJob] = None
        self.lastEvent: Optional[dict] = None
        self._outputCallbacks: List[Optional[Callable[[], None]]] = []
        self._outputLabels: List[str] = []
        self._outputButtons: List = []
        self._spans = STAGE_SPANS
        self._analysisStarted = False

        layout = qt.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)

        # Inputs
        self.inputsBox = qt.QGroupBox("Inputs")
        self.inputsForm = qt.QFormLayout(self.inputsBox)
        self.denoiserCombo = qt.QComboBox()
        for name, label in DENOISERS:
            self.denoiserCombo.addItem(label, name)
        self.denoiserCombo.addItem(CUSTOM_MODEL_LABEL, CUSTOM_MODEL)
        self.denoiserCombo.setToolTip("The low-dose CT denoiser f whose invariances are sampled")
        self.inputsForm.addRow("Denoiser:", self.denoiserCombo)
        self.customFolderEdit = qt.QLineEdit()
        self.customFolderEdit.setPlaceholderText("model folder (metadata.json, weights, cVAE, cINN)")
        self.customBrowseButton = qt.QPushButton("Browse\u2026")
        self.customRow = qt.QWidget()
        customLayout = qt.QHBoxLayout(self.customRow)
        customLayout.setContentsMargins(0, 0, 0, 0)
        customLayout.addWidget(self.customFolderEdit)
        customLayout.addWidget(self.customBrowseButton)
        self.customLabel = qt.QLabel("Model folder:")
        self.inputsForm.addRow(self.customLabel, self.customRow)
        layout.addWidget(self.inputsBox)

        # Sampling
        self.samplingBox = qt.QGroupBox("Sampling")
        form = qt.QFormLayout(self.samplingBox)
        self.countSpin = qt.QSpinBox()
        self.countSpin.setRange(1, MAX_COUNT)
        self.countSpin.setValue(DEFAULT_COUNT)
        self.countSpin.setToolTip("Number of invariances x~ to sample")
        form.addRow("Samples:", self.countSpin)
        self.seedSpin = qt.QSpinBox()
        self.seedSpin.setRange(0, 2 ** 31 - 1)
        self.seedSpin.setToolTip("Random seed: the same seed gives the same samples")
        form.addRow("Seed:", self.seedSpin)
        self.deviceCombo = qt.QComboBox()
        for value, label in DEVICES:
            self.deviceCombo.addItem(label, value)
        self.deviceCombo.setToolTip("Auto uses a CUDA GPU when there is one; CPU forces the CPU")
        form.addRow("Device:", self.deviceCombo)
        self.refineCheck = qt.QCheckBox("Refine towards f(x)")
        self.refineCheck.setChecked(True)
        self.refineCheck.setToolTip("The model folder's consistency refinement (the bundled models': 5 gradient "
                                    "steps on the flow's centre, 1 per sample) moves each invariance towards "
                                    "f(x~) = f(x); off: the samples as drawn (faster; most miss the consistency "
                                    "bar, README)")
        form.addRow("Refinement:", self.refineCheck)
        self.analyzeCheck = qt.QCheckBox("Find anatomy changes")
        self.analyzeCheck.setToolTip("After sampling, flag the invariances that change anatomy rather than noise "
                                     "(method A per invariance; method B when a noise-only ensemble is at hand); "
                                     "the flagged regions are listed in Outputs")
        form.addRow("Analysis:", self.analyzeCheck)
        self.runButton = qt.QPushButton(RUN_TEXT)
        self.runButton.setToolTip("Sample images that the denoiser maps to the same output as the input")
        form.addRow(self.runButton)
        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 100)
        self.progressBar.setValue(0)
        form.addRow(self.progressBar)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.setWordWrap(True)
        form.addRow(self.statusLabel)
        self.errorLabel = qt.QLabel("")
        self.errorLabel.setWordWrap(True)
        self.errorLabel.setStyleSheet("QLabel { color: #c0392b; }")
        self.errorLabel.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)
        self.errorLabel.setVisible(False)
        form.addRow(self.errorLabel)
        layout.addWidget(self.samplingBox)

        # Outputs: one row per output, each with its own Show button (rebuilt by setOutputs)
        self.outputsBox = qt.QGroupBox("Outputs")
        self.outputsLayout = qt.QVBoxLayout(self.outputsBox)
        self.outputsEmptyLabel = qt.QLabel("Nothing yet: what a run creates is listed here.")
        self.outputsLayout.addWidget(self.outputsEmptyLabel)
        self.outputsRows = qt.QWidget()
        qt.QGridLayout(self.outputsRows).setContentsMargins(0, 0, 0, 0)
        self.outputsLayout.addWidget(self.outputsRows)
        layout.addWidget(self.outputsBox)
        layout.addStretch(1)

        self.denoiserCombo.currentIndexChanged.connect(lambda *args: self._updateCustomRow())
        self.customBrowseButton.clicked.connect(lambda *args: self.browseCustomFolder())
        self.runButton.clicked.connect(lambda *args: self.onRunClicked())
        self.markMissingDenoisers(models_dir)
        self._updateCustomRow()

    # ------------------------------------------------------------------ inputs and settings

    def addInputRow(self, label: str, widget) -> None:
        """Put a host's input widget (volume selector, file picker, point) above the denoiser."""
        self.inputsForm.insertRow(self._hostRows(), label, widget)

    def _hostRows(self) -> int:
        return self.inputsForm.rowCount() - 2  # denoiser and custom-folder rows stay last

    def markMissingDenoisers(self, models_dir) -> None:
        """Label bundled denoisers without weights in ``models_dir`` as such (they stay selectable:
        the engine then explains how to get them)."""
        if models_dir is None:
            return
        for index, (name, label) in enumerate(DENOISERS):
            missing = not bundled_denoiser_available(name, models_dir)
            self.denoiserCombo.setItemText(index, f"{label} (no weights yet)" if missing else label)

    def _updateCustomRow(self) -> None:
        custom = prop(self.denoiserCombo, "currentData") == CUSTOM_MODEL
        self.customRow.setVisible(custom)
        self.customLabel.setVisible(custom)

    def browseCustomFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self, "Denoiser model folder", prop(self.customFolderEdit, "text"))
        if folder:
            self.customFolderEdit.setText(folder)

    def setDenoiser(self, model: str) -> None:
        """Select a bundled denoiser by name, or a custom model folder by path."""
        names = [name for name, _ in DENOISERS]
        if model in names:
            self.denoiserCombo.setCurrentIndex(names.index(model))
        else:
            self.denoiserCombo.setCurrentIndex(len(names))
            self.customFolderEdit.setText(os.fspath(model))

    def settings(self) -> dict:
        """The sampling settings: ``model``, ``count``, ``seed``, ``device``, ``refine``, ``analyze``."""
        model = prop(self.denoiserCombo, "currentData")
        if model == CUSTOM_MODEL:
            model = prop(self.customFolderEdit, "text").strip()
        return {"model": model, "count": int(prop(self.countSpin, "value")), "seed": int(prop(self.seedSpin, "value")),
                "device": prop(self.deviceCombo, "currentData"), "refine": bool(self.refineCheck.isChecked()),
                "analyze": bool(self.analyzeCheck.isChecked())}

    # ------------------------------------------------------------------ running

    @property
    def running(self) -> bool:
        return self.job is not None

    def onRunClicked(self) -> None:
        if self.running:
            self.cancel()
        else:
            self.start()

    def start(self) -> bool:
        """Prepare and start a job; show the reason in the panel and return False if it cannot start."""
        if self.running:
            return False
        self.clearError()
        settings = self.settings()
        if not settings["model"]:
            self.showError("Choose the custom denoiser's model folder, or a bundled denoiser.")
            return False
        if self.prepareJob is None:
            self.showError("Nothing to run: the panel has no host.")
            return False
        try:
            job = self.prepareJob(settings)
        except (ValueError, RuntimeError, OSError) as exc:
            self.showError(str(exc))
            return False
        self.setOutputs([])
        self.runner.onStage = self._onStage
        self.runner.onProgress = self._onProgress
        self.runner.onDone = self._onDone
        self.runner.onError = self._onError
        self.runner.onCancelled = self._onCancelled
        self.job = job
        self._spans = ANALYSIS_STAGE_SPANS if settings["analyze"] else STAGE_SPANS
        self._analysisStarted = False
        self.progressBar.setValue(0)
        self.statusLabel.setText("Starting the engine\u2026")
        self._setRunning(True)
        try:
            self.runner.start(job)
        except OSError as exc:
            self.job = None
            self._setRunning(False)
            job.cleanup()
            self.showError(f"Could not start the engine: {exc}")
            return False
        return True

    def cancel(self) -> None:
        """Kill the running job (and its child processes); nothing is read back."""
        if self.running:
            self.statusLabel.setText("Cancelling\u2026")
            self.runner.cancel()

    def _setRunning(self, running: bool) -> None:
        self.runButton.setText(CANCEL_TEXT if running else RUN_TEXT)
        self.runButton.setToolTip("Stop sampling; the scene stays as it was" if running else
                                  "Sample images that the denoiser maps to the same output as the input")
        for widget in (self.inputsBox, self.countSpin, self.seedSpin, self.deviceCombo, self.refineCheck,
                       self.analyzeCheck):
            widget.setEnabled(not running)
        if self.onRunningChanged is not None:
            self.onRunningChanged(running)

    def _stage(self, event: dict) -> str:
        """The event's stage, with the analysis's "writing" told apart from the samples'."""
        stage = event.get("stage", "")
        if stage in ANALYSIS_STAGES:
            self._analysisStarted = True
        return "analysis writing" if stage == "writing" and self._analysisStarted else stage

    def _onStage(self, event: dict) -> None:
        stage = self._stage(event)
        self.progressBar.setValue(overall_percent(stage, 0.0, self._spans))
        self.statusLabel.setText(event.get("message") or STAGE_TEXT.get(stage, stage))
        self.lastEvent = event

    def _onProgress(self, event: dict) -> None:
        stage = self._stage(event)
        self.progressBar.setValue(overall_percent(stage, event.get("fraction", 0.0), self._spans))
        text = STAGE_TEXT.get(stage, stage.capitalize())
        self.statusLabel.setText(f"{text}: {event.get('done', 0)} of {event.get('total', 0)}")
        self.lastEvent = event

    def _onDone(self, event: dict) -> None:
        job, self.job = self.job, None
        self.lastEvent = event
        try:
            self.statusLabel.setText("Reading the results\u2026")
            items = self.collectResults(event.get("outputs", {}), job) if self.collectResults else \
                [(f"{name}: {path}", None) for name, path in event.get("outputs", {}).items()]
        except Exception as exc:  # reading back failed: tell the user, keep the GUI alive
            self._setRunning(False)
            self.showError(f"The results could not be read back: {exc}")
            self.statusLabel.setText("")
            return
        finally:
            if job is not None:
                job.cleanup()
        self.setOutputs(items)
        self.progressBar.setValue(100)
        notes = job.warnings() if job is not None else []
        self.statusLabel.setText("\n".join([event.get("message") or "Done"] + [f"Note: {w}" for w in notes]))
        self._setRunning(False)

    def _onError(self, event: dict) -> None:
        job, self.job = self.job, None
        self.lastEvent = event
        if job is not None:
            job.cleanup()
        self._setRunning(False)
        self.statusLabel.setText("Failed")
        self.showError(event.get("message", "The engine failed"))
        if event.get("kind") == "untrusted" and event.get("folder") and job is not None:
            self._trustAndRestart(job, event)

    def _askTrust(self, message: str) -> bool:
        answer = qt.QMessageBox.question(self, "Trust this denoiser's code?",
                                         f"{message}\n\nTrust its code and sample again?",
                                         qt.QMessageBox.Yes | qt.QMessageBox.No, qt.QMessageBox.No)
        return answer == qt.QMessageBox.Yes

    def _trustAndRestart(self, job: EngineJob, event: dict) -> None:
        """The user's answer to an untrusted model folder: if yes, the engine records the trust
        (``trust FOLDER``, with the job's interpreter and environment) and sampling starts again."""
        import subprocess

        if not self.confirmTrust(event["message"]):
            return
        command = engine_command(["trust", event["folder"]], python=job.command[0])  # the job's interpreter
        try:
            done = subprocess.run(command, env=job.env, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            self.showError(f"Could not trust {event['folder']}: {exc}")
            return
        if done.returncode != 0:
            self.showError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                           f"Could not trust {event['folder']} (exit status {done.returncode})")
            return
        self.start()

    def _onCancelled(self, event: dict) -> None:
        self.job = None
        self.lastEvent = event
        self._setRunning(False)
        self.progressBar.setValue(0)
        self.statusLabel.setText("Cancelled")
        if self.onCancelled is not None:
            self.onCancelled()

    # ------------------------------------------------------------------ messages and outputs

    def showError(self, message: str) -> None:
        self.errorLabel.setText(message)
        self.errorLabel.setVisible(True)

    def clearError(self) -> None:
        self.errorLabel.setText("")
        self.errorLabel.setVisible(False)

    def errorText(self) -> str:
        return prop(self.errorLabel, "text")

    def setOutputs(self, items: Sequence) -> None:
        """List ``(label, show_callable or None)`` items in Outputs: one row each, with a "Show"
        button that calls it (disabled when it is None)."""
        self.outputsLayout.removeWidget(self.outputsRows)
        self.outputsRows.hide()
        self.outputsRows.deleteLater()
        self.outputsRows = qt.QWidget()
        grid = qt.QGridLayout(self.outputsRows)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setColumnStretch(0, 1)
        self.outputsLayout.insertWidget(1, self.outputsRows)
        self._outputLabels, self._outputCallbacks, self._outputButtons = [], [], []
        for row, (label, callback) in enumerate(items):
            text = qt.QLabel(label)
            text.setWordWrap(True)
            button = qt.QPushButton(SHOW_TEXT)
            button.setToolTip(f"Show {label} in the views")
            button.setEnabled(callback is not None)
            button.clicked.connect(lambda *args, index=row: self.showOutput(index))
            grid.addWidget(text, row, 0)
            grid.addWidget(button, row, 1)
            self._outputLabels.append(label)
            self._outputCallbacks.append(callback)
            self._outputButtons.append(button)
        self.outputsEmptyLabel.setVisible(not items)

    def outputLabels(self) -> List[str]:
        return list(self._outputLabels)

    def outputButtons(self) -> List:
        """The "Show" buttons of the outputs, in the order of :meth:`outputLabels`."""
        return list(self._outputButtons)

    def showOutput(self, index: int) -> None:
        """Show output ``index`` (what its "Show" button does)."""
        if 0 <= index < len(self._outputCallbacks) and self._outputCallbacks[index] is not None:
            self._outputCallbacks[index]()
