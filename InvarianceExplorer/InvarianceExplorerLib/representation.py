"""The representation: a conditional VAE (cVAE) that describes a CT patch x completely given f(x).

Method (Eulig et al. 2025, section 2 of docs/method.md; Rombach et al., ECCV 2020): an
encoder E takes the pair ``[x, f(x)]`` and gives a diagonal Gaussian q(z | x, f(x)) over a
latent vector z; a decoder D takes z and the image f(x) and reconstructs x. Together with
the invariance flow (:mod:`.invariance_flow`) it samples images x~ that the denoiser f maps
to (almost) the same output.

Our design, for CPU speed (the reference's ResNet-50 encoder and BigGAN-128 decoder cost
2.7 + 42 GFLOP per 128x128 patch):

* **Decoder** ``D(z, f(x)) = f(x) + r(z, f(x))``: it predicts only the residual r, the part
  of x that f(x) does not explain (noise texture, erased structures), so an untrained or
  blurry r still gives CT-like images and the network spends its capacity on what f throws
  away. z goes through a linear layer to a ``4 x 4`` (for 128 pixels) feature map, then
  stages of nearest-neighbour 2x upsampling and a MONAI :class:`~monai.networks.blocks.ResidualUnit`
  up to full resolution, widths falling as the resolution rises (``channels``, 16 feature
  maps at full resolution). Each stage is conditioned on f(x) by a spatial feature-wise
  affine modulation (SPADE/FiLM: ``h * (1 + gamma) + beta``, Park et al. CVPR 2019) whose
  ``gamma, beta`` come from a small convolutional pyramid of f(x) at that resolution.
  That pyramid depends on f(x) only: :meth:`Representation.condition` computes it once per
  patch and every sample of the same patch reuses it, so the cost per decoded sample is
  the upsampling path alone: 0.54 GFLOP per decoded 128x128 patch at the defaults (0.14
  GFLOP more for the conditioning, once per patch; the encoder costs 0.33 GFLOP).
* **z at every scale** (``z_modulation=True``; training's ``--set cvae.z_modulation=true``): besides the ``4 x 4``
  map, z also modulates every decoder stage channel-wise (``h * (1 + gamma_z) + beta_z``,
  one linear layer of z per stage), as BigGAN feeds z to each of its blocks. Without it the
  only path from z is the ``4 x 4`` map, and a decoder that gets its detail from f(x)
  learns to ignore z: the invariances of one patch then hardly differ (0.3 HU). Models
  saved before it existed load with ``z_modulation=False``.
* **Pre-image branch** (``preimage_layers=N``; training's ``--set cvae.preimage_layers=10``):
  the residual is added to ``f(x) + P(f(x))`` instead of f(x), where P is N full-resolution
  3x3 convolutions (``2 * channels[0]`` feature maps) of f(x) alone: the part of x that f(x)
  still determines (much of x's noise, which f only attenuates) no longer has to pass
  through z or the thin upsampling path. P depends on f(x) only, so :meth:`Representation.condition`
  computes it once per patch and it costs nothing per sample. Measured by
  ``benchmarks/preimage_floor.py`` (README): such a network alone recovers CNN-10's inputs
  to 4.8 HU with the noise texture of x (NPS correlation 1.00, std ratio 0.98), against
  12 HU for the decoder without it.
* **z on the pre-image features** (``z_preimage=True``; training's ``--set cvae.z_preimage=true``;
  needs the pre-image branch): the residual also gets a 3x3 convolution of P's last hidden
  feature maps, each scaled by a number from z (one linear layer of z, starting at zero). Those
  maps follow f(x)'s content at full resolution (P's estimate of x's noise), so z gets a
  high-frequency carrier that is neither the upsampling's blocks nor a lattice. The
  convolution is linear and each map's scale is one number, so conv(h * s) is the sum over
  maps c of s_c * (conv_c h_c): :meth:`Representation.condition` convolves each hidden map
  once per patch (:meth:`Representation.preimage_responses`) and a decoded sample costs a
  weighted sum of those responses.
* **Upsampling** (``upsample``; training's ``--set cvae.upsample=bilinear``): nearest-neighbour
  2x upsampling makes every decoder feature map constant over blocks of 2, 4, ... 32 pixels
  before its convolutions, and decoders trained with it vary their samples of one patch
  along the edges of those blocks: a grid of lines 8, 16 and 32 px apart (the model card's
  axis share, README). Bilinear upsampling has no block edges. ``"pixelshuffle"`` is a
  learned sub-pixel upsampling (Shi et al., CVPR 2016): a 1x1 convolution to 4x the feature
  maps, rearranged into 2x2 pixels, so every pixel of a block gets its own mix of the lower
  stage's features (started as nearest-neighbour, the "ICNR" start of Aitken et al. 2017).
  Models saved before the option load with ``"nearest"``.
* **Padding** (``padding``; training's ``--set cvae.padding=replicate``): every convolution
  pads with zeros (the default, and models saved before the option), so near the patch
  border each feature map sees a dark frame that is not in the image; decoders varied their
  samples most in a rim along the border (README). ``"replicate"`` pads with the border
  pixels instead, so a uniform f(x) gives uniform features up to the edge.
* **Encoder**: a stem convolution and stride-2 residual units down to the same ``4 x 4``
  map (widths ``channels``), then a linear layer to the mean and log-variance of z.
* **Unconditional variant** (``conditional=False``, the "VAE shared by all denoisers" of
  the authors' code): E sees x alone, D(z) has no f(x) input and predicts x itself.

Defaults (patch 128, z of 256): 2.47 M parameters (encoder 1.30 M), 9.9 MB as float32.

No normalisation layers (outputs do not depend on what else is in a batch, so sampling is
the same for every batch size); LeakyReLU 0.2. Images are in network units of the
denoiser's :class:`~.normalization.HUNormalization`, ``(N, 1, P, P)`` with ``P`` the
``patch_size`` the model was built for.

Training (not here) uses :func:`reconstruction_loss` (L1), :func:`kl_divergence` and
:func:`representation_loss`; its adversarial critic sees ``[image, f(x)]`` and its
perceptual term compares features of x and D(E(x)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit

#: LeakyReLU with slope 0.2, in MONAI's activation spelling.
ACT = ("leakyrelu", {"negative_slope": 0.2})

#: The decoder's 2x upsampling modes (module docstring).
UPSAMPLING = ("nearest", "bilinear", "pixelshuffle")

#: The convolutions' padding modes (module docstring).
PADDINGS = ("zeros", "replicate")

#: Default widths (feature maps) from full resolution down to the bottleneck: 128 -> 4 pixels.
DEFAULT_CHANNELS = (16, 24, 48, 96, 128, 64)

#: The decoder's conditioning on f(x) (None when unconditional): one (gamma, beta) pair per
#: decoder stage, full resolution first, the image the residual is added to (f(x), or
#: f(x) + P(f(x)) with the pre-image branch), and with ``z_preimage`` the per-map responses
#: of P's hidden maps (:meth:`Representation.preimage_responses`; else None).
Condition = Optional[Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor, Optional[torch.Tensor]]]


def _conv(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, act=ACT) -> Convolution:
    """A 2D convolution (zero padding keeps the size / halves it with stride 2), then ``act``."""
    return Convolution(2, c_in, c_out, strides=stride, kernel_size=kernel_size, act=act, norm=None,
                       conv_only=act is None)


def _unit(c_in: int, c_out: int, stride: int = 1, subunits: int = 2) -> ResidualUnit:
    """MONAI residual unit: ``subunits`` 3x3 convolutions with LeakyReLU, plus a shortcut
    (1x1 convolution when the width changes, strided 3x3 when the size does)."""
    return ResidualUnit(2, c_in, c_out, strides=stride, kernel_size=3, subunits=subunits, act=ACT, norm=None)


def pixel_shuffle_upsampler(channels: int) -> nn.Sequential:
    """Learned 2x upsampling (module docstring): a 1x1 convolution ``channels -> 4 * channels``
    and :class:`torch.nn.PixelShuffle`, started as nearest-neighbour upsampling (each of the
    2x2 output pixels gets the input feature map unchanged)."""
    conv = nn.Conv2d(channels, 4 * channels, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).repeat_interleave(4, dim=0)[:, :, None, None])
        conv.bias.zero_()
    return nn.Sequential(conv, nn.PixelShuffle(2))


def preimage_branch(layers: int, width: int) -> nn.Sequential:
    """The pre-image branch P (module docstring): ``layers`` full-resolution 3x3 convolutions
    1 -> ``width`` -> ... -> 1 channel, LeakyReLU between, the last scaled down so that P
    starts near 0."""
    branch = nn.Sequential(_conv(1, width), *[_conv(width, width) for _ in range(layers - 2)],
                           _conv(width, 1, act=None))
    with torch.no_grad():
        branch[-1].conv.weight.mul_(0.1)
    return branch


@dataclass
class RepresentationOutput:
    """One pass of the cVAE over a batch.

    Attributes:
        reconstruction: D(z, f(x)), ``(N, 1, P, P)`` in network units.
        mean, logvar: the posterior q(z | x, f(x)), ``(N, z_dim)`` each (log-variance in nats).
        z: the latent code that was decoded (a sample of q, or its mean).
        swapped: D(z', f(x)) with z' the code of the next patch in the batch
            (``swapped=True``) or another draw of q(z | x, f(x)) (``second_noise``); else
            None: another decode of the same f(x), whose difference from ``reconstruction``
            is how the decoder varies its samples of one patch.
    """

    reconstruction: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    swapped: Optional[torch.Tensor] = None


class Representation(nn.Module):
    """The cVAE (or unconditional VAE) over ``patch_size`` x ``patch_size`` CT patches.

    Args:
        patch_size: side of the square patches in pixels; must be divisible by
            ``2 ** (len(channels) - 1)`` (128 in the paper).
        z_dim: length of the latent vector z (256 in the paper).
        channels: feature maps per resolution level, full resolution first; level ``k``
            works at ``patch_size / 2**k`` pixels; the last level is the bottleneck.
        conditional: True for the cVAE of the paper (E sees ``[x, f(x)]``, D is conditioned
            on f(x) and predicts ``x - f(x)``); False for the unconditional VAE.
        full_resolution_subunits: convolutions in the full-resolution decoder unit (1
            keeps the thin full-resolution part cheap; the other units have 2).
        z_modulation: also modulate every decoder stage channel-wise by z (module docstring).
        preimage_layers: convolutions of the pre-image branch P(f(x)) (0: none; module
            docstring); conditional models only.
        z_preimage: also add a convolution of P's hidden maps scaled by z (module docstring).
        upsample: the decoder's 2x upsampling between stages, ``"nearest"`` (models saved
            before the option), ``"bilinear"`` or ``"pixelshuffle"`` (module docstring).
        padding: how every convolution pads, ``"zeros"`` (models saved before the option)
            or ``"replicate"`` (module docstring).
    """

    def __init__(self, patch_size: int = 128, z_dim: int = 256, channels: Sequence[int] = DEFAULT_CHANNELS,
                 conditional: bool = True, full_resolution_subunits: int = 1, z_modulation: bool = False,
                 preimage_layers: int = 0, upsample: str = "nearest", padding: str = "zeros",
                 z_preimage: bool = False):
        super().__init__()
        channels = [int(c) for c in channels]
        levels = len(channels) - 1
        if levels < 1 or patch_size % (2 ** levels) or patch_size < 2 ** levels:
            raise ValueError(f"patch_size {patch_size} must be a multiple of 2**{levels} = {2 ** levels} "
                             f"for {len(channels)} resolution levels (channels={channels})")
        self.patch_size, self.z_dim, self.channels = int(patch_size), int(z_dim), channels
        self.conditional = bool(conditional)
        self.full_resolution_subunits = int(full_resolution_subunits)
        self.z_modulation = bool(z_modulation)
        self.preimage_layers = int(preimage_layers)
        if self.preimage_layers and (not conditional or self.preimage_layers < 2):
            raise ValueError(f"preimage_layers must be 0, or at least 2 in a conditional model; got {preimage_layers}"
                             f"{'' if conditional else ' (unconditional: there is no f(x))'}")
        self.z_preimage = bool(z_preimage)
        if self.z_preimage and not self.preimage_layers:
            raise ValueError("z_preimage needs the pre-image branch (preimage_layers >= 2)")
        if upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}; got {upsample!r}")
        self.upsample = upsample
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}; got {padding!r}")
        self.padding = padding
        self.bottom = patch_size // 2 ** levels
        flat = channels[-1] * self.bottom ** 2

        # encoder E: [x, f(x)] (or x) -> mean, log-variance of z
        self.encoder = nn.Sequential(
            _conv(2 if conditional else 1, channels[0]),
            *[_unit(channels[k], channels[k + 1], stride=2) for k in range(levels)],
            nn.Flatten(),
            nn.Linear(flat, 2 * z_dim),
        )
        # decoder D: z -> bottleneck map -> upsampling units (full resolution last) -> residual
        self.project = nn.Linear(z_dim, flat)
        self.stages = nn.ModuleList([_unit(channels[-1], channels[-1])] + [
            _unit(channels[k + 1], channels[k], subunits=2 if k else self.full_resolution_subunits)
            for k in reversed(range(levels))])
        if self.z_modulation:  # per stage (bottleneck first): z -> (gamma_z, beta_z), starting at zero
            self.z_modulations = nn.ModuleList([nn.Linear(z_dim, 2 * channels[k]) for k in reversed(range(levels + 1))])
            for layer in self.z_modulations:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        if upsample == "pixelshuffle":  # one per upsampling, before stage n >= 1 (width of stage n - 1's output)
            self.upsamplers = nn.ModuleList([pixel_shuffle_upsampler(channels[k + 1]) for k in reversed(range(levels))])
        self.output = _conv(channels[0], 1, act=None)
        with torch.no_grad():  # start near "x = f(x)": small residuals
            self.output.conv.weight.mul_(0.1)
        if conditional:
            # pyramid of f(x): level k features at patch_size / 2**k, and their (gamma, beta)
            self.condition_pyramid = nn.ModuleList(
                [_conv(1, channels[0])] + [_conv(channels[k], channels[k + 1], stride=2) for k in range(levels)])
            self.modulations = nn.ModuleList([_conv(c, 2 * c, kernel_size=1, act=None) for c in channels])
        if self.preimage_layers:
            self.preimage = preimage_branch(self.preimage_layers, 2 * channels[0])
        if self.z_preimage:  # z -> a scale per hidden map of P (starting at zero), and their convolution
            self.preimage_scales = nn.Linear(z_dim, 2 * channels[0])
            nn.init.zeros_(self.preimage_scales.weight)
            nn.init.zeros_(self.preimage_scales.bias)
            self.preimage_output = _conv(2 * channels[0], 1, act=None)
            with torch.no_grad():  # starts adding nothing: the model without the option
                self.preimage_output.conv.weight.mul_(0.1)
                self.preimage_output.conv.bias.zero_()
        for layer in self.modules():  # the same weights pad another way (torch's padding_mode)
            if isinstance(layer, nn.Conv2d) and any(layer.padding):
                layer.padding_mode = padding

    @property
    def arguments(self) -> dict:
        """The constructor arguments (JSON-able), for the model folder's metadata."""
        return {"patch_size": self.patch_size, "z_dim": self.z_dim, "channels": list(self.channels),
                "conditional": self.conditional, "full_resolution_subunits": self.full_resolution_subunits,
                "z_modulation": self.z_modulation, "preimage_layers": self.preimage_layers, "upsample": self.upsample,
                "padding": self.padding, "z_preimage": self.z_preimage}

    def _check(self, image: torch.Tensor, name: str) -> None:
        if image.ndim != 4 or image.shape[1] != 1 or tuple(image.shape[-2:]) != (self.patch_size,) * 2:
            raise ValueError(f"{name} must be (N, 1, {self.patch_size}, {self.patch_size}) patches in network "
                             f"units; got {tuple(image.shape)}")

    def _need_condition(self, y: Optional[torch.Tensor]) -> None:
        if self.conditional and y is None:
            raise ValueError("the conditional representation needs the denoised image f(x)")

    # ----------------------------------------------------------------- encoder

    def encode(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z | x, f(x)) of patches ``x`` ``(N, 1, P, P)`` with denoised ``y = f(x)``
        (the same shape; ignored when unconditional), both in network units (the denoiser's
        normalisation of HU): ``(mean, logvar)`` of the diagonal Gaussian, each ``(N, z_dim)``."""
        self._check(x, "x")
        if self.conditional:
            self._need_condition(y)
            self._check(y, "f(x)")
            x = torch.cat((x, y.expand_as(x)), dim=1)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    # ----------------------------------------------------------------- decoder

    def condition(self, y: Optional[torch.Tensor]) -> Condition:
        """The decoder's conditioning on ``y = f(x)``: per stage (full resolution first) the
        modulation ``(gamma, beta)``, each ``(N, C_k, P / 2**k, P / 2**k)``, and the base
        image the residual is added to (``y``, or ``y + P(y)``, ``(N, 1, P, P)``). Depends on
        f(x) only: compute it once per patch and pass it to :meth:`decode` for every sample.
        None for the unconditional variant."""
        if not self.conditional:
            return None
        self._need_condition(y)
        self._check(y, "f(x)")
        out, h = [], y
        for layer, modulation in zip(self.condition_pyramid, self.modulations):
            h = layer(h)
            out.append(modulation(h).chunk(2, dim=1))
        if self.z_preimage:
            hidden = self.preimage[:-1](y)
            return out, y + self.preimage[-1](hidden), self.preimage_responses(hidden)
        return out, (y + self.preimage(y) if self.preimage_layers else y), None

    def preimage_responses(self, hidden: torch.Tensor) -> torch.Tensor:
        """``z_preimage``: each of P's hidden maps ``(N, C, P, P)`` convolved with its own slice
        of the output convolution (no bias), ``(N, C, P, P)``: the output convolution of the
        maps scaled by s is the sum of s_c times map c's response (module docstring)."""
        conv = self.preimage_output.conv
        padded = F.pad(hidden, (1, 1, 1, 1), mode="constant" if self.padding == "zeros" else "replicate")
        return F.conv2d(padded, conv.weight.transpose(0, 1), groups=hidden.shape[1])

    def decode(self, z: torch.Tensor, y: Optional[torch.Tensor] = None, condition: Condition = None) -> torch.Tensor:
        """D(z, f(x)): patches ``(N, 1, P, P)`` in network units from latent codes ``z``
        ``(N, z_dim)``. The conditional model needs ``y = f(x)`` (``(N or 1, 1, P, P)``) and
        accepts its precomputed :meth:`condition` instead of recomputing it; a batch of one
        f(x) is shared by all N codes."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be (N, {self.z_dim}); got {tuple(z.shape)}")
        if self.conditional:
            self._need_condition(y)
            if condition is None:
                condition = self.condition(y)
            modulations, base, responses = condition
        h = self.project(z).view(z.shape[0], self.channels[-1], self.bottom, self.bottom)
        levels = len(self.channels) - 1
        for n, stage in enumerate(self.stages):
            if n and self.upsample == "pixelshuffle":
                h = self.upsamplers[n - 1](h)
            elif n:
                h = F.interpolate(h, scale_factor=2.0, mode=self.upsample,
                                  align_corners=None if self.upsample == "nearest" else False)
            h = stage(h)
            if self.z_modulation:
                gamma_z, beta_z = self.z_modulations[n](z)[:, :, None, None].chunk(2, dim=1)
                h = torch.addcmul(beta_z, h, 1.0 + gamma_z)
            if self.conditional:
                gamma, beta = modulations[levels - n]
                h = torch.addcmul(beta, h, 1.0 + gamma)
        residual = self.output(h)
        if self.z_preimage:
            scaled = self.preimage_scales(z)[:, :, None, None] * responses  # responses of 1 or N patches
            residual = residual + scaled.sum(dim=1, keepdim=True) + self.preimage_output.conv.bias.view(1, 1, 1, 1)
        return residual + base if self.conditional else residual

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, sample: bool = True,
                generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
                swapped: bool = False, second_noise: Optional[torch.Tensor] = None) -> RepresentationOutput:
        """Encode and decode: z is drawn from q(z | x, f(x)) by the reparametrisation trick
        (``sample=True``, training) or is its mean (``sample=False``). The standard normal
        draws are ``noise`` ``(N, z_dim)`` when given (e.g. drawn on the CPU for the same
        numbers on every device), else drawn from ``generator`` (on the device of x).
        ``swapped``: also decode every patch's f(x) with the code of the next patch in the
        batch, or (``second_noise``, standard normal ``(N, z_dim)``) with a second draw of its
        own posterior (:attr:`RepresentationOutput.swapped`; training's terms on samples)."""
        mean, logvar = self.encode(x, y)
        z = mean
        if sample:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean)
        condition = self.condition(y)
        other = None
        if second_noise is not None:
            other = self.decode(mean + torch.exp(0.5 * logvar) * second_noise.to(mean), y, condition)
        elif swapped:
            other = self.decode(z.roll(1, dims=0), y, condition)
        return RepresentationOutput(self.decode(z, y, condition), mean, logvar, z, other)


def build_representation(**arguments) -> Representation:
    """A new (untrained) :class:`Representation` from its :attr:`~Representation.arguments`."""
    return Representation(**arguments)


# ----------------------------------------------------------------------------- losses


def reconstruction_loss(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (L1) between D(E(x)) and x, in network units per pixel."""
    return (reconstruction - x).abs().mean()


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z | x) || N(0, I)) in nats, summed over the latent dimensions, ``(N,)``."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def representation_loss(output: RepresentationOutput, x: torch.Tensor, kl_weight: float = 1e-4
                        ) -> Dict[str, torch.Tensor]:
    """The likelihood part of the cVAE objective: ``total = l1 + kl_weight * kl``, where
    ``l1`` is :func:`reconstruction_loss` and ``kl`` the batch mean of :func:`kl_divergence`
    divided by the number of pixels (so ``kl_weight`` is independent of the patch size).
    Training adds its adversarial and perceptual terms to ``total``. Returns the three
    scalars as a dict (``total``, ``l1``, ``kl``)."""
    l1 = reconstruction_loss(output.reconstruction, x)
    kl = kl_divergence(output.mean, output.logvar).mean() / x[0].numel()
    return {"total": l1 + kl_weight * kl, "l1": l1, "kl": kl}
