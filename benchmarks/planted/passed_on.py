"""How much of the change in method A's altered regions does f pass on to its output?

A true invariance changes x but not f(x). For each patch of ``run.py`` (same patches, same
seeds) this samples the invariances, runs method A, and measures over the altered pixels of
each sign (brighter, darker) of every invariance the ratio
``mean |G * (f(x~_k) - f(x))| / mean |G * (x~_k - x)|`` (G: method A's reference filter):
near 0 where f ignores the change, near 1 where f passes it on (then the change is the
sampler's error, not something f ignores). Prints, per patch, the number of altered
invariances and the 10th / 50th / 90th percentile of the ratio.

    .venv/bin/python benchmarks/planted/passed_on.py --data data/sim512 \\
        --control runs/planted/control_redcnn --nodule-blind runs/planted/nodule_blind_redcnn
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import nodule_patches  # noqa: E402


def passed_on(folder, make_patches, seed: int, count: int, spacing: float):
    """Yield ``(n, slice, altered invariances, ratios over the altered pixels)`` for each
    patch of ``make_patches(patch size of the model)``."""
    from InvarianceExplorerLib.analysis import BRIGHTER, DARKER, reference_filter, structure_change
    from InvarianceExplorerLib.sampler import InvarianceSampler, Refinement, load_invariance_models

    models = load_invariance_models(folder, device="cpu")
    sampler = InvarianceSampler(models, device="cpu")
    for n, patch in enumerate(make_patches(models.patch_size)):
        result = sampler.sample(patch.low_dose, count=count, seed=seed + n, refinement=Refinement())  # as measured
        a = structure_change(patch.low_dose, result.invariances, (spacing, spacing), refined=False)
        output_change = reference_filter(result.denoised_invariances - result.denoised[None], a.sigma_px)
        ratios = []
        for k in range(count):
            for label in (BRIGHTER, DARKER):
                altered = a.labels[k] == label
                if altered.any():
                    ratios.append(float(np.abs(output_change[k][altered]).mean()
                                        / np.abs(a.difference_hu[k][altered]).mean()))
        yield n, int(patch.index), sum(s["region_count"] > 0 for s in a.samples), ratios


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="simulated data set (its test split is used)")
    parser.add_argument("--control", help="model folder of the control (patches as run.py's control)")
    parser.add_argument("--nodule-blind", help="model folder of the nodule-blind denoiser")
    parser.add_argument("--max-diameter", type=float, default=5.0)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    from InvarianceExplorerLib.datasets import open_source
    from InvarianceExplorerLib.fidelity import held_out_patches

    torch.set_num_threads(args.threads)
    source = open_source(args.data)
    spacing = float(source.manifest["parameters"]["spacing_mm"])
    runs = []
    if args.control:
        runs.append(("control", args.control, lambda size: held_out_patches(source, "test", size, args.slices, 2,
                                                                             args.seed)))
    if args.nodule_blind:
        runs.append(("nodule-blind", args.nodule_blind,
                     lambda size: [c[0] for c in nodule_patches(source, size, args.slices, args.max_diameter)]))
    print("| denoiser | patch | slice | altered invariances | passed-on ratio p10 / p50 / p90 |\n|---|---|---|---|---|")
    for name, folder, patches in runs:
        for n, index, altered, ratios in passed_on(folder, patches, args.seed, args.count, spacing):
            if ratios:
                p10, p50, p90 = np.percentile(ratios, [10, 50, 90])
                print(f"| {name} | {n} | {index} | {altered} | {p10:.2f} / {p50:.2f} / {p90:.2f} |", flush=True)


if __name__ == "__main__":
    main()
