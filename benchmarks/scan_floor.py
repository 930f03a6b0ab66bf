"""Benchmark: the rescan floor estimated from x alone against the one rescans give.

Method A on refined invariances needs regions to exceed ``u`` times the filtered noise std of
a rescan difference x' - x (:func:`~InvarianceExplorerLib.analysis.scan_floor`). Without
scans it is estimated from x and the model folder's noise texture
(:func:`~InvarianceExplorerLib.analysis.estimated_scan_floor`). For held-out test patches
(:func:`~InvarianceExplorerLib.fidelity.held_out_patches`, 2 per slice) of a simulated data
set, ``--scans`` fresh quarter-dose scans of each patch's slice give the measured floor; the
texture is that of the data set's training noise
(:func:`~InvarianceExplorerLib.training.data_noise_texture`, as the bundled folders store it).
Prints per patch the reference filter width and the median over the patch of both floors and
their ratio (above 1: the estimate is conservative, fewer regions pass), then the range; and
the same ratio over the patch's lung pixels and over the rest (full dose below / above
``--lung-hu``), since the noise is measured where soft tissue is.

    .venv/bin/python benchmarks/scan_floor.py --data data/sim512 --slices 8 --scans 8
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from InvarianceExplorerLib.analysis import estimated_scan_floor, reference_sigma_px, scan_floor
from InvarianceExplorerLib.datasets import open_source
from InvarianceExplorerLib.devices import machine, machine_words
from InvarianceExplorerLib.fidelity import another_realisation, held_out_patches
from InvarianceExplorerLib.noise import NoiseTexture
from InvarianceExplorerLib.training import data_noise_texture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="simulated data set (test split; texture from its train split)")
    parser.add_argument("--slices", type=int, default=8, help="test slices, 2 patches each (default 8)")
    parser.add_argument("--patch", type=int, default=128, help="patch size in pixels (default 128)")
    parser.add_argument("--scans", type=int, default=8, help="fresh scans per slice (default 8)")
    parser.add_argument("--lung-hu", type=float, default=-400.0, help="lung: full dose below this (HU)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    m = machine()
    print(f"machine: {machine_words(m)}")
    source = open_source(args.data)
    texture = NoiseTexture.from_dict(data_noise_texture(source))
    patches = held_out_patches(source, "test", args.patch, slices=args.slices, per_slice=2)
    ratios, by_tissue, scans = [], {"lung": [], "rest": []}, {}
    for patch in patches:
        if patch.index not in scans:
            scans[patch.index] = [another_realisation(source, patch.index, 7000 + j) for j in range(args.scans)]
        rescans = np.stack([patch.crop(s) for s in scans[patch.index]]).astype(np.float64)
        x = patch.low_dose.astype(np.float64)
        spacing = tuple(float(v) for v in source[patch.index].spacing[:2])
        sigma_px = reference_sigma_px(rescans - x[None], spacing)
        measured_map = scan_floor(rescans, x, sigma_px)
        estimated_map = estimated_scan_floor(x, sigma_px, spacing, texture)
        measured, estimated = float(np.median(measured_map)), float(np.median(estimated_map))
        ratios.append(estimated / measured)
        lung = patch.full_dose < args.lung_hu
        tissue = ""
        for name, mask in (("lung", lung), ("rest", ~lung)):
            if mask.mean() >= 0.1:  # at least a tenth of the patch
                by_tissue[name].append(float(np.median(estimated_map[mask]) / np.median(measured_map[mask])))
                tissue += f", {name} ({mask.mean():.0%}) {by_tissue[name][-1]:.2f}"
        print(f"slice {patch.index} centre {patch.center}: filter {sigma_px:.2f} px, floor (HU, median) from "
              f"{args.scans} rescans {measured:.2f}, estimated from x {estimated:.2f}, ratio {ratios[-1]:.2f}{tissue}")
    print(f"{len(ratios)} patches: estimated / measured floor {min(ratios):.2f} to {max(ratios):.2f}, "
          f"median {np.median(ratios):.2f}")
    for name, values in by_tissue.items():
        if values:
            print(f"    {name} pixels ({len(values)} patches with a tenth or more): {min(values):.2f} to "
                  f"{max(values):.2f}, median {np.median(values):.2f}")


if __name__ == "__main__":
    main()
