"""``invariance-explorer gui``: the sampling panel as a standalone app (no 3D Slicer).

The window holds the panel (:class:`~.panel.SamplingPanel`) with file pickers (input CT,
results folder) and the centre voxel, and a results view: the input x, one sample x~_k,
f(x~_k) and the standard-deviation map, with a slider over the samples (lung window). When
the folder holds the analysis (``sample --analyze`` or ``analyze``), two more views show it:
x~_k with method A's altered regions of that sample (red: structure added, blue: removed)
and x with method B's significant regions (yellow), each with its numbers. It runs
``invariance-explorer sample`` in a child process and reads the folder it writes
(:mod:`..result_folder`, :func:`..analysis_folder.load_analysis`); "Open results…" shows a
folder written earlier.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..figures import LUNG_WINDOW, std_tile, std_top, window
from ..result_folder import SampleResult, load_result
from .panel import SamplingPanel
from .process import EngineJob, sample_args
from .qtshim import application, prop, qt

#: Views of the results: (title, volume name, stack?)
VIEWS = (("x (input crop)", "input", False), ("x~ (sample)", "invariances", True),
         ("f(x~)", "denoised_invariances", True), ("std of x~", "std", False))
#: Views of the analysis: (title, analysis labelmap, image it is drawn on)
ANALYSIS_VIEWS = (("x~ with method A's altered regions", "altered_regions", "invariances"),
                  ("x with method B's significant regions", "significant_regions", "input"))
#: Overlay colours (RGB) of the analysis labelmaps' values.
OVERLAY_COLOURS = {"altered_regions": {1: (255, 60, 60), 2: (70, 140, 255)}, "significant_regions": {1: (255, 220, 0)}}


def pixmap(array8: np.ndarray, size: int = 192):
    """A QPixmap of an 8-bit grey ``(H, W)`` or RGB ``(H, W, 3)`` array, scaled to ``size``
    pixels (nearest neighbour)."""
    data = np.ascontiguousarray(array8, dtype=np.uint8)
    h, w = data.shape[:2]
    rgb = data.ndim == 3
    image = qt.QImage(data.tobytes(), w, h, 3 * w if rgb else w,
                      qt.QImage.Format_RGB888 if rgb else qt.QImage.Format_Grayscale8).copy()
    return qt.QPixmap.fromImage(image).scaled(size, size, qt.Qt.KeepAspectRatio, qt.Qt.FastTransformation)


def image_label():
    """An empty black image view of at least 192 x 192 pixels."""
    image = qt.QLabel()
    image.setMinimumSize(192, 192)
    image.setAlignment(qt.Qt.AlignCenter)
    image.setStyleSheet("QLabel { background: black; }")
    return image


def overlay(grey8: np.ndarray, labels: np.ndarray, colours: dict, opacity: float = 0.45) -> np.ndarray:
    """``grey8`` as RGB with each labelled pixel blended towards its value's colour."""
    rgb = np.repeat(grey8[..., None], 3, axis=2).astype(np.float32)
    for value, colour in colours.items():
        mask = labels == value
        rgb[mask] = (1 - opacity) * rgb[mask] + opacity * np.asarray(colour, np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def unique_folder(parent: Path, name: str) -> Path:
    """``parent/name``, or ``parent/name-2``, ``-3``... if that exists (the CLI creates it whole)."""
    candidate, n = parent / name, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{name}-{n}"
    return candidate


class ResultsView(qt.QWidget):
    """The four image views and the slider over the samples of a :class:`SampleResult`."""

    def __init__(self, parent=None):
        qt.QWidget.__init__(self, parent)
        self.result: Optional[SampleResult] = None
        layout = qt.QVBoxLayout(self)
        self.titleLabel = qt.QLabel("No results yet: sample invariances, or open a results folder.")
        self.titleLabel.setWordWrap(True)
        layout.addWidget(self.titleLabel)
        grid = qt.QGridLayout()
        self.imageLabels: List = []
        self.captionLabels: List = []
        for index, (title, _, _) in enumerate(VIEWS):
            caption = qt.QLabel(title)
            self.captionLabels.append(caption)
            image = image_label()
            grid.addWidget(caption, 2 * (index // 2), index % 2)
            grid.addWidget(image, 2 * (index // 2) + 1, index % 2)
            self.imageLabels.append(image)
        self.analysisCaptions: List = []
        self.analysisImages: List = []
        for index, (title, _, _) in enumerate(ANALYSIS_VIEWS):
            caption = qt.QLabel(title)
            caption.setWordWrap(True)
            image = image_label()
            grid.addWidget(caption, 4, index)
            grid.addWidget(image, 5, index)
            self.analysisCaptions.append(caption)
            self.analysisImages.append(image)
        layout.addLayout(grid)
        self.analysis: Optional[dict] = None
        self._showAnalysisViews(False)
        row = qt.QHBoxLayout()
        self.sampleSlider = qt.QSlider(qt.Qt.Horizontal)
        self.sampleSlider.setEnabled(False)
        self.sampleLabel = qt.QLabel("sample -")
        row.addWidget(qt.QLabel("Sample:"))
        row.addWidget(self.sampleSlider, 1)
        row.addWidget(self.sampleLabel)
        layout.addLayout(row)
        self.numbersLabel = qt.QLabel("")
        self.numbersLabel.setWordWrap(True)
        layout.addWidget(self.numbersLabel)
        layout.addStretch(1)
        self.sampleSlider.valueChanged.connect(lambda *args: self.showSample(prop(self.sampleSlider, "value")))

    def _showAnalysisViews(self, shown: bool) -> None:
        for widget in self.analysisCaptions + self.analysisImages:
            widget.setVisible(shown)

    def setResult(self, result: SampleResult, analysis: Optional[dict] = None) -> None:
        """Show ``result``; ``analysis`` (:func:`..analysis_folder.load_analysis`) adds its views."""
        self.result = result
        self.analysis = analysis
        self._showAnalysisViews(analysis is not None)
        n = result.count
        numbers = result.numbers
        self.titleLabel.setText(f"{result.folder}: {n} samples, model {numbers.get('model', '?')}, "
                                f"centre voxel {numbers.get('center_ijk', '?')}, seed {numbers.get('seed', '?')}")
        self.sampleSlider.setRange(0, n - 1)
        self.sampleSlider.setEnabled(n > 1)
        for label, (_, name, stack) in zip(self.imageLabels, VIEWS):
            if not stack:
                self._show(label, name, 0)
        if analysis is not None:
            method_b = analysis["numbers"].get("method_b", {})
            caption = self.analysisCaptions[1]
            if method_b.get("skipped"):
                caption.setText(f"Method B not run: {method_b.get('reason', '').split(':')[0]} (analysis.json "
                                "says how to give one)")
            else:
                caption.setText(f"x with method B's significant regions (yellow): {method_b.get('region_count', 0)} "
                                f"regions, {method_b.get('flagged_area_mm2', 0.0):.1f} mm² at FDR "
                                f"{method_b.get('fdr_level', 0.05):g}")
            self._showOverlay(1, 0)
        self.sampleSlider.setValue(0)
        self.showSample(0)

    def _show(self, label, name: str, index: int) -> None:
        volume = self.result.volumes.get(name) if self.result else None
        if volume is None:
            label.clear()
            if name == "std":  # no scale of another folder's std map
                view = [n for _, n, _ in VIEWS].index(name)
                self.captionLabels[view].setText(f"{VIEWS[view][0]}: not in this folder")
            return
        array = volume.array[index]
        if name == "std":  # 0 .. the figures' top (99th percentile), said in the caption: it differs by run
            top = std_top(array)
            grey, _ = std_tile(array, top)
            view = [n for _, n, _ in VIEWS].index(name)
            self.captionLabels[view].setText(f"{VIEWS[view][0]} (black 0, white {top:.2g} HU)")
        else:
            grey = window(array, *LUNG_WINDOW)
        label.setPixmap(pixmap(grey))

    def _showOverlay(self, view: int, index: int) -> None:
        _, labels_name, image_name = ANALYSIS_VIEWS[view]
        label = self.analysisImages[view]
        image = self.result.volumes.get(image_name) if self.result else None
        labels = self.analysis.get(labels_name) if self.analysis else None
        if image is None:
            label.clear()
            return
        shown = window(image.array[index], *LUNG_WINDOW)
        if labels is not None:
            shown = overlay(shown, np.asarray(labels.array[index]), OVERLAY_COLOURS[labels_name])
        label.setPixmap(pixmap(shown))

    def showSample(self, index: int) -> None:
        if self.result is None:
            return
        for label, (_, name, stack) in zip(self.imageLabels, VIEWS):
            if stack:
                self._show(label, name, index)
        if self.analysis is not None:
            self._showOverlay(0, index)
            scores = {s["index"]: s for s in self.analysis["numbers"].get("samples", [])}.get(index)
            self.analysisCaptions[0].setText(
                f"x~ with method A's altered regions (red: added, blue: removed): rank {scores['rank']} of "
                f"{self.result.count}, {scores['region_count']} regions, {scores['area_mm2']:.1f} mm², "
                f"peak |ΔHU| {scores['peak_abs_hu']:.0f}" if scores else
                "x~ with method A's altered regions: analysis.json has no scores for this sample")
        samples = {s["index"]: s for s in self.result.numbers.get("samples", [])}
        sample = samples.get(index, {})
        self.sampleLabel.setText(f"x~{index} ({index + 1} / {self.result.count})")
        self.numbersLabel.setText(f"mean |x~ - x| = {sample['mean_abs_change_hu']:.1f} HU, "
                                  f"mean |f(x~) - f(x)| = {sample['mean_abs_output_change_hu']:.2f} HU; "
                                  f"consistency {_number(self.result.numbers.get('consistency'))}" if sample else
                                  "numbers.json has no figures for this sample")


class MainWindow(qt.QMainWindow):
    """The standalone app: panel with file pickers on the left, results on the right."""

    def __init__(self, results_dir: Optional[os.PathLike] = None, models_dir=None):
        qt.QMainWindow.__init__(self)
        self.setWindowTitle("Invariance Explorer")
        self.panel = SamplingPanel(models_dir=models_dir)
        self.inputEdit = qt.QLineEdit()
        self.inputEdit.setPlaceholderText("low-dose CT: NRRD / NIfTI / MHA file or DICOM folder")
        self.panel.addInputRow("Input CT:", self._withBrowse(self.inputEdit, self.browseInput))
        centre = qt.QWidget()
        centreLayout = qt.QHBoxLayout(centre)
        centreLayout.setContentsMargins(0, 0, 0, 0)
        self.centerSpins = []
        for axis in "ijk":
            spin = qt.QSpinBox()
            spin.setRange(0, 100000)
            spin.setPrefix(f"{axis} ")
            centreLayout.addWidget(spin)
            self.centerSpins.append(spin)
        self.panel.addInputRow("Centre voxel:", centre)
        self.resultsEdit = qt.QLineEdit(os.fspath(results_dir or Path("results") / "gui"))
        self.panel.addInputRow("Results folder:", self._withBrowse(self.resultsEdit, self.browseResults))
        self.openButton = qt.QPushButton("Open results\u2026")
        self.openButton.clicked.connect(lambda *args: self.browseOpenResults())
        self.panel.outputsBox.layout().addWidget(self.openButton)
        self.panel.prepareJob = self.prepareJob
        self.panel.collectResults = self.collectResults
        self.view = ResultsView()
        splitter = qt.QSplitter()
        splitter.addWidget(self.panel)
        splitter.addWidget(self.view)
        self.setCentralWidget(splitter)
        self.outDir: Optional[Path] = None

    def _withBrowse(self, edit, callback):
        row = qt.QWidget()
        layout = qt.QHBoxLayout(row)
        layout.setContentsMargins(0, 0, 0, 0)
        button = qt.QPushButton("Browse\u2026")
        button.clicked.connect(lambda *args: callback())
        layout.addWidget(edit)
        layout.addWidget(button)
        return row

    def browseInput(self) -> None:
        path, _ = qt.QFileDialog.getOpenFileName(self, "Low-dose CT", prop(self.inputEdit, "text"),
                                                 "CT images (*.nrrd *.nhdr *.nii *.nii.gz *.mha *.mhd *.dcm);;All (*)")
        if path:
            self.inputEdit.setText(path)

    def browseResults(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self, "Results folder", prop(self.resultsEdit, "text"))
        if folder:
            self.resultsEdit.setText(folder)

    def browseOpenResults(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self, "Open a sample results folder", prop(self.resultsEdit, "text"))
        if folder:
            try:
                self.openResults(folder)
            except (ValueError, OSError) as exc:  # a damaged or foreign folder: say so, keep what is shown
                self.panel.showError(str(exc))
            else:
                self.recallSettings(self.view.result.numbers)

    def recallSettings(self, numbers: dict) -> None:
        """Set the inputs to those of an opened run (numbers.json: its CT where that still
        exists, centre voxel, denoiser, count and seed), so that it can be sampled again,
        e.g. with another seed."""
        source = Path(str(numbers.get("input", "")))
        if numbers.get("input") and source.exists():
            self.inputEdit.setText(os.fspath(source))
        centre = numbers.get("center_ijk")
        if isinstance(centre, list) and len(centre) == 3:
            self.setCenter(*centre)
        if numbers.get("model"):
            self.panel.setDenoiser(str(numbers["model"]))
        for spin, key in ((self.panel.countSpin, "count"), (self.panel.seedSpin, "seed")):
            if isinstance(numbers.get(key), int):
                spin.setValue(numbers[key])

    def setCenter(self, i: int, j: int, k: int) -> None:
        for spin, value in zip(self.centerSpins, (i, j, k)):
            spin.setValue(int(value))

    def center(self):
        return tuple(int(prop(s, "value")) for s in self.centerSpins)

    def prepareJob(self, settings: dict) -> EngineJob:
        source = Path(prop(self.inputEdit, "text").strip())
        if not prop(self.inputEdit, "text").strip() or not source.exists():
            raise ValueError("Choose the input CT (a NRRD/NIfTI/MHA file or a DICOM folder).")
        root = Path(prop(self.resultsEdit, "text").strip() or "results/gui")
        if root.exists() and not root.is_dir():
            raise ValueError(f"The results folder {root} is a file: choose a folder.")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"The results folder {root} cannot be made ({exc.strerror}): choose another.") from None
        i, j, k = self.center()
        stem = source.name.split(".")[0] or "ct"
        self.outDir = unique_folder(root, f"{stem}_{i}-{j}-{k}_seed{settings['seed']}_n{settings['count']}")
        args = sample_args(model=settings["model"], input_path=source, center_ijk=(i, j, k),
                           count=settings["count"], seed=settings["seed"], device=settings["device"],
                           out_dir=self.outDir, analyze=settings.get("analyze", False),
                           refine=settings.get("refine", True))
        return EngineJob(args, remove_on_cancel=[self.outDir])

    def collectResults(self, outputs: dict, job) -> list:
        folder = Path(outputs["numbers"]).parent if "numbers" in outputs else self.outDir
        return self.openResults(folder)

    def openResults(self, folder) -> list:
        """Show a sample results folder; return the panel's output items."""
        from ..analysis_folder import ANALYSIS_DIR, ANALYSIS_FILES, load_analysis

        result = load_result(folder)
        analysis = load_analysis(result.folder) if (result.folder / ANALYSIS_DIR / ANALYSIS_FILES["numbers"]).is_file() \
            else None
        self.view.setResult(result, analysis)
        self.panel.clearError()
        items = [(f"{name}: {Path(path).name}", lambda p=path: open_file(p)) for name, path in
                 sorted((n, str(result.folder / f)) for n, f in _present_files(result.folder))]
        if analysis is not None:
            items += [(f"analysis {name}: {file}", lambda p=str(result.folder / ANALYSIS_DIR / file): open_file(p))
                      for name, file in ANALYSIS_FILES.items() if (result.folder / ANALYSIS_DIR / file).is_file()]
        self.panel.setOutputs(items)
        return items


def _number(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "?"


def open_file(path) -> bool:
    """Open ``path`` with the desktop's program for its kind (e.g. the PNG figure)."""
    return bool(qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(os.fspath(path))))


def _present_files(folder: Path):
    from ..result_folder import FILES

    return [(name, file) for name, file in FILES.items() if (folder / file).is_file()]


def main(results_dir=None, open_folder=None, input_path=None) -> int:
    """Run the app until its window is closed."""
    from ..denoisers import bundled_models_dir  # (imports torch: fine in the app, not at import of ui/)

    app = application()
    window = MainWindow(results_dir, models_dir=bundled_models_dir())
    if input_path:
        window.inputEdit.setText(os.fspath(input_path))
    if open_folder:
        window.openResults(open_folder)
    window.resize(1100, 700)
    window.show()
    return int(app.exec() if hasattr(app, "exec") else app.exec_())
