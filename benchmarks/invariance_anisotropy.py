"""Do a model's invariances differ from each other like CT noise, or in stripes?

For the held-out patches of the model card (``fidelity.held_out_patches``: test split, 2
patches per slice of ``--slices`` slices, seed 0), samples ``--count`` invariances per patch
and takes their deviations x~_k - mean_k x~ (HU). Prints their 2D power split by direction:
the share in the sector of mostly horizontal frequencies (|k_x| > 2 |k_y|: patterns that
vary along a row, i.e. vertical stripes) against mostly vertical ones (|k_y| > 2 |k_x|:
horizontal stripes), and their ratio (``fidelity.stripe_shares``; the model card's stripe
ratio), beside the same for the noise of x (x - full dose).
Noise of a CT scan has a ratio near 1; a decoder that varies its samples in stripes has a
ratio far from 1 (the radially averaged noise power spectrum of the fidelity figures cannot
see the difference). Beside it, f's own gain mean|f(x + s) - f(x)| / mean|s| for 10 HU
cosine stripes s of 16 and 32 cycles per patch in each direction: equal gains mean the
stripes are the decoder's, not a direction f ignores more. Then, where the samples vary:
the per-pixel std over the invariances of a patch, averaged over patches and over the
columns and rows at the edges of ``--block`` px blocks (the last and first of each block)
against the rest (a decoder with nearest-neighbour upsampling keeps its bottleneck map
constant over blocks of 32 px at 128² patches), and in a ``--border`` px frame. Last, how
periodic that std is: averaged over the pixels of each phase (i mod B, j mod B) inside a
``--phase-border`` px frame (wider than the border frame: decoders vary their samples in a
rim along the patch border, which would count as phases), the largest of those B² means
over their mean, for B = 8, 16, 32 px (``fidelity.periodicity``, also a card figure):
block-edge lines and a lattice of dots (a learned sub-pixel upsampling's) both raise it; a
std that follows anatomy and not the decoder's blocks stays near 1.
``--refine CENTRE,SAMPLE`` samples with that consistency refinement instead of the folder's.

    .venv/bin/python benchmarks/invariance_anisotropy.py Resources/Models/cnn10 Resources/Models/dugan --data data/sim512
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from InvarianceExplorerLib.datasets import open_source
from InvarianceExplorerLib.fidelity import PERIODICITY_BORDER, PERIODS, held_out_patches, periodicity, stripe_shares
from InvarianceExplorerLib.inference import apply_network
from InvarianceExplorerLib.sampler import InvarianceSampler, Refinement


@torch.inference_mode()
def stripe_gains(denoiser, patches, cycles=(16, 32)) -> dict:
    """f's gains (vertical, horizontal) for 10 HU cosine stripes of each number of ``cycles``
    per patch, f(x) computed once."""
    norm = denoiser.normalization
    x = torch.from_numpy(np.stack([p.low_dose for p in patches]))[:, None]
    f = lambda t: norm.denormalize(apply_network(denoiser.network, norm.normalize(t), tile_size=None))  # noqa: E731
    y, p = f(x), x.shape[-1]
    gains = {}
    for k in cycles:
        wave = 10.0 * torch.cos(2 * np.pi * k * torch.arange(p, dtype=torch.float32) / p)
        gains[k] = tuple(float((f(x + s) - y).abs().mean() / s.abs().mean())
                         for s in (wave[None, :].expand(p, p), wave[:, None].expand(p, p)))
    return gains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders with invariance models")
    parser.add_argument("--data", required=True, help="simulated data set (with full dose)")
    parser.add_argument("--slices", type=int, default=4, help="test slices, 2 patches each (the card's 4)")
    parser.add_argument("--count", type=int, default=16, help="invariances per patch")
    parser.add_argument("--block", type=int, default=32, help="block side whose edges are compared (px)")
    parser.add_argument("--border", type=int, default=4, help="width of the border frame (px)")
    parser.add_argument("--phase-border", type=int, default=PERIODICITY_BORDER,
                        help="frame left out of the periodicity figure (px; 16 leaves 96 px of a 128 px patch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--refine", type=Refinement.parse, default=None, metavar="CENTRE,SAMPLE",
                        help="consistency refinement of the samples (default: each folder's own)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = open_source(args.data)
    shown_noise = False
    for folder in args.models:
        sampler = InvarianceSampler(folder, device="cpu")
        patches = held_out_patches(source, "test", sampler.patch_size, args.slices, 2, 0)
        if not shown_noise:
            v, h = stripe_shares(np.stack([p.low_dose - p.full_dose for p in patches]))
            print(f"noise of x (x - full dose): vertical-stripe share {v:.3f}, horizontal {h:.3f}, ratio {v / h:.2f}")
            shown_noise = True
        deviations, stds = [], []
        for n, patch in enumerate(patches):
            result = sampler.sample(patch.low_dose, count=args.count, seed=n, refinement=args.refine)
            deviations.append(result.invariances - result.invariances.mean(axis=0, keepdims=True))
            stds.append(result.std)
        deviations, std = np.concatenate(deviations), np.mean(stds, axis=0)
        v, h = stripe_shares(deviations)
        print(f"{folder} (refinement {result.refinement.as_dict()}): x~ - mean x~ over {len(patches)} patches "
              f"x {args.count}: std {deviations.std():.2f} HU, "
              f"vertical-stripe share {v:.3f}, horizontal {h:.3f}, ratio {v / h:.2f}")
        p, b = std.shape[-1], args.border
        edge = np.isin(np.arange(p) % args.block, (0, args.block - 1))
        inner = std[b:-b, b:-b]
        print(f"    std of the invariances (HU): columns at {args.block} px block edges {inner[:, edge[b:-b]].mean():.2f}, "
              f"rows {inner[edge[b:-b]].mean():.2f}, inside the blocks {inner[~edge[b:-b]][:, ~edge[b:-b]].mean():.2f}; "
              f"{b} px border frame {(std.sum() - std[b:-b, b:-b].sum()) / (p * p - (p - 2 * b) ** 2):.2f}")
        print("    periodicity of that std (largest phase mean / mean): " + ", ".join(
            f"{period} px {periodicity(std, period, args.phase_border):.2f}" for period in PERIODS))
        for cycles, (gv, gh) in stripe_gains(sampler.models.denoiser, patches).items():
            print(f"    f's gain for 10 HU stripes of {cycles} cycles per patch: vertical {gv:.3f}, horizontal {gh:.3f}")


if __name__ == "__main__":
    main()
