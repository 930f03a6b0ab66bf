"""Copy part of a simulated data set, with the same patient split, to carry it to another machine.

The copy's manifest lists only the chosen items but keeps the original ``count``, so
:func:`~InvarianceExplorerLib.datasets.split_patients` splits its patients exactly as in the
whole set (no test item moves into training). Chosen: the ``--val`` validation and ``--test``
test slices that the trainings would pick from the whole set (evenly spaced, as
``split_indices`` picks them), and evenly spaced training slices until ``--megabytes`` of pair
files are reached. Used to send training data to the GPU machine, whose transfers are limited
(64 MiB with the repository); the models trained there say which items they saw.

    python benchmarks/subset_data.py --data data/sim512 --out devdata/sim512 --megabytes 40
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from InvarianceExplorerLib.datasets import split_indices
from InvarianceExplorerLib.simulated_dataset import MANIFEST, SimulatedDataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="simulated data set (data simulate)")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the subset (must not exist)")
    parser.add_argument("--megabytes", type=float, required=True, help="total size of the copied pair files (MB)")
    parser.add_argument("--val", type=int, default=8, help="validation slices (default 8)")
    parser.add_argument("--test", type=int, default=4, help="test slices (default 4)")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new folder")
    source = SimulatedDataset(args.data)
    size = lambda i: (source.root / source.items[i]["file"]).stat().st_size  # noqa: E731
    chosen = split_indices(source, "val", args.val) + split_indices(source, "test", args.test)
    budget = args.megabytes * 1e6 - sum(size(i) for i in chosen)
    train = split_indices(source, "train")
    mean = np.mean([size(i) for i in train])
    for n in range(len(train), 0, -1):  # the most evenly spaced training slices that fit
        picked = [train[k] for k in np.linspace(0, len(train) - 1, n).round().astype(int)]
        if sum(size(i) for i in picked) <= budget:
            break
    else:
        raise SystemExit(f"--megabytes {args.megabytes}: not even one training slice ({mean / 1e6:.2f} MB) fits")
    chosen = sorted(set(chosen) | set(picked))
    manifest = dict(source.manifest)
    manifest["items"] = [source.items[i] for i in chosen]
    manifest["count"] = int(source.manifest.get("count", len(source.items)))  # keeps the split
    manifest["subset_of"] = {"data": str(args.data), "items": chosen, "training_slices": len(picked),
                             "training_slices_in_whole_set": len(train),
                             "command": f"python benchmarks/subset_data.py --data {args.data} --out {args.out} "
                                        f"--megabytes {args.megabytes} --val {args.val} --test {args.test}"}
    temporary = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    for i in chosen:
        target = temporary / source.items[i]["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.root / source.items[i]["file"], target)
    with open(temporary / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    temporary.rename(args.out)
    total = sum(size(i) for i in chosen) / 1e6
    print(f"{args.out}: {len(chosen)} slices ({len(picked)} of {len(train)} training, {args.val} validation, "
          f"{args.test} test), {total:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
