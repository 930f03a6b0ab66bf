"""The figures ``Testing/test_bundled_invariance.py`` checks, for any model folders.

Simulates the test suite's held-out slices (its base seed and count: quarter dose, 512² /
0.7 mm, as the training data) and measures :func:`~.fidelity.invariance_fidelity` there with
the suite's settings (two 128² patches per slice, 8 invariances each, the sampler's
refinement as the folder holds it, and the other setting beside), then prints what the
suite's bars judge: C and B refined and not, the diversity, and for the grid-free test the
periodicity of the samples' std (8 / 16 / 32 px) and their axis share. So a candidate model
folder is judged on the suite's slices before it replaces a bundled one.

    .venv/bin/python benchmarks/suite_fidelity.py Resources/Models/wganvgg runs/cpu_wganvgg_zpre_s2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from InvarianceExplorerLib.sampler import load_invariance_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
from test_bundled_invariance import simulate_held_out, suite_fidelity  # noqa: E402  (the suite's, one place)


def suite_figures(models, data) -> dict:
    """The suite's figures of loaded invariance models on its held-out slices ``data``."""
    f = suite_fidelity(models, data)
    plain = f["alternative"]
    return {"refinement": f["refinement"], "consistency": f["consistency"], "consistency_other": plain["consistency"],
            "other_refinement": plain["refinement"], "noise_baseline": f["noise_baseline"],
            "noise_baseline_other": plain["noise_baseline"], "pairwise_hu": f["diversity"]["pairwise_hu"],
            "pairwise_hu_other": plain["pairwise_hu"], "periodicity": f["stripes"]["periodicity"],
            "axis_share": f["stripes"]["invariances"]["axis_share"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders (or bundled names) with invariance models")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        data = simulate_held_out(folder)
        for name in args.models:
            print(name, json.dumps(suite_figures(load_invariance_models(name), data), indent=1), flush=True)


if __name__ == "__main__":
    main()
