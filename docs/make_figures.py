"""Figures of the documentation, written next to this script.

Run: ``.venv/bin/python docs/make_figures.py``

* ``phantom_montage.png``: procedural chest phantoms (seeds 0-7) in lung and soft-tissue windows.
* ``lowdose_pair.png``: one phantom scanned at quarter and at full dose by the physics
  simulator (512 x 512, 0.7 mm), with a zoom on the lung, in lung and soft-tissue windows.
* ``denoisers.png``: a held-out quarter-dose slice (phantom seed 10000, as in
  Testing/test_bundled_denoisers.py), its full dose and the outputs of the bundled
  denoisers, in lung and soft-tissue windows (central 256 x 256 pixels, 179 mm).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

from InvarianceExplorerLib.figures import LUNG_WINDOW, SOFT_TISSUE_WINDOW, save_png, tile_grid, window
from InvarianceExplorerLib.lowdose import LowDoseSimulator
from InvarianceExplorerLib.phantom import chest_phantom

DOCS = os.path.dirname(os.path.abspath(__file__))


def _shrink(tile: np.ndarray, size: int) -> np.ndarray:
    """An 8-bit tile resampled to ``size`` x ``size`` pixels (area-averaging)."""
    if tile.shape == (size, size):
        return tile
    return np.asarray(Image.fromarray(tile).resize((size, size), Image.BOX))


def phantom_montage(path: str, seeds: Sequence[int] = range(8), per_row: int = 2, tile: int = 384) -> str:
    """Phantoms (512 x 512 at 0.7 mm) side by side in lung and soft-tissue windows, ``per_row``
    phantoms to a row, each tile shown at ``tile`` pixels."""
    windows = (("lung", LUNG_WINDOW), ("soft tissue", SOFT_TISSUE_WINDOW))
    tiles, captions = [], []
    for i, seed in enumerate(seeds):
        phantom = chest_phantom(seed)
        if i % per_row == 0:
            tiles.append([]), captions.append([])
        for name, (center, width) in windows:
            tiles[-1].append(_shrink(window(phantom.hu, center, width), tile))
            nodules = f", {len(phantom.nodules)} nodules" if name == "lung" else ""
            captions[-1].append(f"seed {seed}, {name} window (C {center:g} / W {width:g} HU){nodules}")
    return save_png(tile_grid(tiles, captions), path)


def lowdose_pair(path: str, seed: int = 3, dose: float = 0.25, tile: int = 384) -> str:
    """Quarter-dose and full-dose reconstructions of one phantom, their difference, and a
    2x zoom on a nodule (or the right lung), in lung and soft-tissue windows."""
    phantom = chest_phantom(seed)
    pair = LowDoseSimulator(512, 0.7).simulate(phantom.hu, dose=dose, seed=seed)
    if phantom.nodules:
        cx, cy = (int(round(v / 0.7)) for v in phantom.nodules[0].center_mm)  # mm from pixel [0, 0]
    else:
        cx, cy = 150, 230
    cx, cy = min(max(cx, 64), 448), min(max(cy, 64), 448)
    zoom = (slice(cy - 64, cy + 64), slice(cx - 64, cx + 64))
    images = [("LD x%g" % dose, pair.low_dose), ("FD", pair.full_dose)]
    tiles, captions = [], []
    for wname, (center, width) in (("lung", LUNG_WINDOW), ("soft tissue", SOFT_TISSUE_WINDOW)):
        row = [_shrink(window(a, center, width), tile) for _, a in images]
        row.append(_shrink(window(pair.low_dose - pair.full_dose, 0.0, width / 2), tile))
        row += [_shrink(window(a[zoom], center, width), tile) for _, a in images]
        tiles.append(row)
        captions.append([f"{n}, {wname}" for n, _ in images] + [f"LD - FD (W {width / 2:g} HU)"]
                        + [f"{n} zoom, {wname}" for n, _ in images])
    return save_png(tile_grid(tiles, captions), path)


def denoiser_outputs(path: str, seed: int = 10_000, dose: float = 0.25, crop: int = 256) -> str:
    """LD, FD and each bundled denoiser's output of one held-out phantom slice (central
    ``crop`` pixels), one row per display window, with each image's RMSE against FD."""
    from InvarianceExplorerLib.denoisers import DENOISERS, bundled_models_dir, load_denoiser
    from InvarianceExplorerLib.image import CTImage
    from InvarianceExplorerLib.inference import denoise, image_quality

    pair = LowDoseSimulator(512, 0.7).simulate(chest_phantom(seed).hu, dose=dose, seed=seed, noiseless=False)
    images = [(f"LD x{dose:g}", pair.low_dose), ("FD", pair.full_dose)]
    for arch in DENOISERS:
        if (bundled_models_dir() / arch / "metadata.json").is_file():
            out = denoise(load_denoiser(arch), CTImage(pair.low_dose.astype(np.float32), (0.7, 0.7, 1.0)))
            images.append((arch, out.array))
    c = slice((512 - crop) // 2, (512 + crop) // 2)
    rmse = {n: image_quality(a, pair.full_dose)["rmse_hu"] for n, a in images if n != "FD"}
    tiles, captions = [], []
    for wname, (center, width) in (("lung", LUNG_WINDOW), ("soft tissue", SOFT_TISSUE_WINDOW)):
        tiles.append([window(a[c, c], center, width) for _, a in images])
        captions.append([f"{n}, {wname}" + (f", RMSE {rmse[n]:.1f} HU" if n in rmse else "") for n, _ in images])
    return save_png(tile_grid(tiles, captions), path)


def main() -> None:
    print(phantom_montage(os.path.join(DOCS, "phantom_montage.png")))
    print(lowdose_pair(os.path.join(DOCS, "lowdose_pair.png")))
    print(denoiser_outputs(os.path.join(DOCS, "denoisers.png")))


if __name__ == "__main__":
    main()
