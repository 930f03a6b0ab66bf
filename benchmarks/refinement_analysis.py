"""Benchmark: method A of the analysis on invariances sampled with and without the sampler's
consistency refinement, and on pure noise refined the same way.

For each model folder, held-out test patches (those of the fidelity figures,
:func:`~InvarianceExplorerLib.fidelity.held_out_patches`: 2 per test slice) are sampled
``--count`` times (seed = patch number) without refinement and with ``--refinement``
(default :data:`~InvarianceExplorerLib.sampler.CHECKED_REFINEMENT`), and method A
(:func:`~InvarianceExplorerLib.analysis.structure_change`, default settings, f's outputs
given) runs on both. The refined ones are judged twice: by each difference alone (the noise
model of unrefined samples) and in the noise shape of a null refined the same way
(``null_shape``, regions also beyond the noise of the null as scanned; the null: ``--null``
fresh noise realisations x'_j of the patch's slice,
:func:`~InvarianceExplorerLib.fidelity.another_realisation`, refined by
:meth:`~InvarianceExplorerLib.sampler.InvarianceSampler.refine_null`), as ``analyze`` does.
Per patch it prints the number of invariances with altered regions, their mean altered area
(mm^2) and the regions dropped as seen by f, and the consistency C.

With ``--noise-only J`` it also runs method A on J *other* fresh noise realisations of each
patch's slice (the same anatomy, new noise: whatever method A flags there is not anatomy), as
scanned and refined towards f(x) like the samples, the refined ones judged both ways. Method A
promises ``alpha`` = 0.05 false regions per image. With ``--posterior`` the refined noise
realisations are also judged in the shape of a null drawn from the cVAE posterior of x
(``--null`` decodings ``D(z_j, f(x))``, ``z_j ~ q(z | x, f(x))``, refined the same way), so
without the scans' floor: the null a posterior would give when no scans are at hand (which
``analyze`` therefore does not use for refined samples).
Both are also judged as ``analyze`` judges refined samples without scans: by each difference
alone, with the rescan floor estimated from x and the model folder's noise texture
(:func:`~InvarianceExplorerLib.analysis.estimated_scan_floor`). Method B (per patch: any pixel
flagged at FDR 0.05, and the share) tests the refined invariances and the refined noise
realisations against the refined null of scans and, with ``--posterior``, the refined posterior
null.

    .venv/bin/python benchmarks/refinement_analysis.py Resources/Models/redcnn --data data/sim512 --patches 4 \\
        --noise-only 8
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from InvarianceExplorerLib.analysis import MIN_SHAPE_NULL, ensemble_test, structure_change
from InvarianceExplorerLib.analysis_folder import model_noise_texture, posterior_draws
from InvarianceExplorerLib.datasets import open_source
from InvarianceExplorerLib.devices import machine, machine_words
from InvarianceExplorerLib.fidelity import another_realisation, held_out_patches
from InvarianceExplorerLib.sampler import CHECKED_REFINEMENT, InvarianceSampler, Refinement


def _flags(x, stack, spacing, y=None, outputs=None, null=None, scanned=None, texture=None) -> tuple:
    """Method A on ``stack`` against ``x`` (in the noise shape of the refined ``null`` when
    given, its regions also beyond the noise of the ``scanned`` null, or beyond the rescan
    floor estimated from x and the noise ``texture``): (images with altered regions, mean
    altered area mm^2, regions seen by f)."""
    a = structure_change(x, stack, spacing, denoised=y, denoised_invariances=outputs, null=null,
                         null_shape=null is not None, scans=scanned, noise_texture=texture,
                         refined=scanned is not None or texture is not None)  # without a floor: judged as unrefined
    return (sum(s["region_count"] > 0 for s in a.samples), float(np.mean([s["area_mm2"] for s in a.samples])),
            sum(len(s["seen_by_f"]) for s in a.samples))


def _b(x, stack, spacing, null) -> str:
    """Method B of ``stack`` against ``null``: whether any pixel survives FDR, and the share flagged."""
    b = ensemble_test(stack, null, spacing)
    return f"{'flagged' if (b.labels > 0).any() else 'not flagged'} ({(b.labels > 0).mean():.3f} of pixels)"


def _line(rows) -> str:
    return ", ".join(f"({a}, {b:.0f}, {c})" for a, b, c in rows)


def scans(source, patch, seeds) -> np.ndarray:
    """Fresh low-dose scans of the patch's slice, cut like the patch ``(J, P, P)`` HU."""
    return np.stack([patch.crop(another_realisation(source, patch.index, s)) for s in seeds]).astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders (or bundled names) with invariance models")
    parser.add_argument("--data", required=True, help="simulated data set (its test split)")
    parser.add_argument("--patches", type=int, default=4, help="test patches (default 4)")
    parser.add_argument("--count", type=int, default=16, help="invariances per patch (default 16)")
    parser.add_argument("--refinement", type=Refinement.parse, default=CHECKED_REFINEMENT, metavar="CENTRE,SAMPLE")
    parser.add_argument("--null", type=int, default=16, help="noise-only scans per patch for the null (default 16)")
    parser.add_argument("--noise-only", type=int, default=0, metavar="J",
                        help="also test J other fresh noise realisations per patch, plain and refined (default 0)")
    parser.add_argument("--posterior", action="store_true",
                        help="with --noise-only: also judge them in the shape of a refined cVAE-posterior null")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.null < MIN_SHAPE_NULL or args.count < 3 or 0 < args.noise_only < 3:
        parser.error(f"--null must be at least {MIN_SHAPE_NULL} (the null's shape), --count at least 3 and "
                     "--noise-only 0 or at least 3 (method B)")
    torch.set_num_threads(args.threads)
    m = machine()
    print(f"machine: {machine_words(m)}")
    print("per patch: (images with altered regions, mean altered area mm^2, regions seen by f)")
    source = open_source(args.data)
    for model in args.models:
        sampler = InvarianceSampler(model, device="cpu")
        patches = held_out_patches(source, "test", sampler.patch_size, slices=(args.patches + 1) // 2,
                                   per_slice=2)[:args.patches]
        spacing = tuple(float(s) for s in source[patches[0].index].spacing[:2])  # mm
        scanned = [scans(source, p, range(7000, 7000 + args.null)) for p in patches]
        nulls = [sampler.refine_null(p.low_dose, s, args.refinement).astype(np.float64)
                 for p, s in zip(patches, scanned)]
        texture, why = model_noise_texture(model)
        if texture is None:
            raise SystemExit(why)
        rows = {"plain": [], "refined, own noise": [], "refined, null's shape": [],
                "refined, own noise, floor estimated from x": []}
        consistency, method_b = {}, []
        posteriors = [sampler.refine_null(p.low_dose, posterior_draws(sampler.models.denoiser,
                                                                      sampler.models.representation, p.low_dose,
                                                                      args.null), args.refinement).astype(np.float64)
                      for p in patches] if args.posterior else None
        for refinement in (Refinement(), args.refinement):
            out, change = [], []
            for n, patch in enumerate(patches):
                r = sampler.sample(patch.low_dose, count=args.count, seed=n, batch_size=args.count,
                                   refinement=refinement)
                common = (r.x, r.invariances, spacing, r.denoised, r.denoised_invariances)
                if refinement:
                    rows["refined, own noise"].append(_flags(*common))
                    rows["refined, null's shape"].append(_flags(*common, null=nulls[n], scanned=scanned[n]))
                    rows["refined, own noise, floor estimated from x"].append(_flags(*common, texture=texture))
                    method_b.append(f"patch {n}: refined invariances vs refined scans "
                                    f"{_b(r.x, r.invariances, spacing, nulls[n])}"
                                    + (f", vs refined posterior {_b(r.x, r.invariances, spacing, posteriors[n])}"
                                       if posteriors else ""))
                else:
                    rows["plain"].append(_flags(*common))
                out.append(r.mean_abs_output_change_hu.mean())
                change.append(r.mean_abs_change_hu.mean())
            consistency[bool(refinement)] = np.mean(out) / np.mean(change)
        print(f"{model}: {len(patches)} test patches x {args.count} invariances, pixel {spacing[0]} mm, refinement "
              f"{args.refinement.as_dict()}, null of {args.null} refined scans; C {consistency[False]:.3f} plain, "
              f"{consistency[True]:.3f} refined")
        for label, found in rows.items():
            print(f"  invariances, {label}: {_line(found)}")
        if args.noise_only:
            found = {"as scanned": [], "refined, own noise": [], "refined, null's shape": [],
                     "refined, own noise, floor estimated from x": []}
            if args.posterior:
                found["refined, refined posterior null's shape"] = []
            for n, patch in enumerate(patches):
                plain = scans(source, patch, range(5000, 5000 + args.noise_only))
                refined = sampler.refine_null(patch.low_dose, plain, args.refinement).astype(np.float64)
                found["as scanned"].append(_flags(patch.low_dose, plain, spacing))
                found["refined, own noise"].append(_flags(patch.low_dose, refined, spacing))
                found["refined, null's shape"].append(_flags(patch.low_dose, refined, spacing, null=nulls[n],
                                                             scanned=scanned[n]))
                found["refined, own noise, floor estimated from x"].append(
                    _flags(patch.low_dose, refined, spacing, texture=texture))
                method_b.append(f"patch {n}: refined noise vs refined scans "
                                f"{_b(patch.low_dose, refined, spacing, nulls[n])}"
                                + (f", vs refined posterior {_b(patch.low_dose, refined, spacing, posteriors[n])}"
                                   if posteriors else ""))
                if args.posterior:
                    found["refined, refined posterior null's shape"].append(
                        _flags(patch.low_dose, refined, spacing, null=posteriors[n]))
            for label, rows_ in found.items():
                total = sum(r[0] for r in rows_)
                print(f"  {args.noise_only} other noise realisations per patch, {label}: {_line(rows_)}; "
                      f"{total} of {args.noise_only * len(patches)} images flagged")
        print("  method B (FDR 0.05):")
        for line in method_b:
            print(f"    {line}")


if __name__ == "__main__":
    main()
