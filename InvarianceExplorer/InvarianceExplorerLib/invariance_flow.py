"""The invariance flow: a conditional invertible network (cINN) t that maps the latent code z
of the representation (:mod:`.representation`) to ``v = t(z | f(x))``.

Method (Eulig et al. 2025 and Rombach et al., ECCV 2020; section 3 of docs/method.md):
t is trained by maximum likelihood so that v ~ N(0, I) for every condition f(x) (loss
``0.5 * ||v||^2 - log|det J|``). Because the condition carries everything f keeps, v holds
what f ignores: drawing ``v ~ N(0, I)`` and inverting, ``z = t^-1(v | f(x))``, gives codes
of images that f maps to the same output.

Built with FrEIA (:class:`FrEIA.framework.SequenceINN`), ``n_flows`` times:
:class:`~FrEIA.modules.ActNorm` (per-dimension affine, set from data by :meth:`InvarianceFlow.initialize`),
:class:`~FrEIA.modules.GLOWCouplingBlock` (affine coupling of the two halves of z, both
conditioned, soft-clamped log-scales) and :class:`~FrEIA.modules.PermuteRandom` (a fixed
permutation, drawn from ``seed``). Every coupling block sees the same condition: a learned
embedding of the image f(x) by :class:`ConditionEmbedding` (a small CNN with stride-2
stages down to ``4 x 4``, then a linear layer), which :meth:`InvarianceFlow.embed` computes
once per patch. The coupling subnetworks are MLPs ``[half of z, embedding] -> hidden ->
hidden -> [log-scale, shift]`` whose last layer starts at zero, so an untrained flow is the
identity (after ActNorm).

The paper's cINN has 12 flows of width 1024 and an embedder with 4 down-sampling stages
(137 M parameters); ours defaults to 12 flows of width 128 and a 64-number embedding (1.9 M
parameters, 0.01 GFLOP per reverse pass), so that four denoisers with their cVAE and cINN
fit the 60 MB budget of the bundled models.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn as nn
from monai.networks.blocks import Convolution

ACT = ("leakyrelu", {"negative_slope": 0.2})


class ConditionEmbedding(nn.Module):
    """The cINN's condition: a vector of ``dim`` numbers describing the image f(x).

    Stride-2 3x3 convolutions (LeakyReLU) with ``channels`` feature maps, adaptive average
    pooling to ``4 x 4`` (so any patch of at least ``2 ** len(channels)`` pixels works) and
    a linear layer. Input ``(N, 1, H, W)`` in network units, output ``(N, dim)``.
    """

    def __init__(self, dim: int = 64, channels: Sequence[int] = (16, 32, 64, 64)):
        super().__init__()
        widths = [1] + [int(c) for c in channels]
        self.features = nn.Sequential(
            *[Convolution(2, a, b, strides=2, kernel_size=3, act=ACT, norm=None) for a, b in zip(widths, widths[1:])],
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(widths[-1] * 16, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(y))


def _subnet(hidden: int):
    """FrEIA subnet constructor: an MLP ``in -> hidden -> hidden -> out`` (LeakyReLU),
    last layer zero-initialised (the coupling starts as the identity)."""

    def construct(dims_in: int, dims_out: int) -> nn.Module:
        net = nn.Sequential(nn.Linear(dims_in, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                            nn.LeakyReLU(0.2), nn.Linear(hidden, dims_out))
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        return net

    return construct


class InvarianceFlow(nn.Module):
    """The cINN ``v = t(z | f(x))`` over latent vectors of length ``z_dim``.

    Args:
        z_dim: length of z (the representation's ``z_dim``).
        n_flows: number of (ActNorm, coupling, permutation) steps.
        hidden: width of the coupling MLPs.
        embedding_dim: length of the condition vector.
        embedding_channels: feature maps of the condition CNN's stride-2 stages.
        clamp: soft clamp of the coupling log-scales (each step scales by at most e^clamp).
        seed: seed of the fixed permutations (stored with the weights as well).
    """

    def __init__(self, z_dim: int = 256, n_flows: int = 12, hidden: int = 128, embedding_dim: int = 64,
                 embedding_channels: Sequence[int] = (16, 32, 64, 64), clamp: float = 2.0, seed: int = 0):
        super().__init__()
        if z_dim < 2:
            raise ValueError(f"z_dim must be at least 2 for affine coupling; got {z_dim}")
        self._arguments = {"z_dim": int(z_dim), "n_flows": int(n_flows), "hidden": int(hidden),
                           "embedding_dim": int(embedding_dim), "embedding_channels": [int(c) for c in embedding_channels],
                           "clamp": float(clamp), "seed": int(seed)}
        self.z_dim = int(z_dim)
        self.embedder = ConditionEmbedding(embedding_dim, embedding_channels)
        self.flow = Ff.SequenceINN(z_dim)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(n_flows):
            self.flow.append(Fm.ActNorm)
            self.flow.append(Fm.GLOWCouplingBlock, cond=0, cond_shape=(embedding_dim,),
                             subnet_constructor=_subnet(hidden), clamp=clamp)
            self.flow.append(Fm.PermuteRandom)
            permute = self.flow[-1]  # FrEIA draws it from numpy's global state: replace it by our own
            order = torch.randperm(z_dim, generator=generator, device="cpu")  # the generator's device
            permute.perm.data.copy_(order)
            permute.perm_inv.data.copy_(torch.argsort(order))
        for module in self.flow:
            if isinstance(module, Fm.ActNorm):  # data-dependent start only through initialize()
                module.init_on_next_batch = False

    @property
    def arguments(self) -> dict:
        """The constructor arguments (JSON-able), for the model folder's metadata."""
        return dict(self._arguments)

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        """The condition vector ``(N, embedding_dim)`` of denoised patches ``y = f(x)``
        ``(N, 1, H, W)`` in network units; compute once per patch and reuse it."""
        return self.embedder(y)

    def _embedding(self, n: int, y: Optional[torch.Tensor], embedding: Optional[torch.Tensor]) -> torch.Tensor:
        if embedding is None:
            if y is None:
                raise ValueError("the invariance flow needs its condition: the denoised image f(x) or its embedding")
            embedding = self.embed(y)
        return embedding.expand(n, -1) if embedding.shape[0] == 1 and n > 1 else embedding

    def _check(self, a: torch.Tensor, name: str) -> None:
        if a.ndim != 2 or a.shape[1] != self.z_dim:
            raise ValueError(f"{name} must be (N, {self.z_dim}); got {tuple(a.shape)}")

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None, embedding: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``v = t(z | f(x))`` and ``log|det dv/dz|`` (nats), ``(N, z_dim)`` and ``(N,)``. The
        condition is ``y = f(x)`` or its :meth:`embed` (a batch of one is shared by all z)."""
        self._check(z, "z")
        v, log_det = self.flow(z, c=[self._embedding(z.shape[0], y, embedding)], rev=False, jac=True)
        return v, log_det

    def reverse(self, v: torch.Tensor, y: Optional[torch.Tensor] = None, embedding: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """``z = t^-1(v | f(x))`` for ``v`` ``(N, z_dim)``; condition as in :meth:`forward`."""
        self._check(v, "v")
        z, _ = self.flow(v, c=[self._embedding(v.shape[0], y, embedding)], rev=True, jac=False)
        return z

    @torch.no_grad()
    def initialize(self, z: torch.Tensor, y: Optional[torch.Tensor] = None,
                   embedding: Optional[torch.Tensor] = None) -> None:
        """Data-dependent start of every ActNorm (Kingma & Dhariwal 2018): pass a batch of
        training codes z (and their f(x)) once before training, so that each ActNorm's
        output has zero mean and unit variance per dimension on that batch."""
        for module in self.flow:
            if isinstance(module, Fm.ActNorm):
                module.init_on_next_batch = True
        self.forward(z, y, embedding)
        for module in self.flow:
            if isinstance(module, Fm.ActNorm):
                module.init_on_next_batch = False

    def negative_log_likelihood(self, z: torch.Tensor, y: Optional[torch.Tensor] = None,
                                embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean :func:`nll_per_dimension` of codes ``z`` under the flow (the training loss)."""
        v, log_det = self.forward(z, y, embedding)
        return nll_per_dimension(v, log_det)


def nll_per_dimension(v: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of ``z`` in nats per dimension, averaged over the batch:
    ``(0.5 * ||v||^2 + 0.5 * D * log(2 pi) - log|det J|) / D``; 1.419 (= 0.5 log(2 pi e))
    when v is exactly standard normal and t the identity."""
    d = v.shape[1]
    return ((0.5 * v.pow(2).sum(dim=1) - log_det) / d).mean() + 0.5 * math.log(2 * math.pi)


def build_invariance_flow(**arguments) -> InvarianceFlow:
    """A new (untrained) :class:`InvarianceFlow` from its :attr:`~InvarianceFlow.arguments`."""
    return InvarianceFlow(**arguments)
