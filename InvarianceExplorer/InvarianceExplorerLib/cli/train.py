"""``train denoiser``, ``train cvae``, ``train cinn`` and ``fit``: the trainings."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .options import (_add_refinement, _at_most, _hyperparameter, _json_object, _positive_int, _positive_number,
    _seed, _whole_number)


def _add_train(train) -> None:
    from ..denoisers import DENOISERS, WEIGHT_DTYPES
    from ..training import PRECISIONS

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


def _hyperparameters(args) -> dict:
    """The overrides of :data:`~.train_denoiser.HYPERPARAMETERS` given on the command line."""
    from ..train_denoiser import HYPERPARAMETERS

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
    from ..train_denoiser import train_denoiser

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


def _add_train_invariance(train_sub) -> None:
    """``train cvae`` and ``train cinn``: the invariance models of a frozen denoiser."""
    from ..denoisers import WEIGHT_DTYPES
    from ..dicom_dataset import DICOM_KINDS

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
    from ..train_invariance import train_cvae

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
    from ..train_invariance import train_cinn

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
    from ..custom_denoisers import USES
    from ..dicom_dataset import DICOM_KINDS
    from ..denoisers import WEIGHT_DTYPES
    from ..fit import DEFAULT_BUDGET

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
    from ..custom_denoisers import check_denoiser, read_declaration, read_network
    from ..fit import denoiser_source
    from ..normalization import HUNormalization

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
            from ..denoisers import load_denoiser

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
    from ..fit import fit

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
