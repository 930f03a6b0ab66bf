"""Simulated paired low-/full-dose CT slices: :func:`build_simulated_dataset` scans chest
phantoms (:mod:`.phantom`) with :class:`~.lowdose.LowDoseSimulator` and writes them to a folder
with a ``manifest.json``; :class:`SimulatedDataset` reads them back as
:class:`~.image.PairedSlice` (HU)."""

from __future__ import annotations

import dataclasses
import enum
import platform
import time
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .image import PairedSlice
from .io import read_json_object, write_json, written_file
from .normalization import PAPER_NORMALIZATION, HUNormalization

DATASET_FORMAT = "invariance-explorer/simulated-ldct-pairs"
DATASET_VERSION = 1
MANIFEST = "manifest.json"
#: Slices scanned together: one simulator call and one noise stream per block of
#: consecutive items, so an item depends only on the base seed and its index.
BLOCK = 8
_PERCENTILES = (0.5, 1, 5, 25, 50, 75, 95, 99, 99.5)
_INT16 = np.iinfo(np.int16)


class DatasetMismatchError(ValueError):
    """An output folder already holds a data set built with other parameters."""


def item_seeds(seed: int, index: int) -> Tuple[int, int, float]:
    """Random numbers of item ``index`` of a data set with base ``seed``: the phantom seed,
    the noise seed (that of its block when the item is the block's first) and a uniform number in [0, 1)
    that decides contrast. They come from the ``index``-th child of
    ``numpy.random.SeedSequence(seed)``, so they depend on nothing else."""
    words = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(3)
    return int(words[0]), int(words[1]), float(words[2]) / 2.0**32


def build_simulated_dataset(out_dir, count: int, size: int = 256, spacing: Optional[float] = None,
                            dose: float = 0.25, seed: int = 0, *, contrast_fraction: float = 0.0,
                            photons: Optional[float] = None, electronic_noise: Optional[float] = None,
                            filter: str = "hann", device: str = "cpu", progress: bool = True) -> Path:
    """Write ``count`` simulated low-/full-dose slice pairs to ``out_dir``; return the manifest path.

    Each item is one "patient": a chest phantom (:func:`~.phantom.chest_phantom`) of
    ``size`` x ``size`` pixels of ``spacing`` mm (default ``0.7 * 512 / size``: the 358 mm
    field of view of a 512 x 512, 0.7 mm slice), scanned at full dose and at the dose
    fraction ``dose``. The folder holds ``manifest.json`` and ``pairs/pair_NNNNNN.npz`` with
    ``low_dose`` and ``full_dose`` (int16 HU, rounded, as CT is stored), ``labels`` (uint8)
    and ``nodule_map`` (int16). The manifest records the parameters, seeds, scan geometry,
    photon counts, nodules and HU statistics per item and overall.

    Reproducible and resumable: item ``i`` depends only on ``seed`` and ``i``
    (:func:`item_seeds`; items are scanned in blocks of :data:`BLOCK`), so a rerun writes
    only missing items, with the same values, and a larger ``count`` extends the set. Items
    and the manifest are written whole or not at all. A folder holding a data set with other
    parameters raises :class:`DatasetMismatchError` instead of mixing the two; a smaller
    ``count`` than the folder's is refused (it would change the patient split).
    """
    from tqdm import tqdm

    from .lowdose import LowDoseSimulator
    from .phantom import chest_phantom

    count, size, seed = int(count), int(size), int(seed)
    spacing = 0.7 * 512 / size if spacing is None else float(spacing)
    if count < 0 or not 0.0 < dose <= 1.0 or not 0.0 <= contrast_fraction <= 1.0:
        raise ValueError(f"need count >= 0, dose in (0, 1] and contrast_fraction in [0, 1]; "
                         f"got {count}, {dose}, {contrast_fraction}")
    simulator = LowDoseSimulator(size, spacing, photons=photons, electronic_noise=electronic_noise,
                                 filter=filter, device=device)
    parameters = _jsonable(dict(
        version=DATASET_VERSION, size=size, spacing_mm=spacing, dose=float(dose), seed=seed,
        contrast_fraction=float(contrast_fraction), block=BLOCK, device=simulator.device.type,
        simulator=simulator.describe()))
    out = Path(out_dir)
    pairs = out / "pairs"
    if out.is_dir() and not (out / MANIFEST).exists():
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != "pairs")
        if foreign:
            raise ValueError(f"{out} holds files that are not a simulated data set ({', '.join(foreign[:4])}"
                             f"{', ...' if len(foreign) > 4 else ''}); choose an empty or new folder")
    pairs.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = _open_manifest(manifest_path, parameters)
    if count < int(manifest.get("count", 0)):  # it would drop pairs and change the patient split
        raise ValueError(f"{out} holds a data set of {manifest['count']} pairs; --count {count} would drop "
                         f"{int(manifest['count']) - count} of them and change its patient split: give a count of at "
                         "least that, or another folder")
    for stale in pairs.glob(".pair_*"):  # partial items left by an interrupted run (io.written_file)
        stale.unlink()
    records = {r["index"]: r for r in manifest["items"] if r["index"] < count and (out / r["file"]).is_file()}
    todo = sorted(set(range(count)) - set(records))

    def save(final: bool) -> None:
        manifest["count"] = count
        manifest["items"] = [records[i] for i in sorted(records)]
        manifest["complete"] = len(records) == count
        if final and manifest["complete"]:
            manifest.update(_overall_statistics(out, manifest["items"]))
        manifest["creation"]["updated"] = _now()
        write_json(manifest_path, manifest)

    started, last_save = time.perf_counter(), time.perf_counter()
    bar = tqdm(total=count, initial=count - len(todo), unit="pair", desc="simulating pairs", disable=not progress)
    try:
        for block in sorted({i // BLOCK for i in todo}):
            indices = range(block * BLOCK, (block + 1) * BLOCK)  # whole blocks: the noise stream is fixed
            seeds = [item_seeds(seed, i) for i in indices]
            phantoms = [chest_phantom(s[0], size=size, spacing=spacing, contrast=s[2] < contrast_fraction)
                        for s in seeds]
            noise_seed = seeds[0][1]
            pair = simulator.simulate(np.stack([p.hu for p in phantoms]), dose=dose, seed=noise_seed,
                                      noiseless=False)
            for k, i in enumerate(indices):
                if i < count and i not in records:
                    records[i] = _write_item(pairs, i, phantoms[k], pair.low_dose[k], pair.full_dose[k], noise_seed)
                    bar.update()
            manifest.setdefault("image", _image_geometry(phantoms[0]))
            if time.perf_counter() - last_save > 10.0:
                save(final=False)
                last_save = time.perf_counter()
    finally:
        bar.close()
        creation = manifest["creation"]
        creation["seconds"] = round(creation.get("seconds", 0.0) + time.perf_counter() - started, 3)
        save(final=True)
    return manifest_path


def _open_manifest(path: Path, parameters: dict) -> dict:
    """The manifest at ``path`` if it was built with ``parameters``, a new one if none."""
    if not path.exists():
        photons = parameters["simulator"]["photons_full_dose"]
        return {
            "format": DATASET_FORMAT,
            "version": DATASET_VERSION,
            "parameters": parameters,
            "photons": {"full_dose": photons, "low_dose": photons * parameters["dose"]},
            "seeds": {"base": parameters["seed"],
                      "derivation": "item i: numpy SeedSequence(base).spawn()[i] -> (phantom seed, noise seed, "
                                    f"contrast draw); items scanned in blocks of {BLOCK} with the noise seed "
                                    "of the block's first item"},
            "count": 0, "complete": False, "items": [],
            "creation": {"created": _now(), "engine_version": _engine_version(),
                         "python": platform.python_version(), "numpy": np.__version__,
                         "torch": _torch_version()},
        }
    manifest = read_json_object(path, "choose an empty output folder")
    if manifest.get("format") != DATASET_FORMAT:
        raise DatasetMismatchError(f"{path} is not a simulated InvarianceExplorer data set "
                                   f"(format {manifest.get('format')!r}); choose an empty output folder")
    differences = _differences(manifest.get("parameters", {}), parameters)
    if differences:
        raise DatasetMismatchError(
            f"{path.parent} already holds a data set built with other parameters ("
            + "; ".join(f"{k}: {old!r} there, {new!r} now" for k, old, new in differences[:6])
            + "). Use the same parameters to resume or extend it, or choose another output folder."
            + (" The device is one of them: the scan's floating-point sums differ between devices, so a set begun "
               "on one is finished on the same kind (--device " + str(manifest["parameters"].get("device")) + ")."
               if any(k == "device" for k, _, _ in differences) else ""))
    return manifest


def _write_item(folder: Path, index: int, phantom, low_dose, full_dose, noise_seed: int) -> dict:
    """Write one item atomically (temporary file, then rename); return its manifest record."""
    name = f"pair_{index:06d}.npz"
    arrays = dict(low_dose=_int16(low_dose), full_dose=_int16(full_dose),
                  labels=np.asarray(phantom.labels, dtype=np.uint8),
                  nodule_map=np.asarray(phantom.nodule_map, dtype=np.int16))
    with written_file(folder / name) as temporary, open(temporary, "wb") as f:
        np.savez_compressed(f, **arrays)
    return {
        "index": index, "patient_id": f"sim-{index:06d}", "file": f"pairs/{name}",
        "phantom_seed": int(phantom.seed), "noise_seed": int(noise_seed), "contrast": bool(phantom.contrast),
        "nodules": _jsonable(list(phantom.nodules)),
        "statistics": {k: _statistics(_histogram(arrays[k])) for k in ("full_dose", "low_dose")},
    }


def _image_geometry(phantom) -> dict:
    image = phantom.to_ctimage()
    return {"spacing_mm": list(image.spacing), "origin_mm": list(image.origin), "direction": list(image.direction)}


def _int16(hu) -> np.ndarray:
    return np.clip(np.rint(hu), _INT16.min, _INT16.max).astype(np.int16)


def _histogram(values: np.ndarray) -> np.ndarray:
    """Counts of every int16 value (index 0 is -32768 HU)."""
    return np.bincount(values.ravel().astype(np.int64) - _INT16.min, minlength=1 << 16)


def _statistics(histogram: np.ndarray) -> dict:
    """Mean, standard deviation, extremes and percentiles (nearest rank) in HU of an int16 histogram."""
    values = np.arange(histogram.size, dtype=np.float64) + _INT16.min
    n = histogram.sum()
    mean = float(histogram @ values / n)
    cumulative = np.cumsum(histogram)
    present = np.flatnonzero(histogram)
    return {
        "pixels": int(n), "mean": round(mean, 4),
        "std": round(float(np.sqrt(histogram @ (values - mean) ** 2 / n)), 4),
        "min": float(values[present[0]]), "max": float(values[present[-1]]),
        "percentiles": {f"p{q:g}": float(values[np.searchsorted(cumulative, q / 100.0 * n)]) for q in _PERCENTILES},
    }


def _overall_statistics(out: Path, items: List[dict]) -> dict:
    """HU statistics over all items (read back from their files) and the matching normalisation."""
    totals = {k: np.zeros(1 << 16, dtype=np.int64) for k in ("full_dose", "low_dose")}
    for record in items:
        with np.load(out / record["file"]) as z:
            for k in totals:
                totals[k] += _histogram(z[k])
    both = _statistics(totals["full_dose"] + totals["low_dose"])
    offset = PAPER_NORMALIZATION.offset
    return {
        "statistics": {**{k: _statistics(h) for k, h in totals.items()}, "both": both},
        # the data set's own alternative to the paper's Mayo numbers (see HUNormalization)
        "normalization": HUNormalization(offset=offset, mean=both["mean"] + offset, std=both["std"]).to_dict(),
    }


class SimulatedDataset(Sequence):
    """The pairs written by :func:`build_simulated_dataset`, as :class:`PairedSlice` (HU).

    Args:
        path: the data set folder or its ``manifest.json``.
    """

    #: Every item has its full-dose image.
    has_full_dose = True

    def __init__(self, path):
        path = Path(path)
        self.manifest_path = path / MANIFEST if path.is_dir() else path
        if not self.manifest_path.is_file():
            raise FileNotFoundError(f"{self.manifest_path}: no simulated data set manifest here; "
                                    "build one with build_simulated_dataset (CLI: data simulate)")
        self.manifest = read_json_object(self.manifest_path, "the data set's manifest is damaged: simulate the "
                                                             "data set again into a new folder")
        if self.manifest.get("format") != DATASET_FORMAT:
            raise ValueError(f"{self.manifest_path} is not a simulated InvarianceExplorer data set manifest")
        self.root = self.manifest_path.parent
        self.items = self.manifest["items"]
        image = self.manifest.get("image", {})
        self._geometry = dict(spacing=tuple(image.get("spacing_mm", (1.0, 1.0, 1.0))),
                              origin=tuple(image.get("origin_mm", (0.0, 0.0, 0.0))))
        if "direction" in image:
            self._geometry["direction"] = tuple(image["direction"])

    @property
    def patient_ids(self) -> List[str]:
        """Patient id of every item (each simulated item is its own patient)."""
        return [r["patient_id"] for r in self.items]

    @property
    def split_ids(self) -> List[str]:
        """Patient ids of all ``count`` items the manifest plans, written or not: the
        patient-level split is drawn over these (:func:`make_dataset`), so a set still being
        written splits its items exactly as the complete set will (no test item is trained on)."""
        count = max(int(self.manifest.get("count", 0)), len(self.items))
        return sorted(set(self.patient_ids) | {f"sim-{i:06d}" for i in range(count)})

    @property
    def normalization(self) -> Optional[HUNormalization]:
        """Normalisation with this data set's own HU mean and std (None until complete)."""
        d = self.manifest.get("normalization")
        return HUNormalization.from_dict(d) if d else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PairedSlice:
        record = self.items[index]
        path = self.root / record["file"]
        try:
            with np.load(path) as z:
                item = PairedSlice(low_dose=z["low_dose"].astype(np.float32),
                                   full_dose=z["full_dose"].astype(np.float32), patient_id=record["patient_id"],
                                   labels=z["labels"], nodule_map=z["nodule_map"], **self._geometry)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: the pair file is missing or damaged ({type(exc).__name__}: {exc}); delete it "
                             "and run the same `data simulate` command again, which writes the missing pairs") from None
        size = self.manifest.get("parameters", {}).get("size")
        if size and {item.low_dose.shape, item.full_dose.shape, item.labels.shape} != {(size, size)}:
            raise ValueError(f"{path}: its images are {item.low_dose.shape} and {item.full_dose.shape} pixels, not the "
                             f"set's {size} x {size}; delete it and run the same `data simulate` command again")
        return item

# ----------------------------------------------------------------------------- helpers


def _jsonable(value):
    """Plain JSON types for dataclasses, named tuples, enums, numpy values and tuples."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return _jsonable(value._asdict())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _differences(old, new, prefix="") -> list:
    """``(key, old, new)`` for every leaf where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new))
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]



def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _engine_version() -> str:
    from . import __version__

    return __version__


def _torch_version() -> str:
    import torch

    return torch.__version__
