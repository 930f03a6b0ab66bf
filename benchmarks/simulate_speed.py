"""Benchmark: time to build simulated LD/FD training pairs (chest phantom + fan-beam scan).

Target (foundation issue): 2000 pairs at 256x256 in under 15 minutes on 2 CPU cores,
i.e. at most 0.45 s per pair. Builds ``--count`` pairs in a temporary folder with the
same code as ``invariance-explorer data simulate`` and prints one markdown table row.

    .venv/bin/python benchmarks/simulate_speed.py --count 64 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from InvarianceExplorerLib.devices import machine, machine_words
from InvarianceExplorerLib.simulated_dataset import build_simulated_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        build_simulated_dataset(out, 8, size=args.size, seed=999, device=args.device, progress=False)  # warm-up
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        build_simulated_dataset(out, args.count, size=args.size, seed=0, device=args.device, progress=False)
        seconds = time.perf_counter() - start
    per_pair = seconds / args.count
    m = machine()
    print(f"machine: {machine_words(m)}")
    print("| machine | device | threads | size | pairs | s per pair | 2000 pairs (min) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {m['cpu']} | {args.device} | {args.threads} | {args.size} | {args.count} | "
          f"{per_pair:.3f} | {per_pair * 2000 / 60:.1f} |")


if __name__ == "__main__":
    main()
