"""Fidelity figures of the invariance models of a denoiser, on held-out simulated slices.

Issue 4's bars, each measured on patches of the test split (never trained on) of a
simulated data set (:func:`held_out_patches`):

* **consistency** ``C = mean|f(x~) - f(x)| / mean|x~ - x|`` over samples and patches (the
  part of a change of the input that reaches f's output; bar: <= 0.35), beside the same
  ratio ``C'`` for a fresh noise realisation x' of the same slice;
* **noise baseline** ``B = mean|f(x~) - f(x)| / mean|f(x') - f(x)|``: the sampled
  invariances move f's output about as little as a new noise realisation does (bar: <= 1.5);
* **completeness** of the cVAE: ``mean|f(D(E(x), f(x))) - f(x)|`` (HU), and the noise of the
  reconstruction against that of x (noise = image - full dose): correlation of their radial
  noise power spectra (bar: >= 0.9) and the ratio of their standard deviations (bar: 0.8-1.25);
* **diversity**: mean pairwise ``|x~_i - x~_j|`` (> 0), beside ``mean|x' - x|`` and as a
  fraction of it;
* **spread consistency** (ours; no bar in issue 4): C of the samples about their own mean,
  ``mean|f(x~_k) - mean_k f(x~)| / mean|x~_k - mean_k x~|``. C counts the offset all samples
  share from x as well as how they differ; samples that barely differ, all near one
  pre-image of f(x), meet C without showing what f ignores among them. This figure says how
  much of the samples' own variation reaches f's output (compare C');
* **stripes** (ours; no bar in issue 4): how the invariances of a patch differ from each
  other by direction, :func:`stripe_figures` of ``x~_k - mean_k x~`` beside those of the
  noise of x (x - full dose): the stripe ratio (vertical over horizontal stripes; CT noise
  0.78 on the simulated data, RED-CNN's second models 8.8) and the axis share (power at
  frequencies near either axis: stripes and lines of a grid; CT noise 0.56, every decoder
  with nearest-neighbour upsampling above 0.9), which the radial noise power spectrum and
  the diversity cannot see; and the periodicity of the invariances' std map
  (:func:`periodicity`), which catches a grid or a lattice of the decoder that the axis
  share cannot (a lattice has power in every direction);
* **cINN**: held-out negative log-likelihood per dimension of the codes z, and the mean
  and standard deviation of ``v = t(z | f(x))`` (0 and 1 for a perfect flow).

The invariances are the sampler's, with the models' consistency refinement
(:class:`~.sampler.Refinement`, usually none). C, B, the two mean changes and the diversity
of the same samples with the other setting are reported beside them (``alternative``):
without refinement when the models have one, else with :data:`~.sampler.CHECKED_REFINEMENT`.

The fresh realisation x' is a new scan of the slice's object at the data set's dose
(:func:`another_realisation`): for a simulated data set the noise-free phantom is rebuilt
from the item's seed and scanned again with :class:`~.lowdose.LowDoseSimulator` and the data
set's scan parameters, so x and x' are two draws from exactly the same distribution (a
rescan of the stored full-dose image would add its own noise on top).

Data without full-dose images (:class:`~.datasets.LowDoseDicomDataset`) give no noise
texture (its noise is image - full dose), and data that are not simulated give no fresh
realisation x' (so no C', B nor realisation figures): those figures are None, with the
reason in ``not_measured``; C, the output error of the cVAE, diversity and the cINN figures
need neither and are always measured.

All differences are mean absolute values in HU. :func:`invariance_fidelity` computes all
figures (quality tests and benchmarks call it); :func:`invariance_card` writes them into the
model card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

#: Issue 4's bars: name -> (lower bound or None, upper bound or None).
BARS = {"consistency": (None, 0.35), "noise_baseline": (None, 1.5), "nps_correlation": (0.9, None),
        "noise_std_ratio": (0.8, 1.25), "diversity_hu": (0.0, None)}
#: Why a figure is None (``not_measured``).
NO_FULL_DOSE = ("the data have no full-dose images (low-dose only); the noise texture compares the noise "
                "(image - full dose) of the reconstruction with that of x")
NO_REALISATION = ("no fresh noise realisation x' of the same slice: only a simulated data set can scan its "
                  "phantom again")


# ----------------------------------------------------------------------------- held-out patches


@dataclass(frozen=True)
class HeldOutPatch:
    """A square patch of a held-out slice.

    Attributes:
        index: the slice's item index in its source.
        center: column and row ``(i, j)`` of the slice pixel the patch is centred on
            (:func:`~.sampler.crop_patch`).
        low_dose, full_dose: the patch in HU, ``(P, P)`` float32 (full dose None when the
            data have none).
    """

    index: int
    center: Tuple[int, int]
    low_dose: np.ndarray
    full_dose: Optional[np.ndarray]

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The same patch of another image of the slice (e.g. a new noise realisation)."""
        return _crop(image, self.center, self.low_dose.shape[0])


def _crop(image: np.ndarray, center: Tuple[int, int], size: int) -> np.ndarray:
    from .image import CTImage
    from .sampler import crop_patch

    return crop_patch(CTImage(np.asarray(image, dtype=np.float32), (1.0, 1.0, 1.0)), center, size).array


def held_out_patches(source, split: str, patch_size: int, slices: int = 8, per_slice: int = 2,
                     seed: int = 0) -> List[HeldOutPatch]:
    """``per_slice`` patches of ``patch_size`` pixels from each of up to ``slices`` slices of
    ``split`` (deterministic): centres drawn uniformly (numpy, from ``(seed, index)``) in
    the central half of the slice, where the body is, and far enough from the border that
    the patch (cut by :func:`~.sampler.crop_patch`) lies inside the image."""
    p = int(patch_size)
    patches = []
    from .datasets import split_indices

    for index in split_indices(source, split, slices):
        item = source[index]
        h, w = item.low_dose.shape
        if min(h, w) < p:
            raise ValueError(f"slice {index} is {w} x {h} pixels, smaller than the {p}-pixel patches")
        rng = np.random.default_rng([int(seed), int(index)])
        for _ in range(per_slice):
            j, i = (int(rng.integers(lo, hi + 1)) if lo <= hi else n // 2
                    for n in (h, w) for lo, hi in [(max(p // 2, n // 4), min(n - (p - p // 2), 3 * n // 4))])
            patches.append(HeldOutPatch(index, (i, j), _crop(item.low_dose, (i, j), p),
                                        None if item.full_dose is None else _crop(item.full_dose, (i, j), p)))
    return patches


def realisation_seed(index: int, seed: int = 0) -> int:
    """The noise seed of item ``index``'s fresh realisation x' in the fidelity figures of ``seed``."""
    return 1_000_003 + 7919 * index + seed


def another_realisation(source, index: int, seed: int) -> Optional[np.ndarray]:
    """A new low-dose scan (HU, the slice's shape) of item ``index`` of a simulated data set:
    its phantom rebuilt from the manifest's seed and scanned at the data set's dose with the
    same scan parameters and noise seed ``seed``. None for sources that are not simulated."""
    from .simulated_dataset import SimulatedDataset
    from .lowdose import LowDoseSimulator
    from .phantom import chest_phantom

    if not isinstance(source, SimulatedDataset):
        return None
    p, record = source.manifest["parameters"], source.items[index]
    scan = p["simulator"]
    phantom = chest_phantom(int(record["phantom_seed"]), size=int(p["size"]), spacing=float(p["spacing_mm"]),
                            contrast=bool(record["contrast"]))
    simulator = LowDoseSimulator(int(p["size"]), float(p["spacing_mm"]), photons=scan["photons_full_dose"],
                                 electronic_noise=scan["electronic_noise_quanta"], filter=scan["filter"],
                                 n_views=scan["geometry"]["n_views"])
    low = simulator.simulate(phantom.hu, dose=float(p["dose"]), seed=int(seed), noiseless=False).low_dose
    return np.clip(np.rint(low), -32768, 32767).astype(np.float32)  # stored as int16 HU, like the data set


# ----------------------------------------------------------------------------- noise texture


def radial_power_spectrum(noise: torch.Tensor, sectors: int = 1) -> torch.Tensor:
    """Radially averaged 2D noise power spectrum of noise patches ``(N, P, P)`` (HU or network
    units), each with its mean removed: ``|FFT|^2 / P^2`` averaged over patches and over rings
    of integer radius 0 .. P/2 - 1 (cycles per patch), in squared units per pixel; shape
    ``(P/2,)``. With ``sectors=2`` each ring is split by direction, shape ``(2, P/2)``: row 0
    the frequencies with |k_x| > |k_y| (patterns that vary along a row: vertical stripes),
    row 1 the rest (the zero frequency is in row 1; row 0 of ring 0 is 0). With
    ``sectors=3``, shape ``(3, P/2)``: the sectors of :func:`stripe_shares`, |k_x| > 2 |k_y|
    (row 0) and |k_y| > 2 |k_x| (row 1), and the diagonal rest (row 2, with the zero
    frequency), so that lines along the axes are told from noise of the same ring.
    Differentiable (the cVAE's noise-spectrum and sample-texture terms,
    :mod:`.train_invariance`, use it)."""
    if sectors not in (1, 2, 3):
        raise ValueError(f"sectors must be 1 (rings), 2 (rings split by direction) or 3 (axes and diagonals); "
                         f"got {sectors}")
    noise = noise - noise.mean(dim=(-2, -1), keepdim=True)
    p = noise.shape[-1]
    power = (torch.fft.fft2(noise).abs() ** 2).mean(dim=0) / (p * p)
    f = torch.fft.fftfreq(p, device=noise.device, dtype=torch.float64) * p
    ky, kx = torch.meshgrid(f, f, indexing="ij")
    ring = torch.round(torch.hypot(ky, kx)).long()
    keep = ring < p // 2
    if sectors == 3:
        row = torch.where(kx.abs() > 2 * ky.abs(), 0, torch.where(ky.abs() > 2 * kx.abs(), 1, 2))
    else:
        row = (kx.abs() <= ky.abs()).long() if sectors == 2 else torch.zeros_like(ring)
    bins, index = sectors * (p // 2), (ring + (p // 2) * row)[keep]
    sums = torch.zeros(bins, dtype=power.dtype, device=power.device).index_add(0, index, power[keep])
    spectrum = sums / torch.bincount(index, minlength=bins).clamp(min=1).to(power.dtype)
    return spectrum if sectors == 1 else spectrum.view(sectors, p // 2)


def stripe_shares(images: np.ndarray) -> Tuple[float, float]:
    """Shares of the 2D power of ``images`` ``(N, P, P)`` in the sectors |k_x| > 2 |k_y|
    (patterns that vary along a row: vertical stripes) and |k_y| > 2 |k_x| (horizontal
    stripes); NaN for images without variation. Each image is made mean-free and weighted by
    a 2D Hann window first: an image's border (where decoders vary their samples most, from
    the zero padding of their convolutions) and the FFT's wrap-around would otherwise count
    as lines along the axes."""
    images = np.asarray(images, dtype=np.float64)
    images = images - images.mean(axis=(-2, -1), keepdims=True)
    images = images * np.outer(np.hanning(images.shape[-2]), np.hanning(images.shape[-1]))
    power = (np.abs(np.fft.fft2(images)) ** 2).sum(axis=0)
    k = np.abs(np.fft.fftfreq(images.shape[-1]))
    ky, kx = np.meshgrid(k, k, indexing="ij")
    total = float(power.sum())
    if total <= 0.0:
        return float("nan"), float("nan")
    return float(power[kx > 2 * ky].sum() / total), float(power[ky > 2 * kx].sum() / total)


def stripe_figures(images: np.ndarray) -> Dict[str, float]:
    """Direction of the power of ``images`` ``(N, P, P)`` (:func:`stripe_shares`): ``ratio``,
    the vertical- over the horizontal-stripe share (about 1 for isotropic noise, far above
    (below) 1 for vertical (horizontal) stripes), and ``axis_share``, their sum, the share
    at frequencies near either axis (about 0.5 for isotropic noise, near 1 for stripes of
    either direction or a grid of lines); NaN for images without variation."""
    vertical, horizontal = stripe_shares(images)
    return {"ratio": vertical / horizontal if horizontal > 0 else float("nan"), "axis_share": vertical + horizontal}


def noise_power_spectrum(noise: np.ndarray) -> np.ndarray:
    """:func:`radial_power_spectrum` of noise patches ``(N, P, P)`` (HU) in float64 numpy."""
    return radial_power_spectrum(torch.from_numpy(np.asarray(noise, dtype=np.float64))).numpy()


def noise_texture(noise: np.ndarray, reference_noise: np.ndarray) -> Dict[str, float]:
    """How ``noise`` ``(N, P, P)`` compares with ``reference_noise`` (same shape, HU):
    ``nps_correlation``, the Pearson correlation of their radial noise power spectra
    (without the zero frequency); ``nps_log_error``, the mean over those rings of
    |ln(a_k / b_k)| of the two spectra each scaled to sum 1 (0 for the same texture; ln 2 =
    0.69 when rings are a factor 2 off on average), which, unlike the correlation, weighs
    the weak high-frequency rings as much as the strong ones (a blurred copy of the noise
    keeps a high correlation); and ``noise_std_ratio``, std(noise) / std(reference)."""
    a, b = noise_power_spectrum(noise)[1:], noise_power_spectrum(reference_noise)[1:]
    correlation = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    log_error = float(np.mean(np.abs(np.log(a / a.sum()) - np.log(b / b.sum())))) \
        if (a > 0).all() and (b > 0).all() else float("nan")
    ratio = float(np.std(noise) / max(np.std(reference_noise), 1e-12))
    return {"nps_correlation": correlation, "nps_log_error": log_error, "noise_std_ratio": ratio}


# ----------------------------------------------------------------------------- figures


@torch.inference_mode()
def representation_fidelity(denoiser, representation, patches: Sequence[HeldOutPatch], device="cpu",
                            batch_size: int = 16) -> dict:
    """Completeness of the cVAE on ``patches``: with ``r = D(mean E(x), f(x))``,
    ``output_error_hu`` = mean|f(r) - f(x)|, ``reconstruction_error_hu`` = mean|r - x|, and
    :func:`noise_texture` of ``r - full dose`` against ``x - full dose`` (None, with the
    reason in ``not_measured``, when the patches have no full dose)."""
    norm, f = denoiser.normalization, denoiser
    outputs, recon = [], []
    for first in range(0, len(patches), batch_size):
        chunk = patches[first:first + batch_size]
        x = norm.normalize(torch.from_numpy(np.stack([p.low_dose for p in chunk]))[:, None]).to(device)
        y = f(x)
        mean, _ = representation.encode(x, y)
        r = representation.decode(mean, y)
        outputs.append((norm.denormalize(f(r)) - norm.denormalize(y)).abs().mean(dim=(1, 2, 3)).cpu().numpy())
        recon.append(norm.denormalize(r)[:, 0].float().cpu().numpy())
    recon = np.concatenate(recon)
    x = np.stack([p.low_dose for p in patches])
    figures = {"output_error_hu": float(np.concatenate(outputs).mean()),
               "reconstruction_error_hu": float(np.abs(recon - x).mean())}
    if any(p.full_dose is None for p in patches):
        figures.update(nps_correlation=None, nps_log_error=None, noise_std_ratio=None,
                       not_measured={name: NO_FULL_DOSE for name in ("nps_correlation", "nps_log_error",
                                                                     "noise_std_ratio")})
    else:
        fd = np.stack([p.full_dose for p in patches])
        figures.update(noise_texture(recon - fd, x - fd))
    return {**figures, "patches": len(patches)}


@torch.inference_mode()
def flow_fidelity(representation, flow, denoiser, patches: Sequence[HeldOutPatch], device="cpu",
                  sample_z: bool = True, seed: int = 0, batch_size: int = 32) -> dict:
    """The cINN on held-out codes: ``nll_per_dim`` (nats per dimension of z; 1.419 for a
    standard normal), and the mean and standard deviation of ``v = t(z | f(x))`` over all
    its numbers. z is a draw of the posterior (``sample_z``, noise from ``seed``) or its mean."""
    from .invariance_flow import nll_per_dimension

    norm, f = denoiser.normalization, denoiser
    g = torch.Generator().manual_seed(int(seed))
    vs, nll = [], []
    for first in range(0, len(patches), batch_size):
        chunk = patches[first:first + batch_size]
        x = norm.normalize(torch.from_numpy(np.stack([p.low_dose for p in chunk]))[:, None]).to(device)
        y = f(x)
        mean, logvar = representation.encode(x, y)
        noise = torch.randn(mean.shape, generator=g).to(mean)
        z = mean + torch.exp(0.5 * logvar) * noise if sample_z else mean
        v, log_det = flow(z, y)
        nll.append(float(nll_per_dimension(v, log_det)) * len(chunk))
        vs.append(v.float().cpu().numpy())
    v = np.concatenate(vs)
    return {"nll_per_dim": float(np.sum(nll) / len(patches)), "v_mean": float(v.mean()), "v_std": float(v.std()),
            "z": "posterior sample" if sample_z else "posterior mean", "patches": len(patches)}


#: Periods (px) of :func:`periodicity` on the cards, and the frame it leaves out (px): decoders
#: vary their samples in a rim along the patch border, which would count as phases.
PERIODS, PERIODICITY_BORDER = (8, 16, 32), 16


def periodicity(std: np.ndarray, period: int, border: int = PERIODICITY_BORDER) -> float:
    """How periodic a std map ``(P, P)`` (HU) is with ``period`` px: the mean over the pixels
    of each phase (i mod period, j mod period) inside a ``border`` px frame, the largest of
    those period² means over their mean. About 1 for a std that follows anatomy and noise;
    the block edges of a nearest-neighbour decoder or a sub-pixel lattice raise it. NaN when
    less than one period is left inside the frame, or the std is 0 there."""
    inner = std[border:std.shape[0] - border, border:std.shape[1] - border]
    if min(inner.shape) < period or not inner.mean() > 0:
        return float("nan")
    rows, cols = np.meshgrid(np.arange(border, std.shape[0] - border) % period,
                             np.arange(border, std.shape[1] - border) % period, indexing="ij")
    phase = (rows * period + cols).ravel()
    means = np.bincount(phase, weights=inner.ravel(), minlength=period ** 2)
    means /= np.maximum(np.bincount(phase, minlength=period ** 2), 1)
    return float(means.max() / means.mean())


def _pairwise_mean_abs(samples: np.ndarray) -> float:
    """Mean |a_i - a_j| over all pairs i < j of ``samples`` ``(K, P, P)``."""
    k = samples.shape[0]
    if k < 2:
        return float("nan")
    total = sum(float(np.abs(samples[i] - samples[i + 1:]).mean(axis=(1, 2)).sum()) for i in range(k - 1))
    return total / (k * (k - 1) / 2)


def invariance_fidelity(models, data, split: str = "test", slices: int = 8, per_slice: int = 2, count: int = 16,
                        seed: int = 0, device="cpu", batch_size: int = 16, sample_z: bool = True,
                        figure=None, progress=None) -> dict:
    """All fidelity figures (module docstring) of loaded :class:`~.sampler.InvarianceModels`
    on ``per_slice`` patches of up to ``slices`` slices of ``split`` of ``data`` (a simulated
    data set folder or source), ``count`` invariances per patch (sampler seed ``seed`` + patch
    number). ``progress(done, total)`` is called per patch. ``figure``: a PNG path for the
    paper's layout (per patch: x, f(x), three invariances, their std map) of up to four patches.

    Returns a dict: ``consistency`` (C), ``consistency_noise`` (C'), ``noise_baseline`` (B;
    None without a fresh realisation, i.e. for non-simulated data), ``not_measured`` (the
    reason of each figure that is None: no fresh realisation, no full dose), ``completeness``
    (:func:`representation_fidelity`), ``diversity`` (``pairwise_hu``: mean|x~_i - x~_j|,
    ``realisation_hu``: mean|x' - x|, ``relative``: their ratio), ``spread`` (``consistency``
    = mean|f(x~_k) - mean_k f(x~)| / mean|x~_k - mean_k x~| and those two means in HU
    (``output_change_hu``, ``change_hu``): C of how the samples vary among themselves, the
    offset they share from x left out; C alone can be met by samples that all sit at one
    pre-image of f(x)), ``flow`` (:func:`flow_fidelity`), the underlying
    means in HU (``change_hu`` = mean|x~ - x|, ``output_change_hu`` = mean|f(x~) - f(x)|,
    ``realisation_output_change_hu`` = mean|f(x') - f(x)|), ``refinement`` (the sampler's,
    :meth:`~.sampler.Refinement.as_dict`), ``alternative`` (``refinement``, ``consistency``,
    ``noise_baseline``, ``change_hu``, ``output_change_hu``, ``pairwise_hu`` and
    ``spread_consistency`` of the same
    samples with the other refinement, module docstring), ``stripes`` (:func:`stripe_figures`
    of the invariances' deviations ``x~_k - mean_k x~`` of all patches, ``invariances``, and
    of the noise of x, ``noise``: None without full dose; ``periodicity``: :func:`periodicity`
    of the patches' mean std map for each period of :data:`PERIODS`, by period), ``bars``
    (each figure, its bounds and whether it meets them), and what was measured on.
    """
    from .datasets import open_source
    from .sampler import CHECKED_REFINEMENT, InvarianceSampler, Refinement

    source = data if hasattr(data, "patient_ids") else open_source(data)
    patches = held_out_patches(source, split, models.patch_size, slices, per_slice, seed)
    if not patches:
        raise ValueError(f"{getattr(source, 'root', 'the data set') if source is data else data}: the {split} split "
                         "is empty")
    sampler = InvarianceSampler(models, device=device)
    f = models.denoiser
    norm = models.denoiser.normalization
    fresh: Dict[int, Optional[np.ndarray]] = {}
    change, out_change, pairwise, real_change, real_out_change, shown = [], [], [], [], [], []
    deviations, stds, other = [], [], {"change": [], "output_change": [], "pairwise": []}
    spread = {"change": [], "output_change": [], "other_change": [], "other_output_change": []}
    refinement = sampler.models.refinement
    alternative = Refinement() if refinement else CHECKED_REFINEMENT
    for n, patch in enumerate(patches):
        result = sampler.sample(patch.low_dose, count=count, seed=seed + n, batch_size=batch_size)
        if len(shown) < 4:
            shown.append(result)
        change.append(result.mean_abs_change_hu.mean())
        out_change.append(result.mean_abs_output_change_hu.mean())
        twin = sampler.sample(patch.low_dose, count=count, seed=seed + n, batch_size=batch_size,
                              refinement=alternative)
        other["change"].append(twin.mean_abs_change_hu.mean())
        other["output_change"].append(twin.mean_abs_output_change_hu.mean())
        other["pairwise"].append(_pairwise_mean_abs(twin.invariances))
        for prefix, r in (("", result), ("other_", twin)):  # about the samples' mean: their offset from x left out
            spread[prefix + "change"].append(float(np.abs(r.invariances - r.invariances.mean(axis=0)).mean()))
            spread[prefix + "output_change"].append(float(np.abs(r.denoised_invariances -
                                                                 r.denoised_invariances.mean(axis=0)).mean()))
        pairwise.append(_pairwise_mean_abs(result.invariances))
        deviations.append(result.invariances - result.invariances.mean(axis=0, keepdims=True))
        stds.append(result.std)
        if patch.index not in fresh:
            fresh[patch.index] = another_realisation(source, patch.index, seed=realisation_seed(patch.index, seed))
        if fresh[patch.index] is not None:
            x2 = patch.crop(fresh[patch.index])
            with torch.inference_mode():
                y2 = norm.denormalize(f(norm.normalize(torch.from_numpy(x2)).to(sampler.device)[None, None]))
            real_change.append(float(np.abs(x2 - patch.low_dose).mean()))
            real_out_change.append(float(np.abs(y2[0, 0].float().cpu().numpy() - result.denoised).mean()))
        if progress is not None:
            progress(n + 1, len(patches))
    rep, flow = models.representation, models.flow
    completeness = representation_fidelity(models.denoiser, rep, patches, sampler.device)
    flow_figures = flow_fidelity(rep, flow, models.denoiser, patches, sampler.device, sample_z, seed)
    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    mean_std = np.mean(stds, axis=0)  # the invariances' std map, averaged over the patches
    figures = {
        "consistency": mean(out_change) / max(mean(change), 1e-12),
        "consistency_noise": mean(real_out_change) / max(mean(real_change), 1e-12) if real_change else None,
        "noise_baseline": mean(out_change) / max(mean(real_out_change), 1e-12) if real_out_change else None,
        "change_hu": mean(change), "output_change_hu": mean(out_change),
        "realisation_change_hu": mean(real_change), "realisation_output_change_hu": mean(real_out_change),
        "refinement": refinement.as_dict(),
        "alternative": {"refinement": alternative.as_dict(),
                        "consistency": mean(other["output_change"]) / max(mean(other["change"]), 1e-12),
                        "noise_baseline": mean(other["output_change"]) / max(mean(real_out_change), 1e-12)
                        if real_out_change else None,
                        "change_hu": mean(other["change"]), "output_change_hu": mean(other["output_change"]),
                        "pairwise_hu": mean(other["pairwise"]),
                        "spread_consistency": mean(spread["other_output_change"]) /
                        max(mean(spread["other_change"]), 1e-12)},
        "spread": {"consistency": mean(spread["output_change"]) / max(mean(spread["change"]), 1e-12),
                   "change_hu": mean(spread["change"]), "output_change_hu": mean(spread["output_change"])},
        "completeness": completeness,
        "diversity": {"pairwise_hu": mean(pairwise), "realisation_hu": mean(real_change),
                      "relative": mean(pairwise) / max(mean(real_change), 1e-12) if real_change else None},
        "flow": flow_figures,
        "stripes": {"invariances": stripe_figures(np.concatenate(deviations)),
                    "noise": None if any(p.full_dose is None for p in patches)
                    else stripe_figures(np.stack([p.low_dose - p.full_dose for p in patches])),
                    "periodicity": {str(b): periodicity(mean_std, b) for b in PERIODS}},
    }
    values = {"consistency": figures["consistency"], "noise_baseline": figures["noise_baseline"],
              "nps_correlation": completeness["nps_correlation"], "noise_std_ratio": completeness["noise_std_ratio"],
              "diversity_hu": figures["diversity"]["pairwise_hu"]}
    not_measured = dict(completeness.get("not_measured", {}))
    if figures["stripes"]["noise"] is None:
        not_measured["stripes_noise"] = NO_FULL_DOSE
    if not real_change:
        not_measured.update({name: NO_REALISATION for name in ("consistency_noise", "noise_baseline",
                                                                "realisation_change_hu",
                                                                "realisation_output_change_hu")})
    figures["not_measured"] = not_measured
    figures["bars"] = {name: {"value": value, "min": BARS[name][0], "max": BARS[name][1],
                              "met": None if value is None else _meets(value, *BARS[name]),
                              **({"reason": not_measured[name]} if value is None and name in not_measured else {})}
                       for name, value in values.items()}
    if figure is not None:
        from .figures import invariances_figure

        invariances_figure(shown, figure)
        figures["figure"] = str(figure)
    figures["measured_on"] = {"data": str(data), "split": split, "slices": len({p.index for p in patches}),
                              "patches": len(patches), "patch_size": models.patch_size,
                              "invariances_per_patch": count, "seed": seed, "device": str(sampler.device),
                              "fresh_realisation": "phantom rebuilt from its seed, rescanned at the same dose"
                              if real_change else None}
    return figures



def _meets(value: float, low: Optional[float], high: Optional[float]) -> bool:
    if value != value:  # NaN
        return False
    if low is not None and (value <= low if low == 0.0 else value < low):
        return False
    return high is None or value <= high


# ----------------------------------------------------------------------------- model card


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def fidelity_table(figures: dict) -> str:
    """A Markdown table of :func:`invariance_fidelity`'s figures with issue 4's bars."""
    c, d, fl = figures.get("completeness", {}), figures.get("diversity", {}), figures.get("flow", {})
    other, sp = figures.get("alternative"), figures.get("spread") or {}
    si, sn, periodic = ((figures.get("stripes") or {}).get(key) or {}
                        for key in ("invariances", "noise", "periodicity"))
    bars = figures.get("bars", {})

    def met(name):
        b = bars.get(name)
        return "–" if not b or b.get("met") is None else ("met" if b["met"] else "**missed**")

    rows = [
        ("consistency C = mean\\|f(x~) − f(x)\\| / mean\\|x~ − x\\|", _fmt(figures.get("consistency")), "≤ 0.35",
         met("consistency")),
        ("C' for a fresh noise realisation x'", _fmt(figures.get("consistency_noise")), "(reference)", "–"),
        ("noise baseline B = mean\\|f(x~) − f(x)\\| / mean\\|f(x') − f(x)\\|", _fmt(figures.get("noise_baseline")),
         "≤ 1.5", met("noise_baseline")),
        ("mean\\|x~ − x\\| / mean\\|f(x~) − f(x)\\| (HU)",
         f"{_fmt(figures.get('change_hu'), '.1f')} / {_fmt(figures.get('output_change_hu'), '.2f')}", "", ""),
        *([(f"the same samples with {_refinement_text(other.get('refinement'))}: C / B / mean\\|x~ − x\\| / "
             "mean\\|f(x~) − f(x)\\| (HU) / diversity (HU)",
             f"{_fmt(other.get('consistency'))} / {_fmt(other.get('noise_baseline'))} / "
             f"{_fmt(other.get('change_hu'), '.1f')} / {_fmt(other.get('output_change_hu'), '.2f')} / "
             f"{_fmt(other.get('pairwise_hu'), '.1f')}", "(C ≤ 0.35)" if other.get("consistency") is not None
             else "", "–" if other.get("consistency") is None
             else "met" if other["consistency"] <= BARS["consistency"][1] else "**missed**")]
          if other else []),
        ("mean\\|x' − x\\| / mean\\|f(x') − f(x)\\| (HU)",
         f"{_fmt(figures.get('realisation_change_hu'), '.1f')} / "
         f"{_fmt(figures.get('realisation_output_change_hu'), '.2f')}", "", ""),
        ("cVAE completeness: mean\\|f(D(E(x))) − f(x)\\| (HU)", _fmt(c.get("output_error_hu"), ".2f"), "", ""),
        ("cVAE reconstruction mean\\|D(E(x)) − x\\| (HU)", _fmt(c.get("reconstruction_error_hu"), ".1f"), "", ""),
        ("noise power spectrum correlation, reconstruction vs x", _fmt(c.get("nps_correlation")), "≥ 0.9",
         met("nps_correlation")),
        *([("noise texture, reconstruction vs x: mean \\|ln\\| of the ratio of their noise power per ring, each "
            "spectrum scaled to sum 1 (0: the same texture; 0.69: rings a factor 2 off on average; weighs the weak "
            "high frequencies a blur removes, which the correlation hardly sees)", _fmt(c.get("nps_log_error")),
            "(no bar)", "")] if c.get("nps_log_error") is not None else []),
        ("noise std ratio, reconstruction / x", _fmt(c.get("noise_std_ratio")), "0.8–1.25", met("noise_std_ratio")),
        ("diversity: mean pairwise \\|x~_i − x~_j\\| (HU)", _fmt(d.get("pairwise_hu"), ".2f"), "> 0",
         met("diversity_hu")),
        ("beside mean\\|x' − x\\| (HU); diversity as a fraction of it",
         f"{_fmt(d.get('realisation_hu'), '.1f')}; {_fmt(d.get('relative'), '.3f')}", "", ""),
        *([("spread consistency: mean\\|f(x~) − mean f(x~)\\| / mean\\|x~ − mean x~\\| (C of how the samples "
            "differ, their shared offset from x left out; compare C')"
            + (f"; with {_refinement_text(other.get('refinement'))}" if other else ""),
            _fmt(sp.get("consistency")) + (f"; {_fmt(other.get('spread_consistency'))}" if other else ""),
            "(no bar)", ""),
           ("mean\\|x~ − mean x~\\| / mean\\|f(x~) − mean f(x~)\\| (HU)",
            f"{_fmt(sp.get('change_hu'), '.2f')} / {_fmt(sp.get('output_change_hu'), '.3f')}", "", "")]
          if sp else []),
        ("stripe ratio of x~ − mean x~: power at \\|k_x\\| > 2\\|k_y\\| / at \\|k_y\\| > 2\\|k_x\\| "
         "(noise of x)", f"{_fmt(si.get('ratio'), '.2f')} ({_fmt(sn.get('ratio'), '.2f')})", "", ""),
        ("axis share of x~ − mean x~: its power at either (stripes, grid lines) (noise of x)",
         f"{_fmt(si.get('axis_share'), '.2f')} ({_fmt(sn.get('axis_share'), '.2f')})", "", ""),
        *([(f"periodicity of the samples' std at {' / '.join(periodic)} px: largest mean over a phase (i, j mod "
            f"period) / mean, inside a {PERIODICITY_BORDER} px frame (about 1 without a grid or lattice)",
            " / ".join(_fmt(v, ".2f") for v in periodic.values()), "", "")] if periodic else []),
        ("cINN held-out NLL (nats per dimension of z; depends on z's scale: 1.419 for z ~ N(0, 1), lower for "
         "narrower codes)", _fmt(fl.get("nll_per_dim")), "", ""),
        ("v mean / std over held-out z", f"{_fmt(fl.get('v_mean'))} / {_fmt(fl.get('v_std'))}", "0 / 1", ""),
    ]
    lines = ["| figure | value | bar | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c_} | {m} |" for a, b, c_, m in rows]
    return "\n".join(lines)


def invariance_card(metadata: dict) -> List[str]:
    """Model-card lines (Markdown) of ``metadata["invariance"]``: the representation and
    invariance flow, how they were trained, and their fidelity figures. Empty without one."""
    from .devices import machine_words

    info = metadata.get("invariance")
    if not info:
        return []
    weights = metadata.get("weights", {})
    training = info.get("training", {})
    lines = ["", "## Invariance models", "",
             f"Representation (cVAE, `cvae`, {'conditional on f(x)' if info.get('conditional') else 'unconditional'}) "
             f"and invariance flow (cINN, `cinn`) of this denoiser, on {info.get('patch_size')}² px patches, "
             f"z of {info.get('z_dim')} numbers. cVAE arguments `{json.dumps(info.get('cvae'))}`; cINN arguments "
             f"`{json.dumps(info.get('cinn'))}`." if "cinn" in info else
             f"Representation (cVAE) only, `{json.dumps(info.get('cvae'))}`: its invariance flow (cINN) is not "
             "trained yet, so invariances cannot be sampled.", ""]
    for key, label in (("cvae", "representation (cVAE)"), ("cinn", "invariance flow (cINN)")):
        t = training.get(key)
        if not t:
            continue
        d, m = t.get("data", {}), t.get("machine", {})
        what = (f"{d.get('pairs') or d.get('slices')} slices, {d.get('size')}² px at {d.get('pixel_spacing_mm')} mm, "
                f"dose {d.get('dose')}" if d.get("kind") == "simulated" else
                f"{d.get('slices')} slices of {d.get('patients')} patients at {d.get('pixel_spacing_mm')} mm"
                + (f", {d['images']}" if d.get("images") else ""))
        if d.get("subset_of"):
            sub = d["subset_of"]
            what += (f"; a copy of part of `{sub.get('data')}` with its patient split: {sub.get('training_slices')} of "
                     f"its {sub.get('training_slices_in_whole_set')} training slices (`{sub.get('command')}`)")
        lines += [f"### Training: {label}", "",
                  f"- sizes: {t.get('parameters', 0):,} parameters, {_fmt(t.get('file_mb'), '.2f')} MB "
                  f"({(weights.get(key) or {}).get('dtype')})",
                  f"- data: {d.get('kind')} `{d.get('path')}` ({what}), training split "
                  f"only, low-dose patches of {t.get('patch_size')}² px with random flips/rotations",
                  f"- {t.get('epochs')} epochs × {t.get('steps_per_epoch')} steps × batch {t.get('batch_size')}"
                  f" × {t.get('world_size', 1)} process(es) = {t.get('steps')} steps; seed {t.get('seed')}",
                  f"- losses and hyperparameters: `{json.dumps(t.get('hyperparameters'))}`"
                  + (f"; batches from a fixed pool of {t['pool_patches']} patches per process with f(x) computed "
                     "once" if t.get("pool_patches") else ""),
                  f"- best epoch {t.get('best_epoch')} (validation "
                  + ", ".join(f"{k} {v:.4g}" for k, v in (t.get("validation") or {}).items()
                              if isinstance(v, (int, float))) + ")",
                  f"- wall time {t.get('wall_time_s')} s on {m.get('device')} ({machine_words(m)})"]
        features = t.get("feature_network")
        if features and features.get("used") is False:
            lines.append(f"- no perceptual term: {features.get('reason')}")
        elif features:
            lines.append(f"- feature network of the perceptual loss: `{json.dumps(features)}`")
        lines.append("")
    if info.get("notes"):
        lines += [f"- note: {note}" for note in info["notes"]] + [""]
    fid = info.get("fidelity")
    if fid:
        on = fid.get("measured_on", {})
        lines += ["### Fidelity figures (held-out)", "",
                  f"{on.get('patches')} patches of {on.get('slices')} slices of the {on.get('split')} split of "
                  f"`{on.get('data')}`, {on.get('invariances_per_patch')} invariances each (seed {on.get('seed')}, "
                  f"{on.get('device')}; {_refinement_text(fid.get('refinement'))}); fresh realisations x': "
                  f"{on.get('fresh_realisation') or 'none'}. "
                  "Bars from issue 4; a missed bar is reported, not hidden.", "", fidelity_table(fid)]
        lines += _not_measured_lines(fid.get("not_measured"))
        if fid.get("figure"):
            from pathlib import Path

            lines += ["", f"![x, f(x), three invariances and their std per held-out patch]({Path(fid['figure']).name})"]
    elif info.get("completeness"):
        c = info["completeness"]
        lines += ["### Completeness of the cVAE (held-out)", "",
                  f"mean|f(D(E(x))) − f(x)| {_fmt(c.get('output_error_hu'), '.2f')} HU, mean|D(E(x)) − x| "
                  f"{_fmt(c.get('reconstruction_error_hu'), '.1f')} HU, noise power spectrum correlation "
                  f"{_fmt(c.get('nps_correlation'))}, noise std ratio {_fmt(c.get('noise_std_ratio'))} "
                  f"({c.get('patches')} patches)."]
        lines += _not_measured_lines(c.get("not_measured"))
    return lines


def _refinement_text(refinement: Optional[dict]) -> str:
    """How the sampler refined the invariances, for the model card."""
    if not refinement or not any(refinement.values()):
        return "no consistency refinement"
    return (f"the consistency refinement ({refinement['centre']} steps on the flow's centre, "
            f"{refinement['sample']} per sample)")


def _not_measured_lines(not_measured: Optional[dict]) -> List[str]:
    """Model-card lines saying which figures were not measured and why (one line per reason)."""
    if not not_measured:
        return []
    reasons: Dict[str, List[str]] = {}
    for name, reason in not_measured.items():
        reasons.setdefault(reason, []).append(name)
    return ["", *[f"- not measured ({', '.join(names)}): {reason}." for reason, names in reasons.items()]]
