"""Physics checks of the low-dose simulator, in a uniform water cylinder and on real CT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from InvarianceExplorerLib.lowdose import FILTERS, FanBeamGeometry, LowDoseSimulator, fbp, forward_project
from realdata import dicom_hu, pydicom_data_file, pydicom_test_file

SIZE, SPACING = 256, 1.4


def _grid(size=SIZE, spacing=SPACING):
    c = (np.arange(size) + 0.5 - size / 2) * spacing
    return np.meshgrid(c, c, indexing="xy")  # x: columns, y: rows (mm from the centre)


def water_cylinder(diameter_mm=200.0, size=SIZE, spacing=SPACING):
    x, y = _grid(size, spacing)
    hu = np.full((size, size), -1000.0, np.float32)
    hu[x**2 + y**2 <= (diameter_mm / 2) ** 2] = 0.0
    return hu


def central_roi(radius_mm=60.0, size=SIZE, spacing=SPACING):
    x, y = _grid(size, spacing)
    return x**2 + y**2 <= radius_mm**2


@pytest.fixture(scope="module")
def simulator():
    torch.set_num_threads(2)
    return LowDoseSimulator(SIZE, SPACING)


@pytest.fixture(scope="module")
def water_scans(simulator):
    """Four noise realisations of the water cylinder at each dose."""
    hu = np.stack([water_cylinder()] * 4)
    return {d: simulator.simulate(hu, dose=d, seed=1) for d in (1.0, 0.5, 0.25, 0.1)}


def test_noiseless_water_is_water_and_air_is_air(water_scans):
    clean = water_scans[0.25].noiseless[0]
    assert abs(clean[central_roi()].mean()) < 2.0
    x, y = _grid()
    ring = (x**2 + y**2 > 110**2) & (x**2 + y**2 < 170**2)
    assert abs(clean[ring].mean() + 1000.0) < 5.0


def test_low_dose_mean_of_water_within_5_hu(water_scans):
    for dose, pair in water_scans.items():
        assert abs(pair.low_dose[:, central_roi()].mean()) < 5.0, dose
        assert abs(pair.full_dose[:, central_roi()].mean()) < 5.0, dose


def test_noise_std_scales_with_inverse_sqrt_dose(water_scans):
    roi = central_roi()
    std = {d: (p.low_dose - p.noiseless)[:, roi].std() for d, p in water_scans.items()}
    for dose in (0.5, 0.25, 0.1):
        ratio = std[dose] / std[1.0]
        assert ratio == pytest.approx(1 / np.sqrt(dose), rel=0.10), (dose, ratio)
    # quarter dose has about twice the full-dose noise
    fd = (water_scans[0.25].full_dose - water_scans[0.25].noiseless)[:, roi].std()
    assert std[0.25] / fd == pytest.approx(2.0, rel=0.10)


def test_noise_power_spectrum_is_ramp_filtered_not_white(water_scans):
    """FBP noise is ramp-filtered: little power at low spatial frequencies (white noise
    would have a flat spectrum)."""
    pair = water_scans[0.25]
    noise = pair.low_dose - pair.noiseless
    c, half = SIZE // 2, 48  # a central 96x96 ROI of each realisation, inside the cylinder
    rois = noise[:, c - half : c + half, c - half : c + half]
    nps = np.mean([np.abs(np.fft.fft2(r - r.mean())) ** 2 for r in rois], axis=0)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(2 * half), np.fft.fftfreq(2 * half)))  # cycles/pixel
    low = nps[(f > 0) & (f < 0.04)].mean()
    mid = nps[(f > 0.1) & (f < 0.2)].mean()
    assert low < 0.5 * mid, (low, mid)


def test_pairs_differ_by_noise_only_and_are_seeded(simulator):
    hu = water_cylinder()
    hu[100:110, 100:140] = 800.0  # a bone bar
    a = simulator.simulate(hu, 0.25, seed=3)
    b = simulator.simulate(hu, 0.25, seed=3)
    c = simulator.simulate(hu, 0.25, seed=4)
    np.testing.assert_array_equal(a.low_dose, b.low_dose)
    assert not np.allclose(a.low_dose, c.low_dose)
    np.testing.assert_array_equal(a.noiseless, c.noiseless)
    # the structure is in the same place in every image; differences are zero-mean noise
    assert abs((a.low_dose - a.full_dose)[central_roi()].mean()) < 3.0
    assert a.low_dose[104, 120] > 600 and a.full_dose[104, 120] > 600


def test_reconstruction_places_structures_where_they_are(simulator):
    x, y = _grid()
    hu = water_cylinder()
    disc = (x - 60) ** 2 + (y + 40) ** 2 <= 15**2  # off-centre: right and up
    hu[disc] = 1000.0
    clean = simulator.simulate(hu, 1.0, seed=0).noiseless
    bright = clean > 500
    assert abs(x[bright].mean() - 60) < SPACING and abs(y[bright].mean() + 40) < SPACING
    assert abs(clean[(x - 60) ** 2 + (y + 40) ** 2 <= 10**2].mean() - 1000) < 10


def test_smoother_filters_have_less_noise():
    hu = water_cylinder()
    std = {}
    for name in FILTERS:
        p = LowDoseSimulator(SIZE, SPACING, filter=name).simulate(hu, 0.25, seed=0)
        std[name] = (p.low_dose - p.noiseless)[central_roi()].std()
    assert std["hann"] < std["cosine"] < std["shepp-logan"] < std["ram-lak"]


def test_projector_is_linear_and_fbp_inverts_it():
    g = FanBeamGeometry.for_image(64, 5.0)
    rng = np.random.default_rng(0)
    a, b = (torch.from_numpy(rng.random((1, 64, 64), dtype=np.float32)) for _ in range(2))
    pa, pb = forward_project(a, g), forward_project(b, g)
    torch.testing.assert_close(forward_project(a + 2 * b, g), pa + 2 * pb, rtol=1e-4, atol=1e-4)
    x, y = _grid(64, 5.0)
    blob = torch.from_numpy(np.exp(-(x**2 + y**2) / (2 * 40.0**2)).astype(np.float32))[None]  # smooth
    rec = fbp(forward_project(blob, g), g, "ram-lak")
    inside = torch.from_numpy(central_roi(100, 64, 5.0))
    assert (rec - blob)[0][inside].abs().max() < 0.01


def test_bad_inputs_are_refused(simulator):
    with pytest.raises(ValueError, match="dose"):
        simulator.simulate(water_cylinder(), dose=0.0)
    with pytest.raises(ValueError, match="shape"):
        simulator.simulate(np.zeros((100, 100), np.float32))
    bad = water_cylinder()
    bad[5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        simulator.simulate(bad)
    with pytest.raises(ValueError, match="filter"):
        LowDoseSimulator(SIZE, SPACING, filter="sharp")


def test_cuda_request_falls_back_to_cpu_without_gpu():
    if torch.cuda.is_available():
        sim = LowDoseSimulator(64, 5.0, device="cuda")
        assert sim.device.type == "cuda"
        out = sim.simulate(water_cylinder(200, 64, 5.0), 0.25, seed=0)
        assert np.isfinite(out.low_dose).all()
    else:
        with pytest.warns(RuntimeWarning, match="CPU"):
            sim = LowDoseSimulator(64, 5.0, device="cuda")
        assert sim.device.type == "cpu"
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):  # it failed in a generator
        with pytest.warns(RuntimeWarning, match="no Apple GPU"):
            assert LowDoseSimulator(64, 5.0, device="mps").device.type == "cpu"
    with pytest.raises(ValueError, match="unknown device 'foo'"):
        LowDoseSimulator(64, 5.0, device="foo")


def _soft_tissue_noise(hu, spacing):
    from scipy.ndimage import binary_erosion

    pair = LowDoseSimulator(hu.shape[0], spacing).simulate(hu, 0.25, seed=0)
    tissue = binary_erosion((pair.noiseless > 0) & (pair.noiseless < 80), iterations=3)
    assert tissue.sum() > 200
    return pair, (pair.low_dose - pair.noiseless)[tissue].std()


def test_real_512_ct_slice_gives_plausible_quarter_dose_noise():
    """pydicom-data's 693_UNCI.dcm: a real 512x512 CT slice (head, 0.48 mm pixels)."""
    hu, (sx, sy) = dicom_hu(pydicom_data_file("693_UNCI.dcm"))
    assert hu.shape == (512, 512)
    pair, std = _soft_tissue_noise(hu, sx)
    assert 15.0 <= std <= 60.0, std
    assert np.isfinite(pair.low_dose).all()


def test_real_ct_small_slice_simulates():
    """pydicom's CT_small.dcm (128x128 crop of a body slice)."""
    hu, (sx, sy) = dicom_hu(pydicom_test_file("CT_small.dcm"))
    pair, std = _soft_tissue_noise(hu, sx)
    assert np.isfinite(pair.low_dose).all()
    assert 2.0 <= std <= 60.0, std


def test_insert_noise_makes_a_low_dose_copy_slice_by_slice():
    """The engine's noise insertion (``data lowdose``): the input stays as it was, each slice
    gets its own extra noise (seed + k), about what a quarter dose adds to a full-dose scan,
    and a grid the scan cannot take is refused naming what is wrong."""
    from InvarianceExplorerLib.image import CTImage
    from InvarianceExplorerLib.io import CTInputError
    from InvarianceExplorerLib.lowdose import insert_noise

    slice_hu = np.where(water_cylinder(), 0.0, -1000.0).astype(np.float32)
    full = CTImage(np.stack([slice_hu, slice_hu]), (SPACING, SPACING, 2.5))
    before = full.array.copy()
    low = insert_noise(full, 0.25, seed=3)
    np.testing.assert_array_equal(full.array, before)
    assert low.array.shape == full.array.shape and low.spacing == full.spacing
    extra = low.array - full.array
    inside = central_roi()
    assert 5.0 < extra[0][inside].std() < 200.0
    assert not np.allclose(extra[0], extra[1])  # slice k has noise seed 3 + k
    again = insert_noise(CTImage(slice_hu, (SPACING, SPACING)), 0.25, seed=4)  # a 2D slice: slice 1's noise
    np.testing.assert_allclose(again.array - slice_hu, extra[1], atol=1e-3)
    with pytest.raises(CTInputError, match="square slices with square pixels"):
        insert_noise(CTImage(slice_hu[:, :-2], (SPACING, SPACING)), 0.25)
