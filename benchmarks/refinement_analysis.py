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

    .venv/bin/python benchmarks/refinement_analysis.py Resources/Models/redcnn --data data/sim512 --patches 4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from InvarianceExplorerLib.analysis import structure_change
from InvarianceExplorerLib.datasets import open_source
from InvarianceExplorerLib.devices import machine
from InvarianceExplorerLib.fidelity import held_out_patches
from InvarianceExplorerLib.sampler import CHECKED_REFINEMENT, InvarianceSampler, Refinement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders (or bundled names) with invariance models")
    parser.add_argument("--data", required=True, help="simulated data set (its test split)")
    parser.add_argument("--patches", type=int, default=4, help="test patches (default 4)")
    parser.add_argument("--count", type=int, default=16, help="invariances per patch (default 16)")
    parser.add_argument("--refinement", type=Refinement.parse, default=CHECKED_REFINEMENT, metavar="CENTRE,SAMPLE")
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
                a = structure_change(r.x, r.invariances, spacing, denoised=r.denoised,
                                     denoised_invariances=r.denoised_invariances)
                rows.append((sum(s["region_count"] > 0 for s in a.samples),
                             float(np.mean([s["area_mm2"] for s in a.samples])),
                             sum(len(s["seen_by_f"]) for s in a.samples)))
                out.append(r.mean_abs_output_change_hu.mean())
                change.append(r.mean_abs_change_hu.mean())
            print(f"{model}, refinement {refinement.as_dict()}, {len(patches)} test patches x {args.count} "
                  f"invariances, pixel {spacing[0]} mm: C {np.mean(out) / np.mean(change):.3f}; per patch "
                  "(invariances with altered regions, mean altered area mm^2, regions seen by f): "
                  + ", ".join(f"({a}, {b:.0f}, {c})" for a, b, c in rows))


if __name__ == "__main__":
    main()
