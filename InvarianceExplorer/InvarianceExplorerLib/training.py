"""What every training run shares: seeds, batches of training patches, optimiser steps,
the Wasserstein gradient penalty, the feature network of perceptual losses, checkpoints,
the description of the training data, and torch.distributed set-up.

Used by :mod:`.train_denoiser` (the denoisers) and :mod:`.train_invariance` (the
representation and invariance flow of a frozen denoiser). Reproducibility rule of both:
every random number of epoch ``e`` derives from ``(seed, e)`` (:func:`derive_seed`), so a
run resumed from its checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT = "last.pt"

#: Arithmetic of a training step: "float32", or "bfloat16" mixed precision (autocast:
#: convolutions and matrix products in bfloat16; weights, optimiser state and losses float32).
PRECISIONS = ("float32", "bfloat16")


def derive_seed(*words: int) -> int:
    """A 63-bit seed derived from integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint64)[0] >> 1)


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def adam(module: nn.Module, hp: dict) -> torch.optim.Adam:
    """Adam over ``module``'s parameters with ``hp["lr"]`` and ``hp["betas"]``."""
    return torch.optim.Adam(module.parameters(), lr=hp["lr"], betas=tuple(hp["betas"]))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Zero the gradients, back-propagate ``loss``, take one step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def autocast(device, precision: str):
    """The context a training step runs in under ``precision`` (:data:`PRECISIONS`) on
    ``device``: bfloat16 autocast (faster on CPUs with AMX, e.g. Xeon Sapphire Rapids:
    1.6-2.7x per step in README's table, and on CUDA) or plain float32. Validation and exported weights stay float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, rng: torch.Generator,
                     condition: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gulrajani et al. 2017: mean of (||grad critic(mix)||_2 - 1)^2 at random mixes of real
    and fake images (one mixing weight per image, drawn from ``rng``). A conditional critic
    sees ``[mix, condition]`` (channels) and the gradient is taken w.r.t. the image only."""
    a = torch.rand(real.shape[0], 1, 1, 1, generator=rng).to(real)
    mix = (a * real + (1 - a) * fake).requires_grad_(True)
    score = critic(mix if condition is None else torch.cat((mix, condition), dim=1))
    (grad,) = torch.autograd.grad(score.sum(), mix, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class TrainingBatches:
    """Batches of random training patches; the ``k``-th call's batches depend only on
    ``(seed, k)``, so epoch ``e`` is the same whether or not the run was resumed (give each
    process of a distributed run its own ``seed`` so that they draw different patches)."""

    def __init__(self, source, patch_size, batch_size, seed, normalization, num_workers, device):
        from .datasets import ItemCache

        source = source if isinstance(source, ItemCache) else ItemCache(source)
        self.source, self.patch_size, self.batch_size, self.seed = source, patch_size, batch_size, seed
        self.normalization, self.num_workers, self.device = normalization, num_workers, device

    def __call__(self, steps: int, key: int = 0):
        from monai.data import DataLoader
        from torch.utils.data import RandomSampler

        from .datasets import make_dataset

        seed = derive_seed(self.seed, key, 1)
        data = make_dataset(self.source, "train", patch_size=self.patch_size, augment=True, seed=seed % 2**32,
                            normalization=self.normalization)
        if len(data) == 0:
            raise ValueError("the training split is empty; the data set needs more patients")
        sampler = RandomSampler(data, replacement=True, num_samples=steps * self.batch_size,
                                generator=make_generator(seed))
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          generator=make_generator(seed + 1), drop_last=True,
                          pin_memory=torch.device(self.device).type == "cuda")


def validation_items(source, split: str, limit: int, normalization):
    """Up to ``limit`` whole slices of ``split`` (evenly spaced, deterministic)."""
    from torch.utils.data import Subset

    from .datasets import make_dataset

    data = make_dataset(source, split, patch_size=None, augment=False, normalization=normalization)
    if len(data) > limit:
        data = Subset(data, np.linspace(0, len(data) - 1, limit).round().astype(int).tolist())
    return data


def train_feature_network(network: nn.Module, batches: Iterable[dict], validation, hp: dict, device,
                          progress: bool) -> dict:
    """Train ``network`` (:class:`~.denoisers.FeatureNetwork`) to segment the tissue labels of
    low- and full-dose training patches (low-dose patches alone where the data have no full
    dose; per-pixel cross-entropy, Adam ``feature_lr``, ``feature_steps`` batches of
    ``batches(steps)``); leave it frozen in eval mode and
    return its record (steps, final loss, validation pixel accuracy)."""
    from tqdm.auto import tqdm

    network.train().requires_grad_(True)
    optimizer = torch.optim.Adam(network.parameters(), lr=hp["feature_lr"])
    steps, running = hp["feature_steps"], []
    bar = tqdm(total=steps, desc="feature network (tissue labels)", disable=not progress)
    for batch in batches(steps):
        if batch.get("labels") is None:
            raise ValueError("the perceptual loss uses a feature network trained on tissue labels, which this "
                             "data set lacks; train on simulated data or reuse the feature network of a WGAN-VGG "
                             "model folder (--feature-network FOLDER)")
        images = [batch["ld"]] + ([batch["fd"]] if "fd" in batch else [])
        x = torch.cat(images).to(device)
        target = batch["labels"].long().to(device)[:, 0].repeat(len(images), 1, 1)
        loss = F.cross_entropy(network(x), target)
        optimizer_step(optimizer, loss)
        running.append(loss.item())
        bar.update()
        bar.set_postfix(ce=f"{np.mean(running[-50:]):.3f}")
    bar.close()
    network.eval().requires_grad_(False)
    correct = total = 0
    with torch.no_grad():
        for item in validation:
            if item.get("labels") is not None:
                predicted = network(item.get("fd", item["ld"])[None].to(device)).argmax(1).cpu()
                correct += int((predicted == item["labels"].long()).sum())
                total += item["labels"].numel()
    return {"steps": steps, "lr": hp["feature_lr"], "final_cross_entropy": float(np.mean(running[-50:])),
            "val_pixel_accuracy": correct / total if total else None,
            "inputs": "low- and full-dose training patches", "target": "phantom tissue labels (phantom.Label)"}


def load_feature_network(network: nn.Module, source) -> dict:
    """Load the feature network of model folder (or bundled name) ``source`` into ``network``
    (frozen, eval mode); return its training record with the folder. ``ValueError`` when the
    folder has none (WGAN-VGG model folders have one)."""
    from .denoisers import load_weights, read_metadata, resolve_model_folder

    folder = resolve_model_folder(source)
    metadata = read_metadata(folder)
    if "feature_network" not in metadata["weights"]:
        raise ValueError(f"{folder}: no feature network in this model folder (WGAN-VGG models have one)")
    load_weights(network, folder, metadata["weights"]["feature_network"])
    network.eval().requires_grad_(False)
    return dict(metadata.get("training", {}).get("feature_network", {}), source=str(folder))


def describe_data(source, path) -> dict:
    """What the training data were, for the model metadata."""
    from .simulated_dataset import SimulatedDataset

    if isinstance(source, SimulatedDataset):
        p = source.manifest["parameters"]
        record = {"kind": "simulated", "path": str(path), "pairs": len(source), "size": p["size"],
                  "pixel_spacing_mm": p["spacing_mm"], "dose": p["dose"], "seed": p["seed"],
                  "contrast_fraction": p["contrast_fraction"], "photons": source.manifest.get("photons")}
        if "subset_of" in source.manifest:  # benchmarks/subset_data.py: which items of which set
            record["subset_of"] = source.manifest["subset_of"]
        elif not source.manifest.get("complete", True):  # `data simulate` stopped before its end
            record["unfinished"] = True
            warnings.warn(f"{path}: the simulated data set is unfinished: {len(source)} of "
                          f"{source.manifest.get('count')} pairs written; training on those. Run the same "
                          "`data simulate` command again to finish it (it resumes)", RuntimeWarning)
        return record
    first = source[0]
    return {"kind": type(source).__name__, "path": str(path), "slices": len(source),
            "patients": len(set(source.patient_ids)), "pixel_spacing_mm": float(first.spacing[0]),
            "images": "low- and full-dose" if getattr(source, "has_full_dose", True) else "low-dose only"}


def check_data(source, data, patch_size: int, test: bool = False) -> None:
    """``ValueError`` before a run starts (and before it makes a folder) when a split it uses
    (train and val, and test with ``test``: the fidelity figures) holds no slice, or the
    slices are smaller than its patches (``data``: the name to show)."""
    from .datasets import PAPER_FRACTIONS, split_indices

    empty = [s for s in ("train", "val", "test")[:3 if test else 2] if not split_indices(source, s, 1)]
    if empty:
        patients = len(set(getattr(source, "split_ids", source.patient_ids)))
        hint = "; or measure no fidelity figures on it (--fidelity-slices 0)" if empty == ["test"] else ""
        raise ValueError(f"{data}: the {' and '.join(empty)} split{'s hold' if len(empty) > 1 else ' holds'} no "
                         f"slice: its {patients} patients are split "
                         f"{'/'.join(str(round(100 * f)) for f in PAPER_FRACTIONS)} % by patient; give a data set "
                         f"of more patients{hint}")
    side = min(source[0].low_dose.shape)
    if patch_size > side:
        raise ValueError(f"patch size {patch_size} (--patch-size) is larger than the slices ({side} pixels); "
                         f"choose at most {side}")


def data_noise_texture(source, split: str = "train", slices: int = 16, patch_size: int = 128) -> Optional[dict]:
    """The :class:`~.noise.NoiseTexture` of a paired data set's noise, for the model metadata
    (``metadata["noise_texture"]``): the NPS of the low- minus full-dose differences of up to
    ``slices`` slices of ``split``, four ``patch_size`` squares from the central half of each
    (where the body is), with a note of what was measured. None without full-dose images."""
    from .datasets import split_indices
    from .noise import noise_texture

    if not getattr(source, "has_full_dose", True):
        return None
    squares, spacing = [], None
    for index in split_indices(source, split, slices):
        item = source[index]
        if item.full_dose is None:
            return None
        difference = item.low_dose.astype(np.float64) - item.full_dose.astype(np.float64)
        h, w = difference.shape
        if spacing is None:
            p, spacing = min(int(patch_size), h // 2, w // 2), tuple(float(v) for v in item.spacing[:2])
        if min(h, w) // 2 < p:
            continue
        for top in (h // 4, 3 * h // 4 - p):
            for left in (w // 4, 3 * w // 4 - p):
                squares.append(difference[top:top + p, left:left + p])
    if not squares:
        return None
    texture = noise_texture(np.stack(squares), spacing)
    return {**texture.to_dict(), "measured_on": f"low- minus full-dose differences, {len(squares)} squares of "
                                                f"{squares[0].shape[0]} px from {len(squares) // 4} {split} slices"}


#: Whole-number hyperparameters that must be at least 1 (sizes and counts of steps or parts).
COUNTS = ("n_critic", "z_dim", "critic_hidden", "local_mean_pixels", "nps_sectors", "feature_steps", "n_flows",
          "hidden", "embedding_dim", "init_batches", "n_d_train", "disc_levels", "disc_channels")
#: Number hyperparameters that must be above 0 (rates, bounds); other numbers (weights) may be 0.
POSITIVE = ("lr", "feature_lr", "clamp", "clip_grad")


def check_hyperparameters(defaults: dict, values: dict, prefix: str = "") -> None:
    """``ValueError`` (``<prefix><name>=<value>: must be ...``) for a value in ``values`` of
    another kind than its default in ``defaults`` (a whole number, a number, yes/no, text, a
    list) or out of range: the :data:`COUNTS` >= 1, other whole numbers >= 0, numbers finite
    and > 0 (:data:`POSITIVE`) or >= 0, Adam's betas two numbers in [0, 1), layer widths a
    non-empty list of whole numbers >= 1. Names without a default are not checked here."""
    kinds = ((bool, (bool,), "true or false"), (int, (int,), "a whole number"), (float, (int, float), "a number"),
             (str, (str,), "text"), (tuple, (list, tuple), "a list"))
    for name, value in values.items():
        default = defaults.get(name)
        for of, allowed, meaning in kinds:
            if isinstance(default, of):
                if not isinstance(value, allowed) or (of is not bool and isinstance(value, bool)):
                    raise ValueError(f"{prefix}{name}={value!r}: must be {meaning}, like its default {default!r}")
                break
        problem = None
        if isinstance(default, bool) or isinstance(value, (bool, str)) or value is None:
            pass
        elif isinstance(default, int):
            least = 1 if name in COUNTS else 0
            problem = None if value >= least else f"a whole number >= {least}"
        elif isinstance(default, float):
            positive = name in POSITIVE
            ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
            problem = None if ok else ("a finite number > 0" if positive else "a finite number >= 0")
        elif isinstance(default, tuple) and name == "betas":
            ok = len(value) == 2 and all(isinstance(v, (int, float)) and 0 <= v < 1 for v in value)
            problem = None if ok else "two numbers in [0, 1)"
        elif isinstance(default, tuple):
            ok = len(value) > 0 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            problem = None if ok else "a non-empty list of whole numbers >= 1"
        if problem:
            raise ValueError(f"{prefix}{name}={value!r}: must be {problem}")


#: What a training run writes into its folder.
RUN_ENTRIES = ("checkpoints", "history.json", "validation", "model")


def _run_kind(checkpoint: Path) -> Optional[str]:
    """What a checkpoint of this engine trains: "denoiser", "cvae" or "cinn" (None if unreadable)."""
    try:
        config = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]
        return "denoiser" if "arch" in config else str(config["kind"])
    except Exception:
        return None


def run_checkpoint(out: Path, resume: bool, kind: str) -> Path:
    """The checkpoint path of the training run folder ``out`` of a ``kind`` ("denoiser",
    "cvae", "cinn") training; ``ValueError`` when it holds a run of another kind, or a run and
    ``resume`` is not asked, or files a run does not write (a data set, a model folder: a run
    must not mix its files in); a ``RuntimeWarning`` when ``resume`` is asked and there is no
    run to resume (a new one starts)."""
    out = Path(out)
    checkpoint = out / "checkpoints" / CHECKPOINT
    there = _run_kind(checkpoint) if checkpoint.exists() else None
    if there is not None and there != kind:
        raise ValueError(f"{out} holds a {there} training run, and this is a {kind} training: give it another "
                         "output folder (--out)")
    if checkpoint.exists() and not resume:
        raise ValueError(f"{out} already holds a training run ({checkpoint}); pass --resume to continue it or "
                         "choose another output folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give the training run a folder")
    if (out / "model").exists() and not checkpoint.exists():  # a model folder no run here wrote
        raise ValueError(f"{out} holds a model folder but no training run ({out / 'model'} would be replaced); "
                         "choose a new output folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith(".")) \
        if out.is_dir() else []
    if foreign:
        raise ValueError(f"{out} holds files a training run does not write ({', '.join(foreign[:4])}"
                         f"{', ...' if len(foreign) > 4 else ''}); choose a new output folder (a run writes "
                         f"{', '.join(RUN_ENTRIES)} there)")
    if resume and not checkpoint.exists():
        warnings.warn(f"{out} holds no training run to resume (no {checkpoint.relative_to(out)}): starting a new one",
                      RuntimeWarning)
    return checkpoint


def restore_checkpoint(path: Path, config: dict, objective, state: dict, added: tuple = ()) -> dict:
    """Load the checkpoint ``path`` into ``objective``'s networks and optimisers and return the
    run state it saved (keys of ``state``, defaults from ``state``); ``ValueError`` naming the
    settings that differ when it was trained with another ``config`` (keys in ``added``,
    recorded by later versions, are compared only where the checkpoint has them)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise ValueError("not a checkpoint of this engine")
    except Exception as exc:  # cut short, overwritten, or another program's file
        raise ValueError(f"{path}: the checkpoint is damaged ({' '.join(str(exc).split())[:200]}); delete it to "
                         "train from the start, or restore it") from None
    then = {**{k: config[k] for k in added if k not in saved["config"]}, **saved["config"]}
    if any(then.get(k) != config.get(k) for k in set(config) | set(then)):
        raise ValueError(f"{path} was trained with other settings ({_differences(then, config)}); "
                         "resume with the same settings or train into another folder")
    for name, network in objective.networks.items():
        network.load_state_dict(saved["networks"][name])
    for name, optimizer in objective.optimizers.items():
        optimizer.load_state_dict(saved["optimizers"][name])
    return {k: saved.get(k, state[k]) for k in state}


class TrainingDiverged(ValueError):
    """A training's losses or validation figures became NaN or infinite (learning rate too
    high for the data, or bfloat16 overflow): the run stops instead of exporting it."""


def stop_if_diverged(run: str, epoch: int, training: dict, validation: dict, checkpoint: Path, dist=None) -> None:
    """Raise :class:`TrainingDiverged` when a number of ``training`` (the epoch's mean losses)
    or ``validation`` (its validation figures) is NaN or infinite. Called before the epoch is
    checkpointed, so ``checkpoint`` keeps the epoch before; every process of a distributed
    run (``dist``) stops together."""
    figures = {**{f"training {n}": v for n, v in training.items()},
               **{f"validation {n}": v for n, v in validation.items()}}
    bad = [(name, value) for name, value in figures.items()
           if isinstance(value, (int, float)) and not math.isfinite(value)]
    if dist is not None and dist.enabled:
        import torch.distributed as torch_dist

        flag = torch.tensor([float(bool(bad))], device=dist.device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        if flag.item() and not bad:
            bad = [("another process's loss", float("nan"))]
    if bad:
        name, value = bad[0]
        kept = f"{checkpoint} keeps epoch {epoch - 1}" if epoch > 1 else "no epoch finished"
        raise TrainingDiverged(
            f"the {run} training diverged in epoch {epoch}: {name} is {value}; nothing was exported ({kept}). "
            f"Train again with a lower learning rate (--lr), or in float32 if it ran in bfloat16, into a new "
            f"folder or after deleting {checkpoint.parent.parent}")


def _differences(then: dict, now: dict) -> str:
    """The settings that differ, ``name: old then, new now`` (a dict's entries one by one)."""
    parts = []
    for key in sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k)):
        a, b = then.get(key), now.get(key)
        pairs = [(f"{key}.{n}", a.get(n), b.get(n)) for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)] \
            if isinstance(a, dict) and isinstance(b, dict) else [(key, a, b)]
        parts += [f"{name}: {str(x)[:200]!s} then, {str(y)[:200]!s} now" for name, x, y in pairs]
    return "; ".join(parts)


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` ``state`` to ``path`` atomically (temporary file, then rename)."""
    from .io import written_file

    with written_file(path) as temporary:
        torch.save(state, temporary)


# ----------------------------------------------------------------------------- torch.distributed


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a (possibly) distributed run.

    Attributes:
        rank, world_size: this process's number and the number of processes (0 and 1 alone).
        device: the torch device of this process (``cuda:<local rank>`` on GPUs).
        initialized: whether this process set up the process group (and must tear it down).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` when distributed
        (gradients averaged over processes at every backward pass), else itself."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()


def setup_distributed(device) -> Distributed:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1 in the
    environment; also works when the group is already initialised, e.g. by
    ``torch.multiprocessing.spawn``): backend nccl on CUDA, gloo on the CPU; each process
    takes GPU ``LOCAL_RANK``. Alone (no ``WORLD_SIZE``), returns a single-process record on
    ``device`` (:func:`~.devices.resolve_device`)."""
    import torch.distributed as dist

    from .devices import resolve_device

    device = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        rank, world, initialized = dist.get_rank(), dist.get_world_size(), False
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":  # before the process group, so that NCCL binds this GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world, initialized = dist.get_rank(), dist.get_world_size(), True
    else:
        return Distributed(device=device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return Distributed(rank, world, device, initialized)
