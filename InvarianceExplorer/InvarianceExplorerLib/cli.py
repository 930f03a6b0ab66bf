"""``invariance-explorer``: the engine on the command line (files in, files out).

Commands:
    demo            simulate a low-dose chest slice and write NRRD + PNG (bundled data only)
    data simulate   write a paired low-/full-dose training set of simulated chest slices
    data lowdose    simulate a low-dose scan of a user's full-dose CT (file or DICOM folder)
    train denoiser  train CNN-10, RED-CNN, WGAN-VGG or DU-GAN on paired data (resumable)
    train cvae      train the representation (cVAE) of a frozen denoiser (resumable, torchrun)
    train cinn      train the invariance flow (cINN) on a cVAE's codes (resumable, torchrun)
    fit             your own denoiser (TorchScript, MONAI bundle, class + state dict): check it,
                    fit its invariance models, write a model folder (resumable, torchrun)
    denoise         denoise a CT image or volume with a bundled or trained denoiser
    sample          sample the invariances of a denoiser for a patch around a voxel
    analyze         find the invariances that change anatomy in a sample output folder
    trust           let the code of an imported denoiser's model folder run on this machine

Errors in the user's input or files (unreadable, unwritable) are reported in one line (what was
wrong and what to do) with exit status 2; nothing is written in that case. Warnings print as one
line each; an interrupted command (Ctrl-C) exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import List, Optional

from . import __version__


def _whole_number(text: str, minimum: int = 0, maximum: Optional[int] = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum or (maximum is not None and value > maximum):
        meaning = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        raise argparse.ArgumentTypeError(f"must be {meaning}{f' up to {maximum}' if maximum else ''}; got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _at_most(maximum: int, minimum: int = 1):
    """An argparse type: a whole number from ``minimum`` to ``maximum`` (a bound that keeps
    a mistyped value from filling the memory)."""
    return lambda text: _whole_number(text, minimum, maximum)


def _seed(text: str) -> int:
    return _whole_number(text, 0, 2 ** 63 - 1)


def _positive_number(text: str, maximum: float = math.inf) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= maximum):
        bound = f" up to {maximum:g}" if maximum < math.inf else ""
        raise argparse.ArgumentTypeError(f"must be a positive finite number{bound}; got {text!r}")
    return value


def _hyperparameter(text: str) -> tuple:
    """``NAME=VALUE`` -> (name, value); the value is read as JSON (numbers, lists), else kept as text."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. disc_channels=32; got {text!r}")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}); give a JSON object such as "
                                         f"'{{\"width\": 8}}' (keys in double quotes); got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"give a JSON object such as '{{\"width\": 8}}'; got {text!r}")
    return value


def _dose(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"dose is a fraction of full dose in (0, 1], e.g. 0.25 for quarter dose; "
                                         f"got {text!r}")
    return value


def _add_scan_options(p: argparse.ArgumentParser) -> None:
    from .lowdose import FILTERS

    p.add_argument("--dose", type=_dose, default=0.25, help="dose fraction of full dose (default 0.25: quarter dose)")
    p.add_argument("--photons", type=_positive_number, default=None,
                   help="full-dose incident quanta per ray (default: simulator's)")
    p.add_argument("--filter", choices=FILTERS, default="hann", help="FBP apodisation filter (default hann)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or auto (default cpu)")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``invariance-explorer`` parser. With ``command`` (a name of :data:`COMMANDS`, or ""
    for none) only that command gets its arguments: each command's builder imports the engine
    modules its choices and defaults come from (which import torch), so ``--help``,
    ``--version`` and a mistyped command answer at once."""
    parser = argparse.ArgumentParser(prog="invariance-explorer", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (helptext, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext)
        if command is None or command == name:
            add_arguments(p)
    return parser


def _add_demo(demo) -> None:
    demo.add_argument("--out", type=Path, default=Path("results/phantom-demo"),
                      help="output folder: new, empty, or an earlier demo's (default results/phantom-demo)")
    demo.add_argument("--seed", type=_seed, default=0, help="phantom and noise seed (default 0)")
    demo.add_argument("--size", type=_at_most(4096), default=512, help="slice size in pixels (default 512)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_options(demo)
    demo.set_defaults(func=_cmd_demo)


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


def _add_train(train) -> None:
    from .denoisers import DENOISERS, WEIGHT_DTYPES
    from .training import PRECISIONS

    train_sub = train.add_subparsers(dest="train_command", required=True)
    den = train_sub.add_parser("denoiser", help="train a denoiser on paired LD/FD data; checkpoints every epoch")
    den.add_argument("--arch", choices=list(DENOISERS), required=True, help="denoiser architecture")
    den.add_argument("--data", type=Path, required=True, help="simulated data set folder or paired DICOM folder")
    den.add_argument("--out", type=Path, required=True, help="run folder (checkpoints/, history.json, model/)")
    den.add_argument("--epochs", type=_positive_int, default=10, help="total epochs (default 10)")
    den.add_argument("--steps-per-epoch", type=_positive_int, default=500, help="batches per epoch (default 500)")
    den.add_argument("--batch-size", type=_at_most(4096), default=16, help="patches per batch (default 16)")
    den.add_argument("--patch-size", type=_positive_int, default=128, help="patch side in pixels (default 128)")
    den.add_argument("--lr", type=_positive_number, default=None,
                     help="Adam learning rate (default: the architecture's)")
    den.add_argument("--lr-decay", type=float, default=None,
                     help="multiply the learning rate by this factor every epoch from --lr-decay-start on (default: constant)")
    den.add_argument("--lr-decay-start", type=_positive_int, default=1,
                     help="first epoch with a decayed learning rate (default 1)")
    den.add_argument("--seed", type=_seed, default=0, help="seed of weights, patches and every random draw (default 0)")
    den.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    den.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda (default auto)")
    den.add_argument("--num-workers", type=_whole_number, default=0, help="data loader processes (default 0)")
    den.add_argument("--val-slices", type=_positive_int, default=32, help="validation slices per epoch (default 32)")
    den.add_argument("--weights-dtype", choices=list(WEIGHT_DTYPES), default="float32",
                     help="storage of the exported weights (default float32)")
    den.add_argument("--precision", choices=list(PRECISIONS), default="float32",
                     help="arithmetic of the training steps: bfloat16 mixed precision is faster on CPUs with AMX "
                          "(1.6-2.7x per step measured, README) and on CUDA; validation stays float32 "
                          "(default float32)")
    den.add_argument("--feature-network", type=Path, default=None,
                     help="WGAN-VGG: reuse the feature network of this model folder instead of training one")
    den.add_argument("--init", type=Path, default=None, dest="initial_weights",
                     help="start from the denoiser weights of this model folder (same layers), e.g. a trained "
                          "RED-CNN for DU-GAN's generator")
    den.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", type=_hyperparameter,
                     help="override a training hyperparameter of the architecture (repeatable), e.g. "
                          "--set disc_channels=32")
    den.add_argument("--no-progress", action="store_true", help="no progress bars")
    den.set_defaults(func=_cmd_train_denoiser)
    _add_train_invariance(train_sub)


def _add_train_invariance(train_sub) -> None:
    """``train cvae`` and ``train cinn``: the invariance models of a frozen denoiser."""
    from .denoisers import WEIGHT_DTYPES
    from .dicom_dataset import DICOM_KINDS

    for kind, helptext in (("cvae", "train the representation (cVAE) of a frozen denoiser; checkpoints every epoch"),
                           ("cinn", "train the invariance flow (cINN) on the codes of a trained cVAE; checkpoints "
                                    "every epoch")):
        p = train_sub.add_parser(kind, help=helptext,
                                 description=helptext + ". Runs alone or under torchrun --nproc_per_node N "
                                 "(DistributedDataParallel; rank 0 writes).")
        if kind == "cvae":
            p.add_argument("--denoiser", required=True, metavar="NAME_OR_FOLDER",
                           help="the frozen denoiser f: bundled name (cnn10, redcnn, wganvgg, dugan) or model folder")
        else:
            p.add_argument("--denoiser", required=True, metavar="FOLDER",
                           help="model folder holding the denoiser and its cVAE (OUT/model of train cvae)")
        p.add_argument("--data", type=Path, required=True,
                       help="simulated data set folder, or DICOM folder with one folder per patient (paired or "
                            "low-dose only)")
        p.add_argument("--dicom", choices=DICOM_KINDS, default="auto",
                       help="how to read a DICOM --data folder: auto, paired, or low-dose (as for fit)")
        p.add_argument("--out", type=Path, required=True,
                       help="run folder: checkpoints/, history.json, validation/ and model/ (a copy of the "
                            "denoiser's folder with the new weights and model card)")
        p.add_argument("--epochs", type=_positive_int, default=10, help="total epochs (default 10)")
        p.add_argument("--steps-per-epoch", type=_positive_int, default=500,
                       help="batches per epoch and process (default 500)")
        p.add_argument("--batch-size", type=_at_most(4096), default=8 if kind == "cvae" else 32,
                       help=f"patches per batch and process (default {8 if kind == 'cvae' else 32})")
        if kind == "cvae":
            p.add_argument("--patch-size", type=_positive_int, default=128,
                           help="patch side in pixels, a multiple of 32 (default 128 as in the paper; e.g. 64)")
            p.add_argument("--feature-network", type=Path, default=None,
                           help="model folder whose feature network gives the perceptual term (default: the "
                                "denoiser's own if it ships one, else one is trained on tissue labels)")
        p.add_argument("--lr", type=_positive_number, default=None,
                       help="Adam learning rate (default: see train_invariance)")
        p.add_argument("--seed", type=_seed, default=0,
                       help="seed of weights, patches and every random draw (default 0)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        p.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda (default auto)")
        p.add_argument("--num-workers", type=_whole_number, default=0, help="data loader processes (default 0)")
        p.add_argument("--val-patches", type=_positive_int, default=32 if kind == "cvae" else 64,
                       help=f"held-out validation patches per epoch (default {32 if kind == 'cvae' else 64})")
        p.add_argument("--pool", type=_whole_number, default=0, metavar="N", dest="pool_patches",
                       help="draw batches from a fixed pool of N training patches per process whose f(x)"
                            + (" and encoder codes are" if kind == "cinn" else " is")
                            + " computed once (fast when f is slow, e.g. RED-CNN on a CPU; default 0: fresh "
                              "patches every step)")
        p.add_argument("--fidelity-slices", type=_whole_number, default=8,
                       help="test slices for the fidelity figures of the model card (0: none; default 8)")
        if kind == "cinn":
            _add_refinement(p, "written into the model folder (default: none)")
        p.add_argument("--weights-dtype", choices=list(WEIGHT_DTYPES), default="float32",
                       help="storage of the exported weights (default float32)")
        p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", type=_hyperparameter,
                       help=f"override a {kind} hyperparameter (repeatable), e.g. "
                            + ("--set z_dim=128 --set lam_adv=0.01" if kind == "cvae" else "--set n_flows=8"))
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(func=_cmd_train_cvae if kind == "cvae" else _cmd_train_cinn)


def _cmd_train_cvae(args) -> int:
    from .train_invariance import train_cvae

    folder = train_cvae(args.denoiser, args.data, args.out, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                        batch_size=args.batch_size, patch_size=args.patch_size, lr=args.lr, seed=args.seed,
                        resume=args.resume, device=args.device, num_workers=args.num_workers,
                        val_patches=args.val_patches, weights_dtype=args.weights_dtype,
                        hyperparameters=dict(args.set), feature_network=args.feature_network,
                        fidelity_slices=args.fidelity_slices, pool_patches=args.pool_patches, dicom=args.dicom,
                        progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        with open(folder / "metadata.json") as f:
            record = json.load(f)["invariance"]["training"]["cvae"]
        v = record["validation"] or {}
        print(f"cvae: best epoch {record['best_epoch']} of {record['epochs']}: held-out reconstruction error "
              f"{v.get('mae_hu', float('nan')):.1f} HU, f notices {v.get('output_error_hu', float('nan')):.2f} HU; "
              f"model folder {folder} (next: invariance-explorer train cinn --denoiser {folder} ...)")
    return 0


def _cmd_train_cinn(args) -> int:
    from .train_invariance import train_cinn

    folder = train_cinn(args.denoiser, args.data, args.out, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, resume=args.resume,
                        device=args.device, num_workers=args.num_workers, val_patches=args.val_patches,
                        weights_dtype=args.weights_dtype, hyperparameters=dict(args.set),
                        fidelity_slices=args.fidelity_slices, pool_patches=args.pool_patches,
                        refinement=args.refine, dicom=args.dicom, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        with open(folder / "metadata.json") as f:
            info = json.load(f)["invariance"]
        v = info["training"]["cinn"]["validation"] or {}
        fid = info.get("fidelity") or {}
        text = (f"; held-out consistency C {fid['consistency']:.3f}, noise baseline B "
                f"{fid['noise_baseline'] if fid.get('noise_baseline') is None else format(fid['noise_baseline'], '.3f')}"
                if fid else "")
        print(f"cinn: best epoch {info['training']['cinn']['best_epoch']}: held-out NLL "
              f"{v.get('nll_per_dim', float('nan')):.4f} nats/dim{text}; invariance models in {folder}")
    return 0


def _add_fit(p) -> None:
    from .custom_denoisers import USES
    from .dicom_dataset import DICOM_KINDS
    from .denoisers import WEIGHT_DTYPES
    from .fit import DEFAULT_BUDGET

    p.description = ("Import a denoiser (TorchScript file, MONAI bundle folder, or state dict with --class), check "
                     "it, train its cVAE and cINN on the low-dose images of --data, measure the fidelity figures on "
                     "the test split, and write a model folder. Alone or under torchrun --nproc_per_node N.")
    p.add_argument("--denoiser", type=Path, required=True, metavar="PATH",
                   help="TorchScript file (torch.jit.save), MONAI bundle folder, state dict file (.pt read with "
                        "weights_only=True, or .safetensors) with --class, or a model folder (train denoiser)")
    p.add_argument("--class", dest="class_path", metavar="MODULE:CLASS",
                   help="the network class of a state dict: package.module:Class or path/to/file.py:Class")
    p.add_argument("--arguments", type=_json_object, default=None, metavar="JSON",
                   help="keyword arguments of the class, as a JSON object")
    p.add_argument("--declaration", type=Path, metavar="FILE",
                   help="JSON file declaring normalization, use, class, arguments, name (options given here win)")
    p.add_argument("--normalization", metavar="SPEC",
                   help="the network's input normalisation: paper, identity (HU), window:LOW,HIGH (HU onto 0..1) "
                        "or mean-std:MEAN,STD (HU)")
    p.add_argument("--use", choices=USES, help="patch: a local network, tiled on large slices (default); "
                                               "full-image: applied to whole slices only")
    p.add_argument("--name", help="name shown in the model card (default: the file or folder name)")
    p.add_argument("--data", type=Path,
                   help="simulated data set (data simulate), or DICOM folder with one folder per patient: paired "
                        "(low- and full-dose series) or low-dose series only; only low-dose images train")
    p.add_argument("--dicom", choices=DICOM_KINDS, default="auto",
                   help="how to read a DICOM --data folder: auto (paired when every patient has a full-dose "
                        "series, low-dose only when none has), paired, or low-dose (ignore full-dose series)")
    p.add_argument("--out", type=Path, help="the model folder to write")
    p.add_argument("--budget", default=DEFAULT_BUDGET,
                   help=f"cVAE steps (e.g. 3000steps) or wall time (e.g. 45m, 2h) (default {DEFAULT_BUDGET})")
    p.add_argument("--work", type=Path, default=None, help="run folder with checkpoints (default OUT.work)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fit from its work folder")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda (default auto)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of weights, patches and every random draw (default 0)")
    p.add_argument("--batch-size", type=_at_most(4096), default=8, help="cVAE patches per batch (default 8)")
    p.add_argument("--patch-size", type=_positive_int, default=128, help="patch side in pixels (default 128)")
    p.add_argument("--fidelity-slices", type=_whole_number, default=4,
                   help="test slices for the fidelity figures (default 4; 0: none)")
    _add_refinement(p, "written into the model folder (default: none)")
    p.add_argument("--weights-dtype", choices=list(WEIGHT_DTYPES), default="float32",
                   help="storage of the cVAE and cINN weights (default float32)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.NAME=VALUE", type=_hyperparameter,
                   help="override a hyperparameter of stage cvae or cinn (repeatable), e.g. --set cvae.z_dim=128")
    p.add_argument("--check", action="store_true", help="only check the denoiser and print what was measured")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_fit)


def _cmd_fit(args) -> int:
    from .custom_denoisers import check_denoiser, read_declaration, read_network
    from .fit import denoiser_source
    from .normalization import HUNormalization

    args.denoiser = denoiser_source(args.denoiser)  # a bundled name (cnn10, ...) is its folder
    declared = read_declaration(args.declaration) if args.declaration else {}
    spec = args.normalization or declared.get("normalization")
    model_folder = (args.denoiser / "metadata.json").is_file()  # carries its own normalisation
    if spec is None and not model_folder:
        raise ValueError("declare the denoiser's input normalisation: --normalization (paper, identity, "
                         "window:LOW,HIGH or mean-std:MEAN,STD) or \"normalization\" in --declaration")
    settings = dict(normalization=HUNormalization.parse(spec) if spec else None,
                    use=args.use or declared.get("use", "patch"),
                    class_path=args.class_path or declared.get("class"),
                    arguments=args.arguments if args.arguments is not None else declared.get("arguments"),
                    name=args.name or declared.get("name"))
    overrides = {"cvae": {}, "cinn": {}}
    for key, value in args.set:
        stage, _, name = key.partition(".")
        if stage not in overrides or not name:
            raise ValueError(f"--set {key}=...: name the stage, e.g. --set cvae.z_dim=128 or --set cinn.n_flows=8")
        overrides[stage][name] = value
    if args.check:
        if model_folder:
            from .denoisers import load_denoiser

            denoiser = load_denoiser(args.denoiser)
            network, settings["normalization"] = denoiser.network, denoiser.normalization
        else:
            network, _, _ = read_network(args.denoiser, settings["class_path"], settings["arguments"])
        report = check_denoiser(network, settings["normalization"], use=settings["use"], device=args.device,
                                patch_size=args.patch_size)
        print(f"{args.denoiser}: passes the checks: " + json.dumps(report))
        return 0
    if args.data is None or args.out is None:
        raise ValueError("fit needs --data (training images) and --out (the model folder to write); "
                         "--check alone only checks the denoiser")
    from .fit import fit

    out = fit(args.denoiser, args.data, args.out, budget=args.budget, device=args.device, seed=args.seed,
              resume=args.resume, work=args.work, patch_size=args.patch_size, batch_size=args.batch_size,
              fidelity_slices=args.fidelity_slices, weights_dtype=args.weights_dtype, hyperparameters=overrides,
              progress=not args.no_progress, dicom=args.dicom, refinement=args.refine, **settings)
    if os.environ.get("RANK", "0") == "0":
        with open(out / "metadata.json") as f:
            metadata = json.load(f)
        fid = metadata["invariance"].get("fidelity") or {}
        text = f"; held-out consistency C {fid['consistency']:.3f}" if fid else ""
        print(f"fit: {metadata['fit']['plan']['cvae_steps']} cVAE steps in {metadata['fit']['wall_time_s']:.0f} s"
              f"{text}; model folder {out} (use it with --model {out} or the panel's custom model folder)")
    return 0


def _add_progress(parser) -> None:
    """``--progress {bar,json,none}`` (and ``--no-progress`` = none): see :mod:`.progress`."""
    from .progress import MODES

    parser.add_argument("--progress", choices=MODES, default="bar",
                        help="progress display: tqdm bar (default), JSON lines on stdout for programs, or none")
    parser.add_argument("--no-progress", action="store_const", const="none", dest="progress",
                        help="same as --progress none")


def _add_denoise(den) -> None:
    den.add_argument("--model", required=True, help="bundled denoiser name (cnn10, redcnn, wganvgg, dugan) or model folder")
    den.add_argument("--input", type=Path, required=True, help="CT: NRRD/NIfTI/MHA file, DICOM file or series folder")
    den.add_argument("--output", type=Path, required=True, help="denoised CT to write (.nrrd)")
    den.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder holds several series")
    den.add_argument("--hu-offset", type=float, default=0.0, help="add to the stored values to get HU (e.g. -1024)")
    den.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda (default auto)")
    den.add_argument("--batch-size", type=_positive_int, default=4, help="slices per forward pass (default 4)")
    den.add_argument("--tile-size", type=_positive_int, default=512,
                     help="slices larger than this many pixels are denoised in overlapping tiles (default 512)")
    _add_progress(den)
    den.set_defaults(func=_cmd_denoise)


def _add_refinement(parser, which: str) -> None:
    parser.add_argument("--refine", default=None, metavar="CENTRE,SAMPLE",  # read by the engine's Refinement
                        help="consistency refinement: gradient steps that move the sampled invariances x~ towards "
                             "f(x~) = f(x), keeping what f does not pass on: CENTRE steps on the flow's centre, "
                             f"added to every sample, then SAMPLE steps on each (0,0: none); {which}")


def _add_sample(sam) -> None:
    sam.add_argument("--model", required=True,
                     help="bundled denoiser name (cnn10, redcnn, wganvgg, dugan) or model folder with invariance models")
    sam.add_argument("--input", type=Path, required=True, help="CT: NRRD/NIfTI/MHA file, DICOM file or series folder")
    sam.add_argument("--center", required=True, metavar="I,J,K",
                     help="voxel the patch is centred on: column i, row j, slice k (0-based; i,j for a 2D slice)")
    sam.add_argument("--count", type=_at_most(10_000), default=64, help="number of invariances to sample (default 64)")
    sam.add_argument("--seed", type=_seed, default=0, help="seed of the sampled codes (default 0)")
    sam.add_argument("--batch-size", type=_positive_int, default=None,
                     help="invariances per forward pass (default: 10 on the CPU, 100 on CUDA)")
    _add_refinement(sam, "(default: the model folder's setting)")
    sam.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda (default auto)")
    sam.add_argument("--out", type=Path, required=True,
                     help="output folder, created whole (it must not exist or be empty)")
    sam.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder holds several series")
    sam.add_argument("--hu-offset", type=float, default=0.0, help="add to the stored values to get HU (e.g. -1024)")
    sam.add_argument("--analyze", action="store_true",
                     help="then analyse the folder (as invariance-explorer analyze OUT, default settings)")
    _add_progress(sam)
    sam.set_defaults(func=_cmd_sample)


def _cmd_demo(args) -> int:
    """The data-pipeline demo: phantom -> physics -> NRRD (LD, FD, labels) + PNG figure."""
    import numpy as np
    from tqdm.auto import tqdm

    from .figures import LUNG_WINDOW, SOFT_TISSUE_WINDOW, save_png, tile_grid, window
    from .io import write_nrrd, written_whole
    from .lowdose import LowDoseSimulator
    from .phantom import Label, chest_phantom

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


def _cmd_data_simulate(args) -> int:
    from .simulated_dataset import build_simulated_dataset

    manifest = build_simulated_dataset(
        args.out, args.count, size=args.size, spacing=args.spacing, dose=args.dose, seed=args.seed,
        contrast_fraction=args.contrast_fraction, photons=args.photons, filter=args.filter,
        device=args.device, progress=not args.no_progress)
    print(f"data set: {manifest}")
    return 0


def _cmd_data_lowdose(args) -> int:
    from tqdm.auto import tqdm

    from .io import read_image, write_nrrd
    from .lowdose import check_square_grid, insert_noise

    image = read_image(args.input, series_uid=args.series_uid, hu_offset=args.hu_offset)
    _check_output_file(args.output, args.input, "low-dose CT")
    check_square_grid(image.array.shape, image.pixel_spacing, args.input)
    low = insert_noise(image, args.dose, args.seed, photons=args.photons, filter=args.filter, device=args.device,
                       progress=lambda slices: tqdm(slices, desc="simulating low dose", unit="slice",
                                                    disable=args.no_progress))
    write_nrrd(low, args.output)
    print(f"low-dose CT (dose {args.dose:g}) written to {args.output}")
    return 0


def _hyperparameters(args) -> dict:
    """The overrides of :data:`~.train_denoiser.HYPERPARAMETERS` given on the command line."""
    from .train_denoiser import HYPERPARAMETERS

    overrides = dict(args.set)
    known = set(HYPERPARAMETERS[args.arch]) | {"lr_decay", "lr_decay_start", "scheme"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"--set {', '.join(unknown)}: not a hyperparameter of {args.arch}; it has "
                         f"{', '.join(sorted(known))}")
    if args.lr_decay is not None:
        overrides.update(lr_decay=args.lr_decay, lr_decay_start=args.lr_decay_start)
    return overrides


def _cmd_train_denoiser(args) -> int:
    from .train_denoiser import train_denoiser

    folder = train_denoiser(args.arch, args.data, args.out, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                            batch_size=args.batch_size, patch_size=args.patch_size, lr=args.lr, seed=args.seed,
                            resume=args.resume, device=args.device, num_workers=args.num_workers,
                            val_slices=args.val_slices, weights_dtype=args.weights_dtype,
                            feature_network=args.feature_network, initial_weights=args.initial_weights,
                            precision=args.precision, progress=not args.no_progress,
                            hyperparameters=_hyperparameters(args))
    with open(folder / "metadata.json") as f:
        training = json.load(f)["training"]
    v = training["validation"]
    print(f"{args.arch}: best epoch {training['best_epoch']} of {training['epochs']}: validation RMSE "
          f"{v['rmse_hu']:.1f} HU (low dose {training['validation_low_dose']['rmse_hu']:.1f} HU), "
          f"PSNR {v['psnr_db']:.2f} dB, SSIM {v['ssim']:.4f}; model in {folder}")
    return 0


def _existing_above(path: Path) -> Path:
    """The nearest existing folder above ``path`` (where it would be made: the filesystem root at most)."""
    return next(p for p in path.absolute().parents if p.exists())


def _check_output_file(output: Path, source: Path, what: str) -> None:
    """Before the work: ``output`` (of denoise, data lowdose) is a new .nrrd file, not the
    input, in a folder that can be written; ``CTInputError`` saying what to do otherwise."""
    from .io import CTInputError

    if output.suffix.lower() != ".nrrd":
        raise CTInputError(output, "output must be a .nrrd file", "Choose a file name ending in .nrrd.")
    if source.exists() and output.exists() and source.resolve() == output.resolve():
        raise CTInputError(output, "output is the input file", f"Write the {what} to a new file.")
    if output.is_dir():
        raise CTInputError(output, "output is a folder", "Give a file name ending in .nrrd.")
    if output.exists() or output.is_symlink():
        raise CTInputError(output, "output already exists (it is not replaced)",
                           f"Write the {what} to a new file, or delete that one first.")
    folder = _existing_above(output)
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise CTInputError(output, f"cannot be written: {folder} is not a folder you can write to",
                           "Choose another output folder.")


def _cmd_denoise(args) -> int:
    from .denoisers import load_denoiser
    from .inference import denoise
    from .io import read_image, write_nrrd
    from .progress import Progress

    _check_output_file(args.output, args.input, "denoised CT")
    progress = Progress(args.progress)
    denoiser = load_denoiser(args.model, device=args.device)
    image = read_image(args.input, series_uid=args.series_uid, hu_offset=args.hu_offset)
    slices = 1 if image.is_slice else image.array.shape[0]
    update = progress.stage("denoising", slices, f"Denoising {slices} slice{'s' * (slices > 1)} ({denoiser.arch})")
    result = denoise(denoiser, image, device=args.device, batch_size=args.batch_size, tile_size=args.tile_size,
                     progress=lambda done, total: update(done))
    progress.close()
    write_nrrd(result, args.output)
    progress.done({"denoised": args.output},
                  f"denoised CT ({denoiser.arch}, {denoiser.folder}) written to {args.output}")
    return 0


def _add_trust(trust) -> None:
    """``trust``: let the code of an imported denoiser's model folder run here."""
    trust.add_argument("folder", type=Path, help="model folder of an imported denoiser (fit, or made elsewhere)")
    trust.set_defaults(func=_cmd_trust)


def _cmd_trust(args) -> int:
    from .denoisers import CUSTOM, read_metadata, verify_weights
    from .trusted_code import code_files, describe_code, trust

    if not args.folder.is_dir():
        from .denoisers import DENOISERS

        raise ValueError(f"{args.folder}: no such model folder"
                         + ("; a bundled model holds weights only and needs no trust" if str(args.folder) in DENOISERS
                            else ""))
    metadata = read_metadata(args.folder.absolute())
    if metadata["architecture"]["name"] != CUSTOM:
        print(f"{args.folder}: a {metadata['architecture']['name']} folder holds weights only and runs no code; "
              "there is nothing to trust")
        return 0
    for record in code_files(metadata).values():  # the files as recorded, unchanged
        verify_weights(args.folder, record)
    trust(args.folder, metadata)
    print(f"{args.folder}: its code ({describe_code(metadata)}) may now run on this machine")
    return 0


def _add_gui(gui) -> None:
    """``gui``: the sampling panel as a standalone app (needs the "gui" extra: Qt.py, PySide6)."""
    gui.add_argument("--input", type=Path, default=None, help="CT to start with (file or DICOM folder)")
    gui.add_argument("--results", type=Path, default=Path("results/gui"), help="where sample runs write their folders (default results/gui)")
    gui.add_argument("--open", type=Path, default=None, dest="open_folder", help="show this sample results folder")
    gui.set_defaults(func=_cmd_gui)


def _cmd_gui(args) -> int:
    try:
        from .ui.app import main as app_main
    except ImportError as exc:
        raise ValueError(f"the GUI needs Qt.py and PySide6 ({exc}); install them with "
                         "`pip install 'invariance-explorer[gui]'`") from None
    import signal

    for stop in (signal.SIGINT, signal.SIGTERM):  # Qt's event loop runs no Python handler: stop as a program does
        signal.signal(stop, signal.SIG_DFL)
    return app_main(results_dir=args.results, open_folder=args.open_folder, input_path=args.input)


def _center(text: str) -> tuple:
    """``"i,j,k"`` (or ``"i,j"``) -> a tuple of voxel indices."""
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) not in (2, 3):
        raise ValueError(f"--center {text!r}: give the voxel as i,j,k (column, row, slice; 0-based), e.g. 256,200,0")
    return values


def _check_new_folder(out: Path, command: str, analyze: bool = False) -> None:
    """``out`` may become the folder ``command`` writes whole: it does not exist, or is an empty
    folder (``analyze``: ``sample --analyze``, whose earlier run may have stopped in its analysis)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give {command} the path of a new folder (--out)")
    if out.exists() and any(out.iterdir()):
        done = (out / "numbers.json").is_file() and not (out / "analysis" / "analysis.json").is_file()
        raise ValueError(f"{out}: the output folder already exists and is not empty; choose a new folder "
                         f"({command} writes it whole) or remove the old one"
                         + (f"; it holds samples without their analysis: `invariance-explorer analyze {out}` "
                            "analyses them" if done and analyze else ""))
    above = _existing_above(out)
    if not above.is_dir():
        raise ValueError(f"{above} is a file, so the folder {out} cannot be made; give {command} another --out")
    if not os.access(above, os.W_OK | os.X_OK):  # the folder is written beside, then moved in
        raise ValueError(f"{above} is not a folder you can write to, so {command} cannot make {out} there; give "
                         "another --out")


def _cmd_sample(args) -> int:
    """``sample``: crop, sample, write DIR whole (:func:`~.io.written_whole`)."""
    from .inference import warn_on_spacing
    from .io import read_image, written_whole
    from .result_folder import FILES, write_result
    from .progress import Progress
    from .sampler import InvarianceSampler

    out = args.out
    _check_new_folder(out, "sample", getattr(args, "analyze", False))
    center = _center(args.center)
    progress = Progress(args.progress)
    update = progress.stage("loading", 2, "Loading the models and the image")
    sampler = InvarianceSampler(args.model, device=args.device)
    update(1)
    image = read_image(args.input, series_uid=args.series_uid, hu_offset=args.hu_offset)
    warn_on_spacing(sampler.models.denoiser, image)
    patch = sampler.crop(image, center)
    if patch.padded_pixels:
        warnings.warn(f"the patch reaches over the image's border: {patch.padded_pixels} of {patch.array.size} pixels "
                      f"({100 * patch.padded_pixels / patch.array.size:.0f} %) are filled with air (-1000 HU), and the "
                      "invariances there describe no anatomy; centre further inside the image where you can",
                      RuntimeWarning)
    update(2)

    current = {}

    def report(stage: str, done: int, total: int) -> None:
        if current.get("stage") != (stage, total):
            current["stage"] = (stage, total)
            messages = {"encoding": "Encoding the patch", "sampling": f"Sampling {total} invariances"}
            current["update"] = progress.stage(stage, total, messages.get(stage, stage))
        current["update"](done)

    out.parent.mkdir(parents=True, exist_ok=True)  # before the work: a folder that cannot be made says so now
    content = patch.content  # the figures' pixels: not padding, nor air a scanner leaves constant
    with written_whole(out) as partial:
        result = sampler.sample(patch.array, count=args.count, seed=args.seed, batch_size=args.batch_size,
                                progress=report, refinement=args.refine, content=content)
        update = progress.stage("writing", len(FILES), f"Writing {out}")
        write_result(partial, result, patch, image, model=args.model, model_folder=sampler.models.folder,
                     input=args.input, denoiser=sampler.models.denoiser.arch, written=update)
    outputs = {name: out / file for name, file in FILES.items()}
    message = (f"{result.count} invariances of {sampler.models.denoiser.arch} around voxel "
               f"{tuple(patch.center_ijk)} (consistency {result.consistency:.3f}, {result.seconds:.1f} s on "
               f"{result.device}) written to {out}")
    if args.analyze:  # one "done" for both jobs
        more, text = _run_analysis(out, progress)
        outputs.update(more)
        message += f"; {text}"
    progress.done(outputs, message)
    return 0


def _add_analyze(ana) -> None:
    from .analysis import ALPHA, FDR, MAX_PASSED_ON, MIN_AREA_MM2
    from .lowdose import FILTERS

    ana.add_argument("results", type=Path, metavar="RESULTS_DIR", help="a folder written by invariance-explorer sample")
    ana.add_argument("--alpha", type=float, default=ALPHA,
                     help=f"method A: expected false regions per invariance from noise alone (default {ALPHA})")
    ana.add_argument("--fdr", type=float, default=FDR, help=f"method B: false discovery rate (default {FDR})")
    ana.add_argument("--min-area", type=float, default=MIN_AREA_MM2, metavar="MM2",
                     help=f"method A: smallest altered region in mm^2 (default {MIN_AREA_MM2})")
    ana.add_argument("--max-passed-on", type=float, default=MAX_PASSED_ON, metavar="FRACTION",
                     help="method A: a region counts only where f passes on at most this fraction of its change "
                          f"to f(x~) (default {MAX_PASSED_ON}; 1e9 counts every region)")
    ana.add_argument("--sigma-mm", type=lambda text: _positive_number(text, 50.0), default=None,
                     help="reference filter width (Gaussian sigma) in mm (default: the noise correlation length)")
    ana.add_argument("--model", default=None, metavar="FOLDER_OR_NAME",
                     help="the model folder (or bundled name) that sampled, for refined invariances (default: the "
                          "one numbers.json names)")
    null = ana.add_argument_group("noise-only null for method B (default: noise_only.nrrd in RESULTS_DIR, if any)")
    null.add_argument("--null", type=Path, default=None, metavar="FILE",
                      help="NRRD stack (axis 0 = realisation) of noise-only variants of the crop at the input's dose")
    null.add_argument("--full-dose", type=Path, default=None, metavar="FILE",
                      help="full-dose CT on the input's grid: simulate the noise-only variants with the scan simulator")
    null.add_argument("--posterior", action="store_true",
                      help="no full-dose image: draw the variants from the cVAE posterior of x (the model folder in "
                           "numbers.json; a weaker null, recorded as such)")
    null.add_argument("--dose", type=_dose, default=0.25, help="dose fraction of the input (default 0.25)")
    null.add_argument("--photons", type=_positive_number, default=None,
                      help="full-dose quanta per ray (default: simulator's)")
    null.add_argument("--filter", choices=FILTERS, default="hann", help="FBP apodisation filter (default hann)")
    null.add_argument("--null-count", type=_at_most(1000), default=16,
                      help="simulated or posterior realisations (default 16)")
    null.add_argument("--seed", type=_seed, default=0, help="noise seed of the simulated realisations (default 0)")
    null.add_argument("--hu-offset", type=float, default=0.0, help="add to the full-dose file's values to get HU")
    _add_progress(ana)
    ana.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args) -> int:
    from .progress import Progress

    if (args.null is not None) + (args.full_dose is not None) + bool(args.posterior) > 1:
        raise ValueError("give one of --null, --full-dose and --posterior")
    if args.full_dose is None:
        _refuse_unused(args, ("dose", "photons", "filter", "hu_offset"), "to simulate the null from --full-dose")
        if not args.posterior:
            _refuse_unused(args, ("null_count", "seed"), "to simulate the null from --full-dose or draw it with "
                                                         "--posterior")
    progress = Progress(args.progress)
    outputs, text = _run_analysis(args.results, progress, args)
    progress.done(outputs, text)
    return 0


def _warn_if_elsewhere(null, folder: Path, path) -> None:
    """Warn when a --null stack's geometry puts it elsewhere than the sample folder's crop (a
    stack saved without geometry, origin 0 and 1 mm pixels, is not judged)."""
    import numpy as np

    from .result_folder import FILES, read_volume

    crop = read_volume(folder / FILES["input"])
    if null.origin == (0.0, 0.0, 0.0) and tuple(null.spacing[:2]) == (1.0, 1.0):
        return
    shift = np.abs(np.subtract(null.origin, crop.origin)) / np.asarray(crop.spacing)
    if shift[:2].max() > 0.5 or not np.allclose(null.spacing[:2], crop.spacing[:2], rtol=1e-3) or \
            not np.allclose(null.direction_matrix, crop.direction_matrix, atol=1e-3):
        warnings.warn(f"{path}: its geometry (origin {tuple(round(v, 1) for v in null.origin)} mm, pixels "
                      f"{tuple(round(v, 3) for v in null.spacing[:2])} mm) is not the crop's (origin "
                      f"{tuple(round(v, 1) for v in crop.origin)} mm, pixels {tuple(round(v, 3) for v in crop.spacing[:2])}"
                      " mm): is it noise-only images of this patch?", RuntimeWarning)


def _check_null_settings(folder: Path, args) -> None:
    """Before a null is read, simulated or drawn: ``ValueError`` when method B could not use it
    (fewer than 3 invariances) or when refined invariances need a larger one than asked for."""
    from .analysis import MIN_SHAPE_NULL
    from .result_folder import load_result
    from .sampler import Refinement

    result = load_result(folder)
    given = "--null" if args.null is not None else "--full-dose" if args.full_dose is not None else "--posterior"
    if result.count < 3:
        raise ValueError(f"{folder} holds {result.count} invariance{'s' if result.count != 1 else ''}, and method B, "
                         f"the only user of {given}'s null, needs at least 3: sample again with --count 3 or more, "
                         f"or analyse without {given}")
    if args.null is None and args.null_count < 3:
        raise ValueError(f"--null-count {args.null_count}: method B needs at least 3 noise-only images")
    refined = Refinement.parse(result.numbers.get("refinement"))
    if refined and args.full_dose is not None and args.null_count < MIN_SHAPE_NULL:
        raise ValueError(f"--null-count {args.null_count}: these invariances were sampled with a consistency "
                         f"refinement; the analysis refines the null the same way and needs at least "
                         f"{MIN_SHAPE_NULL} scans (--null-count {MIN_SHAPE_NULL} or more)")


def _run_analysis(folder: Path, progress, args=None) -> tuple:
    """Analyse a sample folder (``analyze``, or ``sample --analyze`` with default settings);
    returns the outputs (name -> path) and a one-line summary for the "done" report."""
    from .analysis import ALPHA, FDR, MAX_PASSED_ON, MIN_AREA_MM2
    from .analysis_folder import (POSTERIOR_NULL, analyze_folder, check_analysis_target, posterior_null,
                                  simulate_null_for_folder)
    from .io import read_image
    from .result_folder import read_volume

    check_analysis_target(folder)  # before any null is simulated
    if args is not None and (args.null is not None or args.full_dose is not None or args.posterior):
        _check_null_settings(folder, args)
    null, source = None, None
    if args is not None and args.null is not None:
        given = read_volume(args.null)
        null, source = given.array, "given"
        _warn_if_elsewhere(given, folder, args.null)
    elif args is not None and args.full_dose is not None:
        update = progress.stage("simulating", 1, f"Simulating {args.null_count} noise-only scans at dose {args.dose:g}")
        null = simulate_null_for_folder(folder, read_image(args.full_dose, hu_offset=args.hu_offset), args.dose,
                                        args.null_count, args.seed, photons=args.photons, filter=args.filter,
                                        source=args.full_dose)
        source = "simulator"
        update(1)
    elif args is not None and args.posterior:
        update = progress.stage("posterior", 1, f"Drawing {args.null_count} images from the cVAE posterior of x")
        null, source = posterior_null(folder, args.null_count, args.seed, model=args.model), POSTERIOR_NULL
        update(1)
    messages = {"noise": "Measuring noise", "method A": "Method A: structure change per invariance",
                "method B": "Method B: ensemble test against the noise-only null", "writing": "Writing the analysis"}
    current = {}

    def report(stage: str, done: int, total: int) -> None:
        if current.get("stage") != (stage, total):
            current["stage"] = (stage, total)
            current["update"] = progress.stage(stage, total, messages.get(stage, stage))
        current["update"](done)

    out, record = analyze_folder(
        folder, null=null, null_source=source,
        alpha=ALPHA if args is None else args.alpha, fdr=FDR if args is None else args.fdr,
        sigma_mm=None if args is None else args.sigma_mm,
        min_area_mm2=MIN_AREA_MM2 if args is None else args.min_area,
        max_passed_on=MAX_PASSED_ON if args is None else args.max_passed_on,
        model=None if args is None else args.model, progress=report)
    a, b = record["method_a"], record["method_b"]
    text = (f"analysis of {record['count']} invariances: method A flags {a['altered_samples']} with altered regions "
            f"(|z| >= {a['threshold_z']:.2f}"
            + (f"; {a['regions_seen_by_f']} regions left out, f passes on most of their change" if a["max_passed_on"]
               is not None else "; f(x~) not at hand, every region counts") + "); ")
    text += (f"method B skipped: {b['reason']}" if b["skipped"] else
             f"method B ({b['null_source']} null of {b['null_count']}) flags {b['flagged_area_mm2']:.1f} mm2 "
             f"at FDR {b['fdr_level']:g}")
    text += f"; {record['noise']['answer']}; written to {out}"
    progress.close()
    return {f"analysis_{name}": out / file for name, file in record["files"].items()}, text


#: Top-level commands in the order of ``--help``: name -> (help, the function that adds its arguments).
COMMANDS = {
    "demo": ("simulate a low-dose chest slice; write NRRD and PNG", _add_demo),
    "data": ("training data: simulate pairs, simulate low dose", _add_data),
    "train": ("train networks: denoisers, invariance models (cVAE, then cINN)", _add_train),
    "fit": ("your own denoiser: check it, fit its invariance models (cVAE + cINN), write a model folder for "
            "--model / the Slicer panel", _add_fit),
    "denoise": ("denoise a CT image or volume (slice by slice); write NRRD", _add_denoise),
    "sample": ("sample invariances x~ (f(x~) = f(x)) of a denoiser for the patch around a voxel; write NRRD, JSON "
               "and a PNG figure", _add_sample),
    "analyze": ("find the invariances that change anatomy (noise analysis, method A per invariance, method B "
                "against a noise-only null); write RESULTS_DIR/analysis/", _add_analyze),
    "gui": ("open the sampling panel as a standalone app (Qt)", _add_gui),
    "trust": ("let the code of an imported denoiser's model folder (TorchScript, MONAI bundle, Python class) run "
              "on this machine", _add_trust),
}


def _finish_bars() -> None:
    """End every progress bar still drawn, so that the error after it starts on a line of its own
    (and the bar is not drawn again, after the error, when Python collects it)."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # tqdm's own registry of open bars
        bar.close()


def _given_options(command: str, words: List[str]) -> set:
    """The destinations of the options written in ``words`` (those not left at their defaults):
    the same parser with every default suppressed keeps only what was given."""
    parser = build_parser(command)
    parsers = [parser]
    for p in parsers:
        for action in p._actions:  # argparse keeps a parser's actions there; subcommands' parsers in choices
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.dest != "help":
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(words))) - {"func"}


def _refuse_unused(args, options, needs: str) -> None:
    """``ValueError`` when any of ``options`` (destinations) was given although the run will not
    use it (``needs`` says what would): a setting silently ignored misleads."""
    unused = [f"--{name.replace('_', '-')}" for name in options if name in getattr(args, "given", ())]
    if unused:
        raise ValueError(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect here: "
                         f"{'it is' if len(unused) == 1 else 'they are'} used only {needs}; leave "
                         f"{'it' if len(unused) == 1 else 'them'} out")


def _negative_voxels_joined(words: List[str]) -> List[str]:
    """``--center -5,10,1`` as ``--center=-5,10,1``: argparse would take the value for an
    option; joined, it reaches the centre's own check (which says where the image lies)."""
    joined = []
    for word in words:
        if joined and joined[-1] == "--center" and word[:1] == "-" and word[1:2].isdigit():
            joined[-1] = f"--center={word}"
        else:
            joined.append(word)
    return joined


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a job's Cancel, ``timeout``, a scheduler), raised so that partly written
    outputs are removed as on Ctrl-C."""


def _terminate(signum, frame):
    raise _Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``invariance-explorer`` and ``python -m InvarianceExplorerLib``."""
    words = _negative_voxels_joined(sys.argv[1:] if argv is None else list(argv))
    command = next((w for w in words if not w.startswith("-")), "")
    args = build_parser(command if command in COMMANDS else "").parse_args(words)
    args.given = _given_options(command, words)

    from .io import CTInputError
    from .progress import WARNING_PREFIX, Progress

    json_progress = getattr(args, "progress", None) == "json"
    shown = warnings.formatwarning, warnings.showwarning
    warnings.formatwarning = lambda message, *rest, **named: f"{WARNING_PREFIX}{message}\n"

    def show_warning(message, *rest, **named):  # a line of its own, not after a progress bar's
        from tqdm.auto import tqdm

        tqdm.write(f"{WARNING_PREFIX}{message}", file=sys.stderr)

    if sys.stderr.isatty():  # where bars are drawn; elsewhere warnings stay recordable (catch_warnings)
        warnings.showwarning = show_warning
    on_term = None
    if threading.current_thread() is threading.main_thread():
        on_term = signal.signal(signal.SIGTERM, _terminate)

    def input_error(exc: BaseException) -> int:  # the user's input or files: one clear line, no traceback
        _finish_bars()
        message = str(exc)
        if isinstance(exc, OSError) and exc.strerror and exc.filename:  # e.g. a folder that cannot be made
            message = f"{exc.filename}: {exc.strerror}; check the path and that it may be read (or written) there"
        if json_progress:
            from .trusted_code import UntrustedCodeError

            untrusted = isinstance(exc, UntrustedCodeError)  # a panel asks, and trusts the folder
            Progress("json").error(message, kind="untrusted" if untrusted else "input",
                                   **({"folder": str(exc.folder)} if untrusted else {}))
        print(f"invariance-explorer: error: {message}", file=sys.stderr)
        return 2

    try:
        return int(args.func(args) or 0)
    except (CTInputError, ValueError, OSError) as exc:
        return input_error(exc)
    except KeyboardInterrupt as stop:
        _finish_bars()
        if json_progress:
            Progress("json").error("interrupted", kind="cancelled")
        terminated = isinstance(stop, _Terminated)
        print(f"invariance-explorer: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # a bug or a failing machine: programs reading JSON still get told
        cause = exc
        while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is not exc and isinstance(cause, (CTInputError, ValueError, OSError)):
            return input_error(cause)  # ours, wrapped by a library (MONAI's "applying transform ...")
        _finish_bars()
        if json_progress:
            Progress("json").error(f"{type(exc).__name__}: {exc}", kind="internal")
        raise
    finally:
        warnings.formatwarning, warnings.showwarning = shown
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


if __name__ == "__main__":
    raise SystemExit(main())
