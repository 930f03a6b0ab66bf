"""Shared by the panel, app and Slicer-layer tests: a tiny real denoiser folder, a CT volume
with a non-trivial geometry, a results folder in the layout of ``invariance-explorer sample``,
and a Qt event-loop wait."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from InvarianceExplorerLib.image import CTImage
from InvarianceExplorerLib.io import write_nrrd
from InvarianceExplorerLib.result_folder import FILES

#: An oblique, anisotropic volume geometry (LPS), so that LPS/RAS and index-order mistakes show.
_angle = np.deg2rad(20.0)
DIRECTION = (np.cos(_angle), -np.sin(_angle), 0.0, np.sin(_angle), np.cos(_angle), 0.0, 0.0, 0.0, 1.0)
SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-120.0, -90.5, 33.0)


def screenshot_path(name: str, tmp_path: Path) -> Path:
    """Where a test saves its screenshot: ``tmp_path``, or the folder named by the environment
    variable ``INVARIANCE_EXPLORER_SCREENSHOTS`` (``docs`` refreshes the README's images:
    ``INVARIANCE_EXPLORER_SCREENSHOTS=docs make test``)."""
    folder = Path(os.environ.get("INVARIANCE_EXPLORER_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def make_model(folder: Path) -> Path:
    """A randomly initialised CNN-10 saved as a model folder (the engine's real loader reads it)."""
    import torch

    from InvarianceExplorerLib.denoisers import CNN10, save_denoiser
    from InvarianceExplorerLib.normalization import PAPER_NORMALIZATION

    torch.manual_seed(0)
    return save_denoiser(folder, CNN10(), "cnn10", {}, PAPER_NORMALIZATION, {"patch_size": 64})


def make_volume(shape=(4, 48, 56), seed=0) -> CTImage:
    """A small CT volume in HU (z, y, x) with the geometry above."""
    rng = np.random.default_rng(seed)
    array = rng.normal(-700.0, 60.0, shape).astype(np.float32)
    return CTImage(array, SPACING, ORIGIN, DIRECTION)


def crop_image(volume: CTImage, center_ijk, patch: int) -> CTImage:
    """The one-slice crop of side ``patch`` centred at voxel (i, j, k), with its own origin (LPS)."""
    i, j, k = center_ijk
    i0, j0 = i - patch // 2, j - patch // 2
    array = volume.array[k, j0:j0 + patch, i0:i0 + patch][None]
    step = volume.direction_matrix * np.asarray(volume.spacing)[None, :]
    origin = np.asarray(volume.origin) + step @ np.array([i0, j0, k], float)
    return CTImage(array, volume.spacing, tuple(origin), volume.direction)


def write_sample_folder(out: Path, volume: CTImage, center_ijk, patch=16, count=5, seed=0, model="cnn10") -> dict:
    """Write ``out`` in the layout of ``invariance-explorer sample`` (see result_folder.py):
    deterministic stand-in values, the geometry as the engine writes it. Returns the outputs."""
    rng = np.random.default_rng(seed)
    crop = crop_image(volume, center_ijk, patch)
    x = crop.array
    samples = x[0][None] + rng.normal(0, 20.0, (count, patch, patch)).astype(np.float32)
    denoised = x * 0.5 - 350.0
    stack = CTImage(samples, crop.spacing, crop.origin, crop.direction)
    outputs = {
        "input": write_nrrd(crop, out / FILES["input"]),
        "denoised": write_nrrd(crop, out / FILES["denoised"], array=denoised),
        "reconstruction": write_nrrd(crop, out / FILES["reconstruction"], array=x + 1.0),
        "invariances": write_nrrd(stack, out / FILES["invariances"]),
        "denoised_invariances": write_nrrd(stack, out / FILES["denoised_invariances"],
                                           array=samples * 0.5 - 350.0),
        "std": write_nrrd(crop, out / FILES["std"], array=samples.std(axis=0)[None]),
    }
    numbers = {"model": model, "input": "input", "center_ijk": list(center_ijk), "patch_size": patch,
               "count": count, "seed": seed, "device": "cpu",
               "samples": [{"index": k, "mean_abs_change_hu": float(np.abs(samples[k] - x[0]).mean()),
                            "mean_abs_output_change_hu": 0.1 * k} for k in range(count)],
               "consistency": 0.5, "seconds": 1.0}
    (out / FILES["numbers"]).write_text(json.dumps(numbers))
    outputs["numbers"] = str(out / FILES["numbers"])
    return outputs


def wait_until(condition, timeout=90.0, app=None):
    """Run the Qt event loop until ``condition()`` is true; AssertionError after ``timeout`` s."""
    from InvarianceExplorerLib.ui.qtshim import application

    app = app or application()
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        app.processEvents()
        time.sleep(0.01)


def write_analysis_folder(sample_folder: Path, altered: np.ndarray, significant=None) -> Path:
    """Write ``sample_folder/analysis/`` in the layout of ``analyze`` / ``sample --analyze`` (see
    analysis_folder.py) with given labelmaps: ``altered`` (K, P, P) uint8 (method A: 1 structure
    added, 2 removed; its change maps: 3 times the label, in z), ``significant`` (P, P) uint8
    (method B; its significance: 2.5 times the label) or None (method B skipped); the
    geometry as the engine writes it (the crop's, from input.nrrd)."""
    from InvarianceExplorerLib.analysis_folder import ANALYSIS_DIR, ANALYSIS_FILES
    from InvarianceExplorerLib.result_folder import read_volume

    crop = read_volume(Path(sample_folder) / FILES["input"])
    out = Path(sample_folder) / ANALYSIS_DIR
    out.mkdir()
    stack = CTImage(np.asarray(altered, np.float32), crop.spacing, crop.origin, crop.direction)
    write_nrrd(stack, out / ANALYSIS_FILES["altered_regions"], array=np.asarray(altered, np.uint8))
    write_nrrd(stack, out / ANALYSIS_FILES["change_maps"], array=np.asarray(altered, np.float32) * 3.0)
    files = {name: ANALYSIS_FILES[name] for name in ("change_maps", "altered_regions", "numbers")}
    if significant is not None:
        write_nrrd(crop, out / ANALYSIS_FILES["significant_regions"], array=np.asarray(significant, np.uint8)[None])
        write_nrrd(crop, out / ANALYSIS_FILES["significance"], array=np.asarray(significant, np.float32)[None] * 2.5)
        files.update({name: ANALYSIS_FILES[name] for name in ("significant_regions", "significance")})
    record = {"version": 1, "count": int(altered.shape[0]), "files": files,
              "method_b": {"skipped": significant is None}}
    (out / ANALYSIS_FILES["numbers"]).write_text(json.dumps(record))
    return out
