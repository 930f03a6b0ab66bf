"""Our terms of the representation's (cVAE's) training objective, beside the paper's
(:mod:`.train_invariance` adds each with its weight; all off by default). Images are
``(N, 1, P, P)`` in network units; r = D(z, f(x)) is the reconstruction, y = f(x).

S is the noise-spectrum term (:func:`noise_spectrum_loss`, ours, off by default): L1
charges for every speck of noise the decoder draws where x has another, so r keeps less
noise than x (noise std ratio 0.75 for DU-GAN at 560 CPU steps) and the critic alone
does not restore it at CPU budgets; S asks the texture of ``r - f(x)`` to match that of
``x - f(x)`` ring by ring of the spectrum (1.01 with ``lam_nps`` 0.01, README). A ring
average cannot see direction: ``nps_sectors=2`` splits each ring into mostly horizontal
and mostly vertical frequencies (``benchmarks/invariance_anisotropy.py``: decoders fitted
with the ring average varied their samples in stripes, README).
M is the local-mean term (:func:`local_mean_loss`, ours, off by default): L1 between the
means of r and x over blocks of ``local_mean_pixels``. Under CT noise the pixel L1 hardly
sees a shift of a region's mean by 1 HU (its gradient is about 2 p(0) per HU, p the
noise density at 0: a few percent of the full gradient), yet such shifts fill the lowest
rings of the reconstruction's noise power spectrum (``benchmarks/reconstruction_spectrum.py``;
WGAN-VGG's NPS correlation 0.86 -> 0.99 with ``lam_local_mean`` 1, README).
T is the sample-texture term (:func:`sample_texture_loss`, ours, off by default): the
terms above shape one reconstruction, but the invariances of a patch differ from each
other by how the decoder's output changes with z, and decoders fitted without T varied it
in vertical stripes or along a grid of lines (the model card's stripe ratio and axis
share, README). With r' = D(z of the next patch in the batch, f(x)), T asks the spectrum
of ``r' - r``, ring by ring and split into the two axis sectors and the diagonals (stripes
of either direction and grid lines), to have the shape (not the level) of the noise f
removes from x: two noise realisations, the invariances every denoiser has, differ by
such noise.
The swapped consistency ``L1(f(r'), f(x))`` and the spread term P (:func:`spread_loss`;
both ours, off by default) aim at what sampling needs: the invariances of one patch are
decodes of f(x) with other codes, and decoders fitted without them ignore z (the samples
of a bundled model differed by 0.5-3 HU while they differed from x by 8-12 HU). The
swapped consistency asks a decode with another patch's code to keep f's output; P asks
the two decodes of one f(x) to differ at least as much as the reconstruction differs
from x (``relu(mean|x - r| - mean|r' - r|)``, the first held fixed): x is one more sample
of p(x | f(x)) for a sampler that is calibrated, so its samples are as far from each
other as from x. With ``lam_spread`` set, the adversarial term also judges r', so the
spread is spent on CT-like images. r' decodes the code of the next patch in the batch
(``second_code="other"``), or a second draw of the patch's own posterior
(``"posterior"``): with other patches' codes asked to keep f's output, a CNN-10 fit's
encoder stopped describing x (KL near 0, README); two draws of one posterior ask the
posterior to be as wide as the reconstruction's error instead, yet a WGAN-VGG fit with
them ended near KL 0 as well (README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fidelity import radial_power_spectrum


def _log_spectrum_ratio(noise: torch.Tensor, reference: torch.Tensor, sectors: int) -> torch.Tensor:
    """``log NPS(noise) - log NPS(reference)`` (nats) at rings 1 .. P/2 - 1 of the batches'
    radial noise power spectra (:func:`~.fidelity.radial_power_spectrum` with ``sectors``),
    images ``(N, 1, P, P)``."""
    spectra = [radial_power_spectrum(image[:, 0].float(), sectors)[..., 1:] for image in (noise, reference)]
    return torch.log(spectra[0] + 1e-12) - torch.log(spectra[1] + 1e-12)


def noise_spectrum_loss(reconstruction: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                        sectors: int = 1) -> torch.Tensor:
    """The noise-spectrum term S (nats): mean over rings 1 .. P/2 - 1 of
    ``|log NPS(r - y) - log NPS(x - y)|``, with NPS the batch's radial noise power spectrum
    (:func:`~.fidelity.radial_power_spectrum`) and ``y = f(x)``; zero when what the
    reconstruction ``r`` adds to f(x) has the texture and level of the noise f removes from
    x. With ``sectors=2`` each ring is split by direction (|k_x| > |k_y| or not), so power
    put into stripes of one direction is charged too (3: the two axis sectors and the
    diagonals). Scale-free, so one weight fits any normalisation; images ``(N, 1, P, P)``."""
    return _log_spectrum_ratio(reconstruction - y, x - y, sectors).abs().mean()


def local_mean_loss(reconstruction: torch.Tensor, x: torch.Tensor, pixels: int) -> torch.Tensor:
    """The local-mean term M: mean |mean_B(r) - mean_B(x)| over the ``pixels`` x ``pixels``
    blocks B tiling the patches ``(N, 1, P, P)`` (P a multiple of ``pixels``), in the
    images' units; zero when the reconstruction ``r`` keeps every block's mean of x."""
    return F.l1_loss(F.avg_pool2d(reconstruction, pixels), F.avg_pool2d(x, pixels))


def sample_texture_loss(swapped: torch.Tensor, reconstruction: torch.Tensor, x: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
    """The sample-texture term T (nats): with ``d = swapped - reconstruction`` (two decodes of
    the same f(x) = ``y`` from different codes) and ``l = log NPS(d) - log NPS(x - y)``, the
    radial noise power spectra split into the two axis sectors and the diagonals
    (:func:`~.fidelity.radial_power_spectrum` with 3 sectors, rings 1 .. P/2 - 1), the mean
    of ``|l - mean(l)|``: zero when the samples of a patch differ from each other with the
    texture and direction of the noise f removes, whatever their level (the diversity is left
    to the rest of the objective); stripes and grid lines raise it. Images ``(N, 1, P, P)``."""
    log_ratio = _log_spectrum_ratio(swapped - reconstruction, x - y, 3)
    return (log_ratio - log_ratio.mean()).abs().mean()


def spread_loss(swapped: torch.Tensor, reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The spread term P (images' units): ``relu(mean|x - r| - mean|r' - r|)`` with
    ``r' = swapped`` and ``r = reconstruction`` two decodes of the same f(x) and the
    reconstruction error held fixed: zero once the decodes of one f(x) differ from each other
    at least as much as the reconstruction differs from x. Images ``(N, 1, P, P)``."""
    error = (x - reconstruction).abs().mean().detach()
    return F.relu(error - (swapped - reconstruction).abs().mean())
