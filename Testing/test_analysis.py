"""The analysis: noise amplitude and NPS, method A (per-invariance structure change), method B
(ensemble test against a noise-only null), and the ``analyze`` command on a real sample folder.

Synthetic cases with known answers, all seeded and small (128-pixel images, 16 samples):

* noise: stationary Gaussian noise (``mode="wrap"`` filtering, so no border artefacts) of a
  known standard deviation, white or correlated over about a pixel like CT noise; and real
  CT noise from the scan simulator (low dose minus the noiseless reconstruction of the same
  scan, whose standard deviation is measured directly);
* pure noise: the invariances are other noise realisations of x — nothing should be found
  beyond the error rates the methods promise (method A: ``alpha`` = 0.05 false regions per
  invariance; method B: FDR 0.05, which under the complete null is the chance of flagging
  anything at all);
* a disc of known radius and contrast added to some invariances — found at its place with
  its area.
"""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from InvarianceExplorerLib.analysis import (ALPHA, BRIGHTER, DARKER, FLOOR_ESTIMATED, benjamini_hochberg, border_gain,
                                            edge_level, ensemble_test, estimated_scan_floor, expected_false_regions,
                                            outline, reference_sigma_px, rft_threshold, scan_floor,
                                            simulate_noise_only, structure_change)
from InvarianceExplorerLib.analysis_folder import ANALYSIS_DIR, ANALYSIS_FILES, METHOD_B_FILES, load_analysis
from InvarianceExplorerLib.cli import main
from InvarianceExplorerLib.lowdose import LowDoseSimulator
from InvarianceExplorerLib.noise import (correlation_length_mm, estimate_noise, noise_power_spectrum,
                                         noise_summary, noise_texture)
from InvarianceExplorerLib.phantom import Label, chest_phantom

SPACING = (0.7, 0.7)
SHAPE = (128, 128)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_noise(rng, count, std, correlation_px=0.0, shape=SHAPE):
    """``count`` stationary noise images of standard deviation ``std`` HU (Gaussian-correlated
    over ``correlation_px`` pixels; periodic filtering keeps the borders like the inside)."""
    white = rng.standard_normal((count,) + shape)
    if correlation_px:
        white = ndimage.gaussian_filter(white, (0, correlation_px, correlation_px), mode="wrap")
        white /= np.sqrt(np.sum(_kernel(correlation_px) ** 2))
    return std * white


def _kernel(sigma):
    impulse = np.zeros((41, 41))
    impulse[20, 20] = 1.0
    return ndimage.gaussian_filter(impulse, sigma, mode="wrap")


def disc(center_ij, radius_px, shape=SHAPE):
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    return np.hypot(cols - center_ij[0], rows - center_ij[1]) <= radius_px


@pytest.fixture(scope="module")
def ct_scans():
    """Real CT noise: 33 quarter-dose scans of one 128-pixel chest slice (2.8 mm pixels) with
    independent noise, and the noiseless reconstruction of the same scan."""
    size, spacing = 128, 0.7 * 512 / 128
    phantom = chest_phantom(4, size=size, spacing=spacing)
    simulator = LowDoseSimulator(size, spacing)
    scans = simulate_noise_only(phantom.hu, 0.25, 33, seed=0, simulator=simulator, batch=11)
    return scans, (spacing, spacing)


# ----------------------------------------------------------------------------- noise


def test_noise_texture_gives_the_share_a_filter_passes():
    """White noise: a Gaussian of s pixels passes 1 / (4 pi s^2) of its variance, its high-pass
    residual 1 - 3 / (4 pi s^2); correlated
    noise: the measured share of the filtered images' variance. Records round-trip; a broken
    one is a clear error."""
    rng = np.random.default_rng(3)
    white = noise_texture(gaussian_noise(rng, 8, 20.0), (0.5, 0.5))
    assert white.gaussian_fraction(2 * 0.5) == pytest.approx(1 / (4 * np.pi * 4), rel=0.03)
    assert white.high_pass_fraction(1 * 0.5) == pytest.approx(1 - 3 / (4 * np.pi), rel=0.02)  # 1 - 2 G(0) + |G|^2
    noise = gaussian_noise(rng, 8, 20.0, 1.0)
    texture = noise_texture(noise, SPACING)
    passed = ndimage.gaussian_filter(noise, (0, 2, 2), mode="wrap").var() / noise.var()
    assert texture.gaussian_fraction(2 * SPACING[0]) == pytest.approx(passed, rel=0.05)
    again = type(texture).from_dict(json.loads(json.dumps(texture.to_dict())))
    assert again.gaussian_fraction(1.4) == pytest.approx(texture.gaussian_fraction(1.4), rel=1e-4)
    with pytest.raises(ValueError, match="nyquist_per_mm"):
        type(texture).from_dict({"frequency_per_mm": [0, 1]})


@pytest.mark.parametrize("std, correlation_px", [(5.0, 0.0), (20.0, 0.0), (60.0, 0.0), (20.0, 0.7)])
def test_noise_estimate_on_gaussian_noise_of_known_std(std, correlation_px):
    rng = np.random.default_rng(int(std * 10 + correlation_px * 100))
    rows, cols = np.mgrid[0:128, 0:128]
    anatomy = 40.0 + 0.3 * cols - 0.2 * rows  # soft tissue with a slow trend the estimator must ignore
    noise = gaussian_noise(rng, 1, std, correlation_px)[0]
    truth = noise.std()
    estimate = estimate_noise(anatomy + noise)
    assert estimate.region == "soft tissue" and estimate.pixels > 0.8 * noise.size
    assert estimate.std_hu == pytest.approx(truth, rel=0.10)
    roi = disc((64, 64), 30)
    assert estimate_noise(anatomy + noise, roi).std_hu == pytest.approx(noise[roi].std(), rel=0.10)


def test_noise_estimate_on_real_ct_noise():
    """Scan-simulator noise (low dose minus the noiseless reconstruction): the estimate on the
    low-dose image is within 10 % of the noise's own standard deviation on the same pixels —
    on a water cylinder (found automatically), inside a ROI of the chest phantom (the heart),
    and on the noise image itself."""
    size, spacing = 256, 0.7 * 512 / 256
    simulator = LowDoseSimulator(size, spacing)
    rows, cols = (np.mgrid[0:size, 0:size] - (size - 1) / 2) * spacing
    water = np.where(np.hypot(rows, cols) < 0.35 * size * spacing, 0.0, -1000.0).astype(np.float32)
    phantom = chest_phantom(2, size=size, spacing=spacing)
    scans = simulator.simulate(np.stack([water, phantom.hu]), dose=0.25, seed=2)
    noise = scans.low_dose - scans.noiseless

    found = estimate_noise(scans.low_dose[0])
    assert found.region == "soft tissue" and found.pixels > 5000
    assert found.std_hu == pytest.approx(noise[0][found.mask].std(), rel=0.10)

    heart = phantom.labels == Label.HEART
    in_roi = estimate_noise(scans.low_dose[1], heart)
    assert in_roi.region == "roi"
    assert in_roi.std_hu == pytest.approx(noise[1][heart].std(), rel=0.10)

    centre = noise[1][64:192, 64:192]
    assert estimate_noise(centre + 40.0).std_hu == pytest.approx(centre.std(), rel=0.10)


def test_noise_power_spectrum_of_white_noise():
    rng = np.random.default_rng(5)
    noise = gaussian_noise(rng, 8, 20.0, shape=(64, 64))
    nps = noise_power_spectrum(noise, SPACING, detrend="mean")
    assert nps.realisations == 8
    assert nps.frequency_per_mm.max() < 0.5 / SPACING[0] and nps.frequency_per_mm[-1] > 0.45 / SPACING[0]
    expected = 20.0 ** 2 * SPACING[0] * SPACING[1]  # HU^2 mm^2, flat
    assert np.nanmedian(nps.radial) == pytest.approx(expected, rel=0.1)
    assert nps.variance_hu2 == pytest.approx(noise.var(), rel=0.02)  # Parseval: the integral is the variance
    assert correlation_length_mm(nps) == pytest.approx(1.3 * SPACING[0], rel=0.1)
    coarse = noise_power_spectrum(gaussian_noise(rng, 8, 20.0, 1.0, shape=(64, 64)), SPACING, detrend="mean")
    assert correlation_length_mm(coarse) > 1.5 * correlation_length_mm(nps)  # coarser grain, longer length


def test_noise_summary_measures_amplitude_spread_and_realisation():
    """Invariances with other noise realisations of 0.5x to 1.5x the input's amplitude: the
    ratios are found within 10 % and the correlation with the input's noise is near 0; the
    input's own noise (plus a little) gives a correlation near 1."""
    rng = np.random.default_rng(6)
    x = 40.0 + gaussian_noise(rng, 1, 20.0, 0.7)[0]
    scales = np.tile(np.linspace(0.5, 1.5, 6), 2)
    invariances = 40.0 + gaussian_noise(rng, 12, 20.0, 0.7) * scales[:, None, None]
    summary = noise_summary(x, invariances, SPACING)
    for key in ("ratio_to_input", "varying_ratio_to_input"):
        assert np.allclose([s[key] for s in summary["samples"]], scales, rtol=0.1), key
    assert summary["amplitude"]["spread_ratio"] == pytest.approx(1.0, abs=0.15)
    assert summary["amplitude"]["basis"] == "ensemble-referenced"
    assert summary["realisation"]["mean_abs_correlation"] < 0.1  # other noise realisations
    assert "noise amplitudes" in summary["answer"]
    same = noise_summary(x, x[None] + gaussian_noise(rng, 6, 5.0, 0.7), SPACING)
    assert same["realisation"]["mean_abs_correlation"] > 0.9  # the input's own noise
    assert same["amplitude"]["basis"] == "single-image" and "same noise realisation" in same["answer"]
    few = noise_summary(x, invariances[:3], SPACING)
    assert few["input"]["varying_std_hu"] is None and few["amplitude"]["basis"] == "single-image"
    json.dumps(summary)


def test_noise_summary_ensemble_reference_ignores_shared_anatomy_texture():
    """Anatomy with a fine texture (15 HU, as fine as the noise) shared by x and every x~_k:
    a single image counts it as noise, the ensemble-referenced amplitudes do not."""
    rng = np.random.default_rng(16)
    anatomy = 40.0 + gaussian_noise(rng, 1, 15.0, 1.0)[0]
    x = anatomy + gaussian_noise(rng, 1, 20.0, 0.7)[0]
    scales = np.tile(np.linspace(0.5, 1.5, 6), 2)
    summary = noise_summary(x, anatomy + gaussian_noise(rng, 12, 20.0, 0.7) * scales[:, None, None], SPACING)
    assert np.allclose([s["varying_ratio_to_input"] for s in summary["samples"]], scales, rtol=0.1)
    assert summary["input"]["varying_std_hu"] == pytest.approx(20.0, rel=0.1)
    assert summary["input"]["std_hu"] > 22.0  # the texture counted as noise


# ----------------------------------------------------------------------------- method A


def test_threshold_from_random_field_theory():
    lam = 0.07
    u = rft_threshold(SHAPE, lam, 0.05)
    assert expected_false_regions(u, SHAPE, lam) == pytest.approx(0.05, rel=1e-3)
    assert rft_threshold(SHAPE, lam, 0.01) > u > rft_threshold(SHAPE, lam, 0.2)
    assert rft_threshold(SHAPE, 10.0, 0.05) <= 5.0  # a rough field: Bonferroni over 16384 pixels caps it
    assert edge_level(100.0, 2.0) == pytest.approx(0.5, abs=0.01) and edge_level(5.0, 2.0) < 0.45
    gain = border_gain(SHAPE, 2.0)
    assert gain[64, 64] == pytest.approx(1.0) and gain[0, 64] > 1.5 and gain[0, 0] > 3.0


def test_method_a_finds_no_region_in_pure_noise():
    """Invariances that are other noise realisations: about alpha = 0.05 false regions per
    invariance (random field theory), so over 8 x 16 invariances at most twice that."""
    false_regions = 0
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        x = 40.0 + gaussian_noise(rng, 1, 20.0, 0.7)[0]
        invariances = 40.0 + gaussian_noise(rng, 16, 20.0, 0.7)
        change = structure_change(x, invariances, SPACING, refined=False)
        false_regions += sum(s["region_count"] for s in change.samples)
        assert change.labels.dtype == np.uint8 and change.change_map.shape == (16,) + SHAPE
        assert abs(np.std(change.change_map) - 1.0) < 0.1  # z-scores in units of the noise-only fluctuation
    assert false_regions <= 2 * ALPHA * 8 * 16


def test_method_a_is_not_misled_by_padding():
    """A patch 42 % of which is padding (constant air beyond the image, where the sampled
    invariances hardly vary): the roughness and the threshold are those of the body's noise,
    and the pad holds no regions; as in pure noise, about alpha false regions per invariance."""
    false_regions, thresholds = 0, []
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        x = 40.0 + gaussian_noise(rng, 1, 20.0, 0.7)[0]
        invariances = 40.0 + gaussian_noise(rng, 16, 20.0, 0.7)
        x[:, :54] = -1000.0
        invariances[:, :, :54] = -1000.0 + gaussian_noise(rng, 16, 0.7, 2.0)[:, :, :54]
        change = structure_change(x, invariances, SPACING, refined=False)
        false_regions += sum(s["region_count"] for s in change.samples)
        thresholds.append(change.threshold_z)
        assert not change.labels[:, :, :53].any()
    assert false_regions <= 2 * ALPHA * 8 * 16
    assert min(thresholds) > 4.3  # as without the pad (4.38); 3.9 when its smooth zeros entered the roughness


def test_method_a_does_not_count_a_noise_amplitude_change():
    """f is invariant to noise amplitude: invariances with 0.5x to 2x the input's noise are
    not altered anatomy (each difference is judged against its own noise)."""
    rng = np.random.default_rng(300)
    x = 40.0 + gaussian_noise(rng, 1, 20.0, 0.7)[0]
    scales = np.linspace(0.5, 2.0, 16)[:, None, None]
    change = structure_change(x, 40.0 + gaussian_noise(rng, 16, 20.0, 0.7) * scales, SPACING, refined=False)
    assert sum(s["region_count"] for s in change.samples) <= 2
    sigmas = [s["noise_sigma_hu"] for s in change.samples]
    assert sigmas[-1] > 1.5 * sigmas[0]  # the louder difference, the larger its noise-only std


def test_method_a_finds_no_region_in_real_ct_noise(ct_scans):
    """Real CT noise on real (phantom) anatomy: x and 16 invariances are quarter-dose scans of
    the same slice with independent noise; 16 more scans are the null, whose differences
    with x go through the same test (calibration). Expected 0.8 false regions in each set of
    16 (alpha = 0.05 each); at most 3 (Poisson probability of more: 1 %)."""
    scans, spacing = ct_scans
    x, invariances, null = scans[0], scans[1:17], scans[17:]
    change = structure_change(x, invariances, spacing, null=null, refined=False)
    assert sum(s["region_count"] for s in change.samples) <= 3
    assert change.calibration["null_count"] == 16 and change.calibration["false_regions"] <= 3


def refined_like_noise(rng, count):
    """Differences shaped as the consistency refinement shapes noise: the same sharp amplitude
    pattern in every image (full amplitude in bands 16 pixels wide where "f" passes little on,
    a quarter elsewhere), ``(count, H, W)`` HU."""
    amplitude = np.where((np.arange(SHAPE[1]) // 16) % 3 == 0, 1.0, 0.25)[None, None, :]
    return gaussian_noise(rng, count, 20.0, 0.7) * amplitude


def test_method_a_takes_the_noise_shape_of_refined_samples_from_a_refined_null():
    """Pure noise in the refinement's shape: judged by each difference alone, the quiet bands
    lower the local noise estimate of the loud ones and method A finds many false regions;
    with the null's noise shape about alpha per invariance, and a disc added in a quiet band
    is still found."""
    rng = np.random.default_rng(700)
    x = 40.0 + gaussian_noise(rng, 1, 20.0, 0.7)[0]
    null = x + refined_like_noise(rng, 16)
    own, shaped = 0, 0
    for seed in range(4):
        invariances = x + refined_like_noise(np.random.default_rng(710 + seed), 16)
        own += sum(s["region_count"] for s in structure_change(x, invariances, SPACING, refined=False).samples)
        shaped += sum(s["region_count"] for s in structure_change(x, invariances, SPACING, null=null,
                                                                  null_shape=True).samples)
    assert own > 4 * ALPHA * 4 * 16 and shaped <= 2 * ALPHA * 4 * 16, (own, shaped)
    invariances = x + refined_like_noise(np.random.default_rng(720), 16)
    invariances[5] += 30.0 * disc((64, 40), 6)  # column 64 (a quiet band); 30 HU: 6 noise standard deviations there
    change = structure_change(x, invariances, SPACING, null=null, null_shape=True)
    assert change.samples[5]["region_count"] >= 1 and change.labels[5][40, 64] == BRIGHTER
    assert "null's noise shape" in change.summary()["noise_estimate"]
    with pytest.raises(ValueError, match="at least 8"):
        structure_change(x, invariances, SPACING, null=null[:4], null_shape=True)
    # a faint change, significant against the little noise the refinement leaves but within
    # what a rescan's noise does, counts only without the rescans' floor; a strong one with it
    scans = x + gaussian_noise(rng, 16, 20.0, 0.7)
    faint = x + refined_like_noise(np.random.default_rng(730), 16)
    faint[2] += 15.0 * disc((80, 40), 6)  # about 9 times the quiet band's filtered noise, 3 times a rescan's
    faint[6] += 60.0 * disc((80, 88), 6)
    alone = structure_change(x, faint, SPACING, null=null, null_shape=True)
    floored = structure_change(x, faint, SPACING, null=null, null_shape=True, scans=scans)
    assert alone.labels[2][40, 80] == BRIGHTER and floored.labels[2][40, 80] == 0
    assert alone.labels[6][88, 80] == floored.labels[6][88, 80] == BRIGHTER
    assert "rescan" in floored.summary()["noise_estimate"]


def test_method_a_on_refined_samples_without_scans_uses_a_rescan_floor_estimated_from_x():
    """No scans at hand: the floor comes from x's own noise and the noise texture. Refined-like
    pure noise judged by each difference alone gives many false regions, with the estimated
    floor about none; a faint disc within a rescan's noise is dropped, a strong one kept."""
    rng = np.random.default_rng(740)
    x = 40.0 + gaussian_noise(rng, 1, 20.0, 0.7)[0]
    texture = noise_texture(gaussian_noise(rng, 8, 20.0, 0.7), SPACING)
    own, floored = 0, 0
    for seed in range(4):
        invariances = x + refined_like_noise(np.random.default_rng(750 + seed), 16)
        own += sum(s["region_count"] for s in structure_change(x, invariances, SPACING, refined=False).samples)
        floored += sum(s["region_count"] for s in structure_change(x, invariances, SPACING,
                                                                   noise_texture=texture).samples)
    assert own > 4 * ALPHA * 4 * 16 and floored <= 2 * ALPHA * 4 * 16, (own, floored)
    faint = x + refined_like_noise(np.random.default_rng(760), 16)
    faint[2] += 15.0 * disc((80, 40), 6)
    faint[6] += 60.0 * disc((80, 88), 6)
    change = structure_change(x, faint, SPACING, noise_texture=texture)
    assert change.labels[2][40, 80] == 0 and change.labels[6][88, 80] == BRIGHTER
    assert change.scan_floor == FLOOR_ESTIMATED and "training data's noise texture" in change.summary()["noise_estimate"]
    # the caller says whether they are refined: refined ones without a floor are refused, and
    # without a word (and no floor) method A warns that it judges them as unrefined
    with pytest.raises(ValueError, match="refined invariances need a rescan floor: pass scans= .* or noise_texture="):
        structure_change(x, faint, SPACING, refined=True)
    with pytest.warns(RuntimeWarning, match="method A judges these invariances as unrefined"):
        assert structure_change(x, faint, SPACING).labels.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not structure_change(x, faint, SPACING, refined=True, noise_texture=texture).labels[2].any()


def test_the_estimated_rescan_floor_matches_the_one_rescans_give(ct_scans):
    """Real CT physics: the rescan floor estimated from one quarter-dose scan x and the noise
    texture of *another* phantom's low- minus full-dose difference (as a model folder stores
    its training noise) against the floor measured on 16 rescans of x's slice: within
    0.8-1.6x in the body (README: 1.07-1.46x on 16 held-out patches of 0.7 mm pixels)."""
    scans, spacing = ct_scans
    size, pixel = scans.shape[-1], spacing[0]
    pair = LowDoseSimulator(size, pixel).simulate(chest_phantom(5, size=size, spacing=pixel).hu, dose=0.25, seed=3)
    texture = noise_texture(pair.low_dose[32:96, 32:96] - pair.full_dose[32:96, 32:96], spacing)
    x, rescans = scans[0], scans[1:17]
    sigma_px = reference_sigma_px(rescans - x[None], spacing)
    measured = scan_floor(rescans, x, sigma_px)
    estimated = estimated_scan_floor(x, sigma_px, spacing, texture)
    body = (slice(32, 96),) * 2  # the slice's centre: inside the body, as the sampler's patches are
    ratio = float(np.median(estimated[body]) / np.median(measured[body]))
    assert 0.8 <= ratio <= 1.6, ratio


def added_and_removed_disc():
    """x and 16 invariances with 20 HU noise; a disc of radius 7 pixels and 100 HU contrast
    added to invariance 3 and taken away from invariance 9. Returns ``(x, invariances, disc)``."""
    rng = np.random.default_rng(7)
    x = 40.0 + gaussian_noise(rng, 1, 20.0, 0.7)[0]
    invariances = 40.0 + gaussian_noise(rng, 16, 20.0, 0.7)
    shape = disc((70, 50), 7.0)
    invariances[3] += 100.0 * shape
    invariances[9] -= 100.0 * shape
    return x, invariances, shape


def test_method_a_finds_an_added_and_a_removed_disc_with_their_area():
    """A disc of radius 7 pixels (4.9 mm, 73 mm^2 on the pixel grid) and 100 HU contrast added
    to invariance 3 and taken away from invariance 9 (noise 20 HU): one region each, at the
    disc (centroid within 1 pixel), labelled brighter / darker, its area within 15 % — the
    outline of the noiseless blurred disc has its area within 3 % (checked below; a
    pixelated disc is not quite round), and noise moves the outline by a fraction of a pixel
    along its 44-pixel perimeter: over 12 seeds the area ratio was 1.01 +- 0.05 (range
    0.93-1.11), so 15 % is three standard deviations — and these two invariances ranked
    first; the others have no region."""
    x, invariances, shape = added_and_removed_disc()
    change = structure_change(x, invariances, SPACING, refined=False)
    true_area = shape.sum() * SPACING[0] * SPACING[1]
    for k, label in ((3, BRIGHTER), (9, DARKER)):
        sample = change.samples[k]
        assert sample["region_count"] == 1, sample
        region = sample["regions"][0]
        assert region["area_mm2"] == pytest.approx(true_area, rel=0.15)
        assert np.allclose(region["centroid_ij"], (70, 50), atol=1.0)
        assert sample["peak_abs_hu"] == pytest.approx(100.0, abs=25.0)
        assert set(np.unique(change.labels[k])) == {0, label}
        assert (change.labels[k] > 0)[50, 70]
    assert sorted(change.ranking[:2]) == [3, 9]
    others = [s["region_count"] for s in change.samples if s["index"] not in (3, 9)]
    assert sum(others) <= 1
    # the noiseless outline of the blurred disc, and the curvature it corrects: half the
    # peak would lose 8 % of the area here
    blurred = ndimage.gaussian_filter(100.0 * shape, change.sigma_px)
    assert outline(blurred, blurred > 1.0, change.sigma_px).sum() / shape.sum() == pytest.approx(1.0, abs=0.03)
    assert (blurred >= 0.5 * blurred.max()).sum() / shape.sum() < 0.95


# ----------------------------------------------------------------------------- method B


def test_method_a_counts_only_what_f_ignores():
    """A disc added to invariance 3 and taken from invariance 9, judged with f's outputs.
    Two real (linear) denoisers: a Gaussian smoother (sigma 1.5 px) passes on about 90 % of
    a 7-pixel disc's change, so x~_3 and x~_9 are not invariances of it there (the sampler's
    error): no region is labelled, both are reported as seen by f. The same smoother blind
    to the disc's area (its input there replaced by a constant, as the planted region-blind
    denoiser) passes on little of it: both regions count, passed-on fraction below 1/2."""
    x, invariances, shape = added_and_removed_disc()
    blind = disc((70, 50), 9.0)

    def smoother(images):
        return ndimage.gaussian_filter(images, (0,) * (images.ndim - 2) + (1.5, 1.5))

    def region_blind(images):
        return smoother(np.where(blind, 40.0, images))

    seen = structure_change(x, invariances, SPACING, denoised=smoother(x), denoised_invariances=smoother(invariances),
                            refined=False)
    assert seen.max_passed_on == 0.5 and seen.summary()["regions_seen_by_f"] >= 2
    for k in (3, 9):
        assert seen.samples[k]["region_count"] == 0 and not seen.labels[k].any()
        assert [r["passed_on"] > 0.8 for r in seen.samples[k]["seen_by_f"]] == [True]
    ignored = structure_change(x, invariances, SPACING, denoised=region_blind(x),
                               denoised_invariances=region_blind(invariances), refined=False)
    for k, label in ((3, BRIGHTER), (9, DARKER)):
        sample = ignored.samples[k]
        assert sample["region_count"] == 1 and sample["seen_by_f"] == []
        assert sample["regions"][0]["passed_on"] < 0.3 and (ignored.labels[k] == label)[50, 70]
    ungated = structure_change(x, invariances, SPACING, refined=False)  # without f's outputs every region counts
    assert ungated.max_passed_on is None and ungated.samples[3]["regions"][0]["passed_on"] is None
    assert np.array_equal(ungated.labels, structure_change(x, invariances, SPACING, denoised=smoother(x),
                                                           denoised_invariances=smoother(invariances),
                                                           max_passed_on=1e9, refined=False).labels)
    with pytest.raises(ValueError, match="or neither"):
        structure_change(x, invariances, SPACING, denoised=smoother(x), refined=False)


def test_benjamini_hochberg_matches_the_definition():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.2, 0.5 -> p * m / rank = 0.05, 0.075, 0.0667, 0.25, 0.5, then cumulative minima
    assert np.allclose(benjamini_hochberg(p), [0.05, 0.0667, 0.0667, 0.25, 0.5], atol=1e-3)
    assert (benjamini_hochberg(p, "by") >= benjamini_hochberg(p)).all()


def test_method_b_flags_nothing_in_pure_noise():
    """Under the complete null, BH at level 0.05 flags anything at all with probability <= 0.05;
    over 6 seeds at most one run may flag, and then only a few pixels. A global change of the
    noise amplitude (f is invariant to it) is not flagged but reported as the noise scale."""
    runs_flagging = 0
    for seed in range(6):
        rng = np.random.default_rng(200 + seed)
        invariances = 40.0 + gaussian_noise(rng, 16, 20.0, 0.7)
        null = 40.0 + gaussian_noise(rng, 16, 20.0, 0.7)
        test = ensemble_test(invariances, null, SPACING)
        summary = test.summary()
        runs_flagging += summary["flagged_fraction"] > 0
        assert summary["flagged_fraction"] <= 0.05
        assert summary["calibration"]["flagged_fraction"] <= 0.05
        assert summary["calibration"]["p_below_0.05_fraction"] == pytest.approx(0.05, abs=0.03)
    assert runs_flagging <= 1
    rng = np.random.default_rng(9)
    louder = ensemble_test(40.0 + gaussian_noise(rng, 16, 30.0, 0.7), 40.0 + gaussian_noise(rng, 16, 20.0, 0.7),
                           SPACING)
    assert louder.summary()["flagged_fraction"] == 0.0 and louder.noise_scale == pytest.approx(2.25, rel=0.2)
    assert louder.summary()["noise_variance_ratio"] == louder.noise_scale


def test_method_b_does_not_scale_up_invariances_quieter_than_noise():
    """Invariances that vary far less than noise (0.1 HU, as a cVAE that decodes little noise
    gives) with a faint local pattern (0.5 HU more in a disc) vary less than noise everywhere:
    nothing is flagged, the measured ratio is reported and not applied. A disc of 100 HU in
    half of such quiet invariances is flagged."""
    rng = np.random.default_rng(11)
    shape = disc((60, 60), 8.0)
    quiet = 40.0 + gaussian_noise(rng, 16, 0.1, 0.7) + 0.5 * shape * rng.normal(size=(16, 1, 1))
    null = 40.0 + gaussian_noise(rng, 16, 20.0, 0.7)
    test = ensemble_test(quiet, null, SPACING)
    assert test.summary()["flagged_fraction"] == 0.0 and test.noise_scale == 1.0
    assert test.summary()["noise_variance_ratio"] < 1e-3
    assert ensemble_test(quiet, null, SPACING, noise_scaling="none").summary()["flagged_fraction"] == 0.0
    quiet[::2] += 100.0 * shape
    flagged = ensemble_test(quiet, null, SPACING).q <= 0.05
    assert flagged[shape].mean() > 0.9 and flagged[~ndimage.binary_dilation(shape, iterations=8)].mean() < 0.01


def test_method_b_flags_nothing_in_real_ct_noise(ct_scans):
    scans, spacing = ct_scans
    test = ensemble_test(scans[1:17], scans[17:], spacing, null_source="simulator")
    summary = test.summary()
    assert summary["null_source"] == "simulator" and summary["flagged_fraction"] <= 0.001


def test_method_b_flags_a_disc_that_the_invariances_vary():
    """Half of 16 invariances hold a disc (radius 7 px, 100 HU): flagged there, the largest
    region's centroid within 1.5 pixels and its area within 10 % (the outline follows the
    excess standard deviation over the 16 images; over 12 seeds the area ratio was
    1.00 +- 0.02, range 0.97-1.02, so 10 % is a wide margin); flagged pixels away from the disc
    (beyond the filter's reach) stay a small share, as the FDR allows."""
    rng = np.random.default_rng(8)
    shape = disc((70, 50), 7.0)
    invariances = 40.0 + gaussian_noise(rng, 16, 20.0, 0.7)
    invariances[::2] += 100.0 * shape
    null = 40.0 + gaussian_noise(rng, 16, 20.0, 0.7)
    test = ensemble_test(invariances, null, SPACING)
    regions = sorted(test.summary()["regions"], key=lambda r: -r["area_mm2"])
    true_area = shape.sum() * SPACING[0] * SPACING[1]
    assert regions[0]["area_mm2"] == pytest.approx(true_area, rel=0.10)
    assert np.allclose(regions[0]["centroid_ij"], (70, 50), atol=1.5)
    near = ndimage.binary_dilation(shape, iterations=8)
    flagged = test.q <= 0.05
    assert flagged[shape].mean() > 0.95
    assert (flagged & ~near).sum() <= 0.05 * flagged.sum() + 5
    assert test.significance[50, 70] > 3.0 and test.labels[50, 70] == 1


# ----------------------------------------------------------------------------- the analyze command


@pytest.fixture(scope="module")
def sample_folder(tmp_path_factory):
    """A real ``sample`` output folder (tiny invariance models of a random CNN-10, as in
    test_invariance.py) for a simulated quarter-dose slice, plus its full-dose image."""
    from InvarianceExplorerLib.denoisers import build_denoiser, save_denoiser
    from InvarianceExplorerLib.invariance_flow import InvarianceFlow
    from InvarianceExplorerLib.io import write_nrrd
    from InvarianceExplorerLib.normalization import PAPER_NORMALIZATION
    from InvarianceExplorerLib.representation import Representation
    from InvarianceExplorerLib.sampler import save_invariance_models

    root = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    folder = save_denoiser(root / "cnn10", build_denoiser("cnn10"), "cnn10", {}, PAPER_NORMALIZATION)
    save_invariance_models(folder, Representation(patch_size=32, z_dim=16, channels=(8, 16, 16, 32)),
                           InvarianceFlow(z_dim=16, n_flows=4, hidden=32, embedding_dim=8, embedding_channels=(8, 8)),
                           {"training": {"steps": 0}})
    size, spacing = 64, 0.7 * 512 / 64
    phantom = chest_phantom(3, size=size, spacing=spacing)
    pair = LowDoseSimulator(size, spacing, photons=1e4).simulate(phantom.hu, dose=0.25, seed=1)
    image = phantom.to_ctimage()
    low = write_nrrd(image.with_array(pair.low_dose), root / "ld.nrrd")
    full = write_nrrd(image.with_array(pair.full_dose), root / "fd.nrrd")
    out = root / "sample"
    assert main(["sample", "--model", str(folder), "--input", low, "--center", "30,34,0", "--count", "6",
                 "--seed", "1", "--device", "cpu", "--out", str(out), "--progress", "none"]) == 0
    return out, full


def _events(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_analyze_command_writes_every_output_with_the_crop_geometry(sample_folder, capsys):
    from InvarianceExplorerLib.result_folder import load_result, read_volume

    out, full = sample_folder
    assert main(["analyze", str(out), "--full-dose", full, "--dose", "0.25", "--photons", "1e4", "--null-count", "8",
                 "--progress", "json"]) == 0
    events = _events(capsys.readouterr().out)
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["simulating", "noise", "method A", "method B", "writing"]
    assert events[-1]["event"] == "done"
    analysis = out / ANALYSIS_DIR
    assert set(events[-1]["outputs"]) == {f"analysis_{name}" for name in ANALYSIS_FILES}
    assert sorted(p.name for p in analysis.iterdir()) == sorted(ANALYSIS_FILES.values())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    sample = load_result(out)
    crop, stack = sample.crop, sample.volumes["invariances"]
    for name, reference, frames in (("change_maps", stack, 6), ("altered_regions", stack, 6),
                                    ("significance", crop, 1), ("significant_regions", crop, 1)):
        volume = read_volume(analysis / ANALYSIS_FILES[name])
        assert volume.array.shape == (frames, 32, 32), name
        assert np.allclose(volume.origin, reference.origin, atol=1e-4), name
        assert np.allclose(volume.spacing, reference.spacing, atol=1e-5), name
        assert np.allclose(volume.direction, reference.direction), name
    import SimpleITK as sitk

    assert sitk.ReadImage(str(analysis / "altered_regions.nrrd")).GetPixelID() == sitk.sitkUInt8

    record = json.loads((analysis / "analysis.json").read_text())
    assert record["count"] == 6 and len(record["samples"]) == 6
    assert record["method_b"]["skipped"] is False and record["method_b"]["null_source"] == "simulator"
    assert record["method_b"]["null_count"] == 8 and record["method_b"]["fdr_level"] == 0.05
    assert sorted(s["rank"] for s in record["samples"]) == list(range(1, 7))
    assert record["noise"]["input"]["std_hu"] > 0 and "answer" in record["noise"]
    with open(analysis / "analysis.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {"noise_std_hu", "altered_area_mm2", "rank", "peak_abs_change_hu",
                               "regions_seen_by_f"} <= set(rows[0])
    assert record["settings"]["max_passed_on"] == 0.5  # f(x) and f(x~) are in the sample folder
    assert [float(r["altered_area_mm2"]) for r in rows] == [s["area_mm2"] for s in record["samples"]]
    loaded = load_analysis(out)
    assert np.allclose(loaded["change_maps"].array, read_volume(analysis / "change_maps.nrrd").array)

    from PIL import Image

    with Image.open(analysis / "figure.png") as figure:  # x, f(x), 3 invariances, std, change map; 2 rows
        assert figure.size == (7 * (32 + 4) + 4, 2 * (32 + 4 + 14) + 4)


def test_analyze_without_a_null_skips_method_b_and_says_why(sample_folder, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sample_folder[0], out)
    shutil.rmtree(out / ANALYSIS_DIR, ignore_errors=True)
    assert main(["analyze", str(out), "--progress", "none"]) == 0
    text = capsys.readouterr().out
    assert "method B skipped" in text and "noise_only.nrrd" in text
    record = json.loads((out / ANALYSIS_DIR / "analysis.json").read_text())
    assert record["method_b"]["skipped"] is True and "--full-dose" in record["method_b"]["reason"]
    assert "refined_samples_note" not in record["method_a"]  # sampled without refinement
    names = {p.name for p in (out / ANALYSIS_DIR).iterdir()}
    assert names == {f for n, f in ANALYSIS_FILES.items() if n not in METHOD_B_FILES}
    # a re-run replaces the analysis whole; bad input is one clear line and exit status 2
    assert main(["analyze", str(out), "--progress", "none", "--alpha", "0.01"]) == 0
    assert json.loads((out / ANALYSIS_DIR / "analysis.json").read_text())["method_a"]["alpha"] == 0.01
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "nothing"), "--progress", "none"]) == 2
    assert "no such results folder" in capsys.readouterr().err


def test_sample_with_analyze_runs_the_analysis(sample_folder, tmp_path, capsys):
    from InvarianceExplorerLib.result_folder import FILES, load_result

    numbers = load_result(sample_folder[0]).numbers
    out = tmp_path / "sampled"
    assert main(["sample", "--model", numbers["model"], "--input", numbers["input"], "--center", "30,34,0",
                 "--count", "4", "--device", "cpu", "--out", str(out), "--analyze", "--progress", "json"]) == 0
    events = _events(capsys.readouterr().out)
    assert [e["event"] for e in events].count("done") == 1
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages[-4:] == ["writing", "noise", "method A", "writing"]
    outputs = events[-1]["outputs"]
    assert set(FILES) <= set(outputs) and "analysis_change_maps" in outputs
    assert (out / ANALYSIS_DIR / "change_maps.nrrd").is_file()
    import shutil

    shutil.rmtree(out / ANALYSIS_DIR)  # as if stopped during its analysis: the rerun says what to do
    assert main(["sample", "--model", numbers["model"], "--input", numbers["input"], "--center", "30,34,0",
                 "--count", "4", "--device", "cpu", "--out", str(out), "--analyze", "--progress", "none"]) == 2
    assert f"`invariance-explorer analyze {out}` analyses them" in capsys.readouterr().err


def test_analyze_refuses_a_full_dose_image_of_other_anatomy_or_off_the_grid(sample_folder, tmp_path, capsys):
    """Method B's null must be scans of x's own anatomy: another phantom on the same grid, or an
    image too small to hold the crop, is refused with what to give instead; nothing is written."""
    from InvarianceExplorerLib.image import CTImage
    from InvarianceExplorerLib.io import read_image, write_nrrd

    out, full = sample_folder
    image = read_image(full)
    other = chest_phantom(7, size=64, spacing=image.spacing[0])
    pair = LowDoseSimulator(64, image.spacing[0], photons=1e4).simulate(other.hu, dose=0.25, seed=1)
    before = sorted(p.name for p in out.rglob("*"))
    for name, array, message in (("other.nrrd", pair.full_dose, "does not show the anatomy of the sampled crop"),
                                 ("small.nrrd", image.array[:20, :20], "is not on the low-dose input's grid")):
        path = write_nrrd(CTImage(array, image.spacing, image.origin, image.direction), tmp_path / name)
        assert main(["analyze", str(out), "--full-dose", path, "--dose", "0.25", "--photons", "1e4",
                     "--null-count", "4", "--progress", "none"]) == 2
        err = capsys.readouterr().err
        assert message in err and path in err and "Traceback" not in err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_the_null_covers_the_corners_where_x_was_scanned_there(sample_folder, tmp_path):
    """A crop reaching beyond the inscribed circle: where x shows noise there (a whole-square
    scan, as `data lowdose` makes), so does the null; where x shows constant air there (a
    scanner's field of view), the null is scanned the same way."""
    from InvarianceExplorerLib.analysis_folder import simulate_null_for_folder
    from InvarianceExplorerLib.io import read_image, write_nrrd

    model = json.loads((sample_folder[0] / "numbers.json").read_text())["model_folder"]
    size, spacing = 64, 0.7 * 512 / 64
    phantom = chest_phantom(3, size=size, spacing=spacing)
    for cover in (False, True):
        pair = LowDoseSimulator(size, spacing, photons=1e4, cover_corners=cover).simulate(phantom.hu, dose=0.25,
                                                                                          seed=1)
        image, folder = phantom.to_ctimage(), tmp_path / f"cover{cover}"
        low = write_nrrd(image.with_array(pair.low_dose), folder / "ld.nrrd")
        full = write_nrrd(image.with_array(pair.full_dose), folder / "fd.nrrd")
        assert main(["sample", "--model", model, "--input", low, "--center", "16,16,0", "--count", "2",
                     "--device", "cpu", "--out", str(folder / "sample"), "--progress", "none"]) == 0
        null = simulate_null_for_folder(folder / "sample", read_image(full), 0.25, count=3, photons=1e4)
        corner = null[:, :3, :3]  # pixels 0-2 of a 64-pixel slice: beyond the inscribed circle
        assert bool((corner.std(axis=0) > 1.0).all()) == cover and bool((corner == -1000).all()) != cover


def test_analysis_of_refined_samples_refines_the_null_or_says_it_is_uncalibrated(sample_folder, tmp_path, capsys):
    import warnings

    from InvarianceExplorerLib.result_folder import load_result

    numbers = load_result(sample_folder[0]).numbers
    out = tmp_path / "refined"
    assert main(["sample", "--model", numbers["model"], "--input", numbers["input"], "--center", "30,34,0",
                 "--count", "4", "--device", "cpu", "--out", str(out), "--refine", "2,1", "--progress", "none"]) == 0
    with pytest.warns(RuntimeWarning, match="no noise-only null of scans is at hand and the model folder .* holds no "
                                            "noise texture"):
        assert main(["analyze", str(out), "--progress", "none"]) == 0
    record = json.loads((out / ANALYSIS_DIR / "analysis.json").read_text())
    assert "--full-dose" in record["method_a"]["refined_samples_note"]
    assert record["settings"]["refinement"] == {"centre": 2, "sample": 1} and not record["settings"]["null_refined"]
    capsys.readouterr()
    assert main(["analyze", str(out), "--null", str(out / "invariances.nrrd"), "--progress", "none"]) == 2
    assert "at least 8 images" in capsys.readouterr().err  # too few to shape the noise by
    with pytest.warns(RuntimeWarning) as caught:  # and, the null dropped, that the analysis is uncalibrated
        assert main(["analyze", str(out), "--posterior", "--null-count", "8", "--progress", "none"]) == 0
    assert any("cannot be refined into a noise-only one" in str(w.message) for w in caught)
    record = json.loads((out / ANALYSIS_DIR / "analysis.json").read_text())
    assert not record["settings"]["null_refined"] and "null's noise shape" not in record["method_a"]["noise_estimate"]
    assert record["method_b"]["skipped"] and "cannot be refined" in record["method_b"]["reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert main(["analyze", str(out), "--full-dose", sample_folder[1], "--dose", "0.25", "--photons", "1e4",
                     "--null-count", "8", "--progress", "none"]) == 0
    record = json.loads((out / ANALYSIS_DIR / "analysis.json").read_text())
    assert record["settings"]["null_refined"] and "refined_samples_note" not in record["method_a"]
    assert record["settings"]["model"] == json.loads((out / "numbers.json").read_text())["model_folder"]
    assert "null's noise shape" in record["method_a"]["noise_estimate"] and not record["method_b"]["skipped"]
    assert record["method_a"]["scan_floor"] == "from noise-only scans"
    # no scans, but the model folder knows its training noise's texture: the floor is estimated from x
    import shutil

    from InvarianceExplorerLib.analysis_folder import analyze_folder
    from InvarianceExplorerLib.denoisers import read_metadata, write_metadata
    from InvarianceExplorerLib.io import read_image

    model = shutil.copytree(numbers["model_folder"], tmp_path / "model")
    metadata = read_metadata(model)
    low, full = (read_image(path) for path in (numbers["input"], sample_folder[1]))
    difference = (low.array.astype(np.float64) - full.array).reshape(low.array.shape[-2:])
    metadata["noise_texture"] = noise_texture(difference, low.spacing[:2]).to_dict()
    write_metadata(model, metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, record = analyze_folder(out, model=model)
    assert not record["settings"]["null_refined"] and "refined_samples_note" not in record["method_a"]
    assert record["method_a"]["scan_floor"] == FLOOR_ESTIMATED


def test_analyze_with_the_cvae_posterior_as_null(sample_folder, tmp_path, capsys):
    import shutil

    out = tmp_path / "posterior"
    shutil.copytree(sample_folder[0], out)
    assert main(["analyze", str(out), "--posterior", "--null-count", "6", "--progress", "json"]) == 0
    events = _events(capsys.readouterr().out)
    assert [e["stage"] for e in events if e["event"] == "stage"][0] == "posterior"
    record = json.loads((out / ANALYSIS_DIR / "analysis.json").read_text())
    assert record["method_b"]["null_source"] == "cvae posterior" and record["method_b"]["null_count"] == 6
    assert (out / ANALYSIS_DIR / "significance.nrrd").is_file()
    assert record["method_a"]["calibration"]["null_count"] == 6
    assert main(["analyze", str(out), "--posterior", "--null", str(out / "invariances.nrrd"), "--progress", "none"]) == 2


def test_analyze_takes_a_null_file_or_the_folders_noise_only_stack(sample_folder, tmp_path):
    import shutil

    out = tmp_path / "given"
    shutil.copytree(sample_folder[0], out)
    null = tmp_path / "null.nrrd"
    shutil.copy(out / "invariances.nrrd", null)  # any stack of the crop's size will do here
    assert main(["analyze", str(out), "--null", str(null), "--progress", "none"]) == 0
    record = json.loads((out / ANALYSIS_DIR / "analysis.json").read_text())
    assert record["method_b"]["null_source"] == "given" and record["method_b"]["null_count"] == 6

    shutil.copy(null, out / "noise_only.nrrd")
    numbers = json.loads((out / "numbers.json").read_text())
    (out / "numbers.json").write_text(json.dumps({**numbers, "noise_only": {"source": "cvae posterior"}}))
    assert main(["analyze", str(out), "--progress", "none"]) == 0
    record = json.loads((out / ANALYSIS_DIR / "analysis.json").read_text())
    assert record["method_b"]["null_source"] == "cvae posterior"
    assert record["method_b"]["null_note"] == "noise_only.nrrd in the sample folder"


def test_analyze_refuses_a_bad_null_and_keeps_the_users_files(sample_folder, tmp_path, capsys):
    """A null with a NaN, or not in HU (HU / 1000), is refused naming what is wrong (it gave
    exit 0 and NaN figures); so is a results volume with NaN; and an ``analysis`` folder that
    holds the user's own files is not replaced (it was, silently)."""
    import shutil

    from InvarianceExplorerLib.io import write_nrrd
    from InvarianceExplorerLib.result_folder import read_volume

    out = tmp_path / "run"
    shutil.copytree(sample_folder[0], out)
    shutil.rmtree(out / ANALYSIS_DIR, ignore_errors=True)
    stack = read_volume(out / "invariances.nrrd")
    for name, array, said in (("nan", np.where(np.arange(stack.array.size).reshape(stack.array.shape) == 7, np.nan,
                                               stack.array), "NaN or infinite"),
                              ("scaled", stack.array / 1000, "look normalised or scaled")):
        null = write_nrrd(stack.with_array(array.astype(np.float32)), tmp_path / f"{name}.nrrd")
        assert main(["analyze", str(out), "--null", str(null), "--progress", "none"]) == 2
        assert said in capsys.readouterr().err and not (out / ANALYSIS_DIR).exists()
    (out / ANALYSIS_DIR).mkdir()
    (out / ANALYSIS_DIR / "notes.txt").write_text("mine")
    assert main(["analyze", str(out), "--progress", "none"]) == 2
    assert "holds files analyze did not write (notes.txt)" in capsys.readouterr().err
    assert (out / ANALYSIS_DIR / "notes.txt").read_text() == "mine"
    shutil.rmtree(out / ANALYSIS_DIR)
    from dataclasses import replace

    elsewhere = write_nrrd(replace(stack, origin=(stack.origin[0] + 50.0, *stack.origin[1:])), tmp_path / "far.nrrd")
    with pytest.warns(RuntimeWarning, match="is not the crop's"):
        assert main(["analyze", str(out), "--null", str(elsewhere), "--progress", "none"]) == 0
    shutil.rmtree(out / ANALYSIS_DIR)
    broken = stack.array.copy()
    broken[0, 3, 3] = np.nan
    write_nrrd(stack.with_array(broken), out / "invariances.nrrd")
    assert main(["analyze", str(out), "--progress", "none"]) == 2
    assert "invariances.nrrd: 1 of" in capsys.readouterr().err


def test_a_full_dose_volume_elsewhere_along_z_is_refused(sample_folder):
    """Its slice k must be where the crop was taken: only the in-plane position was compared."""
    from dataclasses import replace

    from InvarianceExplorerLib.analysis_folder import simulate_null_for_folder
    from InvarianceExplorerLib.io import read_image
    from InvarianceExplorerLib.result_folder import load_result

    out, full = sample_folder
    plane = read_image(full)
    crop_z = load_result(out).crop.origin[2]
    volume = replace(plane, array=np.stack([plane.array] * 3), spacing=(*plane.spacing[:2], 2.5),
                     origin=(*plane.origin[:2], crop_z + 100.0))
    with pytest.raises(ValueError, match=r"slice 0 lies 100.0 mm from the sample's crop in z \(its slices are 2.5 mm "
                                         r"apart\)"):
        simulate_null_for_folder(out, volume, 0.25, 8, 0)


def test_analyze_refuses_null_settings_it_would_not_use(sample_folder, tmp_path, capsys):
    """Options of a null that is not made were ignored without a word; a null method B could not
    use was simulated first (2 invariances) and then skipped."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(sample_folder[0], out)
    shutil.rmtree(out / ANALYSIS_DIR, ignore_errors=True)
    for options, said in ((["--dose", "0.5"], "--dose has no effect here: it is used only to simulate the null from "
                                              "--full-dose; leave it out"),
                          (["--posterior", "--photons", "1e4", "--filter", "cosine"],
                           "--photons, --filter have no effect here"),
                          (["--null-count", "8"], "--null-count has no effect here: it is used only to simulate the "
                                                  "null from --full-dose or draw it with --posterior"),
                          (["--posterior", "--null-count", "2"], "--null-count 2: method B needs at least 3")):
        assert main(["analyze", str(out), *options, "--progress", "none"]) == 2
        assert said in capsys.readouterr().err and not (out / ANALYSIS_DIR).exists()
    numbers = json.loads((out / "numbers.json").read_text())
    two = tmp_path / "two"
    assert main(["sample", "--model", numbers["model"], "--input", numbers["input"], "--center", "30,34,0",
                 "--count", "2", "--device", "cpu", "--out", str(two), "--progress", "none"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(two), "--full-dose", sample_folder[1], "--progress", "json"]) == 2
    captured = capsys.readouterr()
    assert "holds 2 invariances, and method B, the only user of --full-dose's null, needs at least 3" in captured.err
    assert "simulating" not in captured.out  # refused before the scans were simulated


def test_the_readme_python_example_runs_as_written(capsys):
    """README's "From Python" block, run verbatim: the bundled CNN-10's refined invariances of
    the sample CT's nodule, method A with the estimated rescan floor (no false anatomy)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### From Python\n.*?```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(block, "README.md (From Python)", "exec"), {})
    shape, altered = capsys.readouterr().out.splitlines()
    assert shape.startswith("(16, 128, 128) C = 0.") and float(shape.split("= ")[1]) <= 0.35
    assert altered == "0 of 16 invariances change anatomy"


def test_nan_images_and_a_scalar_pixel_size():
    """NaN in x, the invariances or the null is refused by name (it gave 'cannot convert float
    NaN to integer', or a pixel treated as noise-free); one number is taken as a square
    pixel's size."""
    rng = np.random.default_rng(5)
    x = 40.0 + gaussian_noise(rng, 1, 20.0, 0.7)[0]
    invariances, null = x + gaussian_noise(rng, 4, 20.0, 0.7), x + gaussian_noise(rng, 4, 20.0, 0.7)
    square = structure_change(x, invariances, 0.7, refined=False)
    assert np.array_equal(square.change_map, structure_change(x, invariances, (0.7, 0.7), refined=False).change_map)
    bad = x.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="x: 1 of .* values are NaN or infinite"):
        structure_change(bad, invariances, SPACING, refined=False)
    null[1, 2, 2] = np.inf
    with pytest.raises(ValueError, match="null: 1 of .* values are NaN or infinite"):
        ensemble_test(invariances, null, SPACING)
    with pytest.raises(ValueError, match="spacing: the pixel size"):
        structure_change(x, invariances, (0.7, 0.0), refined=False)
