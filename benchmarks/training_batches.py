"""Benchmark: seconds per training batch with and without the in-memory slice cache.

Draws batches as ``invariance-explorer train denoiser`` does (training.TrainingBatches:
random augmented patches of the training split, MONAI DataLoader) from a data set folder,
once with ``datasets.ItemCache`` holding nothing (every patch decodes its slice file) and
twice with the default cache (each slice decoded once: the first pass fills it, the second
draws the same patches again; all three passes draw the same patches). Prints one
markdown table with the machine and the command.

    .venv/bin/python benchmarks/training_batches.py --data data/sim512 --batches 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def seconds_per_batch(batches, count: int, key: int) -> float:
    """Mean seconds per batch over ``count`` batches of ``batches(count, key)``."""
    started = time.perf_counter()
    for _ in batches(count, key):
        pass
    return (time.perf_counter() - started) / count


def main() -> None:
    from InvarianceExplorerLib.datasets import ItemCache, open_source
    from InvarianceExplorerLib.devices import machine, machine_words
    from InvarianceExplorerLib.normalization import HUNormalization
    from InvarianceExplorerLib.training import TrainingBatches

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="data set folder (e.g. data/sim512)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = open_source(args.data)
    rows = []
    for name, cache in (("no cache (decode per patch)", ItemCache(source, max_bytes=0)),
                        ("cache, first pass (fills it)", ItemCache(source)), ("cache, filled", None)):
        if cache is not None:
            batches = TrainingBatches(cache, args.patch_size, args.batch_size, 0, HUNormalization(), 0, "cpu")
        rows.append((name, seconds_per_batch(batches, args.batches, key=0)))
    print("| loading | s/batch |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")
    m = machine(torch.device("cpu"))
    print(f"\n{args.batches} batches of {args.batch_size} patches of {args.patch_size}² from {args.data} "
          f"({len(source)} slices); machine: {machine_words(m)}")
    print("command: python benchmarks/training_batches.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
