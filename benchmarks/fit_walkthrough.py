"""The README's "Your own denoiser" walk-through, timed: export the bundled CNN-10 as a
TorchScript file (standing for the user's network), run ``invariance-explorer fit`` on it
with a budget, and print the wall time and the held-out figures from the model folder.

    .venv/bin/python benchmarks/fit_walkthrough.py --data data/sim512 --budget 10m --threads 1

Writes ``OUT`` (default ``runs/fit_walkthrough/model``; its work folder beside it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="simulated data set (data simulate)")
    parser.add_argument("--budget", default="10m", help="fit --budget (default 10m)")
    parser.add_argument("--out", type=Path, default=Path("runs/fit_walkthrough/model"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from InvarianceExplorerLib.cli import main as cli
    from InvarianceExplorerLib.denoisers import load_denoiser
    from InvarianceExplorerLib.devices import machine, resolve_device

    args.out.parent.mkdir(parents=True, exist_ok=True)
    for old in (args.out, args.out.with_name(args.out.name + ".work")):
        shutil.rmtree(old, ignore_errors=True)
    script = args.out.parent / "my_denoiser.pt"
    torch.jit.save(torch.jit.script(load_denoiser("cnn10").network.float()), str(script))
    started = time.perf_counter()
    code = cli(["fit", "--denoiser", str(script), "--normalization", "paper", "--data", str(args.data), "--out",
                str(args.out), "--budget", args.budget, "--device", args.device, "--no-progress"])
    seconds = time.perf_counter() - started
    if code:
        raise SystemExit(code)
    metadata = json.loads((args.out / "metadata.json").read_text())
    fidelity = metadata["invariance"]["fidelity"]
    print(json.dumps({"budget": args.budget, "wall_time_min": round(seconds / 60, 1), "plan": metadata["fit"]["plan"],
                      "consistency_C": round(fidelity["consistency"], 3),
                      "noise_baseline_B": fidelity["noise_baseline"] and round(fidelity["noise_baseline"], 3),
                      "diversity_hu": round(fidelity["diversity"]["pairwise_hu"], 2),
                      "machine": machine(resolve_device(args.device))}, indent=1))


if __name__ == "__main__":
    main()
