"""Train the nodule-blind denoiser of the planted benchmark: a bundled denoiser (``--base``:
CNN-10, or RED-CNN as the issue names) fine-tuned on the targets of ``nodule_blind_data.py``
(lung nodules below 5 mm erased from full dose).

Small nodules cover about 70 pixels of a 512² slice, so uniformly drawn patches almost never
show one; here three quarters of every batch are patches around a small nodule of the
training split (centre jittered by up to a quarter patch), the rest drawn anywhere, with
random flips. Squared error in network units, weighted ``--erase-weight`` times on the erased
pixels (the rare pixels that carry the planted behaviour), Adam. Writes a model folder (``train denoiser``'s
shape) and prints how much of the small nodules it erases on the test split: the mean of
f(x) - full dose inside them, against the same for the bundled base denoiser and against the
HU a complete erasure gives (erased target - full dose). ``--precision bfloat16`` runs the
network in bfloat16 mixed precision (training.autocast), which pays for RED-CNN on a CPU.

    .venv/bin/python benchmarks/planted/train_nodule_blind.py --data data/sim512_nodule_blind \\
        --out runs/planted/nodule_blind_den --steps 2500 --lr 1e-3 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch


def _crop(image: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    h, w = image.shape
    r0 = int(np.clip(row - size // 2, 0, h - size))
    c0 = int(np.clip(col - size // 2, 0, w - size))
    return image[r0:r0 + size, c0:c0 + size]


def small_nodules(source, indices, max_diameter_mm: float):
    """``(item index, row, col, nodule index)`` of every nodule below ``max_diameter_mm``."""
    out = []
    for index in indices:
        with np.load(source.root / source.items[index]["file"]) as z:
            nodule_map = z["nodule_map"]
        for nodule in source.items[index].get("nodules", []):
            if nodule["diameter_mm"] < max_diameter_mm:
                rows, cols = np.nonzero(nodule_map == nodule["index"])
                if rows.size:
                    out.append((index, int(rows.mean()), int(cols.mean()), nodule["index"]))
    return out


def erasure(denoisers: dict, source, original, indices, max_diameter_mm: float) -> dict:
    """Mean HU inside the small nodules of ``indices``: f(x) - original full dose per
    denoiser, and erased target - original full dose (a complete erasure)."""
    from InvarianceExplorerLib.inference import denoise

    sums = {name: [] for name in (*denoisers, "complete erasure")}
    for index in indices:
        item, full = source[index], original[index].full_dose
        small = [n["index"] for n in source.items[index].get("nodules", []) if n["diameter_mm"] < max_diameter_mm]
        mask = np.isin(item.nodule_map, small)
        if not mask.any():
            continue
        low = item.images()[0]
        for name, denoiser in denoisers.items():
            sums[name].append(float((denoise(denoiser, low, device="cpu").array - full)[mask].mean()))
        sums["complete erasure"].append(float((item.full_dose - full)[mask].mean()))
    return {name: round(float(np.mean(v)), 1) for name, v in sums.items()}


def main(argv=None) -> None:
    from InvarianceExplorerLib.training import PRECISIONS, autocast

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the nodule-blind data set (nodule_blind_data.py)")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-diameter", type=float, default=5.0)
    parser.add_argument("--erase-weight", type=float, default=10.0,
                        help="weight of the squared error on erased pixels (others: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--base", choices=["cnn10", "redcnn"], default="cnn10", help="bundled denoiser to fine-tune")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="float32")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from InvarianceExplorerLib.datasets import open_source, split_indices
    from InvarianceExplorerLib.denoisers import load_denoiser, read_metadata, save_denoiser, write_metadata
    from InvarianceExplorerLib.devices import machine

    source = open_source(args.data)
    original = open_source(source.manifest["derived"]["from"])
    bundled = load_denoiser(args.base)
    network = copy.deepcopy(bundled.network).float().train().requires_grad_(True)
    norm = bundled.normalization
    train = split_indices(source, "train")
    nodules = small_nodules(source, train, args.max_diameter)
    cache = {}

    def pair(index):
        if index not in cache:
            item = source[index]
            erased = (np.abs(item.full_dose - original[index].full_dose) > 0.5).astype(np.float32)
            cache[index] = (norm.normalize(item.low_dose), norm.normalize(item.full_dose),
                            1.0 + (args.erase_weight - 1.0) * erased)
        return cache[index]

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    p, started, losses = args.patch_size, time.perf_counter(), []
    for step in range(args.steps):
        xs, ys, ws = [], [], []
        for k in range(args.batch_size):
            if k < 3 * args.batch_size // 4:
                index, row, col, _ = nodules[rng.integers(len(nodules))]
                row, col = (v + int(rng.integers(-p // 4, p // 4 + 1)) for v in (row, col))
            else:
                index = train[rng.integers(len(train))]
                row, col = (int(rng.integers(p // 2, 512 - p // 2)) for _ in range(2))
            low, full, weight = pair(index)
            x, y, w = (_crop(a, row, col, p) for a in (low, full, weight))
            if rng.random() < 0.5:
                x, y, w = x[:, ::-1], y[:, ::-1], w[:, ::-1]
            xs.append(x.copy())
            ys.append(y.copy())
            ws.append(w.copy())
        x, y, w = (torch.from_numpy(np.stack(a))[:, None] for a in (xs, ys, ws))
        with autocast(torch.device("cpu"), args.precision):
            out = network(x)
        loss = (w * (out.float() - y) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            print(f"step {step + 1}: mse {np.mean(losses[-250:]):.3g}", flush=True)
    network.eval().requires_grad_(False)
    seconds = time.perf_counter() - started
    record = {"training": {"scheme": f"fine-tune of the bundled {args.base} on nodule-erased targets (planted benchmark)",
                           "precision": args.precision,
                           "data": {"kind": "simulated", "path": str(args.data),
                                    "pixel_spacing_mm": float(source.manifest["parameters"]["spacing_mm"])},
                           "steps": args.steps, "batch_size": args.batch_size,
                           "patch_size": p, "lr": args.lr, "nodule_share": 0.75, "erase_weight": args.erase_weight,
                           "small_nodules": len(nodules),
                           "wall_time_s": round(seconds, 1), "machine": machine()},
              "patch_size": p}
    folder = save_denoiser(args.out, network, args.base, bundled.metadata["architecture"].get("arguments", {}), norm,
                           record)
    test = split_indices(source, "test")
    result = erasure({f"bundled {args.base}": bundled, "nodule-blind": load_denoiser(folder)}, source, original, test,
                     args.max_diameter)
    metadata = read_metadata(folder)
    metadata["erasure_hu"] = result
    write_metadata(folder, metadata)
    print(json.dumps({"mean HU of f(x) - full dose inside small test nodules": result, "seconds": round(seconds)}))


if __name__ == "__main__":
    main()
