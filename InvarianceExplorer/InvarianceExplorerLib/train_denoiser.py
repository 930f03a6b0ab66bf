"""Training the four denoisers: seeded, checkpointed every epoch, resumable, exported as a model folder.

Training schemes (one :class:`_Objective` each, :data:`OBJECTIVES`; hyperparameters in
:data:`HYPERPARAMETERS`; each architecture's published one by default, :data:`SCHEME`):

* ``pixel`` — CNN-10 and RED-CNN: mean squared error to full dose (as published); also
  the MSE pretraining of a GAN's generator (hyperparameter ``scheme="pixel"``), whose
  model folder then starts the adversarial run (``initial_weights``, CLI ``--init``).
* ``wgan-vgg`` — WGAN-VGG: Wasserstein critic with gradient penalty, plus the perceptual loss (L1 between
  deep features of the denoised and the full-dose image) weighted by ``lam_perc``, plus an
  optional MSE term ``lam_mse`` (0 in ldct-benchmark). The features come from our
  :class:`~.denoisers.FeatureNetwork`, first trained here to segment tissue labels
  (``feature_steps``), then frozen and shipped in the model folder.
* ``du-gan`` — DU-GAN: least-squares adversarial losses of two U-Net discriminators (images, and Sobel
  gradient magnitudes), each with an encoder (global) and a decoder (per-pixel) output,
  CutMix regularisation of the discriminators, plus pixel MSE and gradient L1 losses.

One epoch is ``steps_per_epoch`` batches of random ``patch_size`` patches of the training
split (:func:`~.datasets.make_dataset`, drawn with replacement); then the denoiser is
validated on whole slices of the validation split (:func:`~.inference.image_quality`: RMSE
in HU, PSNR, SSIM) and ``<out>/checkpoints/last.pt`` is written. Every random number of
epoch ``e`` derives from ``(seed, e)``, so a run resumed from a checkpoint continues exactly
as the uninterrupted run would. At the end the weights of the epoch with the lowest
validation RMSE are exported to ``<out>/model/`` (:func:`~.denoisers.save_denoiser`), with
figures on the test split.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .denoisers import (DENOISERS, FeatureNetwork, UNetDiscriminator, WGANCritic, build_denoiser, load_weights,
                        read_metadata, receptive_field, resolve_model_folder, save_denoiser)
from .devices import machine
from .inference import METRIC_HU_RANGE, apply_network, image_quality
from .normalization import PAPER_NORMALIZATION, HUNormalization
from .io import write_json, written_whole
from .training import (TrainingBatches as _TrainingBatches, adam as _adam, autocast as _autocast,
                       check_data as _check_data, check_hyperparameters as _check_kinds, derive_seed as _seed,
                       data_noise_texture, describe_data, gradient_penalty as _gradient_penalty, load_feature_network,
                       make_generator as _generator, optimizer_step as _step, restore_checkpoint, run_checkpoint,
                       save_checkpoint as _save_checkpoint, stop_if_diverged as _stop_if_diverged,
                       train_feature_network as _train_feature_network, validation_items as _validation_items)

#: Training hyperparameters per architecture, rounded from ldct-benchmark's configs (tuned
#: there on the Mayo data): Adam learning rate and betas, and the loss weights of each scheme.
#: WGAN-VGG ``feature_*`` set the pretraining of our feature network (our addition);
#: DU-GAN ``disc_levels`` / ``disc_channels`` size its U-Net discriminators.
HYPERPARAMETERS = {
    "cnn10": dict(lr=1.58e-4, betas=(0.9, 0.999)),
    "redcnn": dict(lr=9.58e-5, betas=(0.9, 0.999)),
    "wganvgg": dict(lr=7.10e-5, betas=(0.326, 0.999), n_critic=1, lam_gp=10.0, lam_adv=1.0, lam_perc=0.689, lam_mse=0.0,
                    feature_steps=2000, feature_lr=1e-3),
    "dugan": dict(lr=1.24e-5, betas=(0.9, 0.999), n_d_train=2, lam_adv=0.0803, lam_px_im=1.0, lam_px_grad=27.8,
                  cutmix_prob=0.5, cutmix_warmup=7615, lam_cutmix=2.65, disc_levels=6, disc_channels=64),
}


# ----------------------------------------------------------------------------- training schemes


class _Objective:
    """What one training step optimises. ``networks`` and ``optimizers`` (by name) are
    everything a checkpoint holds; ``networks["denoiser"]`` is the network being trained."""

    def __init__(self, denoiser: nn.Module, hp: dict, patch_size: int):
        self.hp = hp
        self.networks: Dict[str, nn.Module] = {"denoiser": denoiser}
        self.optimizers: Dict[str, torch.optim.Optimizer] = {"denoiser": _adam(denoiser, hp)}

    def to(self, device) -> "_Objective":
        for network in self.networks.values():
            network.to(device)
        return self

    def prepare(self, batches, validation, device, progress: bool) -> Optional[dict]:
        """Work before the first epoch (a record for the metadata, or None)."""
        return None

    def step(self, ld: torch.Tensor, fd: torch.Tensor, labels, step: int, rng: torch.Generator) -> Dict[str, float]:
        raise NotImplementedError


class _PixelObjective(_Objective):
    """CNN-10, RED-CNN: mean squared error (network units) to full dose."""

    def step(self, ld, fd, labels, step, rng):
        loss = F.mse_loss(self.networks["denoiser"](ld), fd)
        _step(self.optimizers["denoiser"], loss)
        return {"mse": loss.item()}


class _WGANVGGObjective(_Objective):
    """WGAN-VGG: ``n_critic`` critic steps (Wasserstein loss + ``lam_gp`` * gradient penalty),
    then a generator step on ``-lam_adv * critic + lam_perc * perceptual + lam_mse * MSE``."""

    def __init__(self, denoiser, hp, patch_size):
        super().__init__(denoiser, hp, patch_size)
        self.networks["critic"] = WGANCritic(patch_size)
        self.networks["feature_network"] = FeatureNetwork().eval().requires_grad_(False)  # trained in prepare()
        self.optimizers["critic"] = _adam(self.networks["critic"], hp)

    def prepare(self, batches, validation, device, progress):
        """Train the feature network to segment tissue labels, or take it from the model
        folder (or bundled name) ``hp["feature_network"]``."""
        features, source = self.networks["feature_network"], self.hp.get("feature_network")
        if not source:
            return _train_feature_network(features, batches, validation, self.hp, device, progress)
        return load_feature_network(features, source)

    def step(self, ld, fd, labels, step, rng):
        hp, generator, critic = self.hp, self.networks["denoiser"], self.networks["critic"]
        features = self.networks["feature_network"].features
        with torch.no_grad():
            fake = generator(ld)
        for _ in range(hp["n_critic"]):
            wasserstein = critic(fake).mean() - critic(fd).mean()
            penalty = _gradient_penalty(critic, fd, fake, rng)
            _step(self.optimizers["critic"], wasserstein + hp["lam_gp"] * penalty)
        critic.requires_grad_(False)
        fake = generator(ld)
        adversarial = -critic(fake).mean()
        perceptual = F.l1_loss(features(fake), features(fd))
        mse = F.mse_loss(fake, fd)
        _step(self.optimizers["denoiser"], hp["lam_adv"] * adversarial + hp["lam_perc"] * perceptual + hp["lam_mse"] * mse)
        critic.requires_grad_(True)
        return {"critic": wasserstein.item(), "gp": penalty.item(), "adv": adversarial.item(),
                "perceptual": perceptual.item(), "mse": mse.item()}


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """DU-GAN's gradient domain: ``sqrt(gx^2 + gy^2 + eps)`` of Sobel derivatives (kernels
    divided by 4, zero padding), ``(N, 1, H, W)`` in and out."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype) / 4
    kernels = torch.stack([kx, kx.T])[:, None]
    g = F.conv2d(x, kernels, padding=1)
    return torch.sqrt((g ** 2).sum(1, keepdim=True) + eps)


def _ls(x: torch.Tensor, target) -> torch.Tensor:
    """Least-squares GAN loss: mean of (x - target)^2."""
    return ((x - target) ** 2).mean()


def _cutmix_mask(shape, rng) -> torch.Tensor:
    """CutMix mask ``(1, 1, H, W)``: 0 in a random box covering a fraction 1 - lambda of the
    image (lambda ~ U(0, 1), centre uniform), 1 elsewhere."""
    h, w = shape[-2:]
    lam, cy, cx = torch.rand(3, generator=rng).tolist()
    bh, bw = h * math.sqrt(1 - lam), w * math.sqrt(1 - lam)
    cy, cx = cy * h, cx * w
    mask = torch.ones(1, 1, h, w)
    mask[..., round(max(cy - bh / 2, 0)):round(min(cy + bh / 2, h)),
         round(max(cx - bw / 2, 0)):round(min(cx + bw / 2, w))] = 0
    return mask


class _DUGANObjective(_Objective):
    """DU-GAN: each discriminator learns full dose = 1, denoised = 0 and low dose = 0 (encoder
    and decoder outputs, least squares), with CutMix regularisation applied with a
    probability rising linearly to ``cutmix_prob`` over ``cutmix_warmup`` steps; the image
    discriminator takes ``n_d_train`` steps per generator step, the gradient one one step.
    The generator minimises ``lam_adv`` * (both adversarial losses) + ``lam_px_im`` * MSE +
    ``lam_px_grad`` * L1 of the Sobel gradient magnitudes."""

    def __init__(self, denoiser, hp, patch_size):
        super().__init__(denoiser, hp, patch_size)
        for name in ("image_discriminator", "gradient_discriminator"):
            self.networks[name] = UNetDiscriminator(hp["disc_levels"], hp["disc_channels"])
            self.optimizers[name] = _adam(self.networks[name], hp)

    def _train_discriminator(self, name, low, real, fake, cutmix: bool, rng) -> float:
        d = self.networks[name]
        real_enc, real_dec = d(real)
        fake_enc, fake_dec = d(fake)
        low_enc, low_dec = d(low)
        loss = (_ls(real_enc, 1.0) + _ls(real_dec, 1.0) + _ls(fake_enc, 0.0) + _ls(fake_dec, 0.0)
                + _ls(low_enc, 0.0) + _ls(low_dec, 0.0))
        if cutmix:
            mask = _cutmix_mask(real.shape, rng).to(real)
            mix_enc, mix_dec = d(mask * real + (1 - mask) * fake)
            consistency = F.mse_loss(mix_dec, mask * real_dec + (1 - mask) * fake_dec)
            loss = loss + _ls(mix_enc, 0.0) + _ls(mix_dec, mask) + self.hp["lam_cutmix"] * consistency
        _step(self.optimizers[name], loss)
        return loss.item()

    def step(self, ld, fd, labels, step, rng):
        hp, generator = self.hp, self.networks["denoiser"]
        fake = generator(ld)
        grads = [sobel_magnitude(x) for x in (ld, fd, fake)]
        p_cutmix = min(step * hp["cutmix_prob"] / hp["cutmix_warmup"], hp["cutmix_prob"])
        cutmix = torch.rand(1, generator=rng).item() < p_cutmix
        for _ in range(hp["n_d_train"]):
            d_image = self._train_discriminator("image_discriminator", ld, fd, fake.detach(), cutmix, rng)
        d_gradient = self._train_discriminator("gradient_discriminator", grads[0], grads[1], grads[2].detach(),
                                               cutmix, rng)
        adversarial = 0.0
        for name, x in (("image_discriminator", fake), ("gradient_discriminator", grads[2])):
            d = self.networks[name].requires_grad_(False)
            enc, dec = d(x)
            adversarial = adversarial + _ls(enc, 1.0) + _ls(dec, 1.0)
        pixel = F.mse_loss(fake, fd)
        gradient = F.l1_loss(grads[2], grads[1])
        _step(self.optimizers["denoiser"],
              hp["lam_adv"] * adversarial + hp["lam_px_im"] * pixel + hp["lam_px_grad"] * gradient)
        for name in ("image_discriminator", "gradient_discriminator"):
            self.networks[name].requires_grad_(True)
        return {"d_image": d_image, "d_gradient": d_gradient, "adv": adversarial.item(),
                "mse": pixel.item(), "gradient": gradient.item()}


#: Training schemes by name; hyperparameter ``scheme`` picks one (default: the architecture's
#: published one, :data:`SCHEME`), e.g. ``pixel`` to pretrain a GAN's generator on MSE alone.
OBJECTIVES = {"pixel": _PixelObjective, "wgan-vgg": _WGANVGGObjective, "du-gan": _DUGANObjective}
SCHEME = {"cnn10": "pixel", "redcnn": "pixel", "wganvgg": "wgan-vgg", "dugan": "du-gan"}


# ----------------------------------------------------------------------------- the training run


def evaluate(network: nn.Module, items, normalization: HUNormalization, device) -> Dict[str, dict]:
    """Mean :func:`~.inference.image_quality` per slice of the denoised and of the low-dose
    images against full dose, over ``items`` (dicts with ``"ld"``, ``"fd"`` ``(1, H, W)`` in
    network units): ``{"denoised": {metric: mean}, "low_dose": {...}}``, the metrics of
    image_quality (RMSE in HU, PSNR in dB, SSIM)."""
    scores = {"denoised": [], "low_dose": []}
    was_training = network.training
    network.eval()
    with torch.no_grad():
        for item in items:
            ld, fd = item["ld"][None].to(device), item["fd"][None]
            denoised = normalization.denormalize(apply_network(network, ld).cpu())
            reference = normalization.denormalize(fd)
            scores["denoised"].append(image_quality(denoised[0, 0], reference[0, 0]))
            scores["low_dose"].append(image_quality(normalization.denormalize(ld.cpu())[0, 0], reference[0, 0]))
    network.train(was_training)
    return {k: {m: float(np.mean([s[m] for s in v])) for m in v[0]} if v else {} for k, v in scores.items()}


def _check_hyperparameters(arch: str, hp: dict) -> None:
    """``ValueError`` naming a hyperparameter of the wrong kind or range (``--lr``, ``--set``;
    :func:`~.training.check_hyperparameters`), or a learning-rate decay outside (0, 1]."""
    _check_kinds(HYPERPARAMETERS[arch], {k: v for k, v in hp.items() if k in HYPERPARAMETERS[arch]})
    decay, start = hp.get("lr_decay"), hp.get("lr_decay_start", 1)
    if decay is not None and not (isinstance(decay, (int, float)) and 0 < decay <= 1):
        raise ValueError(f"lr_decay={decay!r} (--lr-decay): must be a factor in (0, 1], e.g. 0.85 per epoch")
    if not (isinstance(start, int) and start >= 1):
        raise ValueError(f"lr_decay_start={start!r} (--lr-decay-start): must be an epoch number >= 1")


def _check_patch_size(objective: _Objective, arch: str, patch_size: int) -> None:
    """``ValueError`` when a network of the training (the denoiser, a critic or discriminator)
    cannot take ``patch_size``² patches, e.g. RED-CNN's unpadded convolutions below 21 pixels,
    or when the patch is less than half the denoiser's receptive field (every output pixel would
    see more padding than CT)."""
    field = receptive_field(objective.networks["denoiser"])
    if 2 * patch_size < field:
        raise ValueError(f"patch size {patch_size} (--patch-size) is less than half {arch}'s receptive field ({field} "
                         f"pixels): each output pixel would see more padding than CT; choose {max(64, field)} or more")
    for name, network in objective.networks.items():
        mode = network.training
        try:
            with torch.no_grad():
                network.eval()(torch.zeros(2, 1, patch_size, patch_size))
        except RuntimeError as exc:
            raise ValueError(f"patch size {patch_size} (--patch-size) is too small for {arch}'s {name.replace('_', ' ')} "
                             f"({str(exc).splitlines()[0][:200]}); choose a larger patch, e.g. "
                             f"{max(64, field)}") from None
        finally:
            network.train(mode)


def learning_rate(hp: dict, epoch: int) -> float:
    """Adam learning rate of ``epoch`` (1-based): ``hp["lr"]``, times ``hp["lr_decay"]`` per
    epoch from epoch ``hp["lr_decay_start"]`` on (``lr * decay ** (epoch - start + 1)``);
    constant if ``lr_decay`` is unset. Depends on the epoch only, so resuming keeps it."""
    decay, start = hp.get("lr_decay"), int(hp.get("lr_decay_start", 1))
    return float(hp["lr"]) * (float(decay) ** max(0, epoch - start + 1) if decay else 1.0)


def _initialise(network: nn.Module, arch: str, arguments: dict, source, normalization: HUNormalization) -> dict:
    """Load the denoiser weights of model folder (or bundled name) ``source`` into ``network``
    (checked: same network class and arguments, same normalisation); return the record."""
    folder = resolve_model_folder(source)
    metadata = read_metadata(folder)
    architecture = metadata["architecture"]
    if DENOISERS[architecture["name"]] is not DENOISERS[arch] or architecture.get("arguments", {}) != arguments:
        raise ValueError(f"{folder} holds a {architecture['name']} network with arguments "
                         f"{architecture.get('arguments', {})}, which cannot start a {arch} with arguments {arguments}; "
                         "choose a model folder of the same architecture")
    if metadata["normalization"] != normalization.to_dict():
        raise ValueError(f"{folder} was trained with another normalisation ({metadata['normalization']}); "
                         "its weights would see differently scaled images")
    record = metadata["weights"]["denoiser"]
    load_weights(network, folder, record)
    return {"folder": str(folder), "architecture": architecture["name"], "sha256": record.get("sha256"),
            "best_epoch": metadata.get("training", {}).get("best_epoch")}


def train_denoiser(arch: str, data, out, *, epochs: int = 10, steps_per_epoch: int = 500, batch_size: int = 16,
                   patch_size: int = 128, lr: Optional[float] = None, seed: int = 0, resume: bool = False,
                   device="auto", num_workers: int = 0, val_slices: int = 32, weights_dtype: str = "float32",
                   arguments: Optional[dict] = None, hyperparameters: Optional[dict] = None,
                   feature_network=None, initial_weights=None, precision: str = "float32",
                   normalization: HUNormalization = PAPER_NORMALIZATION, progress: bool = True) -> Path:
    """Train denoiser ``arch`` on the paired data in ``data``; return its model folder ``<out>/model``.

    Args:
        arch: "cnn10", "redcnn", "wganvgg" or "dugan".
        data: a simulated data set folder or a paired DICOM folder (:func:`~.datasets.open_source`),
            split by patient 70/20/10 % (seed 0).
        out: run folder: ``checkpoints/last.pt``, ``history.json`` and the exported ``model/``.
        epochs: total epochs (a resumed run continues up to this number).
        steps_per_epoch, batch_size, patch_size: training batches per epoch, patches per
            batch, patch side in pixels.
        lr: Adam learning rate (default: :data:`HYPERPARAMETERS`); ``hyperparameters``
            ``lr_decay`` / ``lr_decay_start`` make it decay per epoch (:func:`learning_rate`).
        seed: seeds the weights and every random draw of the run.
        resume: continue from ``<out>/checkpoints/last.pt``; the settings must match.
        device: "auto", "cpu" or "cuda" (:func:`~.devices.resolve_device`).
        num_workers: data loader processes.
        val_slices: whole slices of the validation (and test) split evaluated per epoch.
        weights_dtype: "float32" or "float16" storage of the exported weights.
        arguments: constructor arguments of the architecture (e.g. ``{"channels": 96}``).
        hyperparameters: overrides of :data:`HYPERPARAMETERS`.
        feature_network: WGAN-VGG only: a model folder whose feature network to reuse
            instead of training one (needed for data without tissue labels).
        initial_weights: a model folder (or bundled name) whose denoiser weights start the
            run instead of random ones, e.g. a RED-CNN for DU-GAN's generator; its network
            must have the same layers (architecture class and arguments).
        precision: arithmetic of the training steps, "float32" or "bfloat16" mixed
            precision (:func:`~.training.autocast`); validation is always float32.
        normalization: HU <-> network units map, recorded with the model.
        progress: show tqdm progress bars.
    """
    from tqdm.auto import tqdm

    from .datasets import open_source, require_full_dose
    from .devices import resolve_device

    if arch not in DENOISERS:
        raise ValueError(f"unknown denoiser architecture {arch!r}; choose one of {', '.join(DENOISERS)}")
    if min(epochs, steps_per_epoch, batch_size, val_slices) < 1 or patch_size < 1:
        raise ValueError("epochs, steps_per_epoch, batch_size, patch_size and val_slices must be positive")
    device = resolve_device(device)
    _autocast(device, precision)  # checks the name before any work
    source = open_source(data)
    require_full_dose(source, data, "training a denoiser")
    hp = {**HYPERPARAMETERS[arch], **(hyperparameters or {}), **({"lr": float(lr)} if lr is not None else {})}
    if feature_network is not None:
        hp["feature_network"] = str(feature_network)
    config = {"arch": arch, "arguments": dict(arguments or {}), "hyperparameters": hp, "patch_size": patch_size,
              "batch_size": batch_size, "steps_per_epoch": steps_per_epoch, "seed": seed, "precision": precision,
              "normalization": normalization.to_dict(),
              "initial_weights": None if initial_weights is None else str(initial_weights),
              "data": str(Path(data).resolve()), "val_slices": int(val_slices)}
    config = json.loads(json.dumps(config))  # tuples -> lists, as stored
    _check_hyperparameters(arch, hp)
    _check_data(source, data, patch_size)  # before any folder is made
    torch.manual_seed(_seed(seed, 0))
    scheme = hp.get("scheme", SCHEME[arch])
    if scheme not in OBJECTIVES:
        raise ValueError(f"unknown training scheme {scheme!r}; choose one of {', '.join(OBJECTIVES)}")
    objective = OBJECTIVES[scheme](build_denoiser(arch, **config["arguments"]), hp, patch_size)
    if feature_network is not None and "feature_network" not in objective.networks:
        raise ValueError(f"a feature network (--feature-network) was given, but {arch}'s training ({scheme}) has no "
                         "perceptual term to use it; leave it out")
    _check_patch_size(objective, arch, patch_size)
    objective.to(device)
    denoiser = objective.networks["denoiser"]
    out = Path(out)
    checkpoint_path = run_checkpoint(out, resume, "denoiser")
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    batches = _TrainingBatches(source, patch_size, batch_size, seed, normalization, num_workers, device)
    validation = _validation_items(source, "val", val_slices, normalization)

    state = {"epoch": 0, "history": [], "seconds": 0.0, "best": None, "prepared": None, "initialised_from": None}
    if resume and checkpoint_path.exists():
        state = restore_checkpoint(checkpoint_path, config, objective, state, added=("data", "val_slices"))
    else:
        started = time.perf_counter()
        if initial_weights is not None:
            state["initialised_from"] = _initialise(denoiser, arch, config["arguments"], initial_weights,
                                                    normalization)
        state["prepared"] = objective.prepare(batches, validation, device, progress)
        state["seconds"] = time.perf_counter() - started

    def checkpoint():
        _save_checkpoint(checkpoint_path, {
            "config": config, **state,
            "networks": {k: v.state_dict() for k, v in objective.networks.items()},
            "optimizers": {k: v.state_dict() for k, v in objective.optimizers.items()}})

    if state["epoch"] == 0:
        checkpoint()
    for epoch in range(state["epoch"] + 1, epochs + 1):
        started = time.perf_counter()
        rng = _generator(_seed(seed, epoch, 2))
        for optimizer in objective.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(hp, epoch)
        sums: Dict[str, float] = {}
        bar = tqdm(total=steps_per_epoch, desc=f"{arch} epoch {epoch}/{epochs}", disable=not progress)
        denoiser.train()
        for k, batch in enumerate(batches(steps_per_epoch, epoch)):
            with _autocast(device, precision):
                losses = objective.step(batch["ld"].to(device), batch["fd"].to(device), batch.get("labels"),
                                        (epoch - 1) * steps_per_epoch + k + 1, rng)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value
            bar.update()
            bar.set_postfix({name: f"{total / (k + 1):.4g}" for name, total in sums.items()})
        bar.close()
        scores = evaluate(denoiser, validation, normalization, device)
        state["seconds"] += time.perf_counter() - started
        state["epoch"] = epoch
        means = {n: t / steps_per_epoch for n, t in sums.items()}
        state["history"].append({"epoch": epoch, "train": means, "val": scores["denoised"],
                                 "val_low_dose": scores["low_dose"], "seconds": round(state["seconds"], 3)})
        _stop_if_diverged(f"{arch} denoiser", epoch, means, scores["denoised"], checkpoint_path)
        best = state["best"]
        if best is None or scores["denoised"]["rmse_hu"] < best["val"]["rmse_hu"]:
            state["best"] = {"epoch": epoch, "val": scores["denoised"],
                             "weights": {k: v.detach().cpu().clone() for k, v in denoiser.state_dict().items()}}
        checkpoint()
        write_json(out / "history.json", state["history"])
        if progress:
            v = scores["denoised"]
            tqdm.write(f"epoch {epoch}: val RMSE {v['rmse_hu']:.1f} HU (low dose {scores['low_dose']['rmse_hu']:.1f}), "
                       f"PSNR {v['psnr_db']:.2f} dB, SSIM {v['ssim']:.4f}")
    return _export(objective, state, config, source, data, out / "model", val_slices, normalization, device,
                   weights_dtype)


def _export(objective, state, config, source, data, folder: Path, val_slices, normalization, device, dtype) -> Path:
    """Write the best epoch's denoiser, with metadata and test-split figures, to ``folder``."""
    from . import __version__
    from .datasets import PAPER_FRACTIONS, split_patients

    denoiser = objective.networks["denoiser"]
    best = state["best"]
    if best is not None:
        denoiser.load_state_dict(best["weights"])
    test = _validation_items(source, "test", val_slices, normalization)
    held_out = None
    if len(test):
        scores = evaluate(denoiser, test, normalization, device)
        held_out = {"split": "test", "slices": len(test), "metric_hu_range": list(METRIC_HU_RANGE), **scores}
    split = split_patients(getattr(source, "split_ids", source.patient_ids))
    last = state["history"][-1] if state["history"] else {}
    training = {
        "data": describe_data(source, data),
        "split": {"fractions": list(PAPER_FRACTIONS), "seed": 0,
                  "patients": {k: len(v) for k, v in split.items()}, "test_patients": split["test"]},
        "epochs": state["epoch"], "steps_per_epoch": config["steps_per_epoch"], "batch_size": config["batch_size"],
        "seed": config["seed"], "val_slices": int(val_slices), "precision": config["precision"], "scheme": config["hyperparameters"].get("scheme", SCHEME[config["arch"]]),
        "hyperparameters": config["hyperparameters"],
        "best_epoch": best and best["epoch"], "validation": best and best["val"],
        "validation_low_dose": last.get("val_low_dose"), "wall_time_s": round(state["seconds"], 1),
        "machine": machine(device), "engine_version": __version__,
    }
    if state["prepared"]:
        training["feature_network"] = state["prepared"]
    if state.get("initialised_from"):
        training["initialised_from"] = state["initialised_from"]
    extra = {"feature_network": objective.networks["feature_network"]} if "feature_network" in objective.networks \
        else None
    with written_whole(folder) as partial:
        save_denoiser(partial, denoiser, config["arch"], config["arguments"], normalization,
                      {"patch_size": config["patch_size"], "training": training, "held_out": held_out,
                       "noise_texture": data_noise_texture(source)},
                      dtype=dtype, extra=extra)
    return folder

