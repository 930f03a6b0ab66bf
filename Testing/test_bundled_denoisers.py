"""The bundled denoisers meet the quality bar of issue 3 on fixed held-out phantom slices.

Each model folder in Resources/Models/ is loaded (checksums verified) and applied to three
fixed quarter-dose chest slices (phantom seeds 10000-10002, whole slices simulated at
512 x 512 / 0.7 mm like the training data, as the issue's bar and the model cards measure
them; the anatomy-dense central 256 x 256 alone is harder: CNN-10 removes 29 % there). Those
seeds are checked to be none of the training set's phantom seeds. The bar: RMSE against
full dose at least 30 % below the low-dose input's, and RED-CNN below CNN-10 when both are
bundled. A real CT slice (pydicom's CT_small.dcm) is denoised too: finite output, less
noise in its most uniform soft-tissue window.
"""

from __future__ import annotations

import numpy as np
import pytest

from InvarianceExplorerLib.denoisers import DENOISERS, bundled_models_dir, load_denoiser
from InvarianceExplorerLib.image import CTImage
from InvarianceExplorerLib.inference import denoise, image_quality
from InvarianceExplorerLib.io import read_image
from InvarianceExplorerLib.simulated_dataset import item_seeds
from realdata import pydicom_test_file

#: Phantom seeds of the held-out test slices (disjoint from the training items' seeds).
SEEDS = (10_000, 10_001, 10_002)
SIZE, SPACING, DOSE = 512, 0.7, 0.25
#: The issue's bar: fraction of the low-dose RMSE a denoiser must remove.
MIN_RMSE_REDUCTION = 0.30


def bundled(arch: str):
    """The loaded bundled denoiser ``arch`` (all four are shipped: a missing one fails)."""
    if not (bundled_models_dir() / arch / "metadata.json").is_file():
        pytest.fail(f"{arch} is shipped but Resources/Models/{arch}/ is missing")
    return load_denoiser(arch)


@pytest.fixture(scope="module")
def held_out():
    """(low dose, full dose) HU arrays ``(3, 512, 512)`` of the fixed held-out slices."""
    from InvarianceExplorerLib.lowdose import LowDoseSimulator
    from InvarianceExplorerLib.phantom import chest_phantom

    hu = np.stack([chest_phantom(seed, size=SIZE, spacing=SPACING).hu for seed in SEEDS])
    pair = LowDoseSimulator(SIZE, SPACING).simulate(hu, dose=DOSE, seed=20_26, noiseless=False)
    return pair.low_dose.astype(np.float32), pair.full_dose.astype(np.float32)


def rmse(denoiser, held_out) -> tuple:
    """(denoised RMSE, low-dose RMSE) in HU, means over the held-out slices."""
    low, full = held_out
    image = CTImage(low, (SPACING, SPACING, 1.0))
    out = denoise(denoiser, image, device="cpu").array
    return image_quality(out, full)["rmse_hu"], image_quality(low, full)["rmse_hu"]


@pytest.mark.parametrize("arch", list(DENOISERS))
def test_held_out_slices_are_not_training_items(arch):
    model = bundled(arch)
    data = model.metadata["training"]["data"]
    assert data["kind"] == "simulated"
    training_seeds = {item_seeds(data["seed"], i)[0] for i in range(data["pairs"])}
    assert not training_seeds & set(SEEDS)
    assert (data["size"], data["pixel_spacing_mm"], data["dose"]) == (SIZE, SPACING, DOSE)


@pytest.mark.parametrize("arch", list(DENOISERS))
def test_bundled_denoiser_reduces_rmse_by_30_percent(arch, held_out):
    denoised, low = rmse(bundled(arch), held_out)
    assert low > 12.0  # quarter-dose noise is really there
    reduction = 1.0 - denoised / low
    assert reduction >= MIN_RMSE_REDUCTION, f"{arch}: RMSE {denoised:.1f} HU vs {low:.1f} HU at low dose"


def test_redcnn_beats_cnn10(held_out):
    redcnn, cnn10 = bundled("redcnn"), bundled("cnn10")
    assert rmse(redcnn, held_out)[0] < rmse(cnn10, held_out)[0]


def most_uniform_window(hu: np.ndarray, size: int = 12, lo: float = -200.0, hi: float = 200.0, margin: int = 16):
    """Slices of the ``size`` x ``size`` window (stride ``size // 2``, at least ``margin``
    pixels from the image border) with the lowest std among those whose mean HU lies in
    [lo, hi] (soft tissue)."""
    best = None
    for y in range(margin, hu.shape[0] - size - margin + 1, size // 2):
        for x in range(margin, hu.shape[1] - size - margin + 1, size // 2):
            w = hu[y:y + size, x:x + size]
            if lo <= w.mean() <= hi and (best is None or w.std() < best[0]):
                best = (w.std(), (slice(y, y + size), slice(x, x + size)))
    assert best is not None, "no soft-tissue window"
    return best[1]


@pytest.mark.parametrize("arch", list(DENOISERS))
def test_bundled_denoiser_on_real_ct(arch):
    model = bundled(arch)
    image = read_image(pydicom_test_file("CT_small.dcm"))
    out = denoise(model, image, device="cpu")
    assert out.array.shape == image.array.shape and np.isfinite(out.array).all()
    window = most_uniform_window(image.array)
    before, after = image.array[window].std(), out.array[window].std()
    assert after < 0.8 * before, f"{arch}: std {after:.1f} HU after vs {before:.1f} HU before"
    assert abs(out.array[window].mean() - image.array[window].mean()) < 15.0  # no HU shift


def test_the_bundled_models_stay_within_their_60_mb():
    """All four denoisers with their cVAE and cINN, cards and figures: at most 60 MB in all
    (the project's budget for Resources/Models; 46.6 MB in December 2026)."""
    size = sum(p.stat().st_size for p in bundled_models_dir().rglob("*") if p.is_file())
    assert 30e6 < size <= 60e6, f"Resources/Models holds {size / 1e6:.1f} MB"
