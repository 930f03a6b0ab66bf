"""Which invariances change *anatomy*, not only noise? Two methods (docs/method.md, section 5).

Sampled invariances x~_k of a denoiser f mostly differ from the input x by noise; the
dangerous ones add or erase structure. Both methods below compare x~_k with x after a
*reference filter* that suppresses noise, and judge the remaining difference against what
noise alone would give. Images are 2D ``(H, W)`` in HU, stacks ``(K, H, W)`` with axis 0
the sample, spacing ``(x, y)`` in mm.

Reference filter — a Gaussian ``G_s`` whose width ``s`` is the noise correlation length
(:func:`reference_sigma_px`: from the noise power spectrum of the differences x~_k - x,
which hold noise but hardly anatomy; 1 to 4 pixels). Why a
Gaussian and not, say, non-local means or a denoising network: it is linear and
shift-invariant, so filtered noise stays (close to) Gaussian with a variance that can be
estimated and a smoothness that random field theory can use — the z-scores and p-values
below keep their meaning; a nonlinear, edge-preserving filter has signal-dependent noise
statistics and, like f, may itself ignore small low-contrast structure (the very thing we
look for). A width of one noise grain averages about ``(2 s / l)^2`` independent noise
grains while blurring structures of a few millimetres (the nodules below 5 mm that matter)
only moderately; a Gaussian of width ``s`` is also close to the matched filter of a blob of
radius ``s * sqrt(2)``.

Method A (:func:`structure_change`) — per invariance. ``D_k = G_s * (x~_k - x)`` (HU) is
divided by its noise-only standard deviation ``sigma_k`` (HU, a map) to give the change
map ``z_k``. ``sigma_k`` is estimated from ``D_k`` itself, locally and robustly
(:func:`local_noise_std`: a Gaussian-weighted mean of ``D_k^2`` over 8 filter widths,
clipped at 3 sigma, with the reflected-border gain of the filter divided out): the patch is
mostly noise-only, so this is the noise-only fluctuation of *that* difference — it carries
x~_k's own noise amplitude and texture (f is invariant to noise amplitude, a known and
wanted invariance that must not count as a change) and follows the non-stationary noise of
CT. Why not the variance of a null ensemble instead: with J = 16 realisations a per-pixel
variance map is uncertain by tens of percent, and at the high thresholds used here that
multiplies the false regions several-fold (measured: 4 false regions in 16 pure-noise
differences against 1 with the local estimate); the null, when given, *checks* the
calibration instead — the same test on noise-only differences ``x'_j - x`` reports its
false regions. Refined invariances (the sampler's consistency refinement) are the exception:
the refinement takes out of x~_k - x what f passes on, so their noise survives where f's gain
is low (near edges, at the patch border) and is much reduced elsewhere, a pattern sharper
than the local window and the same for every image refined towards f(x). For them
(``null_shape``) the null, refined the same way, gives the *shape* of the noise-only std
(:func:`noise_shape`: its root mean square over j, smoothed over one filter width, median 1)
and each difference, divided by that shape, still gives its own level; as the shape is
estimated from J images, z is then a Student-t value with the estimate's degrees of freedom
(measured per pixel from the spread over j), mapped to the normal value of equal tail
probability (:func:`t_to_z`); and since the refinement leaves much less noise than a scan
holds, a region must also change x by more than ``u`` times the filtered noise of a rescan
difference (``scans``: the null as scanned), or changes of a few HU that any rescan makes
would count. Without this, method A flags most refined pure-noise images of an ordinary
RED-CNN; with it at most ``alpha`` (none of 32: README, ``benchmarks/refinement_analysis.py``).
Without scans (the Slicer panel, ``sample --analyze``, a clinic) each refined difference is
judged by its own noise as unrefined ones are, and the floor is estimated from x itself
(:func:`estimated_scan_floor`: x's finest-band noise carried to the filter's scale by the
noise texture of the denoiser's training data, :class:`~.noise.NoiseTexture`); that floor
alone takes the refined pure noise's false regions away (README).
The detection threshold ``u`` makes the expected number of false regions per invariance
equal to ``alpha`` (default 5 %) by the expected Euler characteristic of a smooth 2D
Gaussian field (Worsley et al. 1996, "A unified statistical approach for determining
significant signals in images of cerebral activation", Hum Brain Mapp 4:58-73), with the
field's roughness measured from the data (variance of its finite differences) and capped by
Bonferroni. A region is a connected part
of ``|z_k| >= 2`` that reaches ``|z_k| >= u``, outlined where ``|D_k|`` falls to the value a
blurred structure takes at its edge (:func:`outline`: half its peak for a straight edge,
less for a small disc, whose edge curvature lets more of the blur fall outside), so the
area in mm^2 is the structure's, not the blur's (for structures wider than about two
filter widths; smaller ones come out larger); regions below ``min_area_mm2`` are dropped.
A region counts only where f *ignores* the change: given f(x) and f(x~_k), a region whose
passed-on fraction ``mean |G_s * (f(x~_k) - f(x))| / mean |G_s * (x~_k - x)|`` over its
pixels exceeds ``max_passed_on`` (default :data:`MAX_PASSED_ON` = 1/2: f keeps more of the
change than it suppresses) is not an invariance of f there but the sampler's error (f(x~_k)
differs from f(x) where x~_k differs from x); it is reported (``seen_by_f``), not labelled.
Per invariance: the change map, a labelmap (1: brighter in x~_k than in x — structure added; 2: darker —
structure removed) and the score: altered area (mm^2), peak |Delta HU| in the regions,
region count; invariances are ranked by area, then peak, then max |z|.

Method B (:func:`ensemble_test`) — the ensemble {x~_k} against a noise-only null ensemble
{x'_j} of x at the same dose (from the low-dose simulator when the full-dose image is at
hand, :func:`simulate_noise_only`; otherwise e.g. from the cVAE posterior of x; the caller
says which). Per pixel, the variance over k of ``G_s * x~_k`` against the variance over j of
``G_s * x'_j``: ``F = s_inv^2 / s_null^2 ~ F(K-1, J-1)`` if the invariances vary by noise
only. Validity: the test at one pixel needs independent realisations and Gaussian values —
the realisations are independent draws and filtered CT noise is a sum of many noise grains,
so near Gaussian; the *spatial* correlation the filter adds does not touch a single pixel's
test, only the dependence between tests, and the Benjamini-Hochberg procedure controls the
false discovery rate for positively dependent tests (Benjamini & Yekutieli 2001, PRDS), as
smoothed images give (Genovese, Lazar & Nichols 2002); ``method="by"`` gives the
Benjamini-Yekutieli procedure, valid under any dependence. Because f is invariant to noise
amplitude, the invariances' noise may be globally stronger or weaker than the null's; with
``noise_scaling="median"`` (default) the measured factor ``r = median(F) / median of
F(K-1, J-1)`` is reported (it is itself the noise-amplitude finding) and F is divided by
``max(r, 1)`` first, so a global *excess* of noise is not flagged, only local excess variance
(structure). A global *deficit* (r < 1: the invariances vary less than noise, as when the
cVAE decodes little noise) is not scaled up: the question is whether the invariances vary
more than noise at this dose explains, and scaling up would turn any faint pattern of the
decoder (measured: 0.06 HU of excess standard deviation in invariances that vary by 0.03 HU)
into "significant" regions; a change is flagged once its variance exceeds the filtered
noise variance at that pixel by more than chance allows. The test is calibrated against the null itself: the
null ensemble split in two halves goes through the same test, and the share of its pixels
flagged (should be about 0) and with p < 0.05 (should be about 0.05) are reported.
Outputs: ``-log10 q`` (q: BH-adjusted p-values) and a labelmap of the flagged regions, each
a connected set of pixels with ``q <= fdr`` outlined on its excess standard deviation
``sqrt(s_inv^2 - scale * s_null^2)`` (HU; proportional to the blurred varying structure) as
in method A (:func:`outline`), so that its area is the varying structure's rather than the
reach of the filter.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage, stats

from .noise import (NoiseTexture, correlation_length_mm, estimate_noise,
                    noise_power_spectrum, robust_std)

#: Labelmap values of method A's altered regions.
BRIGHTER, DARKER = 1, 2
ALTERED_LABELS: Dict[int, str] = {BRIGHTER: "brighter in the invariance (structure added)",
                                  DARKER: "darker in the invariance (structure removed)"}
#: Default expected number of false regions per invariance (method A) and FDR level (method B).
ALPHA = 0.05
FDR = 0.05
#: |z| a region grows through before it is outlined at half its peak.
EXTENT_Z = 2.0
#: Largest passed-on fraction of an altered region (method A): above it f keeps more of the
#: change in its output than it suppresses, so the change is not something f ignores.
MAX_PASSED_ON = 0.5
#: Default smallest altered region in mm^2 (a 2 mm disc: below the 3-5 mm nodules of interest).
MIN_AREA_MM2 = 3.0
#: Width of the window (Gaussian sigma, in reference filter widths) of local noise estimates.
LOCAL_WINDOW = 8.0
#: Range of the reference filter's width in pixels.
SIGMA_RANGE_PX = (1.0, 4.0)
#: Width of the window (Gaussian sigma, in reference filter widths) of the null's noise shape.
SHAPE_WINDOW = 1.0
#: Fewest noise-only images for the null's noise shape.
MIN_SHAPE_NULL = 8
#: Background width (pixels) of the finest-band noise estimate of x behind the estimated rescan floor.
FLOOR_BAND_PX = 1.0
#: ``StructureChange.scan_floor``: the rescan floor measured on scans, or estimated from x.
FLOOR_FROM_SCANS = "from noise-only scans"
FLOOR_ESTIMATED = "estimated from x's noise and the training data's noise texture"


def _stack(images, name: str) -> np.ndarray:
    a = np.asarray(getattr(images, "array", images), dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name}: expected a stack (K, H, W) of images; got shape {a.shape}")
    return _finite(a, name)


def _image(image, name: str) -> np.ndarray:
    a = np.asarray(getattr(image, "array", image), dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected one 2D image (H, W); got shape {a.shape}")
    return _finite(a, name)


def _finite(a: np.ndarray, name: str) -> np.ndarray:
    bad = int(np.count_nonzero(~np.isfinite(a)))
    if bad:
        raise ValueError(f"{name}: {bad} of {a.size} values are NaN or infinite; replace them (HU) first")
    return a


def _spacing(spacing) -> Tuple[float, float]:
    """Pixel size ``(x, y)`` in mm from a pair (or longer: the first two) or one number."""
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64)).ravel()
    if values.size == 1:
        values = np.repeat(values, 2)
    if values.size < 2 or not np.all(np.isfinite(values[:2])) or np.any(values[:2] <= 0):
        raise ValueError(f"spacing: the pixel size (x, y) in mm, two positive numbers (or one); got {spacing!r}")
    return float(values[0]), float(values[1])


def pixel_area_mm2(spacing) -> float:
    """The area in mm² of one pixel of size ``spacing`` = (x, y) mm."""
    return float(spacing[0]) * float(spacing[1])


def reference_sigma_px(noise, spacing=(1.0, 1.0)) -> float:
    """Width (Gaussian sigma, pixels) of the reference filter: the noise correlation length
    (:func:`~.noise.correlation_length_mm`) of mostly noise-only images ``noise`` (e.g. the
    differences x~_k - x, or null realisations minus their mean; ``(H, W)`` or ``(N, H, W)``)
    in pixels, kept within :data:`SIGMA_RANGE_PX`. (Measured on differences, not on x
    itself, whose anatomy would count as coarse "noise".)"""
    noise = np.asarray(noise, dtype=np.float64)
    length_mm = correlation_length_mm(noise_power_spectrum(noise, spacing, detrend="mean"))
    return float(np.clip(length_mm / math.sqrt(spacing[0] * spacing[1]), *SIGMA_RANGE_PX))


def reference_filter(images, sigma_px: float) -> np.ndarray:
    """The reference filter ``G_sigma *`` over the last two axes (reflecting borders)."""
    a = np.asarray(images, dtype=np.float64)
    return ndimage.gaussian_filter(a, (0.0,) * (a.ndim - 2) + (sigma_px, sigma_px), mode="reflect")


def border_gain(shape: Tuple[int, int], sigma_px: float) -> np.ndarray:
    """Variance of :func:`reference_filter`-ed white noise per pixel relative to the image's
    inside ``(H, W)``: near the border the reflected samples count twice, so filtered noise
    is up to 2x (corners 4x) stronger there; dividing by ``sqrt`` of this map makes the
    filtered noise stationary (exact for white noise, close for noise correlated over about
    a pixel, like CT noise)."""
    gains = []
    for n in shape:
        operator = ndimage.gaussian_filter1d(np.eye(n), sigma_px, axis=0, mode="reflect")
        v = (operator ** 2).sum(axis=1)
        gains.append(v / v[n // 2])
    return np.outer(gains[0], gains[1])


def masked_smooth(values: np.ndarray, mask: Optional[np.ndarray], window_px: float) -> np.ndarray:
    """Gaussian-weighted local mean of ``values`` over the pixels of ``mask`` (normalised
    convolution; every pixel when ``mask`` is None or empty)."""
    if mask is None or not mask.any():
        return reference_filter(values, window_px)
    weight = mask.astype(np.float64)
    return reference_filter(values * weight, window_px) / np.maximum(reference_filter(weight, window_px), 1e-12)


def local_noise_std(field: np.ndarray, window_px: float, mask: Optional[np.ndarray] = None, clip: float = 3.0,
                    rounds: int = 2) -> np.ndarray:
    """Local noise standard deviation (HU) of a mostly noise-only, zero-mean field ``(H, W)``:
    the Gaussian-weighted (``window_px``) mean of ``field^2`` over ``mask`` (the pixels that
    can hold noise), clipped at ``clip`` times the current estimate (so an altered region
    barely raises it), starting from the robust global estimate. Noise in CT is not
    stationary (lower towards the body's edge, none outside the scanner's field of view), so
    one global value would misjudge it."""
    c2 = clip * clip
    # E[min(X^2, c^2)] for a standard normal X: the clipped mean's bias, corrected below
    clipped_mean = (1.0 - 2.0 * clip * stats.norm.pdf(clip) - 2.0 * stats.norm.sf(clip)) + c2 * 2.0 * stats.norm.sf(clip)
    inside = field if mask is None or not mask.any() else field[mask]
    variance = np.full(field.shape, robust_std(inside) ** 2)
    for _ in range(rounds):
        variance = masked_smooth(np.minimum(field ** 2, c2 * variance), mask, window_px) / clipped_mean
    return np.sqrt(variance)


def noise_shape(null_differences: np.ndarray, window_px: float) -> Tuple[np.ndarray, np.ndarray]:
    """The spatial shape of the noise-only std (median 1 over the patch) of filtered noise-only
    differences ``(J, H, W)``: the square root of their mean square over j, Gaussian-weighted
    over ``window_px``; and the degrees of freedom of that variance estimate per pixel,
    ``2 / (its relative variance)``, the relative variance from the spread over j of each
    image's local mean square (a chi-square variance estimate of nu degrees of freedom has
    relative variance 2 / nu). For differences the sampler's consistency refinement has
    shaped: f takes out what it passes on, so noise survives where f's gain is low (near
    edges, at the patch border) and not elsewhere, a pattern finer than the local window of
    :func:`local_noise_std` and the same for every image refined towards f(x)."""
    local = reference_filter(np.square(null_differences), window_px)  # (J, H, W)
    mean = np.maximum(local.mean(axis=0), 1e-12)
    relative_variance = local.var(axis=0, ddof=1) / (local.shape[0] * mean ** 2)
    shape = np.sqrt(mean)
    return shape / max(float(np.median(shape)), 1e-12), 2.0 / np.maximum(relative_variance, 1e-6)


def scan_floor(scans, x: np.ndarray, sigma_px: float) -> np.ndarray:
    """The filtered noise std (HU map ``(H, W)``) of a rescan difference ``x'_j - x``, from
    noise-only scans ``(J, H, W)`` of x's anatomy at its dose: the root mean square over j of
    ``G_s * (x'_j - x)``, smoothed over :data:`SHAPE_WINDOW` filter widths."""
    return np.sqrt(reference_filter(np.mean(np.square(reference_filter(scans - x[None], sigma_px)), axis=0),
                                    SHAPE_WINDOW * sigma_px))


def estimated_scan_floor(x: np.ndarray, sigma_px: float, spacing, texture: NoiseTexture) -> np.ndarray:
    """:func:`scan_floor` estimated from x alone (HU map ``(H, W)``), for when no scans are at
    hand: ``sqrt(2)`` (two independent realisations) x the noise std of x x the share of it
    the reference filter passes, ``sqrt(texture.gaussian_fraction(s))``, x the filter's
    reflected-border gain. x's noise std is measured in its finest band (high-pass residual
    of :data:`FLOOR_BAND_PX` pixels in uniform soft tissue, :func:`~.noise.estimate_noise`)
    and scaled by that band's share of the texture: at the coarser scales the filter passes,
    anatomy (and the phantom's texture) outweighs noise in one image, so the texture — that
    of the denoiser's training data — carries the noise from fine to coarse. One value for
    the patch, measured where soft tissue is: on 16 held-out simulated patches (0.7 mm
    pixels, quarter dose) 1.07-1.46x (median 1.20x) the median of the floor 8 rescans give
    (``benchmarks/scan_floor.py``, README), a conservative floor."""
    pixel = math.sqrt(float(spacing[0]) * float(spacing[1]))
    band = texture.high_pass_fraction(FLOOR_BAND_PX * pixel)
    noise_std = estimate_noise(x, sigma_px=FLOOR_BAND_PX).std_hu / math.sqrt(max(band, 1e-12))
    filtered = noise_std * math.sqrt(2.0 * texture.gaussian_fraction(sigma_px * pixel))
    return filtered * np.sqrt(border_gain(x.shape, sigma_px))


def t_to_z(t: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """The standard-normal value of equal tail probability for Student-t values ``t`` of
    ``dof`` degrees of freedom (a z-score whose noise-only std is itself estimated)."""
    return np.sign(t) * stats.norm.isf(stats.t.sf(np.abs(t), dof))


def roughness(z: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Roughness ``lambda`` of a unit-variance field (variance of its derivative per pixel,
    the mean over both axes), robustly from the finite differences of ``z`` (2D or a stack)
    between neighbours both in ``mask`` (``(H, W)``; default all): a constant area, where
    z is 0, would otherwise make the field look smooth and lower the threshold everywhere."""
    z = np.asarray(z, dtype=np.float64)
    mask = np.ones(z.shape[-2:], bool) if mask is None else np.asarray(mask, bool)
    dx = np.diff(z, axis=-1)[..., mask[:, 1:] & mask[:, :-1]].ravel()
    dy = np.diff(z, axis=-2)[..., mask[1:] & mask[:-1]].ravel()
    return float(0.5 * (robust_std(dx) ** 2 + robust_std(dy) ** 2))


def varying(x: np.ndarray) -> np.ndarray:
    """The pixels of ``x`` (HU, ``(H, W)``) whose 3 x 3 neighbourhood is not constant: not
    the fill a scanner shows outside its field of view or the patch's padding beyond the
    image, where nothing can change and no noise can be measured. All pixels for an image
    with no variation at all (a noise-free test object)."""
    x = np.asarray(x, dtype=np.float64)
    mask = ndimage.maximum_filter(x, 3) - ndimage.minimum_filter(x, 3) > 1e-3
    return mask if mask.any() else np.ones(x.shape, bool)


def expected_false_regions(u: float, shape: Tuple[int, int], lam: float) -> float:
    """Expected Euler characteristic of ``{|z| >= u}`` for a smooth unit-variance Gaussian
    field of roughness ``lam`` on an ``H x W`` pixel rectangle (two-sided): at high ``u``
    the expected number of regions noise alone gives (Worsley et al. 1996)."""
    h, w = shape
    area, half_perimeter = float(h * w), float(h + w)
    e = math.exp(-u * u / 2.0)
    one = (area * lam * (2 * math.pi) ** -1.5 * u * e + half_perimeter * math.sqrt(lam) / (2 * math.pi) * e
           + stats.norm.sf(u))
    return 2.0 * one


def rft_threshold(shape: Tuple[int, int], lam: float, alpha: float = ALPHA) -> float:
    """The |z| threshold at which noise alone gives ``alpha`` regions on average
    (:func:`expected_false_regions`), at most the Bonferroni threshold over the pixels."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    bonferroni = float(stats.norm.isf(alpha / (2.0 * shape[0] * shape[1])))
    lo, hi = 1.0, 12.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if expected_false_regions(mid, shape, lam) > alpha:
            lo = mid
        else:
            hi = mid
    return float(min(hi, bonferroni))


# ----------------------------------------------------------------------------- method A


@dataclass
class StructureChange:
    """Method A's result for K invariances of one input.

    Attributes:
        change_map: z-scores ``(K, H, W)``: filtered difference / its noise-only std.
        difference_hu: the filtered differences ``G * (x~_k - x)`` ``(K, H, W)`` (HU).
        labels: altered regions ``(K, H, W)`` uint8 (:data:`ALTERED_LABELS`, 0 elsewhere).
        samples: per invariance ``{"index", "area_mm2", "peak_abs_hu", "region_count",
            "max_abs_z", "noise_sigma_hu", "rank", "regions", "seen_by_f"}`` (noise_sigma_hu:
            the median over the patch of the local noise-only std of the filtered
            difference; rank 1: the most altered; regions: one record each, see
            :func:`altered_regions`; seen_by_f: the regions dropped because f passes on more
            than ``max_passed_on`` of their change).
        threshold_z, extent_z, min_area_mm2, alpha, sigma_px, sigma_mm, roughness,
            max_passed_on: the settings used (max_passed_on None: f's outputs not given;
            the filter is isotropic in pixels, so with anisotropic pixels sigma_mm, given
            at the geometric-mean pixel size, is sigma_px times each side along it).
        null_shape: whether the noise-only std took its spatial shape from the null.
        scan_floor: how regions also had to exceed a rescan difference's filtered noise:
            :data:`FLOOR_FROM_SCANS`, :data:`FLOOR_ESTIMATED` or None (no floor).
        calibration: with a null ensemble, the false regions the same test finds in the
            noise-only differences ``x'_j - x`` (should be about ``alpha`` per image).
    """

    change_map: np.ndarray
    difference_hu: np.ndarray
    labels: np.ndarray
    samples: List[dict]
    threshold_z: float
    extent_z: float
    min_area_mm2: float
    alpha: float
    sigma_px: float
    sigma_mm: float
    roughness: float
    calibration: Optional[dict] = None
    max_passed_on: Optional[float] = None
    null_shape: bool = False
    scan_floor: Optional[str] = None

    @property
    def ranking(self) -> List[int]:
        """Sample indices, most altered first."""
        return [s["index"] for s in sorted(self.samples, key=lambda s: s["rank"])]

    def summary(self) -> dict:
        return {"threshold_z": self.threshold_z, "extent_z": self.extent_z, "min_area_mm2": self.min_area_mm2,
                "alpha": self.alpha, "reference_filter": {"kind": "gaussian", "sigma_px": self.sigma_px,
                                                          "sigma_mm": self.sigma_mm},
                "noise_estimate": "local robust std of each filtered difference (window sigma "
                                  f"{LOCAL_WINDOW:g} filter widths, clipped at 3 sigma)"
                                  + (f", in the null's noise shape (window sigma {SHAPE_WINDOW:g} filter widths)"
                                     if self.null_shape else "")
                                  + (f", regions also beyond u times a rescan difference's noise ({self.scan_floor})"
                                     if self.scan_floor else ""),
                "scan_floor": self.scan_floor,
                "roughness": self.roughness, "calibration": self.calibration,
                "max_passed_on": self.max_passed_on,
                "regions_seen_by_f": int(sum(len(s["seen_by_f"]) for s in self.samples)),
                "altered_samples": int(sum(s["region_count"] > 0 for s in self.samples)),
                "ranking": self.ranking, "labels": {str(k): v for k, v in ALTERED_LABELS.items()}}


def robust_peak(values: np.ndarray, region: np.ndarray, radius_px: float) -> float:
    """A region's peak for its half-maximum outline: the mean of ``values`` within
    ``radius_px`` (at least 1) of the region's maximum. The maximum itself of noisy values
    overshoots the structure's contrast (by about 1.5 noise standard deviations over a
    5 mm disc) and would shrink the outline by a tenth of its area; averaging over one
    filter width around it removes most of that and barely lowers a structure wider than
    the filter."""
    masked = np.where(region, values, -np.inf)
    row, col = np.unravel_index(int(np.argmax(masked)), values.shape)
    rows, cols = np.ogrid[0:values.shape[0], 0:values.shape[1]]
    near = region & ((rows - row) ** 2 + (cols - col) ** 2 <= max(radius_px, 1.0) ** 2)
    return float(values[near].mean())


def edge_level(radius_px: float, sigma_px: float) -> float:
    """The value at its edge of a disc of radius ``radius_px`` blurred by a Gaussian of
    ``sigma_px``, as a fraction of the blurred disc's centre value: 0.5 for a straight edge
    (large discs), less for small ones (curvature: more of the blur falls outside). The
    edge value is ``P(|X + R| <= R)`` for ``X ~ N(0, sigma^2 I)``, a non-central chi-square
    probability; the centre value is ``1 - exp(-R^2 / (2 sigma^2))``."""
    r2 = (float(radius_px) / float(sigma_px)) ** 2
    return float(stats.ncx2.cdf(r2, 2, r2) / max(1.0 - math.exp(-r2 / 2.0), 1e-12))


def outline(values: np.ndarray, region: np.ndarray, sigma_px: float, rounds: int = 3) -> np.ndarray:
    """The structure inside ``region`` whose blurred image is ``values`` (HU, >= 0 inside):
    the pixels at or above its edge level — half its peak (:func:`robust_peak`) for a large
    structure, less for a small one (:func:`edge_level`, with the radius of the disc of the
    outlined area, iterated) — so the outlined area is the structure's, not the blur's."""
    peak = robust_peak(values, region, sigma_px)
    level = 0.5
    for _ in range(rounds):
        inside = region & (values >= level * peak)
        radius = math.sqrt(max(int(inside.sum()), 1) / math.pi)
        level = min(0.5, edge_level(radius + sigma_px ** 2 / (2.0 * radius), sigma_px))
    return region & (values >= level * peak)


def altered_regions(z: np.ndarray, difference_hu: np.ndarray, threshold_z: float, spacing,
                    min_area_mm2: float = MIN_AREA_MM2, extent_z: float = EXTENT_Z,
                    peak_radius_px: float = 1.0, output_difference_hu: Optional[np.ndarray] = None,
                    max_passed_on: float = MAX_PASSED_ON, floor_hu: Optional[np.ndarray] = None
                    ) -> Tuple[np.ndarray, List[dict], List[dict]]:
    """Regions of one change map (see the module docstring; ``peak_radius_px``: see
    :func:`robust_peak`, the reference filter's width; ``output_difference_hu``: the
    filtered change of f's output ``G * (f(x~) - f(x))``, or None; ``floor_hu``: the
    filtered noise std of a rescan difference (HU map) that a region's change must also
    exceed ``threshold_z`` times somewhere, or None). Returns the labelmap
    (uint8, BRIGHTER / DARKER), one record per region ``{"sign", "area_mm2", "peak_abs_hu",
    "peak_z", "centroid_ij", "passed_on"}`` (peak_abs_hu: the largest |filtered difference|
    in the region, HU, below the contrast of a structure smaller than the filter; passed_on: the fraction of the region's change
    that reaches f's output; None without f's outputs), and the records of the regions left
    out because f passes on more than ``max_passed_on`` of their change."""
    px = pixel_area_mm2(spacing)
    labels = np.zeros(z.shape, np.uint8)
    records, seen = [], []
    for sign, value in ((1.0, BRIGHTER), (-1.0, DARKER)):
        sz, sd = sign * z, sign * difference_hu
        seeds = sz >= threshold_z
        if not seeds.any():
            continue
        grown, _ = ndimage.label(sz >= min(extent_z, threshold_z))
        for c in np.unique(grown[seeds]):
            component = grown == c
            core, n = ndimage.label(outline(sd, component, peak_radius_px))
            for piece_id in range(1, n + 1):
                piece = core == piece_id
                area = float(piece.sum() * px)
                if area < min_area_mm2 or not (piece & seeds).any():
                    continue
                if floor_hu is not None and not (sd[piece] >= threshold_z * floor_hu[piece]).any():
                    continue  # within what a rescan's noise can do
                passed = None if output_difference_hu is None else float(
                    np.abs(output_difference_hu[piece]).mean() / max(np.abs(difference_hu[piece]).mean(), 1e-12))
                rows, cols = np.nonzero(piece)
                record = {"sign": "brighter" if sign > 0 else "darker", "area_mm2": area,
                          "peak_abs_hu": float(sd[piece].max()), "peak_z": float(sz[piece].max()),
                          "centroid_ij": [float(cols.mean()), float(rows.mean())], "passed_on": passed}
                if passed is not None and passed > max_passed_on:
                    seen.append(record)
                    continue
                labels[piece] = value
                records.append(record)
    return labels, records, seen


def structure_change(x, invariances, spacing=(1.0, 1.0), *, denoised=None, denoised_invariances=None,
                     null=None, sigma_px: Optional[float] = None, alpha: float = ALPHA,
                     threshold_z: Optional[float] = None, min_area_mm2: float = MIN_AREA_MM2,
                     extent_z: float = EXTENT_Z, max_passed_on: float = MAX_PASSED_ON,
                     null_shape: bool = False, scans=None, noise_texture: Optional[NoiseTexture] = None,
                     refined: Optional[bool] = None) -> StructureChange:
    """Method A: per-invariance structure change (see the module docstring).

    Args:
        x: the input patch ``(H, W)`` (HU).
        invariances: the invariances x~_k ``(K, H, W)`` (HU).
        denoised, denoised_invariances: f(x) ``(H, W)`` and f(x~_k) ``(K, H, W)`` (HU), both
            or neither: a region whose change f passes on to its output by more than
            ``max_passed_on`` is not counted (module docstring). Without them every region
            counts (the sampler's own errors included).
        spacing: pixel size ``(x, y)`` in mm.
        null: optional noise-only realisations of x at its dose ``(J, H, W)`` (HU): the
            same test runs on ``x'_j - x`` and its false regions are reported (calibration).
        sigma_px: reference filter width (pixels); default :func:`reference_sigma_px`.
        alpha: expected false regions per invariance that sets the threshold (when
            ``threshold_z`` is not given).
        threshold_z: a fixed |z| threshold instead.
        min_area_mm2: smallest region kept (mm^2).
        extent_z: |z| down to which a detected region grows before it is outlined.
        null_shape: take the spatial shape of the noise-only std from ``null`` (at least
            :data:`MIN_SHAPE_NULL` images; :func:`noise_shape`), each invariance's own
            noise level still from its difference: for invariances sampled with the
            consistency refinement, against a null refined the same way.
        scans: for refined invariances, noise-only scans of x's anatomy at its dose (the
            null before its refinement, ``(J, H, W)`` HU): a region must also change x by
            more than ``u`` times the filtered noise std of a rescan difference ``x'_j - x``
            (:func:`scan_floor`; the refinement leaves far less noise than a scan holds, so a
            change of a few HU can be significant against it and still be one a rescan makes).
        noise_texture: without scans, that floor estimated from x's own noise and this
            texture (:func:`estimated_scan_floor`; the model folder's training noise,
            :func:`~.analysis_folder.model_noise_texture`).
        refined: whether the invariances were sampled with the consistency refinement
            (``Invariances.refinement``; the bundled models' default). Refined ones need
            ``scans`` or ``noise_texture`` (``ValueError`` otherwise): judged by their own
            noise alone, their pure noise is flagged. ``False`` judges them as unrefined;
            ``None`` (not said) without either warns.
    """
    x = _image(x, "x")
    stack = _stack(invariances, "invariances")
    if stack.shape[1:] != x.shape:
        raise ValueError(f"invariances of in-plane shape {stack.shape[1:]} differ from x's {x.shape}")
    spacing = _spacing(spacing)
    sigma_px = float(sigma_px or reference_sigma_px(stack - x[None], spacing))
    noisy = varying(x)
    difference = reference_filter(stack - x[None], sigma_px)
    window_px = max(LOCAL_WINDOW * sigma_px, 8.0)
    if null is not None:
        null = _stack(null, "null")
        if null.shape[1:] != x.shape:
            raise ValueError(f"the noise-only ensemble must be (J, {x.shape[0]}, {x.shape[1]}); got {null.shape}")
        null_difference = reference_filter(null - x[None], sigma_px)
    if null_shape and (null is None or null.shape[0] < MIN_SHAPE_NULL):
        raise ValueError(f"null_shape needs a noise-only ensemble of at least {MIN_SHAPE_NULL} images; got "
                         f"{0 if null is None else null.shape[0]}")
    floor, floor_kind = None, None
    if scans is not None:
        scans = _stack(scans, "scans")
        if scans.shape[1:] != x.shape:
            raise ValueError(f"the scans must be (J, {x.shape[0]}, {x.shape[1]}); got {scans.shape}")
        floor, floor_kind = scan_floor(scans, x, sigma_px), FLOOR_FROM_SCANS
    elif noise_texture is not None:
        floor, floor_kind = estimated_scan_floor(x, sigma_px, spacing, noise_texture), FLOOR_ESTIMATED
    if floor is None and refined:
        raise ValueError("refined invariances need a rescan floor: pass scans= (noise-only scans of x's anatomy) "
                         "or noise_texture= (analysis_folder.model_noise_texture(model)[0]); judged by their own "
                         "noise, their pure noise is flagged as anatomy change")
    if floor is None and refined is None and not null_shape:
        warnings.warn("method A judges these invariances as unrefined (no rescan floor given): if they were sampled "
                      "with the consistency refinement (Invariances.refinement; the bundled models' default), pass "
                      "refined=True with noise_texture= or scans=, or their noise is flagged; refined=False says "
                      "they are unrefined", RuntimeWarning)
    # the noise-only std's spatial shape: the filter's gain at the reflected border, or the null's
    dof = None
    if null_shape:
        gain, dof = noise_shape(null_difference, SHAPE_WINDOW * sigma_px)
    else:
        gain = np.sqrt(border_gain(x.shape, sigma_px))

    def standardise(differences: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        sig = np.stack([local_noise_std(d / gain, window_px, noisy) for d in differences]) * gain[None]
        med = np.array([float(np.median(s)) for s in sig])
        sig = np.maximum(sig, 1e-3 * med[:, None, None] + 1e-6)
        z = differences / sig
        return (z if dof is None else t_to_z(z, dof[None])), med

    output_difference = None
    if (denoised is None) != (denoised_invariances is None):
        raise ValueError("give both f(x) (denoised) and f(x~) (denoised_invariances), or neither")
    if denoised is not None:
        outputs, y = _stack(denoised_invariances, "denoised_invariances"), _image(denoised, "denoised")
        if outputs.shape != stack.shape or y.shape != x.shape:
            raise ValueError(f"f(x) and f(x~) must have the shapes of x and the invariances ({x.shape}, "
                             f"{stack.shape}); got {y.shape} and {outputs.shape}")
        output_difference = reference_filter(outputs - y[None], sigma_px)
    z, sigma_median = standardise(difference)
    z = np.where(noisy[None], z, 0.0)  # nothing to find in constant fill (padding, outside the field of view)
    lam = roughness(z, noisy)
    threshold = float(threshold_z) if threshold_z is not None else rft_threshold(x.shape, lam, alpha)
    calibration = None
    if null is not None:  # the same test on noise-only differences x'_j - x: how many false regions?
        null_z, _ = standardise(null_difference)
        null_z = np.where(noisy[None], null_z, 0.0)
        counts = [len(altered_regions(null_z[j], null_difference[j], threshold, spacing, min_area_mm2, extent_z,
                                      peak_radius_px=sigma_px, floor_hu=floor)[1])  # f of the null: not at hand
                  for j in range(null.shape[0])]
        calibration = {"null_count": int(null.shape[0]), "false_regions": int(sum(counts)),
                       "false_regions_per_image": float(np.mean(counts)),
                       "images_with_false_regions": int(sum(c > 0 for c in counts))}
    labels = np.zeros(z.shape, np.uint8)
    samples = []
    for k in range(z.shape[0]):
        labels[k], regions, seen = altered_regions(
            z[k], difference[k], threshold, spacing, min_area_mm2, extent_z, peak_radius_px=sigma_px,
            output_difference_hu=None if output_difference is None else output_difference[k],
            max_passed_on=max_passed_on, floor_hu=floor)
        samples.append({"index": k, "area_mm2": float(sum(r["area_mm2"] for r in regions)),
                        "peak_abs_hu": float(max((r["peak_abs_hu"] for r in regions), default=0.0)),
                        "region_count": len(regions), "max_abs_z": float(np.abs(z[k]).max()),
                        "noise_sigma_hu": float(sigma_median[k]), "regions": regions, "seen_by_f": seen})
    order = sorted(range(len(samples)), key=lambda k: (-samples[k]["area_mm2"], -samples[k]["peak_abs_hu"],
                                                        -samples[k]["max_abs_z"], k))
    for rank, k in enumerate(order, start=1):
        samples[k]["rank"] = rank
    return StructureChange(z.astype(np.float32), difference.astype(np.float32), labels, samples, threshold, extent_z,
                           float(min_area_mm2), float(alpha), sigma_px, sigma_px * math.sqrt(spacing[0] * spacing[1]),
                           lam, calibration, None if output_difference is None else float(max_passed_on),
                           bool(null_shape), floor_kind)


# ----------------------------------------------------------------------------- method B


def benjamini_hochberg(p, method: str = "bh") -> np.ndarray:
    """Adjusted p-values (q-values) of the Benjamini-Hochberg step-up procedure ("bh"), or of
    Benjamini-Yekutieli ("by", valid under any dependence); same shape as ``p``. Reject the
    hypotheses with ``q <= level`` to control the false discovery rate at ``level``."""
    p = np.asarray(p, dtype=np.float64)
    flat = p.ravel()
    m = flat.size
    if m == 0:
        return p.copy()
    order = np.argsort(flat)
    scale = m / np.arange(1, m + 1)
    if method == "by":
        scale = scale * np.sum(1.0 / np.arange(1, m + 1))
    elif method != "bh":
        raise ValueError(f"method is 'bh' or 'by'; got {method!r}")
    adjusted = np.minimum.accumulate((flat[order] * scale)[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(adjusted, 1.0)
    return q.reshape(p.shape)


def _variance_ratio_p(a: np.ndarray, b: np.ndarray,
                      noise_scaling: str) -> Tuple[np.ndarray, np.ndarray, float, float]:
    """One-sided p-values of ``var(a) > var(b)`` per pixel (stacks, axis 0 the realisation),
    the (scaled) variance ratio, the scale factor applied and the global ratio measured."""
    d1, d2 = a.shape[0] - 1, b.shape[0] - 1
    va, vb = a.var(axis=0, ddof=1), b.var(axis=0, ddof=1)
    noisy = vb > 1e-6 * max(float(np.median(vb)), 1e-12)  # not the noise-free air outside the field of view
    ratio = np.where(noisy, va / np.maximum(vb, 1e-12), 0.0)
    measured = float(np.median(ratio[noisy]) / stats.f.median(d1, d2)) if noisy.any() else 1.0
    if noise_scaling == "median":
        scale = max(measured, 1.0)  # a global excess of noise is discounted, a deficit is not scaled up
    elif noise_scaling == "none":
        scale = 1.0
    else:
        raise ValueError(f"noise_scaling is 'median' or 'none'; got {noise_scaling!r}")
    ratio = ratio / scale
    return stats.f.sf(ratio, d1, d2), ratio, scale, measured


@dataclass
class EnsembleTest:
    """Method B's result for one input.

    Attributes:
        significance: ``-log10 q`` per pixel ``(H, W)`` (q: FDR-adjusted p-value).
        q, p: adjusted and raw p-values ``(H, W)``.
        variance_ratio: (scaled) variance ratio invariances / null per pixel ``(H, W)``.
        labels: flagged regions ``(H, W)`` uint8 (1 inside, 0 elsewhere).
        noise_scale: variance ratio discounted as a global excess of noise amplitude (>= 1
            with "median" scaling; the measured global ratio is ``details["noise_variance_ratio"]``).
        details: JSON-ready numbers (:meth:`summary`): null source and size, FDR method and
            level, flagged area (mm^2) and share, regions, calibration on the null.
    """

    significance: np.ndarray
    q: np.ndarray
    p: np.ndarray
    variance_ratio: np.ndarray
    labels: np.ndarray
    noise_scale: float
    details: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return dict(self.details)


def ensemble_test(invariances, null, spacing=(1.0, 1.0), *, sigma_px: Optional[float] = None,
                  fdr: float = FDR, method: str = "bh", noise_scaling: str = "median", min_area_mm2: float = 0.0,
                  null_source: str = "given") -> EnsembleTest:
    """Method B: do the invariances vary more than noise alone, per pixel? (module docstring)

    Args:
        invariances: x~_k ``(K, H, W)`` HU, K >= 3.
        null: noise-only variants of x at the same dose ``(J, H, W)`` HU, J >= 3.
        spacing: pixel size ``(x, y)`` mm.
        sigma_px: reference filter width; default :func:`reference_sigma_px` of the null.
        fdr: false discovery rate level; method: "bh" or "by".
        noise_scaling: "median" (discount a global excess of noise amplitude) or "none".
        min_area_mm2: drop flagged regions smaller than this (0: keep all, the FDR's own).
        null_source: how the null was made, recorded in the summary ("simulator",
            "cvae posterior", "given").
    """
    stack = _stack(invariances, "invariances")
    null = _stack(null, "null")
    if stack.shape[0] < 3 or null.shape[0] < 3:
        raise ValueError(f"method B needs at least 3 invariances and 3 noise-only images; got {stack.shape[0]} "
                         f"and {null.shape[0]}")
    if stack.shape[1:] != null.shape[1:]:
        raise ValueError(f"invariances {stack.shape[1:]} and null {null.shape[1:]} differ in size")
    if not 0.0 < fdr < 1.0:
        raise ValueError(f"the FDR level must be in (0, 1); got {fdr}")
    spacing = _spacing(spacing)
    sigma_px = float(sigma_px or reference_sigma_px(null - null.mean(axis=0), spacing))
    filtered, filtered_null = reference_filter(stack, sigma_px), reference_filter(null, sigma_px)
    p, ratio, scale, measured = _variance_ratio_p(filtered, filtered_null, noise_scaling)
    q = benjamini_hochberg(p, method)
    flagged = q <= fdr
    # how much the invariances vary beyond noise (HU): a flagged region is outlined on it as
    # in method A, so its area is the varying structure's
    excess = np.sqrt(np.maximum(filtered.var(axis=0, ddof=1) - scale * filtered_null.var(axis=0, ddof=1), 0.0))
    components, n = ndimage.label(flagged)
    px = pixel_area_mm2(spacing)
    labels = np.zeros(flagged.shape, np.uint8)
    regions = []
    for c in range(1, n + 1):
        component = components == c
        core, m = ndimage.label(outline(excess, component, sigma_px))
        for piece_id in range(1, m + 1):
            piece = core == piece_id
            area = float(piece.sum() * px)
            if area < min_area_mm2:
                continue
            labels[piece] = 1
            rows, cols = np.nonzero(piece)
            regions.append({"area_mm2": area, "min_q": float(q[piece].min()),
                            "peak_excess_std_hu": float(excess[piece].max()),
                            "centroid_ij": [float(cols.mean()), float(rows.mean())]})
    calibration = None
    if null.shape[0] >= 6:  # the null against itself: how often does pure noise get flagged?
        p_null, _, _, _ = _variance_ratio_p(filtered_null[0::2], filtered_null[1::2], noise_scaling)
        calibration = {"null_split": [int(filtered_null[0::2].shape[0]), int(filtered_null[1::2].shape[0])],
                       "flagged_fraction": float((benjamini_hochberg(p_null, method) <= fdr).mean()),
                       "p_below_0.05_fraction": float((p_null < 0.05).mean())}
    significance = -np.log10(np.maximum(q, 1e-300))
    details = {"null_source": null_source, "null_count": int(null.shape[0]), "invariance_count": int(stack.shape[0]),
               "test": "per-pixel variance ratio F(K-1, J-1) of reference-filtered images, one-sided",
               "fdr_method": "Benjamini-Hochberg" if method == "bh" else "Benjamini-Yekutieli", "fdr_level": fdr,
               "noise_scaling": noise_scaling, "noise_scale": scale, "noise_variance_ratio": measured,
               "reference_filter": {"kind": "gaussian", "sigma_px": sigma_px,
                                    "sigma_mm": sigma_px * math.sqrt(spacing[0] * spacing[1])},
               "flagged_area_mm2": float(labels.sum() * px), "flagged_fraction": float(labels.mean()),
               "significant_area_mm2": float(flagged.sum() * px),
               "region_count": len(regions), "regions": regions, "min_area_mm2": float(min_area_mm2),
               "max_significance": float(significance.max()), "calibration": calibration}
    return EnsembleTest(significance.astype(np.float32), q.astype(np.float32), p.astype(np.float32),
                        ratio.astype(np.float32), labels, scale, details)


# ----------------------------------------------------------------------------- noise-only ensembles


def simulate_noise_only(full_dose_hu, dose: float, count: int, seed: int = 0, *, spacing: float = None,
                        simulator=None, batch: int = 4) -> np.ndarray:
    """``count`` low-dose realisations ``(count, H, W)`` (HU) of a full-dose slice at ``dose``
    with the scan simulator (:class:`~.lowdose.LowDoseSimulator`, made for the slice's size
    and ``spacing`` mm unless given): the noise-only null of method B when the full-dose
    image is at hand. The realisations of a batch (``batch`` at a time) share one noise seed,
    ``seed`` + the index of its first: calls whose seeds differ by less than ``count`` repeat
    realisations, so give independent nulls seeds far apart."""
    from .lowdose import LowDoseSimulator

    full = _image(full_dose_hu, "full-dose image").astype(np.float32)
    if simulator is None:
        if spacing is None:
            raise ValueError("give the pixel spacing (mm) or a simulator")
        simulator = LowDoseSimulator(full.shape[-1], float(spacing))
    out = np.empty((int(count),) + full.shape, np.float32)
    for first in range(0, int(count), batch):
        n = min(batch, int(count) - first)
        pair = simulator.simulate(np.repeat(full[None], n, 0), dose=dose, seed=seed + first, noiseless=False)
        out[first:first + n] = pair.low_dose
    return out
