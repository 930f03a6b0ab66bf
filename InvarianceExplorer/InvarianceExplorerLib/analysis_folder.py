"""Analysis of a ``sample`` output folder: noise, method A, method B; written as files.

:func:`analyze_folder` reads a folder that ``invariance-explorer sample`` wrote
(:mod:`.result_folder`), runs :func:`~.noise.noise_summary`,
:func:`~.analysis.structure_change` (method A) and, when a noise-only null ensemble is at
hand, :func:`~.analysis.ensemble_test` (method B), and writes ``FOLDER/analysis/`` whole (a
temporary sibling folder, then renamed; an earlier analysis is replaced):

* ``change_maps.nrrd`` — method A's z-score maps, a stack (numpy axis 0 = sample k) with
  the geometry of ``invariances.nrrd``; ``altered_regions.nrrd`` — its labelmaps (uint8,
  1 brighter / 2 darker in the invariance: structure added / removed), the same way;
* ``significance.nrrd`` — method B's ``-log10 q`` (one slice, the crop's geometry);
  ``significant_regions.nrrd`` — its flagged regions (uint8, 1); both only when method B ran;
* ``analysis.json`` — settings, the noise summary, method A's summary and per-sample
  records, method B's summary (or ``{"skipped": true, "reason": ...}``), the files;
* ``analysis.csv`` — one row per invariance (:data:`CSV_COLUMNS`);
* ``figure.png`` — the paper's layout (x, f(x), three invariances — the three most
  altered by method A — and the std map) with a change-map column (max |z| over all
  samples); a second row shows the change maps of the three invariances shown, altered
  regions outlined, and method B's significance map under the std map.

The noise-only null of method B: the ``null`` argument (e.g. simulated by the CLI from the
full-dose image, or a file the user gives), else ``noise_only.nrrd`` in the sample folder
(:data:`NOISE_ONLY_FILE`, a stack like ``invariances.nrrd``; ``numbers.json["noise_only"]
["source"]`` says how it was made, e.g. "cvae posterior"), else method B is skipped and
the JSON says why.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .analysis import ALPHA, FDR, MAX_PASSED_ON, MIN_AREA_MM2, MIN_SHAPE_NULL, ensemble_test, structure_change
from .image import CTImage
from .io import check_hu, read_json_object, written_whole
from .progress import ProgressCallback
from .noise import NoiseTexture, noise_summary
from .result_folder import FILES, load_result, read_volume

#: Sub-folder of a sample folder that holds the analysis.
ANALYSIS_DIR = "analysis"
#: Output name -> file name in ``FOLDER/analysis/``.
ANALYSIS_FILES: Dict[str, str] = {
    "change_maps": "change_maps.nrrd",
    "altered_regions": "altered_regions.nrrd",
    "significance": "significance.nrrd",
    "significant_regions": "significant_regions.nrrd",
    "numbers": "analysis.json",
    "table": "analysis.csv",
    "figure": "figure.png",
}
#: Outputs that exist only when method B ran.
METHOD_B_FILES = ("significance", "significant_regions")
#: Optional noise-only ensemble in a sample folder (see the module docstring).
NOISE_ONLY_FILE = "noise_only.nrrd"
#: Columns of ``analysis.csv``: (column, key of the merged per-sample record).
CSV_COLUMNS = (
    ("sample", "index"),
    ("rank", "rank"),
    ("noise_std_hu", "noise_std_hu"),
    ("noise_ratio_to_input", "noise_ratio_to_input"),
    ("noise_residual_correlation", "noise_residual_correlation"),
    ("varying_noise_std_hu", "varying_noise_std_hu"),
    ("varying_noise_ratio_to_input", "varying_noise_ratio_to_input"),
    ("altered_area_mm2", "area_mm2"),
    ("peak_abs_change_hu", "peak_abs_hu"),
    ("altered_region_count", "region_count"),
    ("regions_seen_by_f", "regions_seen_by_f"),
    ("max_abs_z", "max_abs_z"),
    ("filtered_noise_sigma_hu", "noise_sigma_hu"),
    ("mean_abs_change_hu", "mean_abs_change_hu"),
)



def _stack_image(crop: CTImage, array: np.ndarray) -> CTImage:
    """A stack (axis 0 = sample k) with the crop's geometry, as ``sample`` writes stacks."""
    return CTImage(np.asarray(array, np.float32), crop.spacing, crop.origin, crop.direction)


#: ``null_source`` of a null drawn from the cVAE posterior of x (:func:`posterior_null`).
POSTERIOR_NULL = "cvae posterior"
#: Said (warning and analysis.json) when invariances sampled with a consistency refinement are
#: analysed with neither a noise-only null of scans nor the model folder's noise texture.
REFINED_SAMPLES_NOTE = ("these invariances were sampled with a consistency refinement (sample --refine), {what}: "
                        "the refinement shapes noise by f's local gain, which method A's own noise model does not "
                        "follow (on refined pure noise of an ordinary RED-CNN it flags most images, README); give "
                        "noise-only scans (analyze --full-dose or --null) for a calibrated analysis, or sample with "
                        "--refine 0,0")


#: Said (warning, and method B's skip reason) when refined invariances come with a cVAE-posterior null.
POSTERIOR_REFINED_NOTE = ("these invariances were sampled with a consistency refinement and a cVAE-posterior null "
                          "cannot be refined into a noise-only one (refined, it lacks refined noise's shape and "
                          "variance: method B flagged refined pure noise against it in 4 of 4 test patches of the "
                          "bundled RED-CNN, README), so method B is skipped and method A uses the rescan floor "
                          "estimated from x; give noise-only scans (--full-dose or --null) for method B")


def model_noise_texture(model) -> Tuple[Optional[NoiseTexture], str]:
    """The noise texture of a model folder's training data (``metadata["noise_texture"]``,
    :func:`~.training.data_noise_texture`), or ``(None, why not)`` when the folder holds none;
    a ``ValueError`` when the folder cannot be read (the analysis would silently lose its
    calibration)."""
    from .denoisers import read_metadata, resolve_model_folder

    try:
        metadata = read_metadata(resolve_model_folder(model))
    except (OSError, ValueError) as error:
        raise ValueError(f"the model folder that sampled these invariances cannot be read ({error}); give it to the "
                         "analysis (analyze --model FOLDER_OR_NAME) if it has moved") from None
    if not metadata.get("noise_texture"):
        return None, (f"the model folder {model} holds no noise texture of its training data (add it with "
                      "benchmarks/noise_texture.py)")
    return NoiseTexture.from_dict(metadata["noise_texture"]), "the model folder's training noise"


def find_null(folder, numbers: dict, shape: Tuple[int, int]) -> Tuple[Optional[np.ndarray], Optional[str], str]:
    """The noise-only ensemble a sample folder holds: ``(stack, source, note)``, or
    ``(None, None, reason)`` when it holds none."""
    path = Path(folder) / NOISE_ONLY_FILE
    if not path.is_file():
        held = ", ".join(sorted(p.name for p in Path(folder).iterdir() if p.is_file()))
        return None, None, (f"no noise-only ensemble of x at its dose: the sample folder holds only {held} "
                            f"(no {NOISE_ONLY_FILE}); give the full-dose image (analyze --full-dose FILE --dose D) "
                            "or noise-only images (analyze --null FILE) to run method B")
    stack = read_volume(path).array
    if stack.shape[1:] != tuple(shape):
        raise ValueError(f"{path}: in-plane size {stack.shape[1:]} differs from the crop's {tuple(shape)}")
    source = str((numbers.get("noise_only") or {}).get("source", "sample folder"))
    return stack, source, f"{NOISE_ONLY_FILE} in the sample folder"


#: A full-dose image is refused as x's when, both smoothed by a Gaussian of this sigma (px),
#: x differs from it more than ``ANATOMY_GAP_FACTOR`` times plus ``ANATOMY_GAP_HU`` what the
#: simulated scans of it do (mean |difference|, HU): different anatomy, not noise.
ANATOMY_GAP_SIGMA_PX, ANATOMY_GAP_FACTOR, ANATOMY_GAP_HU = 2.0, 4.0, 10.0


def _check_same_anatomy(x: np.ndarray, full_dose: np.ndarray, scans: np.ndarray, dose: float, name) -> None:
    """``x`` (the sample's crop, HU) must be a scan of the full-dose crop ``full_dose``: smoothed,
    it may differ from it only about as the simulated ``scans`` of it do (noise)."""
    from scipy.ndimage import gaussian_filter

    def gap(image: np.ndarray) -> float:
        return float(np.abs(gaussian_filter(image.astype(np.float64) - full_dose, ANATOMY_GAP_SIGMA_PX)).mean())

    expected, found = max(gap(scan) for scan in scans), gap(x)
    if found > ANATOMY_GAP_FACTOR * expected + ANATOMY_GAP_HU:
        raise ValueError(f"{name} does not show the anatomy of the sampled crop: smoothed, the crop differs from it by "
                         f"{found:.0f} HU on average where a simulated scan at dose {dose:g} differs by {expected:.0f} "
                         "HU; give the full-dose scan the low-dose input was made from (same patient, slice and grid)")


def simulate_null_for_folder(folder, full_dose: CTImage, dose: float, count: int = 16, seed: int = 0, *,
                             photons: Optional[float] = None, filter: str = "hann", device="cpu",
                             source=None) -> np.ndarray:
    """Method B's null for a sample folder from the full-dose image at hand: ``count``
    low-dose scans at ``dose`` of the full-dose slice the crop was cut from (simulated whole,
    :func:`~.analysis.simulate_noise_only`, then cut like the crop), ``(count, P, P)`` HU.
    ``full_dose`` must be on the input's grid (the crop's position is checked) and show the
    crop's anatomy (:func:`_check_same_anatomy`); ``source`` names it in errors. The scan
    settings (``photons``, ``filter``) should be those that made the low-dose input. Like
    scanners and the simulated data set, the scans reconstruct the circle inscribed in the
    slice, unless the crop reaches beyond it and x shows noise there (a scan of the whole
    square, as ``data lowdose`` makes): then they cover the corners too, which would
    otherwise give a null of constant air, with no noise to test against."""
    from .analysis import simulate_noise_only, varying
    from .lowdose import FanBeamGeometry, LowDoseSimulator, check_square_grid
    from .sampler import crop_patch

    result = load_result(folder)
    numbers = result.numbers
    if "center_ijk" not in numbers or "patch_size" not in numbers:
        raise ValueError(f"{result.folder}: numbers.json has no center_ijk and patch_size; cannot find the crop")
    i, j, k = (int(v) for v in numbers["center_ijk"])
    size = int(numbers["patch_size"])
    name = "the full-dose image" if source is None else f"the full-dose image {source}"
    if full_dose.is_slice:
        plane = full_dose
    elif 0 <= k < full_dose.array.shape[0]:
        plane = next(itertools.islice(full_dose.slices(), k, None))
    else:
        raise ValueError(f"{name} has {full_dose.array.shape[0]} slices; the crop is on slice {k}: give the "
                         "full-dose image on the low-dose input's grid")
    ny, nx = plane.array.shape
    if not (0 <= i < nx and 0 <= j < ny):
        raise ValueError(f"{name} ({nx} x {ny} pixels) is not on the low-dose input's grid: the crop's centre, voxel "
                         f"({i}, {j}), lies outside it")
    check_square_grid(plane.array.shape, plane.pixel_spacing, name)
    sx = plane.pixel_spacing[0]
    where = crop_patch(plane, (i, j), size).image
    if not np.allclose(where.origin[:2], result.crop.origin[:2], atol=1e-3 * max(sx, 1.0)):
        raise ValueError(f"{name} is not on the low-dose input's grid: the crop would lie at {where.origin[:2]} mm, "
                         f"the sample's crop lies at {result.crop.origin[:2]} mm")
    dz = abs(where.origin[2] - result.crop.origin[2])
    if not full_dose.is_slice and dz > 0.5 * full_dose.spacing[2]:  # a volume's slice k lies elsewhere along z
        raise ValueError(f"{name}'s slice {k} lies {dz:.1f} mm from the sample's crop in z (its "
                         f"slices are {full_dose.spacing[2]:g} mm apart): give the full-dose volume on the low-dose "
                         "input's grid, same slices")
    rows, cols = np.mgrid[j - size // 2:j - size // 2 + size, i - size // 2:i - size // 2 + size] + 0.5 - nx / 2.0
    # pixels whose 3 x 3 neighbourhood lies wholly outside the circle the scan reconstructs
    beyond = (np.hypot(rows, cols) - 2.0) * sx > FanBeamGeometry.for_image(nx, sx).fov_radius
    cover_corners = bool((beyond & varying(result.crop.array[0])).any())
    simulator = LowDoseSimulator(nx, sx, photons=photons, filter=filter, device=device, cover_corners=cover_corners)
    scans = simulate_noise_only(plane.array, dose, count, seed, simulator=simulator)
    crops = np.stack([crop_patch(plane.with_array(scan), (i, j), size).array for scan in scans])
    _check_same_anatomy(result.crop.array[0], where.array, crops, dose, name)
    return crops


def _model_of(result, model=None, required: bool = True):
    """The model folder that sampled a sample folder: ``model``, else the one its numbers.json
    names; without either, a ValueError (or None when not ``required``). A given ``model``
    must hold the denoiser numbers.json names (another one would calibrate the analysis for
    the wrong network)."""
    if model and result.numbers.get("denoiser"):
        from .denoisers import read_metadata

        arch = read_metadata(model)["architecture"]["name"]
        if arch != result.numbers["denoiser"]:
            raise ValueError(f"{model} holds a {arch} denoiser, but {result.folder} was sampled with "
                             f"{result.numbers['denoiser']}; give the model folder that sampled it (--model)")
    model = model or result.numbers.get("model_folder") or result.numbers.get("model")
    if not model and required:
        raise ValueError(f"{result.folder}: numbers.json names no model folder; give the model")
    return model


def posterior_draws(denoiser, representation, x_hu: np.ndarray, count: int = 16, seed: int = 0) -> np.ndarray:
    """``count`` decodings ``D(z_j, f(x))`` of ``z_j ~ q(z | x, f(x))`` for the patch ``x_hu``
    ``(count, P, P)`` HU (see :func:`posterior_null`); the draws are made on the CPU from ``seed``."""
    import torch

    if x_hu.shape != (representation.patch_size,) * 2:
        raise ValueError(f"the crop is {x_hu.shape[0]} pixels but the cVAE works on {representation.patch_size}")
    norm = denoiser.normalization
    noise = torch.randn(int(count), representation.z_dim, generator=torch.Generator().manual_seed(int(seed)))
    with torch.inference_mode():
        x = norm.normalize(torch.from_numpy(np.asarray(x_hu, np.float32))).to(_device(denoiser))[None, None]
        y = denoiser(x)
        mean, logvar = representation.encode(x, y)
        z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
        decoded = representation.decode(z, y, representation.condition(y) if representation.conditional else None)
    return norm.denormalize(decoded[:, 0]).float().cpu().numpy()


def posterior_null(folder, count: int = 16, seed: int = 0, *, model=None, device="cpu") -> np.ndarray:
    """Method B's null from the cVAE posterior of x, for when no full-dose image is at hand:
    ``count`` decodings ``D(z_j, f(x))`` of ``z_j ~ q(z | x, f(x))`` ``(count, P, P)`` HU, with
    the denoiser and cVAE of ``model`` (default: the model folder recorded in the sample
    folder's numbers.json). The draws are made on the CPU from ``seed``.

    Caveat (say so with the results): the posterior's spread is what the representation
    cannot pin down given x and f(x); it is a noise-only null only insofar as the cVAE is
    complete and that spread is noise. The scan simulator's null is the better one."""
    from .sampler import load_representation

    result = load_result(folder)
    denoiser, representation = load_representation(_model_of(result, model), device=device)
    return posterior_draws(denoiser, representation, result.crop.array[0], count, seed)


def _device(denoiser):
    return next(denoiser.network.parameters()).device


def check_analysis_target(folder) -> None:
    """Refuse to analyse ``folder`` when ``folder/analysis`` exists and is not an earlier
    analysis of ours: each run replaces that folder whole, which must not take the user's files;
    or when ``folder`` cannot be written (checked before the work, not after it)."""
    out = Path(folder) / ANALYSIS_DIR
    if Path(folder).is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{folder}: the results folder is read-only, and analyze writes its {ANALYSIS_DIR}/ folder "
                         "there: copy the results folder somewhere you can write, and analyse the copy")
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise ValueError(f"{out} exists and is no analysis folder; analyze writes its results there: move it away")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ANALYSIS_FILES.values())
    if foreign or not (out / ANALYSIS_FILES["numbers"]).is_file():
        what = f"files analyze did not write ({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''})" \
            if foreign else "no analysis.json"
        raise ValueError(f"{out} holds {what}; analyze replaces that folder whole with each run: move them away")


def analyze_folder(folder, *, null: Optional[np.ndarray] = None, null_source: Optional[str] = None,
                   alpha: float = ALPHA, fdr: float = FDR, sigma_mm: Optional[float] = None,
                   min_area_mm2: float = MIN_AREA_MM2, max_passed_on: float = MAX_PASSED_ON,
                   model=None, progress: Optional[ProgressCallback] = None
                   ) -> Tuple[Path, dict]:
    """Analyse the ``sample`` folder ``folder`` and write ``folder/analysis/`` (module docstring).

    Args:
        null: noise-only variants of x at its dose ``(J, P, P)`` HU (J >= 3), or None to
            look for :data:`NOISE_ONLY_FILE` in the folder; as scanned (or decoded), never
            refined. For invariances sampled with a consistency refinement (numbers.json's
            "refinement") the null is refined the same way (at least
            :data:`~.analysis.MIN_SHAPE_NULL` images) with the denoiser of ``model``, method A
            takes its noise shape from it (not from a posterior null: measured, refined
            posterior draws of the bundled RED-CNN do not have refined noise's shape) and
            method B tests against it. Without such a null, method A judges refined
            invariances by their own noise with a rescan floor estimated from x and the
            model folder's noise texture (:func:`model_noise_texture`); without a texture
            it warns that they are uncalibrated (:data:`REFINED_SAMPLES_NOTE`).
        null_source: how ``null`` was made ("simulator", :data:`POSTERIOR_NULL`, "given").
        alpha: method A's expected false regions per invariance; fdr: method B's FDR level.
        sigma_mm: reference filter width in mm (default: the noise correlation length).
        min_area_mm2: method A's smallest altered region.
        max_passed_on: method A counts a region only where f passes on at most this fraction
            of its change (needs ``denoised.nrrd`` and ``denoised_invariances.nrrd``; without
            them every region counts and the JSON says so).
        model: the model folder that sampled (default: the one numbers.json names); only
            read for refined invariances.
        progress: ``progress(stage, done, total)``.

    Returns ``(analysis folder, the analysis.json record)``.
    """
    report = progress or (lambda stage, done, total: None)
    for name, value, ok, meaning in (
            ("alpha", alpha, 0 < alpha < 1, "in (0, 1): method A's expected false regions per invariance"),
            ("fdr", fdr, 0 < fdr < 1, "in (0, 1): method B's false discovery rate, e.g. 0.05"),
            ("sigma_mm", sigma_mm, sigma_mm is None or sigma_mm > 0, "> 0 mm: the reference filter's width"),
            ("min_area_mm2", min_area_mm2, min_area_mm2 >= 0, ">= 0 mm²: method A's smallest altered region"),
            ("max_passed_on", max_passed_on, max_passed_on > 0, "> 0: the share of a change f may pass on")):
        if not ok:
            raise ValueError(f"{name} must be {meaning}; got {value}")
    result = load_result(folder)
    folder = result.folder
    check_analysis_target(folder)
    crop = result.crop
    x = crop.array[0].astype(np.float64)
    stack = result.volumes["invariances"].array.astype(np.float64)
    spacing = crop.spacing[:2]
    pixel = math.sqrt(spacing[0] * spacing[1])
    sigma_px = None if sigma_mm is None else float(sigma_mm) / pixel

    report("noise", 0, 1)
    noise = noise_summary(x, stack, spacing)
    report("noise", 1, 1)

    note = "given"
    if null is None:
        null, null_source, note = find_null(folder, result.numbers, x.shape)
    else:
        null = np.asarray(null, dtype=np.float64)
        null_source = null_source or "given"
        if null.ndim != 3 or null.shape[1:] != x.shape:
            raise ValueError(f"the noise-only ensemble must be a stack (J, {x.shape[0]}, {x.shape[1]}); got {null.shape}")
        check_hu(null, "the noise-only ensemble (new scans of x's anatomy, in HU)")  # NaN, Inf, units

    from .sampler import InvarianceSampler, Refinement

    refinement = Refinement.parse(result.numbers.get("refinement"))
    if refinement and null is not None and null_source == POSTERIOR_NULL:
        # the posterior's spread is not noise: refined, it has neither refined noise's shape (method A)
        # nor its variance (method B)
        warnings.warn(POSTERIOR_REFINED_NOTE, RuntimeWarning)
        null, note = None, POSTERIOR_REFINED_NOTE
    null_refined = bool(refinement) and null is not None
    scans, texture, texture_note = None, None, None
    if refinement and not null_refined:  # no scans: the rescan floor estimated from x and the training noise's texture
        named = _model_of(result, model, required=False)
        texture, texture_note = (model_noise_texture(named) if named else
                                 (None, "numbers.json names no model folder whose noise texture could be used"))
    if null_refined:
        if null.shape[0] < MIN_SHAPE_NULL:
            raise ValueError(f"these invariances were sampled with a consistency refinement; its analysis refines the "
                             f"noise-only null the same way and needs at least {MIN_SHAPE_NULL} images of it; got "
                             f"{null.shape[0]} ({'more images in the --null file' if null_source == 'given' else '--null-count'})")
        report("refining the null", 0, 1)
        scans = null
        sampler = InvarianceSampler(_model_of(result, model), device="cpu")
        null = sampler.refine_null(x, null, refinement).astype(np.float64)
        report("refining the null", 1, 1)
    report("method A", 0, 1)
    outputs = {}
    if "denoised" in result.volumes and "denoised_invariances" in result.volumes:
        outputs = {"denoised": result.volumes["denoised"].array[0].astype(np.float64),
                   "denoised_invariances": result.volumes["denoised_invariances"].array.astype(np.float64)}
    change = structure_change(x, stack, spacing, null=null, sigma_px=sigma_px, alpha=alpha,
                              min_area_mm2=min_area_mm2, max_passed_on=max_passed_on, null_shape=null_refined,
                              scans=scans, noise_texture=texture, **outputs,  # refined without a floor: warned below
                              refined=bool(refinement) and (scans is not None or texture is not None))
    report("method A", 1, 1)

    test = None
    if null is not None and stack.shape[0] >= 3 and null.shape[0] >= 3:
        report("method B", 0, 1)
        test = ensemble_test(stack, null, spacing, sigma_px=change.sigma_px, fdr=fdr, null_source=null_source)
        report("method B", 1, 1)
        method_b = {"skipped": False, **test.summary(), "null_note": note}
    else:
        reason = note if null is None else (f"method B needs at least 3 invariances and 3 noise-only images; "
                                            f"got {stack.shape[0]} and {null.shape[0]}")
        method_b = {"skipped": True, "reason": reason}

    samples = _merged_samples(result.numbers, noise, change)
    uncalibrated = None
    if refinement and not null_refined and texture is None:
        uncalibrated = REFINED_SAMPLES_NOTE.format(what=f"no noise-only null of scans is at hand and {texture_note}")
        warnings.warn(uncalibrated, RuntimeWarning)
    used = _model_of(result, model, required=False) if refinement else None  # refined null, noise texture
    record = {
        "version": 1,
        "sample_folder": str(folder),
        "count": int(stack.shape[0]),
        "spacing_mm": list(spacing),
        "settings": {"alpha": alpha, "fdr": fdr, "sigma_mm": sigma_mm, "min_area_mm2": min_area_mm2,
                     "max_passed_on": max_passed_on if outputs else None, "null_source": null_source,
                     "refinement": refinement.as_dict(), "null_refined": null_refined,
                     "model": None if used is None else str(used),
                     **({} if outputs else {"max_passed_on_note": "f(x) or f(x~) is missing from the sample "
                                            "folder: every region counts, including the sampler's own errors"})},
        "noise": noise,
        "method_a": {**change.summary(), "samples": [{k: v for k, v in s.items()} for s in change.samples],
                     **({"refined_samples_note": uncalibrated} if uncalibrated else {})},
        "method_b": method_b,
        "samples": samples,
        "stacks": "axis 0 of change_maps.nrrd and altered_regions.nrrd is the sample index k, as in invariances.nrrd",
    }
    out = folder / ANALYSIS_DIR
    written = [name for name in ANALYSIS_FILES if test is not None or name not in METHOD_B_FILES]
    record["files"] = {name: ANALYSIS_FILES[name] for name in written}
    report("writing", 0, len(written))
    with written_whole(out) as partial:
        _write(partial, crop, result, change, test, record, samples, lambda n: report("writing", n, len(written)))
    return out, record


def _merged_samples(numbers: dict, noise: dict, change) -> list:
    by_index = {s["index"]: s for s in numbers.get("samples", [])}
    merged = []
    for n, a in zip(noise["samples"], change.samples):
        k = a["index"]
        merged.append({"index": k, "rank": a["rank"], "noise_std_hu": n["std_hu"],
                       "noise_ratio_to_input": n["ratio_to_input"],
                       "noise_residual_correlation": n["residual_correlation"],
                       "varying_noise_std_hu": n["varying_std_hu"],
                       "varying_noise_ratio_to_input": n["varying_ratio_to_input"], "area_mm2": a["area_mm2"],
                       "peak_abs_hu": a["peak_abs_hu"], "region_count": a["region_count"],
                       "regions_seen_by_f": len(a["seen_by_f"]),
                       "max_abs_z": a["max_abs_z"], "noise_sigma_hu": a["noise_sigma_hu"],
                       "mean_abs_change_hu": by_index.get(k, {}).get("mean_abs_change_hu")})
    return merged


def _write(partial: Path, crop: CTImage, result, change, test, record: dict, samples: list,
           update: Callable[[int], None]) -> None:
    from .io import write_nrrd

    stack = _stack_image(crop, change.change_map)
    done = 0
    volumes = [("change_maps", stack, change.change_map), ("altered_regions", stack, change.labels)]
    if test is not None:
        volumes += [("significance", crop, test.significance[None]), ("significant_regions", crop, test.labels[None])]
    for name, geometry, array in volumes:
        write_nrrd(geometry, partial / ANALYSIS_FILES[name], array=array)
        done += 1
        update(done)
    with open(partial / ANALYSIS_FILES["numbers"], "w") as f:
        json.dump(record, f, indent=1)
    done += 1
    update(done)
    with open(partial / ANALYSIS_FILES["table"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c for c, _ in CSV_COLUMNS])
        for s in samples:
            writer.writerow(["" if s[key] is None else s[key] for _, key in CSV_COLUMNS])
    done += 1
    update(done)
    _figure(partial / ANALYSIS_FILES["figure"], crop, result, change, test)
    update(done + 1)


def _outline(labels: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    inside = labels > 0
    return ndimage.binary_dilation(inside) & ~inside  # just outside, so that it shows on a bright region


def _figure(path: Path, crop: CTImage, result, change, test) -> None:
    """The paper's figure row (x, f(x), three invariances, std) + a change-map column; under
    the invariances their change maps with altered regions outlined, under the std map
    method B's significance map (see the module docstring)."""
    from .figures import LUNG_WINDOW, save_png, std_tile, tile_grid, window

    x = crop.array[0]
    denoised = result.volumes["denoised"].array[0] if "denoised" in result.volumes else np.zeros_like(x)
    invariances = result.volumes["invariances"].array
    std = result.volumes["std"].array[0] if "std" in result.volumes else invariances.std(axis=0)
    shown = change.ranking[:3]
    top = max(2.0 * change.threshold_z, 1.0)

    def zmap(z, labels=None):
        tile = window(np.abs(z), top / 2.0, top)
        if labels is not None:
            tile[_outline(labels)] = 255
        return tile

    blank = np.zeros(x.shape, np.uint8)
    std_image, std_label = std_tile(std)
    row1 = ([window(a, *LUNG_WINDOW) for a in (x, denoised, *invariances[shown])] + [std_image]
            + [zmap(np.abs(change.change_map).max(axis=0), change.labels.max(axis=0))])
    labels1 = ["x", "f(x)", *[f"x~{k} (A rank {change.samples[k]['rank']})" for k in shown], std_label,
               f"max |z| 0-{top:.0f}"]
    row2 = [blank, blank, *[zmap(change.change_map[k], change.labels[k]) for k in shown]]
    labels2 = ["", "", *[f"|z| x~{k}: {change.samples[k]['area_mm2']:.0f} mm2" for k in shown]]
    if test is not None:
        row2.append(window(test.significance, 2.0, 4.0))
        labels2.append("B: -log10 q 0-4")
    save_png(tile_grid([row1, row2], [labels1, labels2]), path)


def load_analysis(folder) -> dict:
    """Read ``folder/analysis/`` (``folder``: the sample folder or the analysis folder itself):
    ``{"numbers": analysis.json, "<name>": CTImage for each NRRD present}``."""
    folder = Path(folder)
    if (folder / ANALYSIS_DIR).is_dir():
        folder = folder / ANALYSIS_DIR
    numbers_path = folder / ANALYSIS_FILES["numbers"]
    if not numbers_path.is_file():
        raise ValueError(f"{folder}: no analysis here (run invariance-explorer analyze on the sample folder)")
    loaded = {"numbers": read_json_object(numbers_path, "the analysis is damaged: run invariance-explorer analyze "
                                                        "on the sample folder again")}
    for name, file in ANALYSIS_FILES.items():
        if file.endswith(".nrrd") and (folder / file).is_file():
            loaded[name] = read_volume(folder / file)
    count, sample_numbers = loaded["numbers"].get("count"), folder.parent / FILES["numbers"]
    samples = read_json_object(sample_numbers, "the sample folder is damaged").get("count") \
        if sample_numbers.is_file() else None
    if samples is None:  # an old sample folder without its count: the stack says it
        invariances = folder.parent / FILES["invariances"]
        samples = read_volume(invariances).array.shape[0] if invariances.is_file() else count
    frames = {name: loaded[name].array.shape[0] for name in ("change_maps", "altered_regions") if name in loaded}
    if any(n != samples for n in (count, *frames.values())):
        raise ValueError(f"{folder}: this analysis is of {count} samples ({', '.join(f'{n} in {k}' for k, n in frames.items())}"
                         f") but its sample folder holds {samples}: it belongs to another run; run invariance-explorer "
                         f"analyze on {folder.parent} again")
    return loaded


