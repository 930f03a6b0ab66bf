"""Benchmark: how the sampler's consistency refinement changes what method A of the analysis flags.

For each model folder, held-out test patches (those of the fidelity figures,
:func:`~InvarianceExplorerLib.fidelity.held_out_patches`: 2 per test slice) are sampled
``--count`` times (seed = patch number) without refinement and with ``--refinement``
(default :data:`~InvarianceExplorerLib.sampler.CHECKED_REFINEMENT`), and method A
(:func:`~InvarianceExplorerLib.analysis.structure_change`, default settings, f's outputs
given) runs on both. Per patch it prints the number of invariances with altered regions, their
mean altered area (mm^2) and the regions dropped as seen by f, and the consistency C. For the
bundled RED-CNN, the control of the planted-invariance benchmark (nothing planted), method A
flags nothing without refinement.

With ``--noise-only J`` it also runs method A on J fresh noise realisations x'_j of each
patch's slice (:func:`~InvarianceExplorerLib.fidelity.another_realisation`: the same anatomy,
new noise), as they are and refined towards f(x) as the sampler refines its samples (the
centre steps on the mean of the x'_j, that change added to each, then the per-sample steps):
whatever method A flags there is not anatomy.

    .venv/bin/python benchmarks/refinement_analysis.py Resources/Models/redcnn --data data/sim512 --patches 4 \
        --noise-only 8
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from InvarianceExplorerLib.analysis import structure_change
from InvarianceExplorerLib.datasets import open_source
from InvarianceExplorerLib.devices import machine
from InvarianceExplorerLib.fidelity import another_realisation, held_out_patches
from InvarianceExplorerLib.inference import apply_network
from InvarianceExplorerLib.sampler import CHECKED_REFINEMENT, InvarianceSampler, Refinement, refine_invariances


def _flags(x, stack, y, outputs, spacing) -> tuple:
    """Method A on ``stack`` against ``x``: (samples with altered regions, mean altered area mm^2,
    regions seen by f)."""
    a = structure_change(x, stack, spacing, denoised=y, denoised_invariances=outputs)
    return (sum(s["region_count"] > 0 for s in a.samples), float(np.mean([s["area_mm2"] for s in a.samples])),
            sum(len(s["seen_by_f"]) for s in a.samples))


def noise_only(sampler, source, patch, count: int, refinement: Refinement, spacing) -> tuple:
    """Method A's flags on ``count`` fresh noise realisations of the patch, as they are and
    refined like the sampler's samples (module docstring)."""
    models = sampler.models
    norm = models.denoiser.normalization

    def f(t: torch.Tensor) -> torch.Tensor:
        return apply_network(models.denoiser.network, t, tile_size=None)

    def hu(t: torch.Tensor) -> np.ndarray:
        return norm.denormalize(t[:, 0]).numpy().astype(np.float64)

    stack = np.stack([patch.crop(another_realisation(source, patch.index, 5000 + j)) for j in range(count)])
    x = norm.normalize(torch.from_numpy(patch.low_dose))[None, None]
    noisy = norm.normalize(torch.from_numpy(stack))[:, None]
    with torch.no_grad():
        y, outputs = f(x), f(noisy)
    if refinement.centre:
        mean = noisy.mean(0, keepdim=True)
        noisy = noisy + (refine_invariances(f, mean, y, refinement.centre)[0] - mean)
    refined, refined_outputs = refine_invariances(f, noisy, y, refinement.sample)
    x_hu, y_hu = patch.low_dose.astype(np.float64), hu(y)[0]
    return (_flags(x_hu, stack.astype(np.float64), y_hu, hu(outputs), spacing),
            _flags(x_hu, hu(refined), y_hu, hu(refined_outputs), spacing))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders (or bundled names) with invariance models")
    parser.add_argument("--data", required=True, help="simulated data set (its test split)")
    parser.add_argument("--patches", type=int, default=4, help="test patches (default 4)")
    parser.add_argument("--count", type=int, default=16, help="invariances per patch (default 16)")
    parser.add_argument("--refinement", type=Refinement.parse, default=CHECKED_REFINEMENT, metavar="CENTRE,SAMPLE")
    parser.add_argument("--noise-only", type=int, default=0, metavar="J",
                        help="also test J fresh noise realisations per patch, plain and refined (default 0)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    m = machine()
    print(f"machine: {m['cpu']}, {args.threads} threads, torch {m['torch']}")
    source = open_source(args.data)
    for model in args.models:
        sampler = InvarianceSampler(model, device="cpu")
        p = sampler.patch_size
        patches = held_out_patches(source, "test", p, slices=(args.patches + 1) // 2, per_slice=2)[:args.patches]
        spacing = tuple(float(s) for s in source[patches[0].index].spacing[:2])  # mm
        for refinement in (Refinement(), args.refinement):
            rows, out, change = [], [], []
            for n, patch in enumerate(patches):
                r = sampler.sample(patch.low_dose, count=args.count, seed=n, batch_size=args.count,
                                   refinement=refinement)
                rows.append(_flags(r.x, r.invariances, r.denoised, r.denoised_invariances, spacing))
                out.append(r.mean_abs_output_change_hu.mean())
                change.append(r.mean_abs_change_hu.mean())
            print(f"{model}, refinement {refinement.as_dict()}, {len(patches)} test patches x {args.count} "
                  f"invariances, pixel {spacing[0]} mm: C {np.mean(out) / np.mean(change):.3f}; per patch "
                  "(invariances with altered regions, mean altered area mm^2, regions seen by f): "
                  + ", ".join(f"({a}, {b:.0f}, {c})" for a, b, c in rows))
        if args.noise_only:
            found = [noise_only(sampler, source, patch, args.noise_only, args.refinement, spacing) for patch in patches]
            for k, label in enumerate(("as scanned", f"refined {args.refinement.as_dict()}")):
                print(f"{model}, {args.noise_only} fresh noise realisations per patch, {label}: per patch "
                      "(realisations with altered regions, mean altered area mm^2, regions seen by f): "
                      + ", ".join(f"({a}, {b:.0f}, {c})" for a, b, c in (row[k] for row in found)))


if __name__ == "__main__":
    main()
