"""Noise of CT images: robust amplitude (HU), noise power spectrum, and the paper's first finding.

The paper's first finding (docs/method.md, section 5) is that every denoiser f it studies is
invariant to the *noise amplitude and realisation* of its input: images with other noise map
to the same f(x). This module measures that for one input x and its invariances x~_k:

* :func:`estimate_noise` — the noise standard deviation of one image in HU, robustly: the
  median absolute deviation (MAD) of a high-pass residual ``r = image - G_s * image``
  (Gaussian background of :data:`BACKGROUND_SIGMA_PX` pixels), restricted to *uniform soft
  tissue* found automatically (smoothed HU in :data:`UNIFORM_TISSUE_HU`, away from edges,
  local residual energy not above twice the noise variance, iterated) or to a region of interest the caller
  gives. Why this estimator:

  - the high-pass residual removes anatomy (which varies slowly inside uniform tissue) but
    keeps almost all the noise power: CT noise after filtered back-projection has a
    ramp-shaped noise power spectrum that vanishes at zero frequency, and the Gaussian
    background of 5 pixels removes a fraction ``2 g0 - sum g^2 = 3/(4 pi s^2) = 1.0 %`` of
    white-noise power (amplitude bias -0.5 %) and about 3 % of the amplitude of quarter-dose CT noise of the
    scan simulator (whose NPS peaks at a quarter of the Nyquist frequency); no correction
    is applied;
  - the MAD (times 1.4826, exact for Gaussian noise) ignores the residual's outliers at
    the edges of the region that survive the selection;
  - noise in CT is not stationary (it grows towards the body's centre), so the estimate is
    the noise *where it is measured*; the region used is returned with it.

  Limitation: fine anatomical texture inside the chosen region cannot be told from noise
  in one image; where no uniform tissue is in view (a patch all lung, coarse pixels) the
  estimate is an upper bound — give an ROI of uniform tissue then. Ratios between images of
  the same anatomy (x and its invariances, measured on the same pixels) are less affected.

* :func:`noise_power_spectrum` — the 2D NPS ``|DFT(n)|^2 dx dy / (Nx Ny)`` (HU^2 mm^2,
  frequencies in 1/mm from the pixel spacing), averaged over realisations and radially;
  its integral over frequency is the noise variance (Parseval), the convention of
  ICRU Report 87 and AAPM TG-233. :func:`correlation_length_mm` condenses it into one
  length (half the period of the NPS-weighted mean frequency), used to size the reference
  filter of :mod:`.analysis`.

* :func:`noise_summary` — for x and every x~_k: their noise amplitudes, the spread of the
  invariances' amplitudes relative to the input's, the correlation of their noise (high-pass
  residuals) with the input's (near 0: other noise realisations), and radial NPS curves.

All functions take 2D ``(H, W)`` images (or stacks ``(N, H, W)`` where stated) in HU and a
pixel spacing ``(x, y)`` in mm; nothing here imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
from scipy import ndimage

#: Width (pixels, Gaussian sigma) of the smooth background removed before measuring noise.
BACKGROUND_SIGMA_PX = 5.0
#: Smoothed HU of the tissue counted as "soft tissue" for noise measurement (fat, muscle,
#: blood, organs; not lung, air or bone, whose texture or streaks are not noise).
UNIFORM_TISSUE_HU: Tuple[float, float] = (-150.0, 150.0)
#: Fewest pixels a noise estimate uses before it falls back to a larger region.
MIN_PIXELS = 64
#: Local residual energy (relative to the noise variance) above which a pixel is not flat.
FLAT_ENERGY = 2.0
#: MAD -> standard deviation for Gaussian data.
MAD_TO_STD = 1.4826


def robust_std(values) -> float:
    """Standard deviation of (mostly) Gaussian values from their median absolute deviation."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return float("nan")
    return float(MAD_TO_STD * np.median(np.abs(v - np.median(v))))


def _as_images(images) -> np.ndarray:
    a = np.asarray(getattr(images, "array", images), dtype=np.float64)
    if a.ndim not in (2, 3):
        raise ValueError(f"expected a 2D image (H, W) or a stack (N, H, W); got shape {a.shape}")
    return a


def _spacing2(spacing) -> Tuple[float, float]:
    s = tuple(float(v) for v in (spacing if spacing is not None else (1.0, 1.0)))[:2]
    if len(s) != 2 or min(s) <= 0:
        raise ValueError(f"pixel spacing (x, y) must be two positive numbers in mm; got {spacing}")
    return s


def high_pass_residual(image, sigma_px: float = BACKGROUND_SIGMA_PX) -> np.ndarray:
    """``image - G_sigma * image`` (HU) over the last two axes: the noise plus fine structure."""
    a = _as_images(image)
    sig = (0.0,) * (a.ndim - 2) + (sigma_px, sigma_px)
    return a - ndimage.gaussian_filter(a, sig, mode="reflect")


def uniform_tissue_mask(image, hu_range: Tuple[float, float] = UNIFORM_TISSUE_HU,
                        sigma_px: float = BACKGROUND_SIGMA_PX, window_px: int = 7) -> np.ndarray:
    """Pixels of uniform soft tissue in a 2D image: smoothed HU inside ``hu_range``, at least
    ``sigma_px`` pixels from the range's border (erosion), and flat: local residual energy
    (mean of ``r^2`` over ``window_px`` x ``window_px``) at most :data:`FLAT_ENERGY` times
    the noise variance (no edges, no texture)."""
    a = _as_images(image)
    if a.ndim != 2:
        raise ValueError("uniform_tissue_mask takes one 2D image")
    smooth = ndimage.gaussian_filter(a, sigma_px, mode="reflect")
    tissue = (smooth >= hu_range[0]) & (smooth <= hu_range[1])
    radius = int(np.ceil(sigma_px))
    tissue = ndimage.binary_erosion(tissue, structure=np.ones((2 * radius + 1,) * 2, bool), border_value=1)
    return tissue & _flat(a - smooth, tissue, window_px)


def _flat(residual: np.ndarray, candidates: np.ndarray, window_px: int, rounds: int = 5) -> np.ndarray:
    """The candidates whose local mean residual energy (``window_px`` square) is at most
    :data:`FLAT_ENERGY` times the noise variance, the variance estimated robustly on the
    pixels kept so far (a few rounds of this clipping: edges and texture drop out, pure noise
    loses about 2 % of its windows, so the estimate is barely biased)."""
    if not candidates.any():
        return candidates
    energy = ndimage.uniform_filter(residual ** 2, window_px, mode="reflect")
    kept = candidates & (energy <= 4.0 * np.median(energy[candidates]))
    for _ in range(rounds):
        if kept.sum() < 8:
            break
        variance = robust_std(residual[kept]) ** 2
        new = candidates & (energy <= FLAT_ENERGY * variance)
        if new.sum() < 8 or np.array_equal(new, kept):
            break
        kept = new
    return kept


@dataclass
class NoiseEstimate:
    """A noise amplitude: ``std_hu`` (HU) measured on ``pixels`` pixels of ``region``
    ("roi": the caller's mask; "soft tissue": found automatically; "whole image": the
    fall-back when too little uniform soft tissue is in view). ``mask`` are those pixels."""

    std_hu: float
    pixels: int
    region: str
    mask: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {"std_hu": self.std_hu, "pixels": self.pixels, "region": self.region}


def estimate_noise(image, mask: Optional[np.ndarray] = None, *, sigma_px: float = BACKGROUND_SIGMA_PX,
                   hu_range: Tuple[float, float] = UNIFORM_TISSUE_HU, min_pixels: int = MIN_PIXELS) -> NoiseEstimate:
    """Noise standard deviation (HU) of a 2D CT image (see the module docstring).

    Args:
        image: ``(H, W)`` HU (or a :class:`~.image.CTImage` slice).
        mask: optional region of interest ``(H, W)`` (bool): measure there (its flat part)
            instead of in automatically found uniform soft tissue.
        sigma_px: Gaussian background width in pixels.
        hu_range: smoothed HU counted as soft tissue.
        min_pixels: fewest pixels to use; with fewer uniform soft-tissue pixels the whole
            image's flat part is used (``region`` says which).
    """
    a = _as_images(image)
    if a.ndim != 2:
        raise ValueError("estimate_noise takes one 2D image; loop over a stack")
    residual = high_pass_residual(a, sigma_px)
    if mask is not None:
        roi = np.asarray(mask, dtype=bool)
        if roi.shape != a.shape:
            raise ValueError(f"ROI mask shape {roi.shape} differs from the image's {a.shape}")
        if roi.sum() < 8:
            raise ValueError(f"the ROI holds {int(roi.sum())} pixels; give at least 8")
        chosen, region = _flat(residual, roi, 7), "roi"
    else:
        chosen, region = uniform_tissue_mask(a, hu_range, sigma_px), "soft tissue"
        if chosen.sum() < min(min_pixels, a.size // 4):
            # inside the body (not the noise-free air a scanner shows outside its field of view)
            body = ndimage.gaussian_filter(a, sigma_px, mode="reflect") > -900.0
            body = body if body.sum() >= 8 else np.abs(residual) > 1e-3
            chosen, region = _flat(residual, body, 7), "whole image"
    return NoiseEstimate(robust_std(residual[chosen]), int(chosen.sum()), region, chosen)


# ----------------------------------------------------------------------------- noise power spectrum


@dataclass
class NoisePowerSpectrum:
    """A noise power spectrum (NPS).

    Attributes:
        frequency_per_mm: centres of the radial bins (1/mm).
        radial: radially averaged NPS at those frequencies (HU^2 mm^2).
        nps_2d: the 2D NPS, zero frequency in the centre (``fftshift``), HU^2 mm^2.
        fx_per_mm, fy_per_mm: the 2D frequency axes (1/mm, shifted).
        variance_hu2: the integral of the NPS (= the variance of the noise that was
            measured, HU^2).
        realisations: how many noise images were averaged.
    """

    frequency_per_mm: np.ndarray
    radial: np.ndarray
    nps_2d: np.ndarray
    fx_per_mm: np.ndarray
    fy_per_mm: np.ndarray
    variance_hu2: float
    realisations: int

    @property
    def mean_frequency_per_mm(self) -> float:
        """NPS-weighted mean radial frequency (1/mm): higher for finer noise grain."""
        fr = np.hypot(*np.meshgrid(self.fx_per_mm, self.fy_per_mm))
        return float((fr * self.nps_2d).sum() / max(self.nps_2d.sum(), 1e-30))


def _detrend_poly2(a: np.ndarray) -> np.ndarray:
    """Subtract a least-squares quadratic surface from each image of ``(N, H, W)``."""
    n, h, w = a.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = (x - x.mean()) / max(w, 1), (y - y.mean()) / max(h, 1)
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], -1).reshape(-1, 6)
    coef, *_ = np.linalg.lstsq(basis, a.reshape(n, -1).T, rcond=None)
    return a - (basis @ coef).T.reshape(n, h, w)


def noise_power_spectrum(noise, spacing=(1.0, 1.0), *, detrend: str = "poly2", bins: Optional[int] = None
                         ) -> NoisePowerSpectrum:
    """NPS of noise-only images (HU), ``(H, W)`` or ``(N, H, W)`` realisations.

    ``detrend``: "poly2" subtracts a quadratic surface per image (the standard for ROIs of
    a uniform phantom), "mean" its mean, "none" nothing (for noise already centred, e.g.
    differences of realisations or high-pass residuals). ``spacing``: pixel size (x, y) in
    mm. Radial bins are ``bins`` (default ``min(H, W) // 2``) up to the Nyquist frequency of
    the coarser axis.
    """
    a = _as_images(noise)
    a = a[None] if a.ndim == 2 else a
    n, h, w = a.shape
    dx, dy = _spacing2(spacing)
    if detrend == "poly2":
        a = _detrend_poly2(a)
    elif detrend == "mean":
        a = a - a.mean(axis=(1, 2), keepdims=True)
    elif detrend != "none":
        raise ValueError(f"detrend is 'poly2', 'mean' or 'none'; got {detrend!r}")
    spectrum = (np.abs(np.fft.fft2(a)) ** 2).mean(axis=0) * dx * dy / (h * w)
    nps = np.fft.fftshift(spectrum)
    fx = np.fft.fftshift(np.fft.fftfreq(w, d=dx))
    fy = np.fft.fftshift(np.fft.fftfreq(h, d=dy))
    fr = np.hypot(*np.meshgrid(fx, fy))
    nyquist = 0.5 / max(dx, dy)
    bins = int(bins or max(min(h, w) // 2, 2))
    edges = np.linspace(0.0, nyquist, bins + 1)
    index = np.digitize(fr.ravel(), edges) - 1
    valid = (index >= 0) & (index < bins)
    sums = np.bincount(index[valid], weights=nps.ravel()[valid], minlength=bins)
    counts = np.bincount(index[valid], minlength=bins)
    radial = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    variance = float(nps.sum() / (w * dx * h * dy))  # sum over the frequency grid times df_x df_y
    return NoisePowerSpectrum(0.5 * (edges[1:] + edges[:-1]), radial, nps, fx, fy, variance, n)


@dataclass
class NoiseTexture:
    """The shape of a noise power spectrum: the radial NPS of noise-only images scaled to
    unit variance (``nps``, mm^2 per HU^2 of noise, at ``frequency_per_mm``, out to the
    corners of the frequency square of half-width ``nyquist_per_mm``). The share of the
    noise variance that a linear filter passes depends on the texture alone
    (:meth:`passed_fraction`), so one measured amplitude and the texture give the noise of
    any filtered version. A model folder stores the texture of its training data's noise
    (``metadata["noise_texture"]``: of the low- minus full-dose differences), the noise of
    the images its denoiser was made for."""

    frequency_per_mm: np.ndarray
    nps: np.ndarray
    nyquist_per_mm: float

    def passed_fraction(self, transfer, grid: int = 256) -> float:
        """The share of the noise variance a radially symmetric filter of transfer function
        ``transfer(frequency_per_mm)`` passes: ``int NPS |H|^2 / int NPS`` over the frequency
        square (the radial NPS interpolated onto a ``grid`` x ``grid`` raster of it)."""
        axis = (np.arange(grid) + 0.5) / grid * 2.0 * self.nyquist_per_mm - self.nyquist_per_mm
        radius = np.hypot(*np.meshgrid(axis, axis))
        nps = np.interp(radius, self.frequency_per_mm, self.nps)
        return float((nps * np.square(transfer(radius))).sum() / max(nps.sum(), 1e-30))

    def gaussian_fraction(self, sigma_mm: float) -> float:
        """The share passed by a Gaussian low-pass of ``sigma_mm``."""
        return self.passed_fraction(lambda f: np.exp(-2.0 * (math.pi * sigma_mm * f) ** 2))

    def high_pass_fraction(self, sigma_mm: float) -> float:
        """The share passed by :func:`high_pass_residual` with a background of ``sigma_mm``."""
        return self.passed_fraction(lambda f: 1.0 - np.exp(-2.0 * (math.pi * sigma_mm * f) ** 2))

    def to_dict(self) -> dict:
        return {"frequency_per_mm": [round(float(v), 6) for v in self.frequency_per_mm],
                "nps_per_variance_mm2": [float(f"{v:.5g}") for v in self.nps],
                "nyquist_per_mm": float(self.nyquist_per_mm)}

    @classmethod
    def from_dict(cls, record: dict) -> "NoiseTexture":
        try:
            f = np.asarray(record["frequency_per_mm"], dtype=np.float64)
            nps = np.asarray(record["nps_per_variance_mm2"], dtype=np.float64)
            nyquist = float(record["nyquist_per_mm"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a noise texture record ({error!r}): it needs frequency_per_mm, "
                             "nps_per_variance_mm2 and nyquist_per_mm") from None
        if (f.ndim != 1 or f.shape != nps.shape or f.size < 4 or not np.all(np.isfinite(nps)) or nps.min() < 0
                or nps.max() <= 0 or not nyquist > 0):
            raise ValueError("a noise texture needs matching lists frequency_per_mm and nps_per_variance_mm2 (at least "
                             "4 finite, non-negative values, not all 0) and a positive nyquist_per_mm")
        return cls(f, nps, nyquist)


def noise_texture(noise, spacing=(1.0, 1.0)) -> NoiseTexture:
    """The :class:`NoiseTexture` of noise-only images ``(H, W)`` or ``(N, H, W)`` (HU; e.g.
    low- minus full-dose differences; each image's mean is removed): their 2D NPS averaged
    over rings one frequency step wide, out to the corners of the frequency square."""
    nps = noise_power_spectrum(noise, spacing, detrend="mean")
    radius = np.hypot(*np.meshgrid(nps.fx_per_mm, nps.fy_per_mm)).ravel()
    step = min(np.diff(nps.fx_per_mm).min(), np.diff(nps.fy_per_mm).min())
    ring = np.rint(radius / step).astype(int)
    sums = np.bincount(ring, weights=nps.nps_2d.ravel())
    counts = np.bincount(ring)
    kept = counts > 0
    nyquist = min(float(np.abs(nps.fx_per_mm).max()), float(np.abs(nps.fy_per_mm).max()))
    return NoiseTexture(np.arange(len(sums))[kept] * step, sums[kept] / counts[kept] / max(nps.variance_hu2, 1e-30),
                        nyquist)


def correlation_length_mm(nps: NoisePowerSpectrum) -> float:
    """A noise grain size in mm: ``1 / (2 f_mean)`` with ``f_mean`` the NPS-weighted mean
    radial frequency (white noise on a grid of pixel ``d``: about ``1.3 d``)."""
    return 0.5 / max(nps.mean_frequency_per_mm, 1e-12)


# ----------------------------------------------------------------------------- summaries


def _robust_cov(a: np.ndarray, b: np.ndarray) -> float:
    """Covariance of two (mostly Gaussian) samples from robust variances of their sum and difference."""
    return 0.25 * (robust_std(a + b) ** 2 - robust_std(a - b) ** 2)


def noise_summary(x, invariances, spacing=(1.0, 1.0), mask: Optional[np.ndarray] = None) -> dict:
    """Does f ignore noise amplitude and realisation? Numbers for x and every x~_k.

    Two measurements, both on the pixels of x's noise region (:func:`estimate_noise`):

    * single-image: each image's noise std from its own high-pass residual, and the
      correlation of the residuals of x~_k and x (about 1 for the same noise realisation,
      about 0 for another). Fine anatomical texture shared by x and x~_k counts as noise
      here, pulling ratios towards 1 and correlations upwards — hence the flat region;
    * ensemble-referenced (K >= 4): the noise that *varies* over the ensemble, free of any
      anatomy: the mean of the other invariances (their common anatomy plus 1/(K-1) of their
      noise, whose variance is taken out exactly) is subtracted from x~_k and from x.
      Noise shared by all images (x's own realisation kept by every x~_k) cannot be told
      from anatomy this way, so the single-image correlation decides about realisations, and
      this measurement gives the amplitudes when the realisations differ.

    Returns a JSON-ready dict:

    * ``input``: x's :class:`NoiseEstimate` (``std_hu``, ``pixels``, ``region``) and
      ``varying_std_hu`` (ensemble-referenced; None with K < 4);
    * ``samples``: per x~_k ``{"index", "std_hu", "ratio_to_input", "residual_correlation",
      "varying_std_hu", "varying_ratio_to_input"}``;
    * ``amplitude``: ``{"min_ratio", "max_ratio", "median_ratio", "spread_ratio", "basis"}``
      — spread_ratio = (max - min) of the noise amplitudes f maps to the same output,
      relative to the input's; ``basis`` says which ratios: "ensemble-referenced" when K >= 4
      and the realisations differ (mean |correlation| < 0.5), else "single-image";
    * ``realisation``: mean and max |residual correlation|;
    * ``nps``: radial NPS (HU^2 mm^2) of x's and the mean of the x~_k's high-pass residuals
      at ``frequency_per_mm``, and the correlation lengths (mm);
    * ``answer``: one plain sentence.
    """
    x = _as_images(x)
    stack = _as_images(invariances)
    stack = stack[None] if stack.ndim == 2 else stack
    if stack.shape[1:] != x.shape:
        raise ValueError(f"invariances of in-plane shape {stack.shape[1:]} differ from x's {x.shape}")
    reference = estimate_noise(x, mask)
    region = reference.mask
    count = stack.shape[0]
    rx = high_pass_residual(x)[region]
    samples = []
    for k, xk in enumerate(stack):
        rk = high_pass_residual(xk)[region]
        std_k = robust_std(rk)
        denom = reference.std_hu * std_k
        samples.append({"index": k, "std_hu": std_k,
                        "ratio_to_input": std_k / reference.std_hu if reference.std_hu > 0 else float("nan"),
                        "residual_correlation": float(np.clip(_robust_cov(rx, rk) / denom, -1, 1)) if denom > 0 else 0.0,
                        "varying_std_hu": None, "varying_ratio_to_input": None})
    varying_input = None
    if count >= 4:
        total = stack.sum(axis=0)
        v = np.array([robust_std(high_pass_residual(stack[k] - (total - stack[k]) / (count - 1))[region]) ** 2
                      for k in range(count)])
        # v_k = s_k^2 + (S - s_k^2) / (K-1)^2 with S the sum of all s_j^2: solve for S, then each s_k^2
        total_var = v.sum() * (count - 1) / count
        own = np.maximum((v - total_var / (count - 1) ** 2) / (1.0 - 1.0 / (count - 1) ** 2), 0.0)
        input_var = robust_std(high_pass_residual(x - total / count)[region]) ** 2 - total_var / count ** 2
        varying_input = math.sqrt(max(input_var, 0.0))
        for k, sample in enumerate(samples):
            sample["varying_std_hu"] = math.sqrt(own[k])
            sample["varying_ratio_to_input"] = math.sqrt(own[k]) / varying_input if varying_input > 0 else None
    correlations = np.abs([s["residual_correlation"] for s in samples])
    realisation = {"mean_abs_correlation": float(correlations.mean()), "max_abs_correlation": float(correlations.max())}
    basis = ("ensemble-referenced" if varying_input and realisation["mean_abs_correlation"] < 0.5
             else "single-image")
    key = "varying_ratio_to_input" if basis == "ensemble-referenced" else "ratio_to_input"
    ratios = np.array([s[key] for s in samples], dtype=float)
    amplitude = {"min_ratio": float(ratios.min()), "max_ratio": float(ratios.max()),
                 "median_ratio": float(np.median(ratios)), "spread_ratio": float(ratios.max() - ratios.min()),
                 "basis": basis}
    nps_x = noise_power_spectrum(high_pass_residual(x), spacing, detrend="none")
    nps_k = noise_power_spectrum(high_pass_residual(stack), spacing, detrend="none")
    answer = (f"input noise {reference.std_hu:.1f} HU ({reference.region}, {reference.pixels} px); the invariances' "
              f"noise spans {amplitude['min_ratio']:.2f}x to {amplitude['max_ratio']:.2f}x of the input's ({basis}) "
              f"and correlates with it by {realisation['mean_abs_correlation']:.2f} on average (0: other "
              "realisations): f maps "
              + ("other noise realisations" if realisation["mean_abs_correlation"] < 0.5 else "the same noise realisation")
              + (" and noise amplitudes" if amplitude["spread_ratio"] > 0.2 else "")
              + " to the same output")
    return {"input": {**reference.to_dict(), "varying_std_hu": varying_input},
            "samples": samples, "amplitude": amplitude, "realisation": realisation,
            "nps": {"frequency_per_mm": nps_x.frequency_per_mm.tolist(),
                    "input_hu2_mm2": np.nan_to_num(nps_x.radial).tolist(),
                    "invariances_mean_hu2_mm2": np.nan_to_num(nps_k.radial).tolist(),
                    "input_correlation_length_mm": correlation_length_mm(nps_x),
                    "invariances_correlation_length_mm": correlation_length_mm(nps_k),
                    "note": "NPS of the high-pass residual (Gaussian background of "
                            f"{BACKGROUND_SIGMA_PX:g} px removed): the lowest frequencies are suppressed"},
            "answer": answer}
