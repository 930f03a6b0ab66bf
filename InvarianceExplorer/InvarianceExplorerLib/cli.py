"""``invariance-explorer``: the engine on the command line (files in, files out).

Commands:
    demo            simulate a low-dose chest slice and write NRRD + PNG (bundled data only)
    data simulate   write a paired low-/full-dose training set of simulated chest slices
    data lowdose    simulate a low-dose scan of a user's full-dose CT (file or DICOM folder)
    train denoiser  train CNN-10, RED-CNN, WGAN-VGG or DU-GAN on paired data (resumable)
    denoise         denoise a CT image or volume with a bundled or trained denoiser

Errors in the user's input are reported in one line (what was wrong and what to do) with
exit status 2; nothing is written in that case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def _dose(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"dose is a fraction of full dose in (0, 1], e.g. 0.25 for quarter dose; got {text}")
    return value


def _add_scan_options(p: argparse.ArgumentParser) -> None:
    from .lowdose import FILTERS

    p.add_argument("--dose", type=_dose, default=0.25, help="dose fraction of full dose (default 0.25: quarter dose)")
    p.add_argument("--photons", type=float, default=None, help="full-dose incident quanta per ray (default: simulator's)")
    p.add_argument("--filter", choices=FILTERS, default="hann", help="FBP apodisation filter (default hann)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or auto (default cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invariance-explorer", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="simulate a low-dose chest slice; write NRRD and PNG")
    demo.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="phantom and noise seed")
    demo.add_argument("--size", type=_positive_int, default=512, help="slice size in pixels (default 512)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_options(demo)
    demo.set_defaults(func=_cmd_demo)

    data = sub.add_parser("data", help="training data: simulate pairs, simulate low dose")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    sim = data_sub.add_parser("simulate", help="write N paired LD/FD simulated chest slices with labels and a manifest")
    sim.add_argument("--count", type=_positive_int, required=True, help="number of pairs (one phantom 'patient' each)")
    sim.add_argument("--size", type=_positive_int, default=256, help="slice size in pixels (default 256)")
    sim.add_argument("--spacing", type=float, default=None,
                     help="pixel size in mm (default: 0.7 * 512 / size, a 358 mm field of view)")
    sim.add_argument("--seed", type=int, default=0, help="base seed; item i depends only on it and i")
    sim.add_argument("--contrast-fraction", type=float, default=0.0, help="fraction of phantoms with contrast-enhanced blood")
    sim.add_argument("--out", type=Path, required=True, help="output folder (resumes a partial set with the same parameters)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_options(sim)
    sim.set_defaults(func=_cmd_data_simulate)

    low = data_sub.add_parser("lowdose", help="simulate a low-dose scan of a full-dose CT (slice by slice)")
    low.add_argument("--input", type=Path, required=True, help="full-dose CT: NRRD/NIfTI/MHA file, DICOM file or series folder")
    low.add_argument("--output", type=Path, required=True, help="low-dose CT to write (.nrrd)")
    low.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder holds several series")
    low.add_argument("--hu-offset", type=float, default=0.0, help="add to the stored values to get HU (e.g. -1024)")
    low.add_argument("--seed", type=int, default=0, help="noise seed")
    low.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_options(low)
    low.set_defaults(func=_cmd_data_lowdose)

    _add_train_denoiser(sub)
    _add_denoise(sub)
    return parser


def _add_train_denoiser(sub) -> None:
    from .denoisers import DENOISERS, WEIGHT_DTYPES

    train = sub.add_parser("train", help="train networks: denoisers")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    den = train_sub.add_parser("denoiser", help="train a denoiser on paired LD/FD data; checkpoints every epoch")
    den.add_argument("--arch", choices=list(DENOISERS), required=True, help="denoiser architecture")
    den.add_argument("--data", type=Path, required=True, help="simulated data set folder or paired DICOM folder")
    den.add_argument("--out", type=Path, required=True, help="run folder (checkpoints/, history.json, model/)")
    den.add_argument("--epochs", type=_positive_int, default=10, help="total epochs (default 10)")
    den.add_argument("--steps-per-epoch", type=_positive_int, default=500, help="batches per epoch (default 500)")
    den.add_argument("--batch-size", type=_positive_int, default=16, help="patches per batch (default 16)")
    den.add_argument("--patch-size", type=_positive_int, default=128, help="patch side in pixels (default 128)")
    den.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the architecture's)")
    den.add_argument("--lr-decay", type=float, default=None,
                     help="multiply the learning rate by this factor every epoch from --lr-decay-start on (default: constant)")
    den.add_argument("--lr-decay-start", type=_positive_int, default=1,
                     help="first epoch with a decayed learning rate (default 1)")
    den.add_argument("--seed", type=int, default=0, help="seed of weights, patches and every random draw")
    den.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    den.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda (default auto)")
    den.add_argument("--num-workers", type=int, default=0, help="data loader processes (default 0)")
    den.add_argument("--val-slices", type=_positive_int, default=32, help="validation slices per epoch (default 32)")
    den.add_argument("--weights-dtype", choices=list(WEIGHT_DTYPES), default="float32",
                     help="storage of the exported weights (default float32)")
    den.add_argument("--feature-network", type=Path, default=None,
                     help="WGAN-VGG: reuse the feature network of this model folder instead of training one")
    den.add_argument("--no-progress", action="store_true", help="no progress bars")
    den.set_defaults(func=_cmd_train_denoiser)


def _add_denoise(sub) -> None:
    den = sub.add_parser("denoise", help="denoise a CT image or volume (slice by slice); write NRRD")
    den.add_argument("--model", required=True, help="bundled denoiser name (cnn10, redcnn, wganvgg, dugan) or model folder")
    den.add_argument("--input", type=Path, required=True, help="CT: NRRD/NIfTI/MHA file, DICOM file or series folder")
    den.add_argument("--output", type=Path, required=True, help="denoised CT to write (.nrrd)")
    den.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder holds several series")
    den.add_argument("--hu-offset", type=float, default=0.0, help="add to the stored values to get HU (e.g. -1024)")
    den.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda (default auto)")
    den.add_argument("--batch-size", type=_positive_int, default=4, help="slices per forward pass (default 4)")
    den.add_argument("--tile-size", type=_positive_int, default=512,
                     help="slices larger than this many pixels are denoised in overlapping tiles (default 512)")
    den.add_argument("--no-progress", action="store_true", help="no progress bar")
    den.set_defaults(func=_cmd_denoise)


def _cmd_demo(args) -> int:
    """The data-pipeline demo: phantom -> physics -> NRRD (LD, FD, labels) + PNG figure."""
    import numpy as np
    from tqdm.auto import tqdm

    from .figures import LUNG_WINDOW, SOFT_TISSUE_WINDOW, save_png, tile_grid, window
    from .io import write_nrrd
    from .lowdose import LowDoseSimulator
    from .phantom import Label, chest_phantom

    spacing = 0.7 * 512 / args.size
    steps = tqdm(total=3, desc="demo", disable=args.no_progress)
    phantom = chest_phantom(args.seed, size=args.size, spacing=spacing)
    steps.update()
    sim = LowDoseSimulator(args.size, spacing, photons=args.photons, filter=args.filter, device=args.device)
    pair = sim.simulate(phantom.hu, dose=args.dose, seed=args.seed)
    steps.update()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    image = phantom.to_ctimage()
    files = {
        "low_dose": write_nrrd(image.with_array(pair.low_dose), out / "low_dose.nrrd"),
        "full_dose": write_nrrd(image.with_array(pair.full_dose), out / "full_dose.nrrd"),
        "labels": write_nrrd(image, out / "labels.nrrd", array=phantom.labels),
    }
    tiles = [[window(a, *w) for a in (pair.low_dose, pair.full_dose, pair.low_dose - pair.full_dose + w[0])]
             for w in (LUNG_WINDOW, SOFT_TISSUE_WINDOW)]
    labels = [[f"{n}, {wname} window" for n in (f"LD x{args.dose:g}", "FD", "LD-FD")] for wname in ("lung", "soft-tissue")]
    files["figure"] = save_png(tile_grid(tiles, labels), out / "low_dose_pair.png")
    soft = phantom.labels == Label.SOFT_TISSUE
    noise = {
        "noise_std_soft_tissue_hu": {
            "low_dose": float(np.std((pair.low_dose - pair.noiseless)[soft])),
            "full_dose": float(np.std((pair.full_dose - pair.noiseless)[soft])),
        },
        "dose": args.dose,
        "simulator": sim.describe(),
        "files": {k: os.fspath(v) for k, v in files.items()},
    }
    with open(out / "demo.json", "w") as f:
        json.dump(noise, f, indent=2)
    steps.update()
    steps.close()
    ns = noise["noise_std_soft_tissue_hu"]
    print(f"low-dose simulation of phantom seed {args.seed} ({args.size}x{args.size}, {spacing:.2f} mm): "
          f"soft-tissue noise {ns['low_dose']:.1f} HU at dose {args.dose:g}, {ns['full_dose']:.1f} HU at full dose")
    print(f"results in {out.resolve()}: low_dose.nrrd, full_dose.nrrd, labels.nrrd, low_dose_pair.png, demo.json")
    return 0


def _cmd_data_simulate(args) -> int:
    from .datasets import build_simulated_dataset

    manifest = build_simulated_dataset(
        args.out, args.count, size=args.size, spacing=args.spacing, dose=args.dose, seed=args.seed,
        contrast_fraction=args.contrast_fraction, photons=args.photons, filter=args.filter,
        device=args.device, progress=not args.no_progress)
    print(f"data set: {manifest}")
    return 0


def _cmd_data_lowdose(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from .io import CTInputError, read_image, write_nrrd
    from .lowdose import LowDoseSimulator

    image = read_image(args.input, series_uid=args.series_uid, hu_offset=args.hu_offset)
    if args.output.suffix.lower() != ".nrrd":
        raise CTInputError(args.output, "output must be a .nrrd file", "Choose a file name ending in .nrrd.")
    if args.input.exists() and args.output.exists() and args.input.resolve() == args.output.resolve():
        raise CTInputError(args.output, "output is the input file", "Write the low-dose CT to a new file.")
    ny, nx = image.array.shape[-2:]
    sx, sy = image.pixel_spacing
    if ny != nx or abs(sx - sy) > 1e-3 * sx:
        raise CTInputError(args.input, f"slices are {nx}x{ny} pixels of {sx:g}x{sy:g} mm, but the scan "
                           "simulation needs square slices with square pixels",
                           "Resample or crop the image to a square grid first (e.g. in 3D Slicer).")
    # a user's image may hold anatomy up to its corners: scan the whole square
    sim = LowDoseSimulator(nx, sx, photons=args.photons, filter=args.filter, device=args.device, cover_corners=True)
    stack = image.array[None] if image.is_slice else image.array
    out = np.empty_like(stack)
    for k in tqdm(range(stack.shape[0]), desc="simulating low dose", unit="slice", disable=args.no_progress):
        out[k] = sim.simulate(stack[k], dose=args.dose, seed=args.seed + k).low_dose
    write_nrrd(image.with_array(out[0] if image.is_slice else out), args.output)
    print(f"low-dose CT (dose {args.dose:g}) written to {args.output}")
    return 0


def _cmd_train_denoiser(args) -> int:
    from .train_denoiser import train_denoiser

    folder = train_denoiser(args.arch, args.data, args.out, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                            batch_size=args.batch_size, patch_size=args.patch_size, lr=args.lr, seed=args.seed,
                            resume=args.resume, device=args.device, num_workers=args.num_workers,
                            val_slices=args.val_slices, weights_dtype=args.weights_dtype,
                            feature_network=args.feature_network, progress=not args.no_progress,
                            hyperparameters=None if args.lr_decay is None else
                            {"lr_decay": args.lr_decay, "lr_decay_start": args.lr_decay_start})
    with open(folder / "metadata.json") as f:
        training = json.load(f)["training"]
    v = training["validation"]
    print(f"{args.arch}: best epoch {training['best_epoch']} of {training['epochs']}: validation RMSE "
          f"{v['rmse_hu']:.1f} HU (low dose {training['validation_low_dose']['rmse_hu']:.1f} HU), "
          f"PSNR {v['psnr_db']:.2f} dB, SSIM {v['ssim']:.4f}; model in {folder}")
    return 0


def _cmd_denoise(args) -> int:
    from tqdm.auto import tqdm

    from .denoisers import load_denoiser
    from .inference import denoise
    from .io import CTInputError, read_image, write_nrrd

    if args.output.suffix.lower() != ".nrrd":
        raise CTInputError(args.output, "output must be a .nrrd file", "Choose a file name ending in .nrrd.")
    if args.input.exists() and args.output.exists() and args.input.resolve() == args.output.resolve():
        raise CTInputError(args.output, "output is the input file", "Write the denoised CT to a new file.")
    denoiser = load_denoiser(args.model, device=args.device)
    image = read_image(args.input, series_uid=args.series_uid, hu_offset=args.hu_offset)
    bar = tqdm(total=1 if image.is_slice else image.array.shape[0], desc=f"denoising ({denoiser.arch})",
               unit="slice", disable=args.no_progress)
    result = denoise(denoiser, image, device=args.device, batch_size=args.batch_size, tile_size=args.tile_size,
                     progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    write_nrrd(result, args.output)
    print(f"denoised CT ({denoiser.arch}, {denoiser.folder}) written to {args.output}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``invariance-explorer`` and ``python -m InvarianceExplorerLib``."""
    from .io import CTInputError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CTInputError, ValueError) as exc:  # the user's input: one clear line, no traceback
        print(f"invariance-explorer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
