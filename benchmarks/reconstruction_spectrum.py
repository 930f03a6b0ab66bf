"""Where does a cVAE's reconstruction miss x's noise texture? Ring by ring.

For the held-out patches of the model card (``fidelity.held_out_patches``: test split, 2
patches per slice of ``--slices`` slices, seed 0) and the reconstruction r = D(mean E(x), f(x)),
prints the radial noise power spectra (``fidelity.noise_power_spectrum``, HU² per pixel) of
x − full dose, r − full dose, x − f(x), r − f(x) and f(x) − full dose at a few rings; the
NPS correlation of the card (r − full dose vs x − full dose, rings 1 … P/2 − 1) and the same
without the lowest rings; and the mean |difference| of the block means (``--block`` px, HU)
of r − x, f(x) − x, x − full dose and r − full dose: a shift of a region's mean by 1 HU is
hardly seen by the pixel L1 under noise but fills the lowest rings of the spectrum.

    .venv/bin/python benchmarks/reconstruction_spectrum.py Resources/Models/dugan --data data/sim512
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from InvarianceExplorerLib.datasets import open_source
from InvarianceExplorerLib.fidelity import held_out_patches, noise_power_spectrum
from InvarianceExplorerLib.inference import apply_network
from InvarianceExplorerLib.sampler import load_representation


@torch.inference_mode()
def images(folder, data, slices: int):
    """Held-out x, f(x), r and full dose ``(N, P, P)`` in HU."""
    denoiser, rep = load_representation(folder)
    norm = denoiser.normalization
    patches = held_out_patches(open_source(data), "test", rep.patch_size, slices, 2, 0)
    x = norm.normalize(torch.from_numpy(np.stack([p.low_dose for p in patches]))[:, None])
    y = apply_network(denoiser.network, x, tile_size=None)
    r = rep.decode(rep.encode(x, y)[0], y)
    hu = [norm.denormalize(t)[:, 0].float().numpy() for t in (x, y, r)]
    return (*hu, np.stack([p.full_dose for p in patches]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder with a cVAE (e.g. Resources/Models/dugan)")
    parser.add_argument("--data", required=True, help="simulated data set (with full dose)")
    parser.add_argument("--slices", type=int, default=4, help="test slices, 2 patches each (the card's 4)")
    parser.add_argument("--block", type=int, default=16, help="block side of the local means (px)")
    parser.add_argument("--low-rings", type=int, default=3, help="lowest rings left out of the second correlation")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y, r, fd = images(args.model, args.data, args.slices)
    spectra = {"x-fd": x - fd, "r-fd": r - fd, "x-f(x)": x - y, "r-f(x)": r - y, "f(x)-fd": y - fd}
    spectra = {name: noise_power_spectrum(noise) for name, noise in spectra.items()}
    half = x.shape[-1] // 2
    print(f"{args.model}: {len(x)} held-out patches of {x.shape[-1]}² px; noise power spectra (HU² per pixel)")
    print("ring " + "".join(f"{name:>10}" for name in spectra))
    for ring in sorted({*range(1, 9), *range(8, half, 6)}):
        print(f"{ring:4d} " + "".join(f"{s[ring]:10.1f}" for s in spectra.values()))
    a, b = spectra["r-fd"], spectra["x-fd"]
    k = args.low_rings + 1
    print(f"NPS correlation r-fd vs x-fd, rings 1..{half - 1}: {np.corrcoef(a[1:], b[1:])[0, 1]:.3f}; "
          f"rings {k}..{half - 1}: {np.corrcoef(a[k:], b[k:])[0, 1]:.3f}")
    pool = lambda image: torch.nn.functional.avg_pool2d(torch.from_numpy(image)[:, None], args.block).numpy()  # noqa: E731
    for name, (p, q) in {"r - x": (r, x), "f(x) - x": (y, x), "x - fd": (x, fd), "r - fd": (r, fd)}.items():
        print(f"mean |block mean of {name}| over {args.block}² px blocks: {np.abs(pool(p) - pool(q)).mean():.2f} HU")


if __name__ == "__main__":
    main()
