"""Benchmark: seconds per training step of each denoiser in float32 and in bfloat16 mixed precision.

One step is what ``invariance-explorer train denoiser`` runs per batch (the architecture's
training scheme: MSE for CNN-10 / RED-CNN, critic + perceptual for WGAN-VGG, both U-Net
discriminators for DU-GAN) on random patches, under ``--precision`` (training.autocast).
Data loading is not included. Prints one markdown table row per architecture with the
machine and the command.

    .venv/bin/python benchmarks/training_precision.py --threads 2 --arch cnn10 redcnn
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def step_seconds(arch: str, precision: str, batch: int, patch: int, steps: int, device: str) -> float:
    """Median seconds of ``steps`` training steps (after one warm-up step)."""
    from InvarianceExplorerLib.denoisers import build_denoiser
    from InvarianceExplorerLib.train_denoiser import HYPERPARAMETERS, OBJECTIVES, SCHEME
    from InvarianceExplorerLib.training import autocast, make_generator

    torch.manual_seed(0)
    objective = OBJECTIVES[SCHEME[arch]](build_denoiser(arch), HYPERPARAMETERS[arch], patch).to(device)
    ld, fd = torch.randn(2, batch, 1, patch, patch, device=device)
    rng = make_generator(0)
    times = []
    for k in range(steps + 1):
        started = time.perf_counter()
        with autocast(device, precision):
            objective.step(ld, fd, None, 10_000 + k, rng)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    from InvarianceExplorerLib.denoisers import DENOISERS
    from InvarianceExplorerLib.devices import machine, machine_words

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", choices=list(DENOISERS), default=["cnn10", "redcnn"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| denoiser | float32 (s/step) | bfloat16 (s/step) | speed-up |\n|---|---|---|---|")
    for arch in args.arch:
        fp32, bf16 = (step_seconds(arch, p, args.batch_size, args.patch_size, args.steps, args.device)
                      for p in ("float32", "bfloat16"))
        print(f"| {arch} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.1f}x |", flush=True)
    m = machine(torch.device(args.device))
    print(f"\nbatch {args.batch_size} patches of {args.patch_size}²; median of {args.steps} steps; machine: "
          f"{machine_words(m)}, device {args.device}")
    print("command: python benchmarks/training_precision.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
