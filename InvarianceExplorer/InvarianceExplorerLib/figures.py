"""PNG figures of CT images: display windows and labelled tile grids (Pillow only)."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

#: Display windows as (centre, width) in HU. Lung window as in the paper.
LUNG_WINDOW: Tuple[float, float] = (-600.0, 1500.0)
SOFT_TISSUE_WINDOW: Tuple[float, float] = (40.0, 400.0)


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map HU to 8-bit grey values for the display window (centre, width) in HU."""
    lo = center - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - lo) / float(width)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def std_top(std_hu: np.ndarray) -> float:
    """The top of a std map's display range (HU): its 99th percentile, at least 1 HU."""
    return max(1.0, float(np.ceil(np.percentile(std_hu, 99))))


def std_tile(std_hu: np.ndarray, top: Optional[float] = None) -> Tuple[np.ndarray, str]:
    """A per-pixel std map (HU) as an 8-bit tile from 0 to ``top`` HU (default
    :func:`std_top`), and its label, e.g. ``"std 0-24 HU"``."""
    top = std_top(std_hu) if top is None else top
    return window(std_hu, top / 2.0, top), f"std 0-{top:.0f} HU"


def tile_grid(
    tiles: Sequence[Sequence[np.ndarray]],
    labels: Sequence[Sequence[str]] = (),
    gap: int = 4,
) -> Image.Image:
    """Arrange 8-bit grey tiles (rows of equal-sized arrays) in a grid with captions."""
    rows = [list(r) for r in tiles]
    h, w = rows[0][0].shape
    n_cols = max(len(r) for r in rows)
    caption = 14 if labels else 0
    canvas = Image.new("L", (n_cols * (w + gap) + gap, len(rows) * (h + gap + caption) + gap), 0)
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if tile.shape != (h, w):
                raise ValueError(f"tile ({i}, {j}) has shape {tile.shape}, expected {(h, w)}")
            x0, y0 = gap + j * (w + gap), gap + i * (h + gap + caption)
            canvas.paste(Image.fromarray(tile), (x0, y0 + caption))
            if labels and i < len(labels) and j < len(labels[i]):
                draw.text((x0 + 2, y0 + 1), labels[i][j], fill=255)
    return canvas


def save_png(image: Image.Image, path: str) -> str:
    """Write a PNG whole or not at all (temporary file, then atomic rename)."""
    from .io import written_file

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with written_file(path) as temporary:
        image.save(temporary, format="PNG")
    return path


def invariances_figure(results: Sequence, path) -> str:
    """PNG of sampled invariances (:class:`~.sampler.Invariances`: ``x``, ``denoised``,
    ``invariances``, ``std``, all HU) in the paper's layout: one row per patch with x, f(x),
    three invariances x~ (lung window) and their per-pixel std (0 to the first patch's 99th
    percentile, one scale for all rows). Returns the path."""
    top = std_top(results[0].std)
    tiles = [[window(a, *LUNG_WINDOW) for a in (r.x, r.denoised, *r.invariances[:3])] + [std_tile(r.std, top)[0]]
             for r in results]
    shown = min(3, len(results[0].invariances))
    labels = [["x", "f(x)", *[f"x~{k}" for k in range(shown)], std_tile(results[0].std, top)[1]]]
    return save_png(tile_grid(tiles, labels), path)
