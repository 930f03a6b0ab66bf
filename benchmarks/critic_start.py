"""Does the cVAE's critic learn before the adversarial term starts?

Trains only the conditional critic of :class:`~InvarianceExplorerLib.train_invariance._CVAEObjective`
(its ``critic_step``: Wasserstein loss with gradient penalty, its own Adam) for ``--steps`` steps on real low-dose
patches x against reconstructions D(E(x), f(x)) of the untrained representation, built
exactly as a training run builds it (``torch.manual_seed(derive_seed(seed, 0))`` first), and
prints the critic's Wasserstein estimate mean(critic(fake)) - mean(critic(real)) every few
steps: it falls below zero when the critic separates the two. Run per setting and seed to see
whether a stalled critic follows the setting or the seed (its initial weights).

    .venv/bin/python benchmarks/critic_start.py --data data/sim512 --denoiser Resources/Models/cnn10 \\
        --seeds 1 2 --set z_modulation=true --set lam_cons=1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from InvarianceExplorerLib.datasets import open_source
from InvarianceExplorerLib.denoisers import load_denoiser
from InvarianceExplorerLib.train_invariance import HYPERPARAMETERS, _CVAEObjective
from InvarianceExplorerLib.training import TrainingBatches, derive_seed


def critic_curve(denoiser: Path, data, hp: dict, seed: int, steps: int, batch_size: int, patch_size: int,
                 every: int) -> list:
    """Wasserstein estimates ``(step, value)`` of a critic trained alone from a run's start."""
    den = load_denoiser(denoiser)
    torch.manual_seed(derive_seed(seed, 0))
    objective = _CVAEObjective(hp, patch_size, denoiser)
    objective.wrapped = dict(objective.networks)  # alone: no DistributedDataParallel wrappers
    rep = objective.networks["representation"]
    batches = TrainingBatches(open_source(data), patch_size, batch_size, derive_seed(seed, 0), den.normalization, 0,
                              torch.device("cpu"))
    rng = torch.Generator().manual_seed(derive_seed(seed, 1))
    curve, total = [], 0.0
    for k, batch in enumerate(batches(steps, 1)):
        x = batch["ld"]
        with torch.no_grad():
            y = den.network(x)
            fake = rep(x, y, sample=False).reconstruction
        wasserstein, _ = objective.critic_step(x, fake, y, rng)
        total += wasserstein.item()
        if (k + 1) % every == 0:
            curve.append((k + 1, round(total / every, 4)))
            total = 0.0
    return curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--denoiser", type=Path, required=True, help="model folder of f")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="cVAE hyperparameter (JSON value), as train cvae's --set")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hp = dict(HYPERPARAMETERS["cvae"])
    for item in args.set:
        name, _, value = item.partition("=")
        hp[name] = json.loads(value)
    for seed in args.seeds:
        curve = critic_curve(args.denoiser, args.data, hp, seed, args.steps, args.batch_size, args.patch_size,
                             args.every)
        print(f"seed {seed} {' '.join(args.set) or 'defaults'}: Wasserstein estimate per {args.every} steps "
              + ", ".join(f"{v:+.4f}" for _, v in curve))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
