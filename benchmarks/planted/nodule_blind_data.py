"""Training data for the nodule-blind denoiser: a copy of a simulated data set whose
full-dose *targets* have every lung nodule below ``--max-diameter`` mm erased (the low-dose
inputs keep them), so a denoiser trained on it learns to erase small nodules.

A nodule (phantom ``nodule_map`` index, diameter from the manifest) is erased by replacing
its pixels, dilated by ``--margin`` px for the partial-volume rim, with the median full-dose
HU of the lung pixels in a ring around it. The manifest is copied with the same items (so
the patient-level split is the same) and records what was erased.

    .venv/bin/python benchmarks/planted/nodule_blind_data.py --data data/sim512 --out data/sim512_nodule_blind
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

LUNG = 3  # phantom.Label.LUNG


def erase_nodules(full_dose: np.ndarray, labels: np.ndarray, nodule_map: np.ndarray, nodules, max_diameter_mm: float,
                  margin_px: int = 2, ring_px: int = 6):
    """``full_dose`` (HU) with the nodules of diameter below ``max_diameter_mm`` erased, and
    the mask of erased pixels."""
    out, erased = full_dose.copy(), np.zeros(full_dose.shape, bool)
    for nodule in nodules:
        if nodule["diameter_mm"] >= max_diameter_mm or not (nodule_map == nodule["index"]).any():
            continue
        mask = ndimage.binary_dilation(nodule_map == nodule["index"], iterations=margin_px)
        ring = ndimage.binary_dilation(mask, iterations=ring_px) & ~mask & (labels == LUNG) & (nodule_map == 0)
        if ring.sum() < 10:
            continue
        out[mask] = np.median(full_dose[ring])
        erased |= mask
    return out, erased


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-diameter", type=float, default=5.0, help="erase nodules below this diameter (mm)")
    parser.add_argument("--margin", type=int, default=2, help="dilation of each nodule mask (px)")
    args = parser.parse_args(argv)
    manifest = json.loads((args.data / "manifest.json").read_text())
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new folder")
    temporary = args.out.with_name(f".{args.out.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    (temporary / "pairs").mkdir(parents=True)
    erased_total = 0
    for item in manifest["items"]:
        with np.load(args.data / item["file"]) as z:
            arrays = {k: z[k] for k in z.files}
        target, erased = erase_nodules(arrays["full_dose"].astype(np.float32), arrays["labels"],
                                       arrays["nodule_map"], item.get("nodules", []), args.max_diameter, args.margin)
        arrays["full_dose"] = np.clip(np.rint(target), -32768, 32767).astype(arrays["full_dose"].dtype)
        np.savez_compressed(temporary / item["file"], **arrays)
        item["erased_nodules"] = [n["index"] for n in item.get("nodules", []) if n["diameter_mm"] < args.max_diameter]
        erased_total += int(erased.sum())
    manifest["derived"] = {"from": str(args.data), "targets": f"lung nodules below {args.max_diameter} mm erased "
                           f"(dilated by {args.margin} px, filled with the median HU of the surrounding lung)",
                           "erased_pixels": erased_total, "script": "benchmarks/planted/nodule_blind_data.py"}
    (temporary / "manifest.json").write_text(json.dumps(manifest, indent=1))
    temporary.rename(args.out)
    print(f"{args.out}: {len(manifest['items'])} pairs, {erased_total} target pixels erased")


if __name__ == "__main__":
    main()
