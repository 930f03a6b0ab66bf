"""``invariance-explorer fit``: the invariance models of the user's own denoiser in one run.

:func:`fit` imports and checks the denoiser (:mod:`.custom_denoisers`), trains its
representation (cVAE, :func:`~.train_invariance.train_cvae`) and invariance flow (cINN,
:func:`~.train_invariance.train_cinn`) on the low-dose images of ``data``, measures the
fidelity figures on the test split, and writes a model folder of the bundled shape, with the
budget spent in its metadata and model card. The intermediate runs live in a work folder
(checkpoints every epoch), so an interrupted fit continues with ``resume``. Alone, on one GPU
or under ``torchrun`` (every process runs :func:`fit`; rank 0 writes).

The budget (:func:`parse_budget`) is a number of cVAE optimisation steps (``3000steps``) or a
wall time (``45m``, ``2h``) turned into steps by timing a few real cVAE steps on this machine
(:func:`plan`). Only low-dose images are used for training (a paired data set's full-dose
images serve the fidelity figures); data without phantom tissue labels (DICOM) train without
the perceptual term, which needs a feature network trained on labels.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

#: Share of a time budget given to the cVAE (with its feature network); the rest goes to the
#: cINN, the patch pool and the fidelity figures.
CVAE_SHARE = 0.75
#: Budget when none is given.
DEFAULT_BUDGET = "2000steps"
#: Epochs of each training (checkpoints and validation after each).
EPOCHS = 4


def parse_budget(text: str) -> dict:
    """``{"steps": N}`` for ``"N"``/``"Nsteps"``, ``{"minutes": M}`` for ``"Mm"``/``"Mmin"``/
    ``"Hh"``; ``ValueError`` saying the forms otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(steps?|m|min|minutes?|h|hours?)?\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"budget {text!r}: give cVAE steps (e.g. 3000steps) or a wall time (e.g. 45m, 2h)")
    value, unit = float(match.group(1)), (match.group(2) or "steps")
    if unit.startswith("step"):
        if value != int(value) or value < 8:
            raise ValueError(f"budget {text!r}: at least 8 whole steps")
        return {"steps": int(value)}
    return {"minutes": value * (60.0 if unit.startswith("h") else 1.0)}


def seconds_per_cvae_step(denoiser_folder: Path, patch_size: int, batch_size: int, device, repeats: int = 2,
                          hyperparameters: Optional[dict] = None) -> float:
    """Wall seconds of one full cVAE step (critic, gradient penalty, adversarial weight, and
    every term its hyperparameters switch on) of the representation the fit will train
    (``hyperparameters``: its overrides of ``HYPERPARAMETERS["cvae"]``) on random patches,
    timed here after one warm-up step."""
    from .denoisers import load_denoiser
    from .train_invariance import _CVAEObjective, _hyperparameters

    hp = _hyperparameters("cvae", None, hyperparameters)
    hp["adv_min_separation"] = None  # the adversarial term's gradients run in every timed step
    denoiser = load_denoiser(denoiser_folder, device=device)
    objective = _CVAEObjective(hp, patch_size, denoiser_folder)
    for name, network in objective.networks.items():
        network.to(device)
        objective.wrapped[name] = network
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 1, patch_size, patch_size, generator=rng).to(device) * 0.1
    with torch.no_grad():
        y = denoiser.network(x)
    objective.step(x, y, hp["adv_start"] + 1, rng)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        objective.step(x, y, hp["adv_start"] + 1, rng)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / repeats


def plan(budget: dict, seconds_per_step: Optional[float] = None) -> dict:
    """Steps of each stage for a budget: the cVAE's steps (from a time budget: its share of
    the time over ``seconds_per_step``), its feature network and adversarial start, and the
    cINN's steps, each a multiple of :data:`EPOCHS` epochs."""
    if "steps" in budget:
        steps = budget["steps"]
    else:
        if not seconds_per_step:
            raise ValueError("a time budget needs the measured seconds per cVAE step")
        steps = int(budget["minutes"] * 60.0 * CVAE_SHARE / (1.6 * seconds_per_step))  # 0.6: feature network
    per_epoch = max(1, steps // EPOCHS)
    steps = per_epoch * EPOCHS
    return {"cvae_steps": steps, "cvae_steps_per_epoch": per_epoch, "feature_steps": max(20, min(2000, steps // 2)),
            "adv_start": steps // 4, "cinn_steps": EPOCHS * max(25, per_epoch), "cinn_steps_per_epoch": max(25, per_epoch),
            "seconds_per_cvae_step": seconds_per_step}


def denoiser_source(source) -> Path:
    """The file or folder of a fit's denoiser: ``source`` itself, or the folder of a bundled
    name (cnn10, ...); ``ValueError`` saying what to give when it does not exist or is a
    training run's folder instead of its model folder."""
    from .denoisers import DENOISERS, resolve_model_folder

    source = resolve_model_folder(source) if str(source) in DENOISERS else Path(source)
    if not source.exists():
        raise ValueError(f"{source}: no such file or folder; give a model folder (train denoiser's OUT/model, or "
                         f"a bundled name: {', '.join(DENOISERS)}) or your denoiser's network file")
    if (source / "model" / "metadata.json").is_file() and not (source / "metadata.json").is_file():
        raise ValueError(f"{source} is a training run's folder; give its model folder, {source / 'model'}")
    return source


def _broadcast(value, dist):
    """Rank 0's ``value`` on every process."""
    if not dist.enabled:
        return value
    import torch.distributed as torch_dist

    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


#: In the work folder: the denoiser and settings a fit was started with (``resume`` checks them).
REQUEST_FILE = "denoiser_request.json"


def _denoiser_request(source, normalization, use, class_path, arguments) -> dict:
    """What identifies the denoiser a fit imports (JSON-ready): its resolved path, the SHA-256
    of a file source (which identifies it wherever it lies), and the import settings."""
    from .denoisers import sha256

    path = Path(source).resolve()
    return {"source": str(path), "source_sha256": sha256(path) if path.is_file() else None,
            "normalization": normalization.to_dict() if normalization is not None else None, "use": use,
            "class": class_path, "arguments": dict(arguments or {})}


def fit(source, data, out, *, normalization=None, use: str = "patch", class_path: Optional[str] = None,
        arguments: Optional[dict] = None, name: Optional[str] = None, budget: str = DEFAULT_BUDGET,
        device="auto", seed: int = 0, resume: bool = False, work=None, patch_size: int = 128, batch_size: int = 8,
        fidelity_slices: int = 4, weights_dtype: str = "float32", hyperparameters: Optional[dict] = None,
        progress: bool = True, dicom: str = "auto", refinement=None) -> Path:
    """Import the denoiser ``source`` (see :func:`~.custom_denoisers.import_denoiser` for
    ``normalization``, ``use``, ``class_path``, ``arguments``, ``name``; a model folder, e.g.
    of ``train denoiser``, is taken as it is and they are ignored), fit its invariance
    models on ``data`` (simulated set, paired or low-dose-only DICOM folder:
    :func:`~.datasets.open_source`; ``dicom``: "auto", "paired" or "low-dose") within ``budget``, and write the
    model folder ``out`` whole (replacing it only when it is this fit's earlier output: the same work folder).
    ``work`` (default ``<out>.work``) keeps the runs; ``resume`` continues them.
    ``budget``: cVAE steps ("3000steps") or wall time ("45m", "2h") for the two trainings.
    ``device``: "auto", "cpu" or "cuda"; ``seed`` seeds every random draw. ``patch_size``
    (px) and ``batch_size`` (cVAE patches per step) as in :func:`~.train_invariance.train_cvae`;
    ``fidelity_slices``: test slices for the card's figures (0: none); ``weights_dtype``:
    "float32" or "float16" storage. ``hyperparameters``: ``{"cvae": {...}, "cinn": {...}}``
    overrides of :data:`~.train_invariance.HYPERPARAMETERS` (e.g. a smaller model).
    ``refinement``: the sampler's consistency refinement written into the folder (None:
    none). ``progress``: tqdm bars. Returns ``out``."""
    from . import __version__
    from .custom_denoisers import import_denoiser
    from .datasets import open_source
    from .simulated_dataset import SimulatedDataset
    from .denoisers import copy_model_folder, read_metadata, write_metadata
    from .devices import machine
    from .io import write_json, written_whole
    from .sampler import Refinement
    from .train_invariance import _check, _hyperparameters, _write_card, train_cinn, train_cvae
    from .training import check_data, data_noise_texture, setup_distributed

    refinement = Refinement.parse(refinement)  # a bad setting fails now, not after the cVAE's training

    started = time.perf_counter()
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    limits = parse_budget(budget)
    overrides = hyperparameters or {}
    unknown = set(overrides) - {"cvae", "cinn"}
    if unknown:
        raise ValueError(f"hyperparameters are given per stage, cvae and cinn; got {', '.join(sorted(unknown))}")
    for stage in ("cvae", "cinn"):  # names and kinds of value now, not after the import or the training
        _hyperparameters(stage, None, overrides.get(stage))
    _check(1, 1, batch_size, patch_size, 1)
    if fidelity_slices < 0:
        raise ValueError(f"fidelity_slices must be >= 0 (0: none); got {fidelity_slices}")
    if out.exists() and any(out.iterdir()) and not (out / "metadata.json").is_file():
        raise ValueError(f"{out} exists and is not a model folder; choose a new output folder")
    if out.exists() and (out / "metadata.json").is_file():
        made_by = read_metadata(out).get("fit", {}).get("work_folder")
        if made_by != str(work.resolve()):  # a bundled folder, its copy or another fit's: not ours to replace
            raise ValueError(f"{out} holds a model folder that this fit did not make (its work folder would be "
                             f"{work}); choose a new output folder")
    source = denoiser_source(source)
    if work.resolve() == out.resolve():
        raise ValueError(f"--work and --out are one folder ({out}); the model folder would replace the work folder: "
                         "give another --work, or none (OUT.work)")
    if work.exists() and any(work.iterdir()) and not (work / REQUEST_FILE).is_file():
        raise ValueError(f"{work} is not the work folder of a fit (it has no {REQUEST_FILE}); give a new --work, "
                         "or none (OUT.work)")
    if work.exists() and any(work.iterdir()) and not resume:
        raise ValueError(f"{work} holds an earlier fit; pass --resume to continue it, or delete it to start over")
    model_folder = (Path(source) / "metadata.json").is_file()
    if normalization is None and not model_folder:
        raise ValueError(f"{source}: declare the denoiser's input normalisation (HUNormalization.parse)")
    request = _denoiser_request(source, normalization, use, class_path, arguments)
    if resume and not (work / REQUEST_FILE).is_file():
        warnings.warn(f"{work} holds no fit to resume: starting a new one", RuntimeWarning)
    if resume and (work / REQUEST_FILE).is_file():
        earlier = json.loads((work / REQUEST_FILE).read_text())
        moved = request["source_sha256"] is not None and request["source_sha256"] == earlier.get("source_sha256")
        changed = [k for k in request if request[k] != earlier.get(k) and not (k == "source" and moved)]
        if changed:  # a file is the same denoiser wherever it lies now
            was = "; ".join(f"{k} was {earlier.get(k)!r}" for k in changed if k != "source_sha256")
            was = was or "the source file's contents differ"
            raise ValueError(f"{work} holds a fit of another denoiser or setting ({was}); resume it with the same "
                             "denoiser and settings, or give a new --out")
    source_data = open_source(data, dicom=dicom)
    check_data(source_data, data, patch_size, test=bool(fidelity_slices))
    dist = setup_distributed(device)
    try:
        denoiser_folder = work / "denoiser"
        if dist.is_main and not (denoiser_folder / "metadata.json").is_file():
            made = not work.exists()
            work.mkdir(parents=True, exist_ok=True)
            try:
                if model_folder:  # of train denoiser, bundled, or imported before
                    read_metadata(source)
                    copy_model_folder(Path(source), denoiser_folder)
                else:
                    import_denoiser(source, denoiser_folder, normalization=normalization, use=use,
                                    class_path=class_path, arguments=arguments, name=name, device=dist.device,
                                    patch_size=patch_size, overwrite=True)
            except BaseException:
                if made:  # a refused denoiser leaves no work folder behind
                    shutil.rmtree(work, ignore_errors=True)
                raise
            write_json(work / REQUEST_FILE, request)
        dist.barrier()
        per_step, timing = None, work / "seconds_per_cvae_step.json"
        if "minutes" in limits:  # measured once: a resumed fit keeps its plan (steps per epoch, ...)
            def measured() -> float:
                if timing.is_file():
                    return float(json.loads(timing.read_text())["seconds"])
                seconds = seconds_per_cvae_step(denoiser_folder, patch_size, batch_size, dist.device,
                                                hyperparameters=overrides.get("cvae"))
                write_json(timing, {"seconds": seconds})
                return seconds

            per_step = _broadcast(measured() if dist.is_main else None, dist)
        steps = plan(limits, per_step)
        if dist.is_main and limits.get("steps", steps["cvae_steps"]) != steps["cvae_steps"]:
            warnings.warn(f"budget {budget}: the cVAE trains {steps['cvae_steps']} steps, {EPOCHS} epochs of "
                          f"{steps['cvae_steps_per_epoch']} (a multiple of {EPOCHS})")
        labelled = isinstance(source_data, SimulatedDataset)
        hp = {"feature_steps": steps["feature_steps"], "adv_start": steps["adv_start"], **overrides.get("cvae", {})}
        if not labelled:
            hp["lam_perc"] = 0.0
        common = dict(seed=seed, device=dist.device, weights_dtype=weights_dtype, progress=progress,
                      fidelity_slices=fidelity_slices, dicom=dicom)
        cvae_run, cinn_run = work / "cvae", work / "cinn"
        cvae_model = train_cvae(denoiser_folder, data, cvae_run, epochs=EPOCHS,
                                steps_per_epoch=steps["cvae_steps_per_epoch"], batch_size=batch_size,
                                patch_size=patch_size, resume=resume and cvae_run.exists(), hyperparameters=hp,
                                val_patches=16, **common)
        model = train_cinn(cvae_model, data, cinn_run, epochs=EPOCHS, steps_per_epoch=steps["cinn_steps_per_epoch"],
                           resume=resume and cinn_run.exists(), pool_patches=1024, val_patches=32,
                           hyperparameters=overrides.get("cinn"), refinement=refinement, **common)
        if dist.is_main:
            with written_whole(out) as temporary:
                shutil.copytree(model, temporary, dirs_exist_ok=True)
                metadata = read_metadata(temporary)
                metadata["fit"] = {
                    "budget": budget, "plan": steps, "wall_time_s": round(time.perf_counter() - started, 1),
                    "resumed": bool(resume),  # then wall_time_s is the last session's alone
                    "perceptual_term": "feature network trained on phantom tissue labels" if labelled else
                    "off: the data have no tissue labels",
                    "machine": machine(dist.device), "world_size": dist.world_size, "engine_version": __version__,
                    "work_folder": str(work.resolve())}
                if not metadata.get("noise_texture"):  # for analysing refined samples without scans
                    texture = data_noise_texture(source_data)
                    if texture is not None:
                        metadata["noise_texture"] = texture
                write_metadata(temporary, metadata)
                _write_card(temporary)
        dist.barrier()
        return out
    finally:
        dist.close()
