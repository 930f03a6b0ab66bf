"""``demo``, ``data simulate`` and ``data lowdose``: simulated and low-dose CT."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .options import _add_scan_options, _at_most, _check_new_folder, _check_output_file, _positive_number, _seed


def _add_demo(demo) -> None:
    demo.add_argument("--out", type=Path, default=Path("results/phantom-demo"),
                      help="output folder: new, empty, or an earlier demo's (default results/phantom-demo)")
    demo.add_argument("--seed", type=_seed, default=0, help="phantom and noise seed (default 0)")
    demo.add_argument("--size", type=_at_most(4096), default=512, help="slice size in pixels (default 512)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_options(demo)
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    """The data-pipeline demo: phantom -> physics -> NRRD (LD, FD, labels) + PNG figure."""
    import numpy as np
    from tqdm.auto import tqdm

    from ..figures import LUNG_WINDOW, SOFT_TISSUE_WINDOW, save_png, tile_grid, window
    from ..io import write_nrrd, written_whole
    from ..lowdose import LowDoseSimulator
    from ..phantom import Label, chest_phantom

    out = args.out
    if not (out / "demo.json").is_file():  # a new folder, or an earlier demo's, which is replaced whole
        _check_new_folder(out, "demo")
    spacing = 0.7 * 512 / args.size
    steps = tqdm(total=3, desc="demo", disable=args.no_progress)
    phantom = chest_phantom(args.seed, size=args.size, spacing=spacing)
    steps.update()
    sim = LowDoseSimulator(args.size, spacing, photons=args.photons, filter=args.filter, device=args.device)
    pair = sim.simulate(phantom.hu, dose=args.dose, seed=args.seed)
    steps.update()
    image = phantom.to_ctimage()
    tiles = [[window(a, *w) for a in (pair.low_dose, pair.full_dose, pair.low_dose - pair.full_dose + w[0])]
             for w in (LUNG_WINDOW, SOFT_TISSUE_WINDOW)]
    labels = [[f"{n}, {wname} window" for n in (f"LD x{args.dose:g}", "FD", "LD-FD")] for wname in ("lung", "soft-tissue")]
    soft = phantom.labels == Label.SOFT_TISSUE
    names = {"low_dose": "low_dose.nrrd", "full_dose": "full_dose.nrrd", "labels": "labels.nrrd",
             "figure": "low_dose_pair.png"}
    noise = {
        "noise_std_soft_tissue_hu": {
            "low_dose": float(np.std((pair.low_dose - pair.noiseless)[soft])),
            "full_dose": float(np.std((pair.full_dose - pair.noiseless)[soft])),
        },
        "dose": args.dose,
        "simulator": sim.describe(),
        "files": {k: os.fspath(out / name) for k, name in names.items()},
    }
    with written_whole(out) as partial:  # whole or not at all (Ctrl-C, a full disk)
        write_nrrd(image.with_array(pair.low_dose), partial / names["low_dose"])
        write_nrrd(image.with_array(pair.full_dose), partial / names["full_dose"])
        write_nrrd(image, partial / names["labels"], array=phantom.labels)
        save_png(tile_grid(tiles, labels), partial / names["figure"])
        with open(partial / "demo.json", "w") as f:
            json.dump(noise, f, indent=2)
    steps.update()
    steps.close()
    ns = noise["noise_std_soft_tissue_hu"]
    print(f"low-dose simulation of phantom seed {args.seed} ({args.size}x{args.size}, {spacing:.2f} mm): "
          f"soft-tissue noise {ns['low_dose']:.1f} HU at dose {args.dose:g}, {ns['full_dose']:.1f} HU at full dose")
    print(f"results in {out.resolve()}: low_dose.nrrd, full_dose.nrrd, labels.nrrd, low_dose_pair.png, demo.json")
    return 0


def _add_data(data) -> None:
    data_sub = data.add_subparsers(dest="data_command", required=True)

    sim = data_sub.add_parser("simulate", help="write N paired LD/FD simulated chest slices with labels and a manifest")
    sim.add_argument("--count", type=_at_most(1_000_000), required=True,
                     help="number of pairs (one phantom 'patient' each)")
    sim.add_argument("--size", type=_at_most(4096), default=256, help="slice size in pixels (default 256)")
    sim.add_argument("--spacing", type=_positive_number, default=None,
                     help="pixel size in mm (default: 0.7 * 512 / size, a 358 mm field of view)")
    sim.add_argument("--seed", type=_seed, default=0, help="base seed; item i depends only on it and i (default 0)")
    sim.add_argument("--contrast-fraction", type=float, default=0.0, help="fraction of phantoms with contrast-enhanced blood")
    sim.add_argument("--out", type=Path, required=True, help="output folder (resumes a partial set with the same parameters)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_options(sim)
    sim.set_defaults(func=_cmd_data_simulate)

    low = data_sub.add_parser("lowdose", help="simulate a low-dose scan of a full-dose CT (slice by slice)",
                              description="Add to each slice of a full-dose CT the extra noise of a scan at --dose of "
                                          "its dose (projection-domain noise insertion: Poisson quanta thinned to "
                                          "the dose fraction, electronic noise, log, FBP), keeping the slice's "
                                          "resolution and its own noise. --photons is the full-dose scan's quanta "
                                          "per ray: it sets the level of the noise added.")
    low.add_argument("--input", type=Path, required=True, help="full-dose CT: NRRD/NIfTI/MHA file, DICOM file or series folder")
    low.add_argument("--output", type=Path, required=True, help="low-dose CT to write (.nrrd)")
    low.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder holds several series")
    low.add_argument("--hu-offset", type=float, default=0.0, help="add to the stored values to get HU (e.g. -1024)")
    low.add_argument("--seed", type=_seed, default=0, help="noise seed (default 0)")
    low.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_options(low)
    low.set_defaults(func=_cmd_data_lowdose)


def _cmd_data_simulate(args) -> int:
    from ..simulated_dataset import build_simulated_dataset

    manifest = build_simulated_dataset(
        args.out, args.count, size=args.size, spacing=args.spacing, dose=args.dose, seed=args.seed,
        contrast_fraction=args.contrast_fraction, photons=args.photons, filter=args.filter,
        device=args.device, progress=not args.no_progress)
    print(f"data set: {manifest}")
    return 0


def _cmd_data_lowdose(args) -> int:
    from tqdm.auto import tqdm

    from ..io import read_image, write_nrrd
    from ..lowdose import check_square_grid, insert_noise

    _check_output_file(args.output, args.input, "low-dose CT")  # before the volume is read
    image = read_image(args.input, series_uid=args.series_uid, hu_offset=args.hu_offset)
    check_square_grid(image.array.shape, image.pixel_spacing, args.input)
    low = insert_noise(image, args.dose, args.seed, photons=args.photons, filter=args.filter, device=args.device,
                       progress=lambda slices: tqdm(slices, desc="simulating low dose", unit="slice",
                                                    disable=args.no_progress))
    write_nrrd(low, args.output)
    print(f"low-dose CT (dose {args.dose:g}) written to {args.output}")
    return 0
