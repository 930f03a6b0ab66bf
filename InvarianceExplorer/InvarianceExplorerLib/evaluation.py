"""Held-out figures of the denoisers, and the model cards that publish them.

:func:`held_out_quality` denoises the whole slices of the test split of a data set (the
patient-level split of :func:`~.datasets.split_patients`, never used in training) with each
denoiser and measures, for the low-dose input and each output, against full dose: RMSE (HU),
PSNR (dB) and SSIM (:func:`~.inference.image_quality`), and the noise standard deviation in
uniform regions (:func:`uniform_regions`, :func:`noise_std`), next to that of full dose.

:func:`ship_denoiser` turns a trained model folder into a bundled one (float16 weights when
that changes the held-out RMSE by at most 0.1 HU); :func:`write_held_out` stores the figures
in ``metadata.json`` and writes ``MODEL_CARD.md`` beside the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .devices import machine_words, machine
from .denoisers import (CUSTOM, METADATA, Denoiser, copy_model_folder, load_denoiser, read_metadata,
                        resolve_model_folder, save_denoiser, verify_weights, write_metadata)
from .inference import METRIC_HU_RANGE, denoise, image_quality
from .io import written_whole

MODEL_CARD = "MODEL_CARD.md"
#: Pixels removed from the edge of each uniform region (3.5 mm at 0.7 mm) so that partial
#: volume and the blur of edges do not count as noise.
EROSION_PX = 5
#: Components of a uniform region smaller than this (pixels, after erosion) are ignored.
MIN_COMPONENT_PX = 50


def uniform_regions(labels: np.ndarray, erosion_px: int = EROSION_PX) -> Dict[str, np.ndarray]:
    """Boolean masks of the phantom's near-uniform tissues in a label map ``(H, W)``:
    ``"heart"`` (myocardium and blood, texture amplitude <= 2 HU) and ``"soft_tissue"``
    (muscle, cord; texture <= 5 HU), each eroded by ``erosion_px`` pixels."""
    from scipy.ndimage import binary_erosion

    from .phantom import Label

    return {name: binary_erosion(labels == label, iterations=erosion_px)
            for name, label in (("heart", Label.HEART), ("soft_tissue", Label.SOFT_TISSUE))}


def noise_std(image_hu: np.ndarray, mask: np.ndarray, min_pixels: int = MIN_COMPONENT_PX) -> Optional[float]:
    """Pooled standard deviation (HU) of ``image_hu`` within the connected components of
    ``mask``: each component about its own mean (so structures of different mean HU do not
    count as noise), components under ``min_pixels`` pixels ignored; None if none is left.
    On a phantom this is noise plus the tissue's small texture."""
    from scipy.ndimage import label

    components, n = label(mask)
    squares, count = 0.0, 0
    for k in range(1, n + 1):
        values = image_hu[components == k].astype(np.float64)
        if values.size >= min_pixels:
            squares += float(((values - values.mean()) ** 2).sum())
            count += values.size - 1
    return float(np.sqrt(squares / count)) if count else None


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def held_out_quality(data, denoisers: Mapping[str, Denoiser], split: str = "test", limit: Optional[int] = None,
                     device="cpu", progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Figures of the low-dose input, full dose and each denoiser on the whole slices of ``split``.

    Args:
        data: a simulated data set (folder or :class:`~.datasets.SimulatedDataset`) or any
            source of :func:`~.datasets.open_source`; uniform-region noise needs labels.
        denoisers: ``{name: Denoiser}``.
        split: "test" (default), "val", "train" or "all".
        limit: at most this many slices, evenly spaced (None: all).
        progress: called as ``progress(done, total)`` after each slice.

    Returns:
        ``{"split", "slices", "patients", "metric_hu_range", "figures": {row: {...}}}`` with
        rows ``"low_dose"``, each denoiser name, and ``"full_dose"``; each holds the means
        over slices of ``rmse_hu``, ``psnr_db``, ``ssim`` (not for full dose),
        ``rmse_reduction`` (fraction of the low-dose RMSE removed, denoisers only) and
        ``noise_std_hu`` ``{"heart", "soft_tissue"}`` (:func:`noise_std`, HU).
    """
    from .datasets import open_source, require_full_dose, split_indices

    source = open_source(data) if isinstance(data, (str, os.PathLike)) else data
    require_full_dose(source, data, "measuring a denoiser against full dose")
    indices = split_indices(source, split, limit)
    if not indices:
        raise ValueError(f"{data}: the {split} split is empty")
    rows = ["low_dose", *denoisers, "full_dose"]
    scores: Dict[str, list] = {r: [] for r in rows}
    noise: Dict[str, Dict[str, list]] = {r: {"heart": [], "soft_tissue": []} for r in rows}
    for done, index in enumerate(indices, 1):
        item = source[index]
        low, full = item.images()
        images = {"low_dose": item.low_dose, "full_dose": item.full_dose}
        for name, model in denoisers.items():
            images[name] = denoise(model, low, device=device).array
        regions = uniform_regions(item.labels) if item.labels is not None else {}
        for row in rows:
            if row != "full_dose":
                scores[row].append(image_quality(images[row], item.full_dose))
            for region, mask in regions.items():
                noise[row][region].append(noise_std(images[row], mask))
        if progress is not None:
            progress(done, len(indices))
    figures = {}
    for row in rows:
        figures[row] = {m: _mean(s[m] for s in scores[row]) for m in ("rmse_hu", "psnr_db", "ssim")} \
            if scores[row] else {}
        figures[row]["noise_std_hu"] = {region: _mean(v) for region, v in noise[row].items()}
    for name in denoisers:
        figures[name]["rmse_reduction"] = 1.0 - figures[name]["rmse_hu"] / figures["low_dose"]["rmse_hu"]
    return {"split": split, "slices": len(indices),
            "patients": len({source.patient_ids[i] for i in indices}),
            "metric_hu_range": list(METRIC_HU_RANGE), "noise_regions": {
                "heart": "phantom label HEART", "soft_tissue": "phantom label SOFT_TISSUE",
                "erosion_px": EROSION_PX, "min_component_px": MIN_COMPONENT_PX,
                "estimator": "pooled std about each connected component's mean (noise + phantom texture)"},
            "data": str(data), "figures": figures}


def quality_table(result: dict) -> str:
    """A Markdown table of :func:`held_out_quality`'s figures (one row per image kind)."""
    names = {"low_dose": "low dose (input)", "full_dose": "full dose (reference)"}
    lines = ["| image | RMSE (HU) | RMSE reduction | PSNR (dB) | SSIM | noise std heart (HU) | noise std soft tissue (HU) |",
             "|---|---|---|---|---|---|---|"]

    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    for row, f in result["figures"].items():
        noise = f.get("noise_std_hu", {})
        reduction = f.get("rmse_reduction")
        lines.append(f"| {names.get(row, row)} | {fmt(f.get('rmse_hu'), '.1f')} | "
                     f"{'–' if reduction is None else f'{100 * reduction:.0f} %'} | {fmt(f.get('psnr_db'), '.2f')} | "
                     f"{fmt(f.get('ssim'), '.4f')} | {fmt(noise.get('heart'), '.1f')} | "
                     f"{fmt(noise.get('soft_tissue'), '.1f')} |")
    return "\n".join(lines)


def ship_denoiser(trained, destination, data, tolerance_hu: float = 0.1, limit: Optional[int] = None,
                  device="cpu", reproduce: Sequence[str] = (), notes: Sequence[str] = ()) -> dict:
    """Copy the trained model folder ``trained`` to ``destination`` (e.g.
    ``Resources/Models/cnn10``) with float16 weights if its held-out RMSE on ``data``'s test
    split changes by at most ``tolerance_hu`` HU against float32, else float32; then write
    the held-out figures and the model card there (:func:`write_held_out`). Returns the
    record of the choice ``{"dtype", "rmse_hu": {"float32", "float16"}, "result"}``."""
    trained = resolve_model_folder(trained)
    metadata = read_metadata(trained)
    if metadata["weights"]["denoiser"]["dtype"] != "float32":
        raise ValueError(f"{trained}: ship from float32 weights (they are {metadata['weights']['denoiser']['dtype']})")
    name = metadata["architecture"]["name"]
    model32 = load_denoiser(trained, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        extra = {}
        if "feature_network" in metadata["weights"]:
            from .denoisers import FeatureNetwork, load_weights

            extra["feature_network"] = load_weights(FeatureNetwork(), trained, metadata["weights"]["feature_network"])
        fields = {k: v for k, v in metadata.items()
                  if k not in ("format", "version", "architecture", "normalization", "weights")}
        fp16 = save_denoiser(Path(tmp) / "fp16", model32.network, name, metadata["architecture"]["arguments"],
                             model32.normalization, fields, dtype="float16", extra=extra)
        carried = {k: v for k, v in metadata["weights"].items() if k not in ("denoiser", *extra)}
        if carried:  # invariance models (cVAE, cINN) trained for this denoiser go along unchanged
            for entry in carried.values():
                shutil.copy2(verify_weights(trained, entry), fp16 / entry["file"])
            record = read_metadata(fp16)
            record["weights"].update(carried)
            write_metadata(fp16, record)
        model16 = load_denoiser(Path(tmp) / "fp16", device=device)
        result = held_out_quality(data, {f"{name} float32": model32, f"{name} float16": model16}, limit=limit,
                                  device=device)
        rmse = {d: result["figures"][f"{name} {d}"]["rmse_hu"] for d in ("float32", "float16")}
        dtype = "float16" if abs(rmse["float16"] - rmse["float32"]) <= tolerance_hu else "float32"
        source = Path(tmp) / "fp16" if dtype == "float16" else trained
        replaced = set(read_metadata(destination)["weights"]) - set(metadata["weights"]) \
            if (Path(destination) / METADATA).is_file() else set()
        if replaced:  # trained for the denoiser being replaced: they do not describe the new one
            warnings.warn(f"{destination}: its {', '.join(sorted(replaced))} weights, trained for the denoiser "
                          "shipped there before, are replaced with it; train them again for the new denoiser "
                          "(train cvae, then train cinn)", RuntimeWarning)
        figures = result["figures"]
        chosen = figures.pop(f"{name} {dtype}")
        figures.pop(f"{name} {'float32' if dtype == 'float16' else 'float16'}")
        result["figures"] = {"low_dose": figures["low_dose"], name: chosen, "full_dose": figures["full_dose"]}
        choice = {"dtype": dtype, "tolerance_hu": tolerance_hu, "rmse_hu": rmse}
        destination = Path(destination)
        if destination.is_dir() and any(destination.iterdir()) and not (destination / METADATA).is_file():
            raise ValueError(f"{destination} holds files but no model folder; choose an empty or new folder")
        with written_whole(destination) as partial:  # the shipped folder is replaced whole or not at all
            copy_model_folder(source, partial)
            write_held_out(partial, result, reproduce=reproduce, notes=notes, weights_choice=choice)
    return {**choice, "result": result}


def write_held_out(folder, result: dict, reproduce: Sequence[str] = (), notes: Sequence[str] = (),
                   weights_choice: Optional[dict] = None) -> Path:
    """Store ``result`` (:func:`held_out_quality`, rows ``low_dose``, the model's name,
    ``full_dose``) as ``held_out`` in ``folder``'s ``metadata.json`` together with the
    machine, ``reproduce`` (commands) and ``notes``, then write ``MODEL_CARD.md``. Weight
    files are untouched, so their checksums stay valid. Returns the model card path."""
    folder = Path(folder)
    metadata = read_metadata(folder)
    metadata["held_out"] = {**result, "machine": machine()}
    if reproduce:
        metadata["reproduce"] = list(reproduce)
    if notes:
        metadata["notes"] = list(notes)
    if weights_choice:
        metadata["weights_choice"] = weights_choice
    write_metadata(folder, metadata)
    path = folder / MODEL_CARD
    path.write_text(model_card(metadata))
    return path


def _custom_card(metadata: dict) -> List[str]:
    """Model card lines of an imported denoiser (:mod:`.custom_denoisers`) and its fit."""
    a, checks = metadata["architecture"], metadata.get("checks", {})
    n = metadata["normalization"]
    lines = [f"# {a.get('display_name')} — model card", "",
             f"The user's own denoiser `{a.get('display_name')}`, imported by InvarianceExplorer "
             f"{metadata.get('engine_version')} from `{a.get('source')}` ({a['kind']}"
             + (f", class `{a['class']}`, arguments `{json.dumps(a.get('arguments', {}))}`" if a.get("class") else "")
             + f"); use: {a.get('use')}; receptive field {a.get('receptive_field')} px "
             f"(measured{', at least' if checks.get('receptive_field_lower_bound') else ''}). Generated from "
             f"`{METADATA}`.", "", "## Files", ""]
    for key, r in {**metadata["weights"], **a.get("files", {})}.items():
        lines.append(f"- `{r['file']}` ({key}): SHA-256 `{r['sha256']}`")
    lines += ["", "## Declared normalisation", "",
              f"network units = (HU + {n.get('offset')} − {n.get('mean')}) / {n.get('std')}", "",
              "## Checks passed at import", "",
              f"On {checks.get('device')} with {checks.get('probe')} {checks.get('input_shape')}: one channel in and "
              f"out, same size, finite, two eval-mode runs differ by {checks.get('repeat_max_difference_hu')} HU, "
              f"mean change {checks.get('mean_abs_change_hu')} HU."]
    return lines + _fit_lines(metadata)


def _fit_lines(metadata: dict) -> List[str]:
    """Model card lines of ``metadata["fit"]`` (what ``invariance-explorer fit`` spent)."""
    lines, fit = [], metadata.get("fit")
    if fit:
        p, m = fit["plan"], fit.get("machine", {})
        cvae = (metadata.get("invariance") or {}).get("training", {}).get("cvae", {})
        reused = (cvae.get("feature_network") or {}).get("source")  # the denoiser's own, not trained
        lines += ["", "## Fit", "",
                  f"`invariance-explorer fit` with budget `{fit['budget']}`: cVAE {p['cvae_steps']} steps ("
                  + ("" if str(fit.get("perceptual_term")).startswith("off") else
                     "feature network reused, " if reused else f"feature network {p['feature_steps']}, ")
                  + f"critic from step {p['adv_start']}), cINN {p['cinn_steps']} steps"
                  + (f"; {p['seconds_per_cvae_step']:.2f} s per cVAE step measured"
                     if p.get("seconds_per_cvae_step") else "")
                  + f". Spent {fit['wall_time_s']} s on {m.get('device')} ({machine_words(m)}, "
                    f"{fit.get('world_size')} process(es))"
                  + (" in its last session (it resumed an earlier one; the stages' wall times count every session)"
                     if fit.get("resumed") else "")
                  + f". Perceptual term: {fit.get('perceptual_term')}."]
    return lines


#: Training-record fields the model card words itself, or leaves out on purpose (the engine
#: version; the low-dose input's own validation figures); any others are listed as they are.
_TRAINING_KNOWN = {"data", "split", "epochs", "steps_per_epoch", "steps", "batch_size", "seed", "scheme",
                   "precision", "hyperparameters", "best_epoch", "validation", "wall_time_s", "machine",
                   "initialised_from", "feature_network", "engine_version", "validation_low_dose"}


def _phrase(template: str, *values) -> str:
    """``template`` filled with ``values``, or "" when any of them is unknown (None)."""
    return "" if any(v is None for v in values) else template.format(*values)


def _training_lines(t: dict, patch_size) -> list:
    """The model card's Training lines from a denoiser's training record ``t``, saying only
    what the record holds (a record of another training script lacks some fields)."""
    d, m, split = t.get("data") or {}, t.get("machine") or {}, t.get("split") or {}
    lines = []
    if d:
        lines.append(f"- data: {d.get('kind', 'unknown')} pairs `{d.get('path')}`"
                     + _phrase(": {} slices of {}² px", d.get("pairs"), d.get("size"))
                     + _phrase(" at {} mm", d.get("pixel_spacing_mm"))
                     + _phrase(", dose fraction {} (quarter dose)" if d.get("dose") == 0.25 else ", dose fraction {}",
                               d.get("dose"))
                     + _phrase(", base seed {}", d.get("seed"))
                     + _phrase(", full-dose photons per ray {}", (d.get("photons") or {}).get("full_dose")))
    if split:
        lines.append(f"- split by patient {split.get('fractions')} (seed {split.get('seed')}): {split.get('patients')}")
    steps = (_phrase("{} epochs × {} steps", t.get("epochs"), t.get("steps_per_epoch"))
             or _phrase("{} steps", t.get("steps")))
    if steps:
        lines.append(f"- {steps}" + _phrase(", batch {} patches", t.get("batch_size"))
                     + _phrase(" of {}² px", patch_size) + ", random flips/rotations"
                     + _phrase("; seed {}", t.get("seed")))
    mixed = " (mixed precision: bfloat16 autocast, float32 weights)" if t.get("precision") == "bfloat16" else ""
    lines.append(f"- training scheme {t.get('scheme', 'not recorded')}, {t.get('precision', 'float32')} arithmetic"
                 + mixed)
    if t.get("hyperparameters"):
        lines.append(f"- optimiser: Adam, {json.dumps(t['hyperparameters'])}")
    if t.get("best_epoch") is not None:
        lines.append(f"- best epoch (lowest validation RMSE): {t['best_epoch']}; validation "
                     + ", ".join(f"{k} {v:.4g}" for k, v in (t.get("validation") or {}).items()))
    if t.get("wall_time_s") is not None:
        lines.append(f"- wall time {t['wall_time_s']} s"
                     + _phrase(" on {}", m.get("device"))
                     + f" ({machine_words(m)})")
    other = {k: v for k, v in t.items() if k not in _TRAINING_KNOWN}
    if other:
        lines.append(f"- other training settings: `{json.dumps(other)}`")
    return lines


def model_card(metadata: dict) -> str:
    """``MODEL_CARD.md`` text of a model folder's metadata (every figure from the metadata)."""
    from .fidelity import invariance_card

    if metadata["architecture"]["name"] == CUSTOM:
        return "\n".join(_custom_card(metadata) + invariance_card(metadata)) + "\n"
    a, t = metadata["architecture"], metadata.get("training", {})
    h, w = metadata.get("held_out") or {}, metadata["weights"]
    lines = [f"# {a['name']} — model card", "",
             f"Denoiser `{a['name']}` (class `{a['class']}`, arguments `{json.dumps(a['arguments'])}`, receptive "
             f"field {a['receptive_field']} px) of InvarianceExplorer. Generated from `{METADATA}` by "
             "`InvarianceExplorerLib.evaluation.write_held_out`.", "",
             "## Weights", ""]
    for key, r in w.items():
        lines.append(f"- `{r['file']}` ({key}): {r['dtype']}, SHA-256 `{r['sha256']}`")
    choice = metadata.get("weights_choice")
    if choice:
        lines.append(f"- storage: {choice['dtype']} (held-out RMSE {choice['rmse_hu']['float32']:.3f} HU with "
                     f"float32 weights, {choice['rmse_hu']['float16']:.3f} HU with float16; float16 is used when "
                     f"they differ by at most {choice['tolerance_hu']} HU)")
    n = metadata["normalization"]
    lines += ["", "## Normalisation", "",
              f"network units = (HU + {n.get('offset')} − {n.get('mean')}) / {n.get('std')} "
              f"(`{json.dumps(n)}`)", "",
              "## Training", ""] + _training_lines(t, metadata.get("patch_size"))
    start = t.get("initialised_from")
    if start:
        lines.append(f"- started from the {start['architecture']} weights of `{start['folder']}` (best epoch "
                     f"{start.get('best_epoch')}, SHA-256 {start.get('sha256')})")
    if "feature_network" in t:
        lines.append(f"- feature network of the perceptual loss (trained here, replaces ImageNet VGG-19): "
                     f"`{json.dumps(t['feature_network'])}`")
    texture = metadata.get("noise_texture")
    if texture:
        lines.append(f"- noise texture (NPS shape, for the rescan floor of refined invariances' analysis): "
                     f"{texture.get('measured_on')}")
    for note in metadata.get("notes", []):
        lines.append(f"- note: {note}")
    if h.get("figures"):
        hm = h.get("machine", {})
        lines += ["", "## Held-out figures", "",
                  f"Test split of `{h.get('data')}` ({h.get('slices')} whole slices of {h.get('patients')} "
                  f"patients, never used in training or model selection), against full dose; HU clipped to "
                  f"{h.get('metric_hu_range')} for RMSE/PSNR/SSIM. Noise std: "
                  f"{h.get('noise_regions', {}).get('estimator')} in phantom regions eroded by "
                  f"{h.get('noise_regions', {}).get('erosion_px')} px. Machine: {hm.get('cpu')}, "
                  f"torch {hm.get('torch')}.", "", quality_table(h)]
    lines += _fit_lines(metadata) + invariance_card(metadata)
    if metadata.get("reproduce"):
        lines += ["", "## Reproduce", "", "```bash", *metadata["reproduce"], "```"]
    return "\n".join(lines) + "\n"
