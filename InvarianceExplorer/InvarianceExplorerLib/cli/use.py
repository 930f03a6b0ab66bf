"""``denoise``, ``sample`` and ``analyze``: a denoiser and its invariances applied to the user's CT."""

from __future__ import annotations

import warnings
from pathlib import Path

from .options import (_add_progress, _add_refinement, _at_most, _center, _check_new_folder, _check_output_file,
    _dose, _positive_int, _positive_number, _refuse_unused, _seed)


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
    den.add_argument("--dtype", choices=("float32", "int16"), default="float32",
                     help="voxels of the output: float32 HU as computed (default), or int16 HU rounded, as CT is "
                          "stored (a third of the size)")
    _add_progress(den)
    den.set_defaults(func=_cmd_denoise)


def _cmd_denoise(args) -> int:
    from ..denoisers import load_denoiser
    from ..inference import denoise
    from ..io import read_image, write_nrrd
    from ..progress import Progress

    _check_output_file(args.output, args.input, "denoised CT")
    progress = Progress(args.progress)
    denoiser = load_denoiser(args.model, device=args.device)
    image = read_image(args.input, series_uid=args.series_uid, hu_offset=args.hu_offset)
    slices = 1 if image.is_slice else image.array.shape[0]
    update = progress.stage("denoising", slices, f"Denoising {slices} slice{'s' * (slices > 1)} ({denoiser.arch})")
    result = denoise(denoiser, image, device=args.device, batch_size=args.batch_size, tile_size=args.tile_size,
                     progress=lambda done, total: update(done))
    progress.close()
    if args.dtype == "int16":
        import numpy as np

        write_nrrd(result, args.output, array=np.clip(np.rint(result.array), -32768, 32767).astype(np.int16))
    else:
        write_nrrd(result, args.output)
    progress.done({"denoised": args.output},
                  f"denoised CT ({denoiser.arch}, {denoiser.folder}) written to {args.output}")
    return 0


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


def _cmd_sample(args) -> int:
    """``sample``: crop, sample, write DIR whole (:func:`~.io.written_whole`)."""
    from ..inference import warn_on_spacing
    from ..io import read_image, written_whole
    from ..result_folder import FILES, check_center, write_result
    from ..progress import Progress
    from ..sampler import InvarianceSampler

    out = args.out
    _check_new_folder(out, "sample", getattr(args, "analyze", False))
    center = _center(args.center)
    progress = Progress(args.progress)
    update = progress.stage("loading", 2, "Loading the image and the models")
    image = read_image(args.input, series_uid=args.series_uid, hu_offset=args.hu_offset)
    check_center(center, image.array.shape)  # a point outside the image is told before the models load
    update(1)
    sampler = InvarianceSampler(args.model, device=args.device)
    warn_on_spacing(sampler.models.denoiser, image)
    patch = sampler.crop(image, center)
    if patch.padded_pixels:
        warnings.warn(f"the patch reaches over the image's border: {patch.padded_pixels} of {patch.array.size} pixels "
                      f"({100 * patch.padded_pixels / patch.array.size:.0f} %) are filled with air (-1000 HU), and the "
                      "invariances there describe no anatomy; centre further inside the image where you can",
                      RuntimeWarning)
    update(2)

    report = progress.callback({"encoding": "Encoding the patch",
                                "sampling": lambda total: f"Sampling {total} invariances"})

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
    from ..analysis import ALPHA, FDR, MAX_PASSED_ON, MIN_AREA_MM2
    from ..lowdose import FILTERS

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
    from ..progress import Progress

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

    from ..result_folder import FILES, read_volume

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
    from ..analysis import MIN_SHAPE_NULL
    from ..result_folder import load_result
    from ..sampler import Refinement

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
    from ..analysis import ALPHA, FDR, MAX_PASSED_ON, MIN_AREA_MM2
    from ..analysis_folder import (POSTERIOR_NULL, analyze_folder, check_analysis_target, posterior_null,
                                  simulate_null_for_folder)
    from ..io import read_image
    from ..result_folder import read_volume

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
    report = progress.callback({"noise": "Measuring noise", "method A": "Method A: structure change per invariance",
                                "method B": "Method B: ensemble test against the noise-only null",
                                "writing": "Writing the analysis"})

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
