"""How much of a change of its input does each denoiser pass on, frequency band by frequency band?

The consistency bar C = mean|f(x~) - f(x)| / mean|x~ - x| <= 0.35 (issue 4) asks that f pass
on at most 35 % of the invariances' differences from x. This script measures what f passes
on of *any* small change, by where the change lies in frequency: on the test split's held-out
128² patches (:func:`~.fidelity.held_out_patches`, 2 per slice) it adds to each low-dose patch
x a change d, white Gaussian noise band-limited to a ring of radial spatial frequencies
(cycles per pixel; 0.5 is Nyquist along an axis, the ring 0.5-0.71 the corners of the
spectrum) and scaled to ``--amplitude`` HU mean absolute value, and reports the gain
``mean|f(x + d) - f(x)| / mean|d|``, beside the same ratio C' for a fresh noise realisation
x' of the slice (:func:`~.fidelity.another_realisation`, as in the fidelity figures). A
sampler meets C only with differences that lie where f's gain is below 0.35 (or in
structured directions f ignores, such as the planted denoisers' blind regions).

    .venv/bin/python benchmarks/denoiser_gain.py --data data/sim512 --threads 2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

BANDS = ((0.0, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.71))


def band_limited_noise(shape, band, generator: torch.Generator) -> torch.Tensor:
    """White Gaussian noise of ``shape`` (..., H, W) keeping only radial frequencies in ``band``
    (cycles per pixel, [low, high))."""
    ky = torch.fft.fftfreq(shape[-2])[:, None]
    kx = torch.fft.fftfreq(shape[-1])[None, :]
    radius = torch.sqrt(ky ** 2 + kx ** 2)
    mask = ((radius >= band[0]) & (radius < band[1])).to(torch.float32)
    noise = torch.randn(shape, generator=generator)
    return torch.fft.ifft2(torch.fft.fft2(noise) * mask).real


def main(argv=None) -> None:
    from InvarianceExplorerLib.datasets import open_source
    from InvarianceExplorerLib.denoisers import load_denoiser
    from InvarianceExplorerLib.devices import machine, machine_words
    from InvarianceExplorerLib.fidelity import another_realisation, held_out_patches, realisation_seed

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--denoisers", default="cnn10,redcnn,wganvgg,dugan", help="bundled names or model folders")
    parser.add_argument("--data", required=True, help="simulated data set (its test split)")
    parser.add_argument("--amplitude", type=float, default=10.0, help="mean |d| of each change (HU)")
    parser.add_argument("--repeats", type=int, default=2, help="changes drawn per patch and band")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    source = open_source(args.data)
    patches = held_out_patches(source, "test", 128, slices=8, per_slice=2)
    low_dose = torch.from_numpy(np.stack([p.low_dose for p in patches]))[:, None].float()
    fresh = {}
    for patch in patches:  # the fresh realisations of the fidelity figures (seed 0)
        if patch.index not in fresh:
            fresh[patch.index] = another_realisation(source, patch.index, seed=realisation_seed(patch.index))
    other = (torch.from_numpy(np.stack([p.crop(fresh[p.index]) for p in patches]))[:, None].float()
             if all(v is not None for v in fresh.values()) else None)

    info = machine()
    print(f"{len(patches)} test patches of 128² of {args.data}, changes of {args.amplitude:g} HU mean |d|, "
          f"{args.repeats} per patch and band; {machine_words(info)}")
    print("| f | " + " | ".join(f"{lo:g}–{hi:g}" for lo, hi in BANDS) + " | C' (fresh noise) |")
    print("|---" * (len(BANDS) + 2) + "|")
    for name in args.denoisers.split(","):
        denoiser = load_denoiser(name)
        network, norm = denoiser.network.float().eval(), denoiser.normalization

        def f_hu(image_hu: torch.Tensor) -> torch.Tensor:
            return norm.denormalize(network(norm.normalize(image_hu)))

        generator = torch.Generator().manual_seed(args.seed)
        with torch.inference_mode():
            y = f_hu(low_dose)
            gains = []
            for band in BANDS:
                passed = changed = 0.0
                for _ in range(args.repeats):
                    d = band_limited_noise(low_dose.shape, band, generator)
                    d = d * (args.amplitude / d.abs().mean())
                    passed += float((f_hu(low_dose + d) - y).abs().mean())
                    changed += float(d.abs().mean())
                gains.append(passed / changed)
            c_prime = (float((f_hu(other) - y).abs().mean() / (other - low_dose).abs().mean())
                       if other is not None else float("nan"))
        print(f"| {name} | " + " | ".join(f"{g:.2f}" for g in gains) + f" | {c_prime:.2f} |", flush=True)


if __name__ == "__main__":
    main()
