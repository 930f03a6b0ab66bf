"""How far can f(x) alone take a reconstruction of x, and how much of what it misses does f see?

The consistency bar C = mean|f(x~) - f(x)| / mean|x~ - x| <= 0.35 (issue 4) is about the
invariances' *differences* from x. When the samples hardly differ from one another (low
diversity), those differences are the cVAE's reconstruction error, so C is about the ratio
of that error's f-output error to its size. This script trains a network that sees f(x) only
(no latent code: ``g(y) = y + P(y)`` with P the cVAE's pre-image branch,
:func:`~.representation.preimage_branch`, alone; L1 to x, Adam) and reports, on the test split's held-out patches (:func:`~.fidelity.held_out_patches`,
2 per slice), ``mean|g(y) - x|``, ``mean|f(g(y)) - f(x)|`` and their ratio, and the noise
texture of ``g(y)`` against x's (:func:`~.fidelity.noise_texture` of image - full dose: the
cVAE completeness bars, NPS correlation >= 0.9 and noise std ratio 0.8-1.25), beside the same
for ``x~ = f(x)`` itself. If the ratio stays near C' (the ratio of a fresh noise realisation)
however much of x the network recovers, a reconstruction-dominated sampler cannot meet C: its
invariances must vary where f does not look.

    .venv/bin/python benchmarks/preimage_floor.py --denoiser cnn10 --data data/sim512 \\
        --steps 900 --depth 10 --width 32 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv=None) -> None:
    from InvarianceExplorerLib.datasets import open_source
    from InvarianceExplorerLib.denoisers import load_denoiser
    from InvarianceExplorerLib.devices import machine, machine_words
    from InvarianceExplorerLib.fidelity import held_out_patches, noise_texture
    from InvarianceExplorerLib.representation import preimage_branch
    from InvarianceExplorerLib.training import TrainingBatches

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--denoiser", default="cnn10", help="bundled name or model folder of f")
    parser.add_argument("--data", required=True, help="simulated data set (train split to fit, test split to report)")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=64, help="training patch side (pixels)")
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lam-cons", type=float, default=0.0,
                        help="weight of the consistency term L1(f(g(y)), y) beside L1(g(y), x) (as the cVAE's lam_cons)")
    parser.add_argument("--every", type=int, default=300, help="report every N steps")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    denoiser = load_denoiser(args.denoiser)
    f, norm = denoiser.network.float().eval().requires_grad_(False), denoiser.normalization
    source = open_source(args.data)
    patches = held_out_patches(source, "test", 128, slices=8, per_slice=2)
    x_test = norm.normalize(torch.from_numpy(np.stack([p.low_dose for p in patches]))[:, None])
    full_dose = np.stack([p.full_dose for p in patches])
    with torch.no_grad():
        y_test = f(x_test)
    g = preimage_branch(args.depth, args.width)
    optimizer = torch.optim.Adam(g.parameters(), lr=args.lr)

    def hu_error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((norm.denormalize(a) - norm.denormalize(b)).abs().mean())

    def row(name: str, x_tilde: torch.Tensor, seconds: float) -> None:
        change, output = hu_error(x_tilde, x_test), hu_error(f(x_tilde), y_test)
        texture = noise_texture(norm.denormalize(x_tilde)[:, 0].numpy() - full_dose,
                                norm.denormalize(x_test)[:, 0].numpy() - full_dose)
        print(f"| {name} | {change:.2f} | {output:.2f} | {output / change:.2f} | {texture['nps_correlation']:.2f} / "
              f"{texture['noise_std_ratio']:.2f} | {seconds:.0f} s |", flush=True)

    info = machine()
    print(f"f = {args.denoiser}, lam_cons {args.lam_cons:g}, {len(patches)} test patches of 128², {info['cpu']}, "
          f"{machine_words(info)}")
    print("| x~ | mean\\|x~ - x\\| (HU) | mean\\|f(x~) - f(x)\\| (HU) | ratio | NPS correlation / noise std ratio "
          "| training time |\n|---|---|---|---|---|---|")
    with torch.no_grad():
        row("f(x) itself", y_test, 0.0)
    start = time.perf_counter()
    batches = TrainingBatches(source, args.patch_size, args.batch_size, args.seed, norm, 0, "cpu")
    for step, batch in enumerate(batches(args.steps), start=1):
        x = batch["ld"]
        with torch.no_grad():
            y = f(x)
        x_tilde = y + g(y)
        loss = (x_tilde - x).abs().mean()
        if args.lam_cons:
            loss = loss + args.lam_cons * (f(x_tilde) - y).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                row(f"g(f(x)) after {step} steps", y_test + g(y_test), time.perf_counter() - start)


if __name__ == "__main__":
    main()
