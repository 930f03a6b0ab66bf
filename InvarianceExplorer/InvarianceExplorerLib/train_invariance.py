"""Training the invariance models of a frozen denoiser f: the representation (cVAE), then the
invariance flow (cINN) on its codes (docs/method.md, sections 2-3).

* :func:`train_cvae` - the representation (:class:`~.representation.Representation`) of
  low-dose patches x given f(x). Per step: ``r = D(z, f(x))`` with ``z ~ q(z | x, f(x))``
  (reparametrisation); ``n_critic`` steps of a conditional Wasserstein critic
  (:class:`~.denoisers.WGANCritic` on ``[image, f(x)]``, two channels) on real x against
  r with the gradient penalty (Gulrajani et al. 2017) weighted ``lam_gp``; then one cVAE
  step on ``L1(r, x) + kl_weight * KL / pixels + lam_perc * L1(phi(r), phi(x)) +
  lam_cons * L1(f(r), f(x)) + lam_nps * S(r, x, f(x)) + lam_local_mean * M(r, x) +
  lam_sample_texture * T(r', r, x, f(x)) + lam_swap_cons * L1(f(r'), f(x)) +
  lam_spread * P(r', r, x) + w_adv * (-critic(r, f(x)))``.
  The consistency term
  ``L1(f(r), f(x))`` (ours, not the paper's; f frozen, gradients through it) asks the
  decoder to put what it cannot reconstruct of x where f does not look: a reconstruction
  differs from x (z cannot hold a whole noise realisation), and without the term that
  difference is free to change f's output (held-out consistency C 0.47 for CNN-10). Off by
  default (``lam_cons`` 0, the paper's objective); the bundled CNN-10 models were trained
  with it at 5, WGAN-VGG's at 10, RED-CNN's and DU-GAN's without it (README). ``cons_crop`` > 0
  compares f(r) with f(x) on one random square of that many pixels per step instead of the
  whole patch (both terms that re-apply f), f applied to the crop of x as to the crop of r so
  that it sees the same borders on both: (crop / patch)² of f's cost, for RED-CNN and DU-GAN
  (48 GFLOP per 128² patch) the difference between a CPU fit and none.
  S, M, T, the swapped consistency and P are ours, off by default: :mod:`.invariance_losses`
  defines them and says why each was added.
  phi are the deep features of our
  :class:`~.denoisers.FeatureNetwork` (the paper's perceptual term; ImageNet VGG cannot be
  downloaded here): taken from ``feature_network`` or the denoiser's own folder when it
  ships one (WGAN-VGG), else trained first on tissue labels as WGAN-VGG's training does;
  with ``lam_perc`` 0 (data without tissue labels, e.g. DICOM) there is no perceptual term
  and no feature network is loaded or trained.
  The adversarial weight is adaptive (Esser et al., "Taming transformers", CVPR 2021, as
  in the CompVis code this method comes from): ``w_adv = lam_adv * ||grad_w rec|| /
  ||grad_w adv||`` at the decoder's last layer w, ``rec`` the L1 + KL + perceptual terms,
  so the critic's gradient stays a fixed fraction of the likelihood's whatever their
  scales; it is switched on after ``adv_start`` steps (the critic trains from the start).
  ``max_adv_weight`` caps ``w_adv``: a critic that has not yet learnt to separate real from
  reconstructed patches has a tiny gradient at that layer, the ratio explodes (46-144 in
  the GPU fits of the first RED-CNN, WGAN-VGG and DU-GAN models, against about 0.01 in a
  stable run) and the reconstructions break down; the default 1e4 is the uncapped ratio.
  ``adv_min_separation`` (a Wasserstein level, e.g. 0.1; None: always) keeps the
  adversarial term off in steps where the critic does not yet separate the batch's real
  patches from its reconstructions by that much (``benchmarks/critic_start.py``: whether
  the critic starts at once or after 50-100 steps follows its initial weights).
  Validation per epoch: L1 of the posterior-mean reconstruction on fixed held-out patches
  (the best-epoch criterion), its error in HU, the KL, and how much f notices the
  difference, plus a PNG of x, f(x) and reconstructions.
* :func:`train_cinn` - the invariance flow (:class:`~.invariance_flow.InvarianceFlow`) by
  maximum likelihood on codes of the frozen encoder: ``z ~ q(z | x, f(x))`` (a fresh
  posterior draw each step, ``sample_z``: the flow then models the aggregate posterior, the
  distribution of codes the decoder was trained to decode; posterior means only if
  ``sample_z`` is false), act-norm started from ``init_batches`` batches of codes, gradient
  norm clipped to ``clip_grad``. Validation per epoch: held-out NLL per dimension (the
  best-epoch criterion) and the mean and std of v.

Both runs are seeded (every random number of epoch ``e`` derives from ``(seed, e, rank)``),
checkpoint to ``<out>/checkpoints/last.pt`` every epoch and resume exactly (``resume=True``;
settings must match), show tqdm bars with running losses, and export the best epoch into
``<out>/model/``: a copy of the input model folder plus the new weights
(:func:`~.sampler.save_representation`, then :func:`~.sampler.save_invariance_models`)
with a model card section (:func:`~.fidelity.invariance_card`): sizes, training data, steps,
wall time, machine and the fidelity figures (:mod:`.fidelity`) on the test split.

Cost per step on one CPU thread at the defaults (128x128 patches; measured while other
jobs shared the CPU, CPU time): cVAE batch 8 about 2.0 s, cINN batch 32 about 0.39 s
(0.07 s from a :class:`PatchPool`), plus f(x) itself: CNN-10 0.2 / 0.8 s, WGAN-VGG
0.3 / 1.7 s, RED-CNN and DU-GAN 4.7 / 19 s per batch of 8 / 32; for the last two, a patch
pool (``pool_patches``) computes f once per patch instead of once per step.

Run them alone or under ``torchrun --nproc_per_node N`` (:func:`~.training.setup_distributed`):
DistributedDataParallel averages gradients (gloo on the CPU, nccl on GPUs), every process
draws its own batches, rank 0 validates, writes checkpoints and exports. The same code runs
on the CPU and on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .denoisers import (FeatureNetwork, WGANCritic, copy_model_folder, read_metadata, resolve_model_folder, sha256,
                        verify_weights, write_metadata)
from .devices import machine
from .invariance_losses import local_mean_loss, noise_spectrum_loss, sample_texture_loss, spread_loss
from .invariance_flow import InvarianceFlow, nll_per_dimension
from .representation import DEFAULT_CHANNELS, Representation, representation_loss
from .io import write_json, written_whole
from .training import (Distributed, TrainingBatches, adam, derive_seed, describe_data,
                       gradient_penalty, load_feature_network, make_generator, optimizer_step, restore_checkpoint,
                       save_checkpoint,
                       setup_distributed, train_feature_network, run_checkpoint, check_data, check_hyperparameters,
                       stop_if_diverged)

#: Default hyperparameters. cVAE: Adam, the loss weights of the module docstring, the
#: critic's size, the representation's arguments, and the feature network's pretraining.
#: cINN: Adam, gradient clipping, act-norm start, the flow's arguments.
HYPERPARAMETERS = {
    "cvae": dict(lr=2e-4, betas=(0.5, 0.9), kl_weight=1e-4, lam_gp=10.0, n_critic=1, lam_adv=0.5, adv_start=500,
                 lam_perc=0.1, lam_cons=0.0, cons_crop=0, lam_nps=0.0, nps_sectors=1, lam_local_mean=0.0,
                 local_mean_pixels=16, lam_sample_texture=0.0, lam_swap_cons=0.0, lam_spread=0.0, second_code="other",
                 max_adv_weight=1e4, adv_min_separation=None,
                 critic_widths=(32, 32, 64, 64, 128, 128), critic_hidden=256,
                 z_dim=256, channels=tuple(DEFAULT_CHANNELS), conditional=True, full_resolution_subunits=1,
                 z_modulation=False, preimage_layers=0, z_preimage=False, upsample="nearest", padding="zeros",
                 feature_steps=2000, feature_lr=1e-3),
    "cinn": dict(lr=1e-4, betas=(0.9, 0.999), clip_grad=10.0, sample_z=True, init_batches=4, n_flows=12, hidden=128,
                 embedding_dim=64, embedding_channels=(16, 32, 64, 64), clamp=2.0),
}
#: Representation / flow constructor arguments among the hyperparameters.
CVAE_ARGUMENTS = ("z_dim", "channels", "conditional", "full_resolution_subunits", "z_modulation",
                  "preimage_layers", "z_preimage", "upsample", "padding")
CINN_ARGUMENTS = ("n_flows", "hidden", "embedding_dim", "embedding_channels", "clamp")
VALIDATION = "validation"
#: PNG of held-out invariances written beside the weights at export (paper's layout).
FIDELITY_FIGURE = "fidelity.png"


# ----------------------------------------------------------------------------- objectives


class _Objective:
    """What one step optimises. ``networks``/``optimizers`` (by name) are what a checkpoint
    holds; ``trained`` names the network that is exported; ``wrapped`` holds the
    DistributedDataParallel wrappers used in steps (the modules themselves when alone)."""

    criterion = "l1"  # validation figure of the best epoch (lowest)

    def __init__(self, hp: dict):
        self.hp = hp
        self.networks: Dict[str, nn.Module] = {}
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        self.wrapped: Dict[str, nn.Module] = {}

    def wrap(self, dist: Distributed) -> None:
        for name in self.optimizers:
            self.wrapped[name] = dist.wrap(self.networks[name])

    def prepare(self, batches, validation, device, progress: bool) -> Optional[dict]:
        return None

    def selectable(self, step: int, total: int) -> bool:
        """Whether an epoch ending at ``step`` (of ``total``) may be exported as the best."""
        return True

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int, rng: torch.Generator, **cached) -> Dict[str, float]:
        """One optimisation step on low-dose patches ``x`` with ``y = f(x)`` (network units);
        ``step`` counts from 1 over the whole run. Returns the losses as numbers."""
        raise NotImplementedError


def _noise(shape, rng: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal numbers drawn on the CPU (same on every device), moved to ``like``."""
    return torch.randn(shape, generator=rng).to(like)


class _CVAEObjective(_Objective):
    """The representation with its conditional critic and perceptual term (module docstring)."""

    trained = "representation"

    def __init__(self, hp: dict, patch_size: int, denoiser_folder: Path):
        super().__init__(hp)
        block = int(hp["local_mean_pixels"])
        if hp["second_code"] not in ("other", "posterior"):
            raise ValueError(f"second_code must be 'other' (the code of another patch) or 'posterior' (a second "
                             f"draw of the patch's own posterior); got {hp['second_code']!r}")
        if hp["lam_local_mean"] != 0 and (block < 1 or patch_size % block):
            raise ValueError(f"local_mean_pixels must divide the patch size {patch_size}; got {block}")
        if not 0 <= int(hp["cons_crop"]) <= patch_size:
            raise ValueError(f"cons_crop must be 0 (the whole patch) or a square of at most the patch size "
                             f"{patch_size} pixels; got {hp['cons_crop']}")
        if int(hp["nps_sectors"]) not in (1, 2, 3):
            raise ValueError(f"nps_sectors must be 1 (rings), 2 (rings split by direction) or 3 (axes and diagonals); "
                             f"got {hp['nps_sectors']}")
        rep = Representation(patch_size, **{k: hp[k] for k in CVAE_ARGUMENTS})
        critic = WGANCritic(patch_size, in_channels=2 if rep.conditional else 1, widths=hp["critic_widths"],
                            hidden=hp["critic_hidden"])
        self.networks = {"representation": rep, "critic": critic,
                         "feature_network": FeatureNetwork().eval().requires_grad_(False)}
        if hp["lam_cons"] != 0 or hp["lam_swap_cons"] != 0:  # f itself, frozen, for the consistency terms
            from .denoisers import load_denoiser

            self.networks["denoiser"] = load_denoiser(denoiser_folder).network.eval().requires_grad_(False)
        self.optimizers = {"representation": adam(rep, hp), "critic": adam(critic, hp)}
        self.denoiser_folder = denoiser_folder

    def prepare(self, batches, validation, device, progress):
        """The feature network: from ``hp["feature_network"]``, else the denoiser's folder when
        it ships one, else trained here on tissue labels; none when ``lam_perc`` is 0 (no
        perceptual term: the record says so)."""
        features = self.networks["feature_network"]
        if self.hp["lam_perc"] == 0:
            return {"used": False, "reason": "lam_perc is 0: no perceptual term, so no feature network was "
                                             "loaded or trained (the data have no tissue labels to train one on)"}
        source = self.hp.get("feature_network")
        if not source and "feature_network" in read_metadata(self.denoiser_folder)["weights"]:
            source = self.denoiser_folder
        if source:
            return load_feature_network(features, source)
        return train_feature_network(features, batches, validation, self.hp, device, progress)

    def selectable(self, step: int, total: int) -> bool:
        """Only epochs trained with the whole objective (after ``adv_start``) compete, unless
        the run never reaches it: L1 alone favours blurred reconstructions without noise."""
        return self.hp["lam_adv"] <= 0 or step > self.hp["adv_start"] or total <= self.hp["adv_start"]

    def _pair(self, image: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat((image, y), dim=1) if self.networks["representation"].conditional else image

    def critic_step(self, x, fake, y, rng):
        """One critic update on real patches ``x`` against reconstructions ``fake`` (given
        ``y = f(x)``): returns the Wasserstein estimate mean(critic(fake)) - mean(critic(x))
        (below zero once the critic separates them) and the gradient penalty."""
        critic = self.wrapped["critic"]
        real_score, fake_score = critic(self._pair(torch.cat((x, fake)), torch.cat((y, y)))).chunk(2)
        wasserstein = fake_score.mean() - real_score.mean()
        condition = y if self.networks["representation"].conditional else None
        penalty = gradient_penalty(critic, x, fake, rng, condition)
        optimizer_step(self.optimizers["critic"], wasserstein + self.hp["lam_gp"] * penalty)
        return wasserstein, penalty

    def consistency_target(self, x, y, rng):
        """Where the consistency terms compare f(r) with f(x): the index of the compared region
        and f(x) there. The whole patch (``y``) unless ``cons_crop`` > 0: then one random square
        of that many pixels, f(x) recomputed on the crop of x (module docstring)."""
        size = int(self.hp["cons_crop"])
        if size in (0, x.shape[-1]):  # patches are square
            return (...,), y
        i, j = (int(v) for v in torch.randint(0, x.shape[-1] - size + 1, (2,), generator=rng))
        region = (..., slice(i, i + size), slice(j, j + size))
        with torch.no_grad():
            return region, self.networks["denoiser"](x[region])

    def step(self, x, y, step, rng):
        hp, rep = self.hp, self.wrapped["representation"]
        features = self.networks["feature_network"].features
        zero = torch.zeros((), device=x.device)
        swapped = any(hp[k] != 0 for k in ("lam_sample_texture", "lam_swap_cons", "lam_spread"))
        shape = (x.shape[0], self.networks["representation"].z_dim)
        second = _noise(shape, rng, x) if swapped and hp["second_code"] == "posterior" else None
        out = rep(x, y, sample=True, noise=_noise(shape, rng, x), swapped=swapped, second_noise=second)
        fake = out.reconstruction.detach()
        for _ in range(hp["n_critic"]):
            wasserstein, penalty = self.critic_step(x, fake, y, rng)
        self.networks["critic"].requires_grad_(False)
        judged, condition = out.reconstruction, y
        if hp["lam_spread"] != 0:  # the spread is spent on CT-like images: r' is judged too
            judged, condition = torch.cat((out.reconstruction, out.swapped)), torch.cat((y, y))
        adversarial = -self.networks["critic"](self._pair(judged, condition)).mean()
        perceptual = F.l1_loss(features(out.reconstruction), features(x)) if hp["lam_perc"] != 0 else zero
        losses = representation_loss(out, x, hp["kl_weight"])
        if hp["lam_cons"] != 0 or hp["lam_swap_cons"] != 0:
            region, target = self.consistency_target(x, y, rng)
        consistency = (F.l1_loss(self.networks["denoiser"](out.reconstruction[region]), target)
                       if hp["lam_cons"] != 0 else zero)
        spectrum = (noise_spectrum_loss(out.reconstruction, x, y, int(hp["nps_sectors"])) if hp["lam_nps"] != 0
                    else zero)
        local_mean = (local_mean_loss(out.reconstruction, x, int(hp["local_mean_pixels"]))
                      if hp["lam_local_mean"] != 0 else zero)
        texture = (sample_texture_loss(out.swapped, out.reconstruction, x, y) if hp["lam_sample_texture"] != 0
                   else zero)
        swap_consistency = (F.l1_loss(self.networks["denoiser"](out.swapped[region]), target)
                            if hp["lam_swap_cons"] != 0 else zero)
        spread = spread_loss(out.swapped, out.reconstruction, x) if hp["lam_spread"] != 0 else zero
        likelihood = (losses["total"] + hp["lam_perc"] * perceptual + hp["lam_cons"] * consistency
                      + hp["lam_nps"] * spectrum + hp["lam_local_mean"] * local_mean
                      + hp["lam_sample_texture"] * texture + hp["lam_swap_cons"] * swap_consistency
                      + hp["lam_spread"] * spread)
        weight = torch.zeros(())
        level = hp["adv_min_separation"]
        separates = level is None or wasserstein.item() < -level
        if step > hp["adv_start"] and hp["lam_adv"] > 0 and separates:
            last = self.networks["representation"].output.conv.weight
            (g_rec,) = torch.autograd.grad(likelihood, last, retain_graph=True)
            (g_adv,) = torch.autograd.grad(adversarial, last, retain_graph=True)
            ratio = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4)
            weight = (hp["lam_adv"] * ratio).clamp(max=hp["max_adv_weight"]).detach()
        optimizer_step(self.optimizers["representation"], likelihood + weight * adversarial)
        self.networks["critic"].requires_grad_(True)
        return {"l1": losses["l1"].item(), "kl": losses["kl"].item(), "perceptual": perceptual.item(),
                "consistency": consistency.item(), "spectrum": spectrum.item(), "local_mean": local_mean.item(),
                "sample_texture": texture.item(), "swap_consistency": swap_consistency.item(), "spread": spread.item(),
                "adv": adversarial.item(), "adv_weight": float(weight), "critic": wasserstein.item(),
                "gp": penalty.item()}


class _CINNObjective(_Objective):
    """The invariance flow by maximum likelihood on codes of the frozen encoder."""

    trained = "flow"
    criterion = "nll_per_dim"

    def __init__(self, hp: dict, representation: Representation, seed: int):
        super().__init__(hp)
        self.representation = representation
        flow = InvarianceFlow(representation.z_dim, seed=seed, **{k: hp[k] for k in CINN_ARGUMENTS})
        self.networks = {"flow": flow}
        self.optimizers = {"flow": adam(flow, hp)}

    def codes(self, x: torch.Tensor, y: torch.Tensor, rng: torch.Generator, posterior=None) -> torch.Tensor:
        """z of patches x with f(x) = y: a posterior draw (``sample_z``) or the mean;
        ``posterior`` = precomputed ``(mean, logvar)`` of E(x, y) (a patch pool)."""
        with torch.no_grad():
            mean, logvar = posterior if posterior is not None else self.representation.encode(x, y)
            if not self.hp["sample_z"]:
                return mean
            return mean + torch.exp(0.5 * logvar) * _noise(mean.shape, rng, mean)

    def initialize(self, batches: List[tuple], rng: torch.Generator) -> dict:
        """Act-norm from data: every ActNorm gets zero mean and unit variance on the codes of
        ``batches`` (pairs ``(x, y)``)."""
        z = torch.cat([self.codes(x, y, rng) for x, y in batches])
        y = torch.cat([y for _, y in batches])
        self.networks["flow"].initialize(z, y)
        return {"act_norm_initialised_on": int(z.shape[0])}

    def step(self, x, y, step, rng, posterior=None):
        z = self.codes(x, y, rng, posterior)
        v, log_det = self.wrapped["flow"](z, y)
        loss = nll_per_dimension(v, log_det)
        optimizer = self.optimizers["flow"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.networks["flow"].parameters(), self.hp["clip_grad"])
        optimizer.step()
        return {"nll": loss.item(), "v_std": v.detach().std().item(), "grad_norm": float(norm)}


# ----------------------------------------------------------------------------- shared run


def _frozen_denoiser(folder: Path, device):
    from .denoisers import load_denoiser

    denoiser = load_denoiser(folder, device=device)
    network = denoiser.network

    def f(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(x)

    return denoiser, f


def _held_out_tensors(source, split: str, patch_size: int, count: int, normalization, device):
    """Fixed held-out patches (:func:`~.fidelity.held_out_patches`, 2 per slice) as normalised
    tensors ``(N, 1, P, P)`` (low dose) with the patches themselves (the split holds slices:
    :func:`~.training.check_data`)."""
    from .fidelity import held_out_patches

    patches = held_out_patches(source, split, patch_size, slices=max(1, (count + 1) // 2), per_slice=2)[:count]
    x = normalization.normalize(torch.from_numpy(np.stack([p.low_dose for p in patches]))[:, None]).to(device)
    return x, patches


def _weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (every tensor's bytes, in order), to compare processes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _size_record(module: nn.Module, folder: Path, record: dict) -> dict:
    return {"parameters": int(sum(p.numel() for p in module.parameters())),
            "file_mb": round((folder / record["file"]).stat().st_size / 1e6, 3)}


def _write_card(folder: Path) -> None:
    from .evaluation import MODEL_CARD, model_card

    (folder / MODEL_CARD).write_text(model_card(read_metadata(folder)))


class PatchPool:
    """A fixed pool of ``count`` training patches with their f(x) (and, for the cINN, the
    frozen encoder's posterior ``mean``, ``logvar``), computed once; batches are then drawn
    from it with replacement. For denoisers whose f costs more than the training step itself
    (RED-CNN, DU-GAN: about 0.6 s per 128x128 patch on one CPU thread) this trades patch
    variety for speed. The patches are those of ``batches`` (random crops, flips and
    rotations applied before f, so f(x) is exact) and the draws of call ``key`` depend only
    on ``(seed, key)``: resuming rebuilds the same pool and continues exactly."""

    def __init__(self, batches: TrainingBatches, count: int, f: Callable, device, seed: int,
                 encode: Optional[Callable] = None, progress: bool = False):
        from tqdm.auto import tqdm

        self.batch_size, self.seed = batches.batch_size, seed
        parts: Dict[str, list] = {}
        steps = -(-int(count) // batches.batch_size)
        for batch in tqdm(batches(steps, 0), total=steps, desc=f"patch pool ({count} patches, f(x) once)",
                          disable=not progress):
            x = batch["ld"].to(device)
            y = f(x)
            values = {"ld": x, "y": y}
            if encode is not None:
                with torch.no_grad():
                    values["mean"], values["logvar"] = encode(x, y)
            for name, value in values.items():
                parts.setdefault(name, []).append(value.detach().cpu())
        self.data = {name: torch.cat(value)[:count] for name, value in parts.items()}

    def __len__(self) -> int:
        return self.data["ld"].shape[0]

    def __call__(self, steps: int, key: int = 0):
        g = make_generator(derive_seed(self.seed, key, 5))
        for _ in range(steps):
            index = torch.randint(len(self), (self.batch_size,), generator=g)
            yield {name: value[index] for name, value in self.data.items()}


def _run(kind: str, objective: _Objective, config: dict, out: Path, *, epochs: int, steps_per_epoch: int,
         batches: TrainingBatches, f: Callable, validate: Callable[[int], dict], prepare: Callable[[], Optional[dict]],
         dist: Distributed, seed: int, progress: bool) -> dict:
    """The epoch loop both trainings share: checkpoint / resume (settings checked), seeded
    epochs, tqdm with running means, validation and best-epoch tracking on rank 0. Returns
    the run state (history, best weights of ``objective.trained``, seconds, ...)."""
    from tqdm.auto import tqdm

    device = dist.device
    checkpoint_path = run_checkpoint(out, config["resume"], config["kind"])
    resuming = checkpoint_path.exists()
    dist.barrier()  # every process has looked before rank 0 writes
    config = {k: v for k, v in config.items() if k != "resume"}
    if dist.is_main:
        checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "history": [], "seconds": 0.0, "best": None, "prepared": None}
    if resuming:
        state = restore_checkpoint(checkpoint_path, config, objective, state)
    else:
        started = time.perf_counter()
        state["prepared"] = prepare()
        state["seconds"] = time.perf_counter() - started
    objective.wrap(dist)
    trained = objective.networks[objective.trained]

    def checkpoint():
        if dist.is_main:
            save_checkpoint(checkpoint_path, {
                "config": config, **state,
                "networks": {k: v.state_dict() for k, v in objective.networks.items()},
                "optimizers": {k: v.state_dict() for k, v in objective.optimizers.items()}})

    if state["epoch"] == 0:
        checkpoint()
    criterion = objective.criterion
    for epoch in range(state["epoch"] + 1, epochs + 1):
        started = time.perf_counter()
        rng = make_generator(derive_seed(seed, epoch, 2, dist.rank))
        sums: Dict[str, float] = {}
        bar = tqdm(total=steps_per_epoch, desc=f"{kind} epoch {epoch}/{epochs}",
                   disable=not (progress and dist.is_main))
        for network in objective.optimizers:
            objective.networks[network].train()
        for k, batch in enumerate(batches(steps_per_epoch, epoch)):
            x = batch["ld"].to(device)
            y = batch["y"].to(device) if "y" in batch else f(x)  # a patch pool holds f(x)
            extra = {"posterior": (batch["mean"].to(device), batch["logvar"].to(device))} if "mean" in batch else {}
            losses = objective.step(x, y, (epoch - 1) * steps_per_epoch + k + 1, rng, **extra)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value
            bar.update()
            bar.set_postfix({name: f"{total / (k + 1):.4g}" for name, total in sums.items()})
        bar.close()
        for network in objective.optimizers:
            objective.networks[network].eval()
        scores = validate(epoch) if dist.is_main else {}
        state["seconds"] += time.perf_counter() - started
        state["epoch"] = epoch
        means = {n: t / steps_per_epoch for n, t in sums.items()}
        state["history"].append({"epoch": epoch, "train": means, "val": scores, "seconds": round(state["seconds"], 3)})
        stop_if_diverged(kind, epoch, means, scores, checkpoint_path, dist)
        best = state["best"]
        eligible = objective.selectable(epoch * steps_per_epoch, epochs * steps_per_epoch)
        if dist.is_main and eligible and (best is None or scores[criterion] < best["val"][criterion]):
            state["best"] = {"epoch": epoch, "val": scores,
                             "weights": {k: v.detach().cpu().clone() for k, v in trained.state_dict().items()}}
        checkpoint()
        if dist.is_main:
            write_json(out / "history.json", state["history"])
            if progress:
                tqdm.write(f"{kind} epoch {epoch}: validation " + ", ".join(
                    f"{n} {v:.4g}" for n, v in scores.items() if isinstance(v, (int, float))))
        dist.barrier()
    digests = [_weights_digest(trained)]
    if dist.enabled:
        import torch.distributed as torch_dist

        gathered: List[Optional[str]] = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, digests[0])
        digests = gathered
    state["rank_digests"] = digests
    if len(set(digests)) > 1:
        raise RuntimeError(f"the {dist.world_size} processes ended with different {objective.trained} weights; "
                           "distributed training is broken")
    return state


def _training_record(state: dict, config: dict, source, data, dist: Distributed, module: nn.Module,
                     folder: Path, weights: dict) -> dict:
    from . import __version__

    best = state["best"] or {}
    return {"data": describe_data(source, data), "split": "train (patient-level 70/20/10 %, seed 0)",
            "epochs": state["epoch"], "steps_per_epoch": config["steps_per_epoch"],
            "batch_size": config["batch_size"], "world_size": dist.world_size,
            "steps": state["epoch"] * config["steps_per_epoch"], "patch_size": config["patch_size"],
            "seed": config["seed"], "hyperparameters": config["hyperparameters"],
            "best_epoch": best.get("epoch"), "validation": best.get("val"),
            "wall_time_s": round(state["seconds"], 1), "machine": machine(dist.device),
            "distributed": {"world_size": dist.world_size, "final_weights_sha256": state.get("rank_digests")},
            "denoiser": config["denoiser"], "pool_patches": config.get("pool_patches", 0),
            "engine_version": __version__,
            **_size_record(module, folder, weights)}


def _config(kind: str, hp: dict, denoiser_folder: Path, *, patch_size, batch_size, steps_per_epoch, seed, resume,
            dist: Distributed, data, dicom: str) -> dict:
    metadata = read_metadata(denoiser_folder)
    weights = {k: v["sha256"] for k, v in metadata["weights"].items()}
    return json.loads(json.dumps({
        "kind": kind, "hyperparameters": hp, "patch_size": patch_size, "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch, "seed": seed, "world_size": dist.world_size,
        "data": str(Path(data).resolve()), **({"dicom": dicom} if dicom != "auto" else {}),  # runs before it: auto
        "denoiser": {"folder": str(denoiser_folder.resolve()), "architecture": metadata["architecture"]["name"],
                     "weights_sha256": weights},
        "resume": resume}))


def _check(epochs, steps_per_epoch, batch_size, patch_size, val_patches) -> None:
    if min(epochs, steps_per_epoch, batch_size, val_patches) < 1 or patch_size < 24:
        raise ValueError("epochs, steps_per_epoch, batch_size and val_patches must be positive and patch_size at "
                         "least 24 pixels (the critic's minimum)")


def _hyperparameters(kind: str, lr, overrides) -> dict:
    """The defaults of stage ``kind`` with ``overrides``, each checked for its name, the kind of
    value its default has and its range (:func:`~.training.check_hyperparameters`)."""
    unknown = sorted(set(overrides or {}) - set(HYPERPARAMETERS[kind]) - {"feature_network"})
    if unknown:
        raise ValueError(f"not a {kind} hyperparameter: {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(HYPERPARAMETERS[kind]))}")
    check_hyperparameters(HYPERPARAMETERS[kind], overrides or {}, f"{kind}.")
    return {**HYPERPARAMETERS[kind], **(overrides or {}), **({"lr": float(lr)} if lr is not None else {})}


# ----------------------------------------------------------------------------- the representation


def train_cvae(denoiser, data, out, *, epochs: int = 10, steps_per_epoch: int = 500, batch_size: int = 8,
               patch_size: int = 128, lr: Optional[float] = None, seed: int = 0, resume: bool = False,
               device="auto", num_workers: int = 0, val_patches: int = 32, weights_dtype: str = "float32",
               hyperparameters: Optional[dict] = None, feature_network=None, fidelity_slices: int = 8,
               pool_patches: int = 0, dicom: str = "auto", progress: bool = True) -> Path:
    """Train the representation (cVAE) of the frozen ``denoiser``; return ``<out>/model``.

    Args:
        denoiser: model folder or bundled name of the denoiser f.
        data: simulated data set folder, paired or low-dose-only DICOM folder
            (:func:`~.datasets.open_source`); low-dose patches of its training split are used
            (plus tissue labels to train a feature network when none is given and ``lam_perc``
            is not 0; data without labels need ``lam_perc=0`` or ``feature_network``).
        out: run folder: ``checkpoints/last.pt``, ``history.json``, ``validation/*.png`` and
            ``model/`` (a copy of the denoiser's folder with ``cvae.safetensors`` added).
        epochs: total epochs (a resumed run continues up to this number).
        steps_per_epoch, batch_size, patch_size: batches per epoch (per process), patches
            per batch, patch side in pixels (a multiple of 2**(levels); 128 as in the paper).
        lr: Adam learning rate of cVAE and critic (default :data:`HYPERPARAMETERS`).
        seed: seeds weights, patches and every random draw.
        resume: continue from ``<out>/checkpoints/last.pt``; the settings must match.
        device: "auto", "cpu" or "cuda" (under torchrun: each process takes its GPU).
        num_workers: data loader processes.
        val_patches: held-out patches of the validation split evaluated per epoch.
        weights_dtype: "float32" or "float16" storage of the exported weights.
        hyperparameters: overrides of ``HYPERPARAMETERS["cvae"]`` (e.g. ``z_dim``, ``lam_adv``).
        feature_network: a model folder whose feature network gives the perceptual term.
        fidelity_slices: test-split slices for the completeness figures of the model card (0: none).
        pool_patches: train on a fixed :class:`PatchPool` of this many patches per process
            with f(x) computed once (0: fresh patches and f(x) every step).
        dicom: how to read a DICOM ``data`` folder: "auto", "paired" or "low-dose"
            (:func:`~.datasets.open_source`).
        progress: tqdm bars (rank 0).
    """
    from .datasets import open_source

    _check(epochs, steps_per_epoch, batch_size, patch_size, val_patches)
    hp = _hyperparameters("cvae", lr, hyperparameters)
    if feature_network is not None:
        if float(hp["lam_perc"]) == 0:
            raise ValueError("a feature network (--feature-network) was given, but lam_perc is 0: this recipe has no "
                             "perceptual term to use it; leave it out, or set lam_perc (--set lam_perc=...)")
        hp["feature_network"] = str(feature_network)
    dist = setup_distributed(device)
    try:
        folder = resolve_model_folder(denoiser)
        source = open_source(data, dicom=dicom)
        check_data(source, data, patch_size, test=bool(fidelity_slices))
        out = Path(out)
        config = _config("cvae", hp, folder, patch_size=patch_size, batch_size=batch_size,
                         steps_per_epoch=steps_per_epoch, seed=seed, resume=resume, dist=dist, data=data,
                         dicom=dicom)
        config["pool_patches"] = int(pool_patches)
        hp = config["hyperparameters"]
        device = dist.device
        den, f = _frozen_denoiser(folder, device)
        norm = den.normalization
        torch.manual_seed(derive_seed(seed, 0))
        objective = _CVAEObjective(hp, patch_size, folder)
        for network in objective.networks.values():
            network.to(device)
        rep = objective.networks["representation"]
        batches = TrainingBatches(source, patch_size, batch_size, derive_seed(seed, dist.rank), norm, num_workers,
                                  device)
        if pool_patches:
            batches = PatchPool(batches, pool_patches, f, device, derive_seed(seed, dist.rank),
                                progress=progress and dist.is_main)
        x_val, _ = _held_out_tensors(source, "val", patch_size, val_patches, norm, device)
        y_val = f(x_val)

        def prepare():
            from .training import validation_items

            validation = validation_items(source, "val", 8, norm)
            return objective.prepare(TrainingBatches(source, patch_size, batch_size, derive_seed(seed, 0), norm,
                                                     num_workers, device), validation, device,
                                     progress and dist.is_main)

        def validate(epoch: int) -> dict:
            return _validate_cvae(rep, f, x_val, y_val, norm, out / VALIDATION / f"cvae_epoch_{epoch:03d}.png")

        state = _run("cvae", objective, config, out, epochs=epochs, steps_per_epoch=steps_per_epoch,
                     batches=batches, f=f, validate=validate, prepare=prepare, dist=dist, seed=seed,
                     progress=progress)
        model = out / "model"
        if dist.is_main:
            from .fidelity import held_out_patches, representation_fidelity
            from .sampler import CVAE, load_representation, save_representation

            if state["best"] is not None:
                rep.load_state_dict(state["best"]["weights"])
            rep.eval()
            with written_whole(model) as partial:
                copy_model_folder(folder, partial)
                (partial / FIDELITY_FIGURE).unlink(missing_ok=True)  # of an earlier cVAE's invariances
                save_representation(partial, rep, {}, dtype=weights_dtype)
                metadata = read_metadata(partial)
                metadata.pop("fit", None)  # the denoiser folder's own fit (of a bundled folder) is not this training
                record = _training_record(state, config, source, data, dist, rep, partial, metadata["weights"][CVAE])
                if state["prepared"]:
                    record["feature_network"] = state["prepared"]
                record["critic"] = {"class": "WGANCritic", "in_channels": 2 if rep.conditional else 1,
                                    "parameters": int(sum(p.numel() for p in objective.networks["critic"].parameters()))}
                record["validation_figures"] = sorted(str(p.relative_to(out)) for p in (out / VALIDATION).glob("*.png"))
                info = metadata["invariance"]
                info["training"] = {"cvae": record}
                if fidelity_slices:
                    patches = held_out_patches(source, "test", patch_size, fidelity_slices, 2)
                    if patches:  # the weights as stored (float16 rounds them)
                        stored = load_representation(partial, device=device)[1]
                        info["completeness"] = {**representation_fidelity(den, stored, patches, device), "split": "test"}
                write_metadata(partial, metadata)
                _write_card(partial)
        dist.barrier()
        return model
    finally:
        dist.close()


@torch.no_grad()
def _validate_cvae(rep: Representation, f, x: torch.Tensor, y: torch.Tensor, norm, png: Path) -> dict:
    """Held-out figures of the cVAE (posterior-mean reconstruction r): ``l1`` (network units),
    ``mae_hu`` = mean|r - x|, ``kl`` per pixel, ``output_error_hu`` = mean|f(r) - f(x)|; and a
    PNG (rows: patches; columns x, f(x), r, a posterior sample; lung window)."""
    from .figures import LUNG_WINDOW, save_png, tile_grid, window

    was = rep.training
    rep.eval()
    mean, logvar = rep.encode(x, y)
    r = rep.decode(mean, y)
    sampled = rep.decode(mean + torch.exp(0.5 * logvar) * _noise(mean.shape, torch.Generator().manual_seed(0), mean),
                         y)
    rep.train(was)
    l1 = float((r - x).abs().mean())
    kl = float((0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)).mean() / x[0].numel())
    hu = [norm.denormalize(t[:, 0]).float().cpu().numpy() for t in (x, y, r, sampled, f(r))]
    rows = min(4, x.shape[0])
    tiles = [[window(a[k], *LUNG_WINDOW) for a in hu[:4]] for k in range(rows)]
    labels = [["x", "f(x)", "D(mean)", "D(z~q)"]]
    save_png(tile_grid(tiles, labels), png)
    return {"l1": l1, "mae_hu": float(np.abs(hu[2] - hu[0]).mean()), "kl": kl,
            "output_error_hu": float(np.abs(hu[4] - hu[1]).mean())}


# ----------------------------------------------------------------------------- the invariance flow


def train_cinn(model, data, out, *, epochs: int = 10, steps_per_epoch: int = 500, batch_size: int = 32,
               lr: Optional[float] = None, seed: int = 0, resume: bool = False, device="auto",
               num_workers: int = 0, val_patches: int = 64, weights_dtype: str = "float32",
               hyperparameters: Optional[dict] = None, fidelity_slices: int = 8, fidelity_count: int = 16,
               pool_patches: int = 0, refinement=None, dicom: str = "auto", progress: bool = True) -> Path:
    """Train the invariance flow (cINN) on the codes of the representation in ``model``;
    return ``<out>/model`` (a copy of ``model`` with ``cinn.safetensors`` added: the complete
    invariance models, with the fidelity figures of :func:`~.fidelity.invariance_fidelity`
    on ``fidelity_slices`` test slices and ``fidelity_count`` invariances per patch in its
    metadata and model card; 0 slices skips them). ``refinement``: the sampler's consistency
    refinement written into the model folder (:meth:`~.sampler.Refinement.parse`; None:
    none), with which the fidelity figures are measured.

    ``model`` is a model folder holding a denoiser and its cVAE (``train_cvae``'s
    ``<out>/model``); the patch size is the cVAE's. Other arguments as in :func:`train_cvae`
    (defaults: batch 32; overrides of ``HYPERPARAMETERS["cinn"]``; a :class:`PatchPool` also
    holds the frozen encoder's posterior, so a pooled step costs the flow alone).
    """
    from .datasets import open_source
    from .sampler import Refinement, load_representation

    refinement = Refinement.parse(refinement)
    hp = _hyperparameters("cinn", lr, hyperparameters)
    dist = setup_distributed(device)
    try:
        folder = resolve_model_folder(model)
        den, rep = load_representation(folder, device=dist.device)
        patch_size = rep.patch_size
        _check(epochs, steps_per_epoch, batch_size, patch_size, val_patches)
        source = open_source(data, dicom=dicom)
        check_data(source, data, patch_size, test=bool(fidelity_slices))
        out = Path(out)
        config = _config("cinn", hp, folder, patch_size=patch_size, batch_size=batch_size,
                         steps_per_epoch=steps_per_epoch, seed=seed, resume=resume, dist=dist, data=data,
                         dicom=dicom)
        config["pool_patches"] = int(pool_patches)
        config["cvae_sha256"] = sha256(verify_weights(folder, read_metadata(folder)["weights"]["cvae"]))
        hp = config["hyperparameters"]
        device = dist.device
        _, f = _frozen_denoiser(folder, device)
        norm = den.normalization
        torch.manual_seed(derive_seed(seed, 0))
        objective = _CINNObjective(hp, rep, seed)
        objective.networks["flow"].to(device)
        flow = objective.networks["flow"]
        batches = TrainingBatches(source, patch_size, batch_size, derive_seed(seed, dist.rank), norm, num_workers,
                                  device)
        if pool_patches:
            batches = PatchPool(batches, pool_patches, f, device, derive_seed(seed, dist.rank), encode=rep.encode,
                                progress=progress and dist.is_main)
        x_val, _ = _held_out_tensors(source, "val", patch_size, val_patches, norm, device)
        y_val = f(x_val)
        z_val = objective.codes(x_val, y_val, torch.Generator().manual_seed(0))

        def prepare():
            init = TrainingBatches(source, patch_size, batch_size, derive_seed(seed, 0), norm, num_workers, device)
            pairs = [(b["ld"].to(device), f(b["ld"].to(device))) for b in init(hp["init_batches"], 0)]
            return objective.initialize(pairs, make_generator(derive_seed(seed, 0, 3)))

        @torch.no_grad()
        def validate(epoch: int) -> dict:
            v, log_det = flow(z_val, y_val)
            return {"nll_per_dim": float(nll_per_dimension(v, log_det)), "v_mean": float(v.mean()),
                    "v_std": float(v.std())}

        state = _run("cinn", objective, config, out, epochs=epochs, steps_per_epoch=steps_per_epoch,
                     batches=batches, f=f, validate=validate, prepare=prepare, dist=dist, seed=seed,
                     progress=progress)
        destination = out / "model"
        if dist.is_main:
            from .fidelity import invariance_fidelity
            from .sampler import CINN, load_invariance_models, save_invariance_models

            if state["best"] is not None:
                flow.load_state_dict(state["best"]["weights"])
            flow.eval()
            previous = read_metadata(folder).get("invariance", {})
            with written_whole(destination) as partial:
                copy_model_folder(folder, partial)
                keep = {**{k: previous[k] for k in ("training", "completeness") if k in previous},
                        "refinement": refinement.as_dict()}
                save_invariance_models(partial, rep, flow, keep, dtype=weights_dtype)
                metadata = read_metadata(partial)
                metadata.pop("fit", None)  # the denoiser folder's own fit (of a bundled folder) is not this training
                record = _training_record(state, config, source, data, dist, flow, partial, metadata["weights"][CINN])
                record["act_norm"] = state["prepared"]
                info = metadata["invariance"]
                info.setdefault("training", {})["cinn"] = record
                write_metadata(partial, metadata)
                if fidelity_slices:
                    models = load_invariance_models(partial, device)  # the weights as stored (float16 rounds them)
                    info["fidelity"] = invariance_fidelity(models, source, "test", slices=fidelity_slices,
                                                           count=fidelity_count, device=device, sample_z=hp["sample_z"],
                                                           figure=partial / FIDELITY_FIGURE)
                    info["fidelity"]["measured_on"]["data"] = str(data)
                    info["fidelity"]["figure"] = FIDELITY_FIGURE
                    write_metadata(partial, metadata)
                _write_card(partial)
        dist.barrier()
        return destination
    finally:
        dist.close()
