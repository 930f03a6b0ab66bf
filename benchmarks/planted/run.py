"""Planted-invariance benchmark: do analysis methods A and B find invariances we planted?

For each denoiser (its model folder with cVAE + cINN), on held-out test patches of a
simulated data set: sample ``--count`` invariances per patch, draw ``--null-count`` noise-only
scans of the same phantom slice at the same dose (the method-B null; phantom rebuilt from its
seed and rescanned), run method A and method B, and score them against the planted truth:

- region-blind (``networks.RegionBlind``): truth = the disc M at the patch centre. Per-pixel
  ROC AUC of each method's score (A: mean |z| over the invariances; B: -log10 p of the
  variance-ratio test), per-region AUC (mean score in M against four discs of M's size
  elsewhere in the patch), recall of M's pixels at a 5 % per-pixel false-positive rate, and
  the methods' own binary flags (share of M flagged, share of the rest flagged; method A's
  flags count only regions whose change f passes on by at most half, ``MAX_PASSED_ON``).
- nodule-blind (``--nodule-blind``: a denoiser trained on targets without lung nodules below
  ``--max-diameter`` mm, ``nodule_blind_data.py``): patches centred on such nodules; truth =
  their pixels (dilated by 1 px); the same figures, region AUC with discs of the nodule's size.
- control (an ordinary denoiser): truth = nothing. A patch is flagged by method A when more
  of its invariances hold an altered region than noise alone explains (binomial test at 5 %
  with A's 5 % false-region rate per invariance), by method B when any pixel survives FDR.

With ``--refine C,S`` the invariances are sampled with that consistency refinement and both
methods run against the null refined the same way; adding ``--no-scans``, method A runs as
``analyze`` runs it on refined samples without scans (rescan floor estimated from x and the
data set's noise texture) while method B keeps the refined null.

Targets (issue): AUC >= 0.85 on region-blind, >= 0.75 on nodule-blind, <= 5 % of control
patches flagged.

    .venv/bin/python benchmarks/planted/run.py --data data/sim512 --region-blind runs/planted/region_blind \\
        --nodule-blind runs/planted/nodule_blind_redcnn --control redcnn --write-readme

Without ``--region-blind`` and ``--nodule-blind`` it scores the control alone, e.g. a newly
bundled model folder. A run that lacks either planted denoiser is partial: its JSON and figure
go under ``runs/planted/*_partial`` by default, and the README's tables are written only
from a run with every row.

Prints one table, writes ``--out`` (JSON) and ``--figure`` (PNG), and with
``--write-readme`` puts the table, command and machine between the README's planted markers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
from scipy import stats

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from networks import centre_disc  # noqa: E402

FALSE_POSITIVE_RATE = 0.05
#: README block of the table: ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``, NAME "planted", or
#: "planted-refined" for a run with a refinement, "planted-refined-noscans" for one with --no-scans.
README_BLOCKS = ("planted", "planted-refined", "planted-refined-noscans")


# ----------------------------------------------------------------------------- scores


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> Optional[float]:
    """Area under the ROC curve of ``scores`` for the boolean ``truth`` (Mann-Whitney U with
    ties counted half); None without both classes."""
    scores, truth = np.ravel(scores).astype(np.float64), np.ravel(truth).astype(bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if not positives or not negatives:
        return None
    ranks = stats.rankdata(scores)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def recall_at_fpr(scores: np.ndarray, truth: np.ndarray, fpr: float = FALSE_POSITIVE_RATE) -> Optional[float]:
    """Share of the true pixels scoring above the ``1 - fpr`` quantile of the others."""
    scores, truth = np.ravel(scores), np.ravel(truth).astype(bool)
    if not truth.any() or truth.all():
        return None
    return float((scores[truth] > np.quantile(scores[~truth], 1.0 - fpr)).mean())


def region_discs(size: int, radius: float) -> List[np.ndarray]:
    """The disc M at the centre of a ``size`` patch and four discs of its size centred a
    quarter of the patch away diagonally (they do not overlap M when size/4 * sqrt(2) > 2 r)."""
    rows, cols = np.mgrid[:size, :size]
    centres = [(size // 2, size // 2)] + [(size // 2 + a * (size // 4), size // 2 + b * (size // 4))
                                          for a in (-1, 1) for b in (-1, 1)]
    return [((rows - r) ** 2 + (cols - c) ** 2) <= radius ** 2 for r, c in centres]


def method_a_flags_patch(altered: int, count: int, alpha: float) -> bool:
    """Whether ``altered`` of ``count`` invariances with an altered region is more than noise
    alone gives (each has one with probability ``alpha``): one-sided binomial test at 5 %."""
    return bool(stats.binom.sf(altered - 1, count, alpha) < 0.05)


# ----------------------------------------------------------------------------- one denoiser


def nodule_patches(source, size: int, slices: int, max_diameter_mm: float, per_slice: int = 2) -> list:
    """Test patches of ``size`` px centred on lung nodules below ``max_diameter_mm`` (up to
    ``per_slice`` per slice, of the first ``slices`` test slices that have one), each with its
    truth mask (those nodules' pixels in the patch, dilated by 1 px) and the centre nodule's
    radius in px."""
    from scipy import ndimage

    from InvarianceExplorerLib.datasets import split_indices
    from InvarianceExplorerLib.fidelity import HeldOutPatch, _crop

    spacing = float(source.manifest["parameters"]["spacing_mm"])
    out, used = [], 0
    for index in split_indices(source, "test"):
        small = [n for n in source.items[index].get("nodules", []) if n["diameter_mm"] < max_diameter_mm]
        if not small or used >= slices:
            continue
        item = source[index]
        truth = ndimage.binary_dilation(np.isin(item.nodule_map, [n["index"] for n in small]), iterations=1)
        taken = 0
        for nodule in small:
            rows, cols = np.nonzero(item.nodule_map == nodule["index"])
            if not rows.size or taken >= per_slice:
                continue
            j, i = int(round(rows.mean())), int(round(cols.mean()))
            h, w = item.low_dose.shape
            if not (size // 2 <= i <= w - size // 2 and size // 2 <= j <= h - size // 2):
                continue
            patch = HeldOutPatch(index, (i, j), _crop(item.low_dose, (i, j), size), _crop(item.full_dose, (i, j), size))
            out.append((patch, _crop(truth.astype(np.float32), (i, j), size) > 0.5,
                        max(1.0, nodule["diameter_mm"] / 2.0 / spacing + 1.0)))
            taken += 1
        used += 1
    return out


def evaluate(folder, source, truth: Optional[Callable[[int], np.ndarray]], *, slices: int, count: int,
             null_count: int, seed: int, nulls: Dict[int, np.ndarray], device="cpu", nodules_below_mm=None,
             refinement=None, noise_texture=None) -> dict:
    """Methods A and B on ``per_slice`` = 2 test patches of ``slices`` slices; ``truth(P)`` is
    the planted mask of a P-pixel patch (None: a control). With ``nodules_below_mm`` the
    patches are centred on such nodules instead and each carries its own truth
    (:func:`nodule_patches`). ``nulls`` caches the noise-only scans per slice. With a
    ``refinement`` the invariances are sampled with it, the null is refined the same way
    (:meth:`~InvarianceExplorerLib.sampler.InvarianceSampler.refine_null`), method A takes its
    noise shape from that null (its regions also beyond a rescan's noise) and method B tests
    against it; with a ``noise_texture`` too, method A judges the refined invariances as
    ``analyze`` does without scans (each difference's own noise, regions also beyond the rescan
    floor estimated from x and the texture) while B still tests against the refined null.
    Returns the per-pixel scores,
    flags, truth masks and per-patch records."""
    from InvarianceExplorerLib.analysis import ALPHA, ensemble_test, structure_change
    from InvarianceExplorerLib.fidelity import _crop, another_realisation, held_out_patches
    from InvarianceExplorerLib.sampler import InvarianceSampler, load_invariance_models

    models = load_invariance_models(folder, device=device)
    size = models.patch_size
    spacing = float(source.manifest["parameters"]["spacing_mm"])
    sampler = InvarianceSampler(models, device=device)
    if nodules_below_mm:
        chosen = nodule_patches(source, size, slices, nodules_below_mm)
        patches, truths, radii = [c[0] for c in chosen], [c[1] for c in chosen], [c[2] for c in chosen]
    else:
        patches = held_out_patches(source, "test", size, slices, 2, seed)
        truths = [None if truth is None else truth(size) for _ in patches]
        radii = [None] * len(patches)
    a_scores, b_scores, a_flags, b_flags, records = [], [], [], [], []
    for n, patch in enumerate(patches):
        if patch.index not in nulls:
            nulls[patch.index] = np.stack([another_realisation(source, patch.index, 2_000_003 + 7919 * patch.index + j)
                                           for j in range(null_count)])
        null = np.stack([_crop(scan, patch.center, size) for scan in nulls[patch.index]])
        result = sampler.sample(patch.low_dose, count=count, seed=seed + n, refinement=refinement)
        refined, scanned = bool(result.refinement), null
        if refined:
            null = sampler.refine_null(patch.low_dose, null, result.refinement)
        shaped = refined and noise_texture is None
        a = structure_change(patch.low_dose, result.invariances, (spacing, spacing), denoised=result.denoised,
                             denoised_invariances=result.denoised_invariances, null=null if shaped else None,
                             null_shape=shaped, scans=scanned if shaped else None,
                             noise_texture=noise_texture if refined else None, refined=refined)
        b = ensemble_test(result.invariances, null, (spacing, spacing), null_source="simulator")
        altered = sum(1 for s in a.samples if s["region_count"] > 0)
        a_scores.append(np.abs(a.change_map).mean(axis=0))
        b_scores.append(-np.log10(np.clip(b.p, 1e-300, 1.0)))
        a_flags.append((a.labels > 0).any(axis=0))
        b_flags.append(b.labels > 0)
        records.append({"slice": int(patch.index), "center": list(patch.center), "altered_invariances": altered,
                        "regions_seen_by_f": int(sum(len(s["seen_by_f"]) for s in a.samples)),
                        "a_flags_patch": method_a_flags_patch(altered, count, ALPHA),
                        "b_flags_patch": bool((b.labels > 0).any()), "consistency": float(result.consistency),
                        "std_hu": float(result.std.mean()), "example": (patch.low_dose, result, a, b) if n < 3
                        else None})
    return {"patch_size": size, "spacing_mm": spacing, "a": np.stack(a_scores), "b": np.stack(b_scores),
            "a_flags": np.stack(a_flags), "b_flags": np.stack(b_flags), "records": records,
            "truth": None if truths[0] is None else np.stack(truths), "radii": radii}


def planted_figures(run: dict, radius: Optional[float] = None) -> dict:
    """The figures of a planted run of :func:`evaluate` (module docstring): ``radius`` (px) of
    the centre disc M, or None for per-patch radii (nodules)."""
    mask = run["truth"]
    radii = [radius] * len(mask) if radius is not None else run["radii"]
    out = {}
    for method in ("a", "b"):
        scores = run[method]
        regions = np.array([[s[d].mean() for d in region_discs(run["patch_size"], r)] for s, r in zip(scores, radii)])
        region_truth = np.zeros_like(regions, dtype=bool)
        region_truth[:, 0] = True
        flags = run[f"{method}_flags"]
        out[method] = {"pixel_auc": roc_auc(scores, mask), "region_auc": roc_auc(regions, region_truth),
                       "recall_at_5pct_fpr": recall_at_fpr(scores, mask),
                       "flagged_inside_m": float(flags[mask].mean()), "flagged_outside_m": float(flags[~mask].mean())}
    return out


def control_figures(run: dict) -> dict:
    records = run["records"]
    out = {}
    for method in ("a", "b"):
        flagged = sum(bool(r[f"{method}_flags_patch"]) for r in records)
        out[method] = {"patches_flagged": flagged / len(records), "patches_flagged_count": flagged,
                       "patches": len(records), "pixels_flagged": float(run[f"{method}_flags"].mean())}
    return out


# ----------------------------------------------------------------------------- report


def _fmt(value, spec=".2f") -> str:
    return "–" if value is None else format(value, spec)


def table(results: dict) -> str:
    rows = ["| denoiser (planted invariance) | method | pixel AUC | region AUC | recall at 5 % FPR | truth flagged / "
            "rest flagged | control patches flagged | target |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["denoisers"].items():
        for method, label in (("a", "A (per invariance)"), ("b", "B (ensemble vs noise null)")):
            f = r["figures"][method]
            if r["kind"] == "control":
                rows.append(f"| {name} (control: none planted) | {label} | – | – | – | – / "
                            f"{_fmt(f['pixels_flagged'], '.3f')} | {_fmt(100 * f['patches_flagged'], '.0f')} % "
                            f"({f['patches_flagged_count']} of {f['patches']}) | "
                            f"≤ 5 %: {'met' if f['patches_flagged'] <= 0.05 else 'missed'} |")
                continue
            what, bar = ((f"disc M, r = {r['radius_px']:g} px", 0.85) if r["kind"] == "region-blind" else
                         (f"lung nodules < {r['max_diameter_mm']:g} mm", 0.75))
            rows.append(f"| {name} ({what}) | {label} | {_fmt(f['pixel_auc'])} | {_fmt(f['region_auc'])} | "
                        f"{_fmt(f['recall_at_5pct_fpr'])} | {_fmt(f['flagged_inside_m'])} / "
                        f"{_fmt(f['flagged_outside_m'], '.3f')} | – | "
                        f"AUC ≥ {bar}: {'met' if (f['pixel_auc'] or 0) >= bar else 'missed'} |")
    if "region-blind" in results["denoisers"] and "nodule-blind" not in results["denoisers"]:
        rows.append("| nodule-blind | A, B | not run: no nodule-blind denoiser given | | | | | AUC ≥ 0.75 |")
    return "\n".join(rows)


def save_figure(results_runs: dict, path: Path) -> None:
    """Per denoiser, up to three patches: x, three invariances, std map, method A mean |z|,
    method B -log10 p (display ranges in the captions)."""
    from InvarianceExplorerLib.figures import LUNG_WINDOW, save_png, std_tile, tile_grid, window

    rows, labels = [], []
    size = max(run["patch_size"] for run in results_runs.values())
    for name, run in results_runs.items():
        for record in run["records"]:
            if record["example"] is None:
                continue
            x, result, a, b = record["example"]
            scale = size // x.shape[0]
            up = (lambda t: np.kron(t, np.ones((scale, scale), dtype=t.dtype)))  # noqa: E731
            std, std_label = std_tile(result.std)
            za = np.abs(a.change_map).mean(axis=0)
            sb = -np.log10(np.clip(b.p, 1e-300, 1.0))
            rows.append([up(window(x, *LUNG_WINDOW))] + [up(window(t, *LUNG_WINDOW)) for t in result.invariances[:3]]
                        + [up(std), up(window(za, 2.0, 4.0)), up(window(sb, 4.0, 8.0))])
            labels.append([f"{name}: x", "x~1", "x~2", "x~3", std_label, "A mean|z| 0-4", "B -log p 0-8"])
    save_png(tile_grid(rows, labels), str(path))


def write_readme(readme: Path, text: str, block: str = README_BLOCKS[0]) -> None:
    content = readme.read_text()
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    if begin not in content or end not in content:
        raise SystemExit(f"{readme} has no {begin} ... {end} block")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="simulated data set (its test split is used)")
    parser.add_argument("--region-blind", type=Path, default=None,
                        help="model folder of the region-blind fit (required with --write-readme)")
    parser.add_argument("--nodule-blind", type=Path, default=None,
                        help="model folder of the nodule-blind denoiser with its invariance models")
    parser.add_argument("--max-diameter", type=float, default=5.0, help="nodules it was taught to erase (mm)")
    parser.add_argument("--control", default="cnn10", help="model folder or bundled name of the control")
    parser.add_argument("--slices", type=int, default=8, help="test slices (2 patches each; default 8)")
    parser.add_argument("--count", type=int, default=16, help="invariances per patch (default 16)")
    parser.add_argument("--null-count", type=int, default=16, help="noise-only scans per slice (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refine", default=None, metavar="CENTRE,SAMPLE",
                        help="sample with this consistency refinement (default: each model folder's own) and "
                             "refine the null the same way")
    parser.add_argument("--no-scans", action="store_true",
                        help="with --refine: method A as analyze runs it without scans (rescan floor estimated from x "
                             "and the data set's noise texture); method B still against the refined null")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default runs/planted/results.json, results_refined.json with --refine; "
                             "..._partial.json without --region-blind or --nodule-blind)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="figure (default docs/planted.png, docs/planted_refined.png with --refine; without "
                             "--region-blind or --nodule-blind runs/planted/planted..._partial.png)")
    parser.add_argument("--write-readme", action="store_true", help="put the table in README.md")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    partial = not (args.region_blind and args.nodule_blind)
    if args.write_readme and partial:
        parser.error("--write-readme needs --region-blind and --nodule-blind: the README's tables hold every row")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from InvarianceExplorerLib.datasets import open_source
    from InvarianceExplorerLib.denoisers import read_metadata
    from InvarianceExplorerLib.devices import machine, machine_words
    from InvarianceExplorerLib.sampler import Refinement

    started = time.perf_counter()
    source = open_source(args.data)
    nulls: Dict[int, np.ndarray] = {}
    radius = (float(read_metadata(args.region_blind)["architecture"].get("arguments", {}).get("radius_px", 10.0))
              if args.region_blind else None)  # read first: a wrong folder fails before any work
    refinement = None if args.refine is None else Refinement.parse(args.refine)
    if args.no_scans and not refinement:
        raise SystemExit("--no-scans goes with --refine")
    suffix = ("_refined" if refinement else "") + ("_noscans" if args.no_scans else "")
    texture = None
    if args.no_scans:
        from InvarianceExplorerLib.noise import NoiseTexture
        from InvarianceExplorerLib.training import data_noise_texture

        texture = NoiseTexture.from_dict(data_noise_texture(source))
    if partial:  # a partial run never replaces the full run's results or the README's figure
        args.out = args.out or Path(f"runs/planted/results{suffix}_partial.json")
        args.figure = args.figure or Path(f"runs/planted/planted{suffix}_partial.png")
    args.out = args.out or Path(f"runs/planted/results{suffix}.json")
    args.figure = args.figure or Path(f"docs/planted{suffix}.png")
    common = dict(slices=args.slices, count=args.count, null_count=args.null_count, seed=args.seed, nulls=nulls,
                  refinement=refinement, noise_texture=texture)
    runs = {}
    if args.region_blind:
        runs["region-blind"] = evaluate(args.region_blind, source, lambda p: centre_disc(p, p, radius).numpy() > 0,
                                        **common)
    runs["control"] = evaluate(args.control, source, None, **common)
    if args.nodule_blind:
        runs["nodule-blind"] = evaluate(args.nodule_blind, source, None, nodules_below_mm=args.max_diameter, **common)
    results = {"denoisers": {}}
    if args.region_blind:
        results["denoisers"]["region-blind"] = {"kind": "region-blind", "folder": str(args.region_blind),
                                                "radius_px": radius,
                                                "figures": planted_figures(runs["region-blind"], radius)}
    results["denoisers"]["control"] = {"kind": "control", "folder": str(args.control),
                                       "figures": control_figures(runs["control"])}
    if args.nodule_blind:
        results["denoisers"]["nodule-blind"] = {"kind": "nodule-blind", "folder": str(args.nodule_blind),
                                                "max_diameter_mm": args.max_diameter,
                                                "figures": planted_figures(runs["nodule-blind"])}
    for name, run in runs.items():
        results["denoisers"][name]["patches"] = [{k: v for k, v in r.items() if k != "example"}
                                                 for r in run["records"]]
        results["denoisers"][name]["patch_size"] = run["patch_size"]
    results.update({"refinement": None if refinement is None else refinement.as_dict(),
                    "method_a_scan_floor": None if not refinement else ("estimated" if args.no_scans else "scans"),
                    "data": str(args.data), "slices": args.slices, "invariances_per_patch": args.count,
                    "null_scans_per_slice": args.null_count, "seed": args.seed, "machine": machine(),
                    "wall_time_s": round(time.perf_counter() - started, 1),
                    "command": "python benchmarks/planted/run.py " + " ".join(shlex.quote(a) for a in
                                                                              (argv or sys.argv[1:]))})
    text = table(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    save_figure(runs, args.figure)
    if args.write_readme:
        m = results["machine"]
        write_readme(Path("README.md"), f"{text}\n\nMeasured by `{results['command']}` on {m['cpu']} "
                     f"({machine_words(m)}) in {results['wall_time_s'] / 60:.0f} min: "
                     "test patches: " + ", ".join(f"{name} {len(run['records'])}" for name, run in runs.items())
                     + f"; {args.count} invariances each, "
                     f"{args.null_count} noise-only scans per slice. Figure: `{args.figure}`.",
                     README_BLOCKS[2] if args.no_scans else README_BLOCKS[1] if refinement else README_BLOCKS[0])


if __name__ == "__main__":
    main()
