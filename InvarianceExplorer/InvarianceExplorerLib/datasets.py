"""Paired low-/full-dose CT slices for training and analysing denoisers, and low-dose slices
alone for the invariance models.

Every source is a sequence of :class:`PairedSlice` (HU float32 slices plus geometry in mm
and a patient id), so training and analysis do not care where the pairs come from:

* :func:`build_simulated_dataset` writes simulated pairs (chest phantom scanned by
  :class:`~.lowdose.LowDoseSimulator`) to a folder; :class:`SimulatedDataset` reads it.
* :class:`PairedDicomDataset` reads a user's own paired DICOM series, e.g. the Mayo
  "LDCT and Projection data" used in the paper.
* :class:`LowDoseDicomDataset` reads a user's low-dose DICOM series without full-dose
  partners (items with ``full_dose=None``): enough for the invariance models (cVAE, cINN),
  which train on low-dose images only. :func:`open_source` opens any of the three.
* :func:`split_patients` and :func:`make_dataset` give the patient-level split and the MONAI
  training pipeline (patches, flips and 90-degree rotations, :class:`HUNormalization`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import platform
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .image import CTImage
from .io import CTInputError, list_dicom_series, read_dicom_series
from .normalization import PAPER_NORMALIZATION, HUNormalization

Vec3 = Tuple[float, float, float]

DATASET_FORMAT = "invariance-explorer/simulated-ldct-pairs"
DATASET_VERSION = 1
MANIFEST = "manifest.json"
#: Slices scanned together: one simulator call and one noise stream per block of
#: consecutive items, so an item depends only on the base seed and its index.
BLOCK = 8
#: Fractions of patients in the train, validation and test splits (as in the paper).
PAPER_FRACTIONS = (0.7, 0.2, 0.1)
SPLITS = ("train", "val", "test")
_PERCENTILES = (0.5, 1, 5, 25, 50, 75, 95, 99, 99.5)
_INT16 = np.iinfo(np.int16)


class DatasetMismatchError(ValueError):
    """An output folder already holds a data set built with other parameters."""


@dataclass(frozen=True)
class PairedSlice:
    """One axial slice of a patient scanned at low and at full dose.

    Attributes:
        low_dose, full_dose: float32 HU, ``(y, x)``, same geometry; ``full_dose`` is None
            for low-dose-only data (:class:`LowDoseDicomDataset`).
        spacing: voxel size in mm, ``(x, y, z)`` (z: slice spacing or thickness).
        patient_id: the unit of the train/val/test split.
        origin: LPS position in mm of pixel ``[0, 0]``, ``(x, y, z)``.
        direction: 3x3 direction cosines, row-major, as in :class:`CTImage`.
        labels: uint8 tissue labels (simulated data) or None (real data).
        nodule_map: int16 nodule number per pixel, 0 outside nodules (simulated) or None.
    """

    low_dose: np.ndarray
    full_dose: Optional[np.ndarray]
    spacing: Vec3
    patient_id: str
    origin: Vec3 = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    labels: Optional[np.ndarray] = None
    nodule_map: Optional[np.ndarray] = None

    def images(self) -> Tuple[CTImage, Optional[CTImage]]:
        """``(low_dose, full_dose)`` as CTImages with this slice's geometry (full dose None when absent)."""
        return tuple(None if a is None else CTImage(a, self.spacing, self.origin, self.direction)
                     for a in (self.low_dose, self.full_dose))


# ----------------------------------------------------------------------------- simulated data


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
    parameters raises :class:`DatasetMismatchError` instead of mixing the two.
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
    pairs.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = _open_manifest(manifest_path, parameters)
    for stale in pairs.glob(".pair_*.tmp"):  # left by an interrupted run
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
        _write_json(manifest_path, manifest)

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
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != DATASET_FORMAT:
        raise DatasetMismatchError(f"{path} is not a simulated InvarianceExplorer data set "
                                   f"(format {manifest.get('format')!r}); choose an empty output folder")
    differences = _differences(manifest.get("parameters", {}), parameters)
    if differences:
        raise DatasetMismatchError(
            f"{path.parent} already holds a data set built with other parameters ("
            + "; ".join(f"{k}: {old!r} there, {new!r} now" for k, old, new in differences[:6])
            + "). Use the same parameters to resume or extend it, or choose another output folder.")
    return manifest


def _write_item(folder: Path, index: int, phantom, low_dose, full_dose, noise_seed: int) -> dict:
    """Write one item atomically (temporary file, then rename); return its manifest record."""
    name = f"pair_{index:06d}.npz"
    arrays = dict(low_dose=_int16(low_dose), full_dose=_int16(full_dose),
                  labels=np.asarray(phantom.labels, dtype=np.uint8),
                  nodule_map=np.asarray(phantom.nodule_map, dtype=np.int16))
    temporary = folder / f".{name}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(temporary, folder / name)
    finally:
        if temporary.exists():
            temporary.unlink()
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
        with open(self.manifest_path) as f:
            self.manifest = json.load(f)
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
        with np.load(self.root / record["file"]) as z:
            return PairedSlice(low_dose=z["low_dose"].astype(np.float32), full_dose=z["full_dose"].astype(np.float32),
                               patient_id=record["patient_id"], labels=z["labels"], nodule_map=z["nodule_map"],
                               **self._geometry)


# ----------------------------------------------------------------------------- DICOM data

#: Default series matching: TCIA "LDCT and Projection data" series descriptions and folder
#: names ("Full Dose Images", "Low Dose Images", also "Quarter Dose") and the Grand Challenge
#: folders ("full_1mm", "quarter_3mm", ...). Projection data series do not match.
FULL_DOSE_PATTERN = r"(?i)full[\s_-]*dose[\s_-]*image|^full_\d"
LOW_DOSE_PATTERN = r"(?i)(low|quarter)[\s_-]*dose[\s_-]*image|^quarter_\d"
#: Kinds of DICOM data :func:`open_source` opens (``dicom=``).
DICOM_KINDS = ("auto", "paired", "low-dose")

#: CT series of one patient: ``(series folder, its path relative to the patient folder, the
#: series dict of io.list_dicom_series)``.
_Found = List[Tuple[Path, str, dict]]


@dataclass(frozen=True)
class DicomPatient:
    """The CT series found below one patient folder (:func:`scan_dicom_patients`)."""

    patient_id: str
    folder: Path
    series: _Found
    unreadable: List[str]

    def listing(self) -> str:
        """The series found, for error messages."""
        text = "; ".join(f"'{rel}' \"{s['description']}\" ({s['n_files']} files)" for _, rel, s in self.series)
        text = text or "none"
        if self.unreadable:
            text += "; without DICOM series: " + "; ".join(self.unreadable)
        return text

    def matching(self, pattern: re.Pattern, among: Optional[_Found] = None) -> _Found:
        """The series (of ``among``, default all) whose folder path below the patient folder
        or SeriesDescription ``pattern`` matches."""
        return [(path, rel, s) for path, rel, s in (self.series if among is None else among)
                if pattern.search(rel) or pattern.search(s["description"])]


def scan_dicom_patients(root, patients: Optional[Sequence[str]] = None) -> Dict[str, DicomPatient]:
    """The patient folders of ``root`` (or those named in ``patients``) and the CT series
    below each, at any depth (io.py lists a folder's own files); :class:`CTInputError` when
    ``root`` is no folder, holds no patient folders or lacks a named one."""
    root = Path(root)
    if not root.is_dir():
        raise CTInputError(root, "is not a folder", "Give the folder that holds one folder per patient.")
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()}
    if patients is not None:
        missing = [p for p in patients if p not in folders]
        if missing:
            raise CTInputError(root, f"has no patient folder {', '.join(missing)}",
                               f"Choose among: {', '.join(folders) or '(none)'}.")
        folders = {p: folders[p] for p in patients}
    if not folders:
        files = sum(p.is_file() for p in root.iterdir())
        raise CTInputError(root, "holds no patient folders and no simulated data set (manifest.json)"
                           + (f"; it holds {files} files itself, like a series folder" if files else ""),
                           "Give the folder that holds one folder per patient, each with the patient's DICOM "
                           "series below it (root/<patient>/.../<series>/*.dcm), or a simulated data set folder.")
    scanned = {}
    for pid, folder in folders.items():
        found, unreadable = [], []
        for sub, _, files in sorted(os.walk(folder)):
            if not files:
                continue
            rel = Path(sub).relative_to(folder).as_posix()
            try:
                series = list_dicom_series(sub)
            except CTInputError as exc:
                unreadable.append(f"{'the patient folder itself' if rel == '.' else rel} ({exc.problem})")
                continue
            found += [(Path(sub), rel, s) for s in series if s["modality"] == "CT"]
        scanned[pid] = DicomPatient(pid, folder, found, unreadable)
    return scanned


class _DicomPatients(Sequence):
    """What the DICOM sources share: the patient folders and their series (:func:`scan_dicom_patients`;
    ``scan`` is a scan already made), the slice index and an LRU cache of ``cache_patients``
    patients. Subclasses choose the series (``_find_series``) and read them (``_read``)."""

    #: Whether the items carry full-dose images.
    has_full_dose = True

    def __init__(self, root, patients, hu_offset: float, cache_patients: int,
                 scan: Optional[Dict[str, DicomPatient]]):
        self.root = Path(root)
        self.hu_offset = float(hu_offset)
        self.cache_patients = max(1, int(cache_patients))
        scan = scan if scan is not None else scan_dicom_patients(self.root, patients)
        self.series = {pid: self._find_series(patient) for pid, patient in scan.items()}
        self._cache: "OrderedDict[str, tuple]" = OrderedDict()
        self._index: List[Tuple[str, int]] = []
        for pid in self.series:
            self._index += [(pid, k) for k in range(len(self._load(pid)[-1]))]

    @property
    def patient_ids(self) -> List[str]:
        """Patient id of every slice."""
        return [pid for pid, _ in self._index]

    def __len__(self) -> int:
        return len(self._index)

    def _choose(self, patient: DicomPatient, kind: str, pattern: re.Pattern, candidates: _Found) -> tuple:
        """The one series of ``candidates`` that ``pattern`` matches; CTInputError otherwise."""
        hits = patient.matching(pattern, candidates)
        if len(hits) != 1:
            problem = f"{'no' if not hits else len(hits)} CT series match the {kind} pattern '{pattern.pattern}'"
            raise CTInputError(patient.folder, f"patient {patient.patient_id}: {problem} "
                                               f"(series found: {patient.listing()})",
                               f"Set the {kind.split('-')[0]}_dose pattern (a regular expression searched in the "
                               "series folder path below the patient folder and in the SeriesDescription) "
                               "so that it matches exactly one series." + self._hints.get(kind, ""))
        return hits[0]

    #: Added to the fix of a failed choice, by kind of series.
    _hints: Dict[str, str] = {}

    def _find_series(self, patient: DicomPatient) -> Dict[str, Tuple[Path, str]]:
        raise NotImplementedError

    def _read(self, pid: str) -> Dict[str, CTImage]:
        return {kind: read_dicom_series(path, series_uid=uid, hu_offset=self.hu_offset)
                for kind, (path, uid) in self.series[pid].items()}

    def _arrays(self, pid: str, images: Dict[str, CTImage]) -> tuple:
        raise NotImplementedError

    def _load(self, pid: str) -> tuple:
        """The patient's volumes (z, y, x) and slice geometry (``_arrays``), from the LRU cache."""
        if pid in self._cache:
            self._cache.move_to_end(pid)
            return self._cache[pid]
        entry = self._arrays(pid, self._read(pid))
        self._cache[pid] = entry
        while len(self._cache) > self.cache_patients:
            self._cache.popitem(last=False)
        return entry


def _stack(image: CTImage) -> np.ndarray:
    return image.array.reshape(-1, *image.array.shape[-2:])


class PairedDicomDataset(_DicomPatients):
    """A user's paired low-/full-dose DICOM data, slice by slice, as :class:`PairedSlice` (HU).

    Expected layout: one folder per patient in ``root``, named by the patient id; below it,
    at any depth, one folder per DICOM series (io.py reads a series folder's own files).
    The Mayo "LDCT and Projection data" as downloaded from TCIA is one instance::

        root/L067/08-13-2018-NA-NA-12345/1.000000-Full Dose Images-54321/1-001.dcm ...
        root/L067/08-13-2018-NA-NA-12345/1.000000-Low Dose Images-98765/1-001.dcm ...

    the Grand Challenge layout (``root/L067/full_1mm/*.IMA``, ``root/L067/quarter_1mm/``)
    another. A series is the low-dose (full-dose) series of its patient when the regular
    expression ``low_dose`` (``full_dose``) is found in its folder path relative to the
    patient folder or in its SeriesDescription; each patient needs exactly one of each
    (e.g. ``full_dose="^full_1mm$", low_dose="^quarter_1mm$"`` to pick one reconstruction).
    Low-dose scans without full-dose partners: :class:`LowDoseDicomDataset`.

    Slices are paired by position: both series must cover the same slice positions (within
    a quarter of the slice spacing) with the same size, pixel spacing and orientation;
    otherwise :class:`CTInputError` names the patient and the problem. Every patient is read
    once here to check it; afterwards the ``cache_patients`` most recently used patients
    stay in memory (about 2 MB per 512 x 512 slice pair), others are read again on access.

    Args:
        root: folder holding the patient folders.
        low_dose, full_dose: regular expressions (str or compiled) choosing the two series.
        patients: patient folder names to use (default: every subfolder of ``root``).
        hu_offset: HU added after the DICOM rescale (see :func:`~.io.read_image`).
        cache_patients: patients kept in memory.
        scan: the patients' series as :func:`scan_dicom_patients` found them (default: scan now).
    """

    _hints = {"full-dose": " Low-dose scans without full-dose partners are read as low-dose-only data "
                           "(LowDoseDicomDataset; open_source(..., dicom='low-dose'); the fit command's --data "
                           "does so when no patient has a full-dose series)."}

    def __init__(self, root, *, low_dose: Union[str, re.Pattern] = LOW_DOSE_PATTERN,
                 full_dose: Union[str, re.Pattern] = FULL_DOSE_PATTERN, patients: Optional[Sequence[str]] = None,
                 hu_offset: float = 0.0, cache_patients: int = 4, scan: Optional[Dict[str, DicomPatient]] = None):
        self._patterns = {"low-dose": re.compile(low_dose), "full-dose": re.compile(full_dose)}
        super().__init__(root, patients, hu_offset, cache_patients, scan)

    def __getitem__(self, index: int) -> PairedSlice:
        pid, k = self._index[index]
        low, full, geometry = self._load(pid)
        g = geometry[k]
        return PairedSlice(low_dose=low[k].copy(), full_dose=full[k].copy(), spacing=g.spacing, patient_id=pid,
                           origin=g.origin, direction=g.direction)

    def _find_series(self, patient: DicomPatient) -> Dict[str, Tuple[Path, str]]:
        """The low- and full-dose series of one patient as ``{kind: (folder, SeriesInstanceUID)}``."""
        chosen = {kind: self._choose(patient, kind, pattern, patient.series)
                  for kind, pattern in self._patterns.items()}
        if chosen["low-dose"][2]["uid"] == chosen["full-dose"][2]["uid"]:
            raise CTInputError(patient.folder, f"patient {patient.patient_id}: the same series "
                                               f"'{chosen['low-dose'][1]}' matches both the low-dose and the "
                                               "full-dose pattern",
                               "Make the low_dose and full_dose patterns exclusive.")
        return {kind: (path, s["uid"]) for kind, (path, _, s) in chosen.items()}

    def _arrays(self, pid: str, images: Dict[str, CTImage]) -> tuple:
        """Low- and full-dose volumes, checked to pair slice by slice, and the full-dose slices' geometry."""
        _check_pairing(pid, self.root / pid, images["low-dose"], images["full-dose"])
        return _stack(images["low-dose"]), _stack(images["full-dose"]), list(images["full-dose"].slices())


class LowDoseDicomDataset(_DicomPatients):
    """A user's low-dose DICOM scans without full-dose partners ("unpaired"), slice by slice,
    as :class:`PairedSlice` with ``full_dose=None`` (HU). Enough for the invariance models
    (cVAE and cINN train on low-dose images only), not for training or scoring a denoiser.

    Layout as for :class:`PairedDicomDataset`: one folder per patient in ``root`` (its name
    is the patient id, the unit of the train/val/test split), below it, at any depth, the
    patient's low-dose series in its own folder::

        root/patient01/series/*.dcm
        root/patient02/0001.dcm ...

    A patient's low-dose series is its only CT series, whatever its name; series matching
    ``full_dose`` (e.g. "Full Dose Images") are ignored, and of several remaining series
    exactly one must match ``low_dose`` (same rules as :class:`PairedDicomDataset`; e.g.
    ``low_dose="^quarter_1mm$"``). Each patient is read once here to count its slices; the
    ``cache_patients`` most recently used stay in memory.

    Args: as :class:`PairedDicomDataset`.
    """

    has_full_dose = False

    def __init__(self, root, *, low_dose: Union[str, re.Pattern] = LOW_DOSE_PATTERN,
                 full_dose: Union[str, re.Pattern] = FULL_DOSE_PATTERN, patients: Optional[Sequence[str]] = None,
                 hu_offset: float = 0.0, cache_patients: int = 4, scan: Optional[Dict[str, DicomPatient]] = None):
        self._low, self._full = re.compile(low_dose), re.compile(full_dose)
        super().__init__(root, patients, hu_offset, cache_patients, scan)

    def __getitem__(self, index: int) -> PairedSlice:
        pid, k = self._index[index]
        low, geometry = self._load(pid)
        g = geometry[k]
        return PairedSlice(low_dose=low[k].copy(), full_dose=None, spacing=g.spacing, patient_id=pid,
                           origin=g.origin, direction=g.direction)

    def _find_series(self, patient: DicomPatient) -> Dict[str, Tuple[Path, str]]:
        """The low-dose series of one patient as ``{"low-dose": (folder, SeriesInstanceUID)}``."""
        full = {s["uid"] for _, _, s in patient.matching(self._full)}
        candidates = [c for c in patient.series if c[2]["uid"] not in full]
        if not candidates:
            raise CTInputError(patient.folder, f"patient {patient.patient_id}: no low-dose CT series "
                                               f"(series found: {patient.listing()}; series matching the full-dose "
                                               f"pattern '{self._full.pattern}' are ignored)",
                               "Put the patient's low-dose DICOM series in a folder below the patient folder.")
        path, _, s = candidates[0] if len(candidates) == 1 else self._choose(patient, "low-dose", self._low,
                                                                           candidates)
        return {"low-dose": (path, s["uid"])}

    def _arrays(self, pid: str, images: Dict[str, CTImage]) -> tuple:
        return _stack(images["low-dose"]), list(images["low-dose"].slices())


def _check_pairing(pid: str, where: Path, low: CTImage, full: CTImage) -> None:
    """Raise CTInputError unless the two series cover the same slices with the same geometry."""
    def problem(text, fix="Pair the low- and full-dose reconstructions of the same scan range "
                          "(same slice positions, size and pixel spacing)."):
        raise CTInputError(where, f"patient {pid}: {text}", fix)

    low_slices, full_slices = list(low.slices()), list(full.slices())
    if low.array.shape[-2:] != full.array.shape[-2:]:
        problem(f"low-dose slices are {low.array.shape[-2:]} pixels, full-dose {full.array.shape[-2:]}")
    if not np.allclose(low.pixel_spacing, full.pixel_spacing, rtol=1e-4):
        problem(f"pixel spacing differs: low dose {low.pixel_spacing} mm, full dose {full.pixel_spacing} mm")
    if not np.allclose(low.direction, full.direction, atol=1e-4):
        problem("image orientation (ImageOrientationPatient) differs between the low- and full-dose series")
    if len(low_slices) != len(full_slices):
        problem(f"the low-dose series has {len(low_slices)} slices, the full-dose series {len(full_slices)}")
    tolerance = 0.25 * min(low.spacing[2], full.spacing[2]) if len(full_slices) > 1 else 0.1
    distance = [float(np.linalg.norm(np.subtract(a.origin, b.origin))) for a, b in zip(low_slices, full_slices)]
    k = int(np.argmax(distance))
    if distance[k] > tolerance:
        problem(f"slice positions differ by up to {distance[k]:.2f} mm: low-dose slice {k + 1} at "
                f"{_mm(low_slices[k].origin)}, full-dose slice {k + 1} at {_mm(full_slices[k].origin)}")


def _mm(v) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in v) + ") mm"


def require_full_dose(source, path, purpose: str) -> None:
    """``ValueError`` when ``source`` (read from ``path``) has no full-dose images, which
    ``purpose`` (e.g. "training a denoiser") needs."""
    if not getattr(source, "has_full_dose", True):
        raise ValueError(f"{path}: {purpose} needs paired low- and full-dose images, and these data are low-dose "
                         "only; give a simulated data set or a paired DICOM folder")


def open_source(path, *, dicom: str = "auto", **dicom_options) -> Sequence:
    """The data in ``path``: a :class:`SimulatedDataset` for a folder with ``manifest.json``
    (or that file), otherwise DICOM data, one folder per patient (``dicom_options`` are passed
    on: ``low_dose``, ``full_dose``, ``patients``, ``hu_offset``, ``cache_patients``):

    * ``dicom="paired"``: :class:`PairedDicomDataset` (low- and full-dose series per patient);
    * ``dicom="low-dose"``: :class:`LowDoseDicomDataset` (low-dose series only; full-dose
      series are ignored);
    * ``dicom="auto"`` (default): paired when every patient has a series matching the
      full-dose pattern, low-dose only when none has; a mix is refused, naming the patients.
    """
    path = Path(path)
    if path.name == MANIFEST or (path / MANIFEST).is_file():
        return SimulatedDataset(path)
    if dicom not in DICOM_KINDS:
        raise ValueError(f"dicom is one of {', '.join(DICOM_KINDS)}; got {dicom!r}")
    classes = {"paired": PairedDicomDataset, "low-dose": LowDoseDicomDataset}
    if not path.exists():
        raise CTInputError(path, "does not exist", "Give a simulated data set folder (data simulate) or a DICOM "
                                                   "folder holding one folder per patient.")
    if dicom != "auto":
        return classes[dicom](path, **dicom_options)
    scan = scan_dicom_patients(path, dicom_options.pop("patients", None))
    full = re.compile(dicom_options.get("full_dose", FULL_DOSE_PATTERN))
    with_full = [pid for pid, patient in scan.items() if patient.matching(full)]
    without = [pid for pid in scan if pid not in with_full]
    if with_full and without:
        raise CTInputError(path, f"patients {_names(with_full)} have a full-dose series (matching "
                                 f"'{full.pattern}') but patients {_names(without)} have none",
                           "Give paired data (a low- and a full-dose series for every patient) or low-dose-only "
                           "data (no full-dose series), or read it as low-dose only (fit --dicom low-dose, "
                           "open_source(..., dicom='low-dose')), which ignores the full-dose series.")
    return classes["paired" if with_full else "low-dose"](path, scan=scan, **dicom_options)


def _names(ids: Sequence[str], limit: int = 6) -> str:
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")

# ----------------------------------------------------------------------------- splits and MONAI


def split_patients(patient_ids, fractions: Sequence[float] = PAPER_FRACTIONS, seed: int = 0) -> Dict[str, List[str]]:
    """Split the distinct ``patient_ids`` into ``{"train", "val", "test"}`` lists of ids.

    The ids are shuffled with ``seed`` and cut by ``fractions`` (rounded by largest
    remainder, so the three counts add up), so every patient is in exactly one split.
    """
    ids = sorted({str(p) for p in patient_ids})
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise ValueError(f"fractions are three non-negative numbers (train, val, test) adding up to 1; got {fractions}")
    exact = f * len(ids)
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: len(ids) - counts.sum()]] += 1
    shuffled = [ids[k] for k in np.random.default_rng(seed).permutation(len(ids))]
    ends = np.cumsum(counts)
    return {name: sorted(shuffled[end - n: end]) for name, n, end in zip(SPLITS, counts, ends)}


class ItemCache:
    """``source`` (a sequence of :class:`PairedSlice` with ``patient_ids``) whose items stay in
    memory once loaded, up to ``max_bytes`` in all (later items are loaded on every use), so
    that training, which crops many small patches from each slice, decodes each file once.
    Every other attribute is ``source``'s."""

    def __init__(self, source, max_bytes: int = 4 << 30):
        self.source, self.max_bytes, self.bytes, self._items = source, int(max_bytes), 0, {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> PairedSlice:
        item = self._items.get(index)
        if item is None:
            item = self.source[index]
            size = sum(a.nbytes for a in vars(item).values() if isinstance(a, np.ndarray))
            if self.bytes + size <= self.max_bytes:
                self._items[index], self.bytes = item, self.bytes + size
        return item

    def __getattr__(self, name):
        return getattr(self.source, name)


class _LoadPair:
    """MONAI transform: ``{"index": i}`` -> the item's channel-first arrays and metadata."""

    def __init__(self, source, patch_size: Optional[int]):
        self.source, self.patch_size = source, patch_size

    def __call__(self, data: dict) -> dict:
        item = self.source[data["index"]]
        if self.patch_size and min(item.low_dose.shape) < self.patch_size:
            raise ValueError(f"item {data['index']} ({item.patient_id}) is {item.low_dose.shape} pixels, "
                             f"smaller than the {self.patch_size}-pixel patches")
        out = dict(ld=item.low_dose[None], patient_id=item.patient_id,
                   index=data["index"], spacing=np.asarray(item.spacing, dtype=np.float32))
        if item.full_dose is not None:
            out["fd"] = item.full_dose[None]
        if item.labels is not None:
            out["labels"] = item.labels[None]
        return out


def split_indices(source, split: str, limit: Optional[int] = None) -> List[int]:
    """Item indices of the patient-level ``split`` of ``source`` (:func:`~.datasets.split_patients`),
    at most ``limit`` of them, evenly spaced."""
    if split == "all":
        indices = list(range(len(source)))
    else:
        chosen = set(split_patients(getattr(source, "split_ids", source.patient_ids))[split])
        indices = [i for i, pid in enumerate(source.patient_ids) if pid in chosen]
    if limit is not None and len(indices) > limit:
        indices = [indices[k] for k in np.linspace(0, len(indices) - 1, limit).round().astype(int)]
    return indices


def make_dataset(source, split: str = "train", *, patch_size: Optional[int] = 128, augment: bool = True,
                 seed: int = 0, fractions: Sequence[float] = PAPER_FRACTIONS, split_seed: int = 0,
                 normalization: HUNormalization = PAPER_NORMALIZATION):
    """A MONAI dataset of one split of ``source`` for training or evaluating a denoiser.

    Each element is a dict with ``"ld"`` (input) and ``"fd"`` (target; absent for
    low-dose-only data, :class:`LowDoseDicomDataset`), float32 tensors ``(1, P, P)`` in
    network units (``normalization``), ``"labels"`` (uint8, simulated data only) cropped and
    turned exactly like them, and ``"patient_id"``, ``"index"``,
    ``"spacing"`` (mm). ``"train"`` takes a random ``patch_size`` patch and, with
    ``augment``, a random flip and 90-degree rotation; ``"val"``, ``"test"`` and ``"all"``
    (every item) are deterministic: the central patch, or whole slices if ``patch_size``
    is None.

    Args:
        source: a sequence of :class:`PairedSlice` with ``patient_ids``, or a path for
            :func:`open_source`.
        split: "train", "val", "test" (patient-level, :func:`split_patients` with
            ``fractions`` and ``split_seed``) or "all".
        seed: seed of the random crops and augmentations; the same seed gives the same
            sequence of samples (with a MONAI DataLoader's workers, seed them with
            ``monai.utils.set_determinism``).
    """
    from monai.data import Dataset
    from monai.transforms import (CenterSpatialCropd, Compose, EnsureTyped, RandFlipd, RandRotate90d,
                                  RandSpatialCropd)

    if isinstance(source, (str, os.PathLike)):
        source = open_source(source)
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split is one of {SPLITS + ('all',)}; got {split!r}")
    ids = source.patient_ids
    if split == "all":
        indices = list(range(len(ids)))
    else:
        # a data set still being written splits over its planned ids (SimulatedDataset.split_ids)
        chosen = set(split_patients(getattr(source, "split_ids", ids), fractions, split_seed)[split])
        indices = [i for i, pid in enumerate(ids) if pid in chosen]
    keys = ("ld", "fd", "labels")
    opt = dict(allow_missing_keys=True)
    transforms = [_LoadPair(source, patch_size)]
    train = split == "train"
    if patch_size:
        transforms.append(RandSpatialCropd(keys, roi_size=patch_size, random_size=False, **opt) if train
                          else CenterSpatialCropd(keys, roi_size=patch_size, **opt))
    if train and augment:  # the 8 symmetries of the square, equally likely
        transforms += [RandFlipd(keys, prob=0.5, spatial_axis=0, **opt),
                       RandRotate90d(keys, prob=0.75, max_k=3, **opt)]
    images = ["ld", "fd"] if getattr(source, "has_full_dose", True) else ["ld"]
    transforms += [normalization.monai_transform(keys=images), EnsureTyped(keys, track_meta=False, **opt)]
    pipeline = Compose(transforms)
    pipeline.set_random_state(seed=seed)
    return Dataset([{"index": i} for i in indices], transform=pipeline)


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


def _write_json(path: Path, value) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(temporary, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _engine_version() -> str:
    from . import __version__

    return __version__


def _torch_version() -> str:
    import torch

    return torch.__version__
