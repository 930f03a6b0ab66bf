"""Measure a model folder's fidelity figures again, as its model card did, and compare.

For each model folder with invariance models, reruns :func:`~.fidelity.invariance_fidelity`
with the settings its card records (``invariance.fidelity.measured_on``: data, split, slices,
patches per slice, invariances per patch, seed; on the CPU) and prints every figure of the
card beside the new value. The stripe figures (added to the engine after most bundled models
were trained, and since windowed) are measured anew, not compared. With ``--write``, and
only when every other figure the card already had is reproduced (to ``--tolerance``
relative or 1e-4 absolute: v's mean is near 0), the new figures replace the old in
``metadata.json`` and ``MODEL_CARD.md`` is written again; the weights and ``fidelity.png``
are not touched.

``--refinement CENTRE,SAMPLE`` gives the models a consistency refinement
(:class:`~InvarianceExplorerLib.sampler.Refinement`) their card was measured without: the
card's figures must then be reproduced by the new figures of the samples without it
(``alternative``, which is then without refinement; the card's own ``alternative``, measured
with that refinement, by the new refined figures), and ``--write`` also stores the
refinement in ``metadata.json`` and draws ``fidelity.png`` anew (the invariances it shows
are refined).

    .venv/bin/python benchmarks/remeasure_fidelity.py Resources/Models/cnn10 --data data/sim512 [--write]
    .venv/bin/python benchmarks/remeasure_fidelity.py Resources/Models/cnn10 --data data/sim512 --refinement 5,1
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from InvarianceExplorerLib.denoisers import read_metadata, write_metadata
from InvarianceExplorerLib.evaluation import MODEL_CARD, model_card
from InvarianceExplorerLib.fidelity import invariance_fidelity
from InvarianceExplorerLib.sampler import Refinement, load_invariance_models


#: Figures measured anew rather than reproduced (their definition is newer than some cards).
RENEWED = ("stripes",)


def numbers(figures: dict, prefix: str = "") -> dict:
    """The numeric leaves of a figures dict, by dotted name (``bars`` and ``measured_on`` left out)."""
    out = {}
    for key, value in figures.items():
        if key in ("bars", "measured_on", "not_measured"):
            continue
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


def unrefined_view(figures: dict) -> dict:
    """``figures`` as a card measured without refinement would hold them: the figures of the
    unrefined samples in place of the refined, and the refined ones as its ``alternative``."""
    plain = figures["alternative"]
    assert not any(plain["refinement"].values())
    view = {k: v for k, v in figures.items() if k != "alternative"}
    view.update({k: plain[k] for k in ("refinement", "consistency", "noise_baseline", "change_hu",
                                       "output_change_hu")})
    view["diversity"] = {**figures["diversity"], "pairwise_hu": plain["pairwise_hu"]}
    view["alternative"] = {"refinement": figures["refinement"], "pairwise_hu": figures["diversity"]["pairwise_hu"],
                           **{k: figures[k] for k in ("consistency", "noise_baseline", "change_hu",
                                                      "output_change_hu")}}
    return view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders with invariance models")
    parser.add_argument("--data", required=True, help="the data set the card was measured on (its path here)")
    parser.add_argument("--write", action="store_true", help="store the new figures when the old ones reproduce")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="relative difference that still reproduces (beside 1e-4 absolute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--refinement", type=Refinement.parse, default=None, metavar="CENTRE,SAMPLE",
                        help="measure with this consistency refinement, new to the card (module docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    failed = False
    with tempfile.TemporaryDirectory() as scratch:  # new figures, copied once reproduced
        for folder in map(Path, args.models):
            metadata = read_metadata(folder)
            old = metadata["invariance"]["fidelity"]
            on = old["measured_on"]
            models = load_invariance_models(folder)
            if args.refinement is not None:
                if old.get("refinement") and any(old["refinement"].values()):
                    raise SystemExit(f"{folder}: its card was measured with a refinement already "
                                     f"({old['refinement']})")
                models.refinement = args.refinement
            drawn = args.refinement and args.write and old.get("figure")
            figure = Path(scratch) / f"{folder.name}.png" if drawn else None
            new = invariance_fidelity(models, args.data, on["split"], slices=on["slices"],
                                      per_slice=on["patches"] // on["slices"], count=on["invariances_per_patch"],
                                      seed=on["seed"], device="cpu", figure=figure)
            a = numbers({k: v for k, v in old.items() if k not in RENEWED})
            b = numbers(unrefined_view(new) if args.refinement else new)
            worst, reproduced = 0.0, a.keys() <= b.keys()  # a card figure the engine no longer gives: not reproduced
            print(f"{folder}: {on['patches']} patches of {on['slices']} {on['split']} slices, "
                  f"{on['invariances_per_patch']} invariances each, seed {on['seed']}")
            for name in sorted(a.keys() | b.keys()):
                was, now = a.get(name), b.get(name)
                if was is not None and now is not None and not (math.isnan(was) and math.isnan(now)):
                    worst = max(worst, abs(now - was) / max(abs(was), 1e-12))
                    reproduced &= math.isclose(now, was, rel_tol=args.tolerance, abs_tol=1e-4)
                print(f"    {name:45s} card {'–' if was is None else f'{was:.6g}':>12}   now "
                      f"{'–' if now is None else f'{now:.6g}':>12}")
            print(f"    largest relative difference {worst:.2e}: {'reproduced' if reproduced else 'NOT reproduced'}")
            alt = new["alternative"]
            print(f"    now {new['refinement']} (C' {new['consistency_noise']:.4f}): C {new['consistency']:.4f}, B "
                  f"{new['noise_baseline']:.4f}, mean|x~ - x| {new['change_hu']:.2f} HU, mean|f(x~) - f(x)| "
                  f"{new['output_change_hu']:.2f} HU, diversity {new['diversity']['pairwise_hu']:.2f} HU, spread C "
                  f"{new['spread']['consistency']:.4f}; with "
                  f"{alt['refinement']}: C {alt['consistency']:.4f}, B {alt['noise_baseline']:.4f}, mean|x~ - x| "
                  f"{alt['change_hu']:.2f} HU, mean|f(x~) - f(x)| {alt['output_change_hu']:.2f} HU, diversity "
                  f"{alt['pairwise_hu']:.2f} HU, spread C {alt['spread_consistency']:.4f}")
            if args.write and reproduced:
                new["measured_on"]["data"] = on["data"]
                if old.get("figure"):
                    new["figure"] = old["figure"]
                    if figure is not None:
                        shutil.copyfile(figure, folder / old["figure"])
                if args.refinement is not None:
                    metadata["invariance"]["refinement"] = args.refinement.as_dict()
                metadata["invariance"]["fidelity"] = new
                write_metadata(folder, metadata)
                (folder / MODEL_CARD).write_text(model_card(read_metadata(folder)))
                print(f"    written: {folder / 'metadata.json'}, {folder / MODEL_CARD}")
            failed |= args.write and not reproduced
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
