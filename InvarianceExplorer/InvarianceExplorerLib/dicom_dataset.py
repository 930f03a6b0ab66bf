"""A user's own CT data as DICOM, one folder per patient: :class:`PairedDicomDataset` (low- and
full-dose series, e.g. the Mayo "LDCT and Projection data" of the paper) and
:class:`LowDoseDicomDataset` (low-dose series only), slice by slice as
:class:`~.image.PairedSlice` (HU); :func:`scan_dicom_patients` finds the series."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .image import CTImage, PairedSlice
from .io import CTInputError, list_dicom_series, read_dicom_series

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
                               "so that it matches exactly one series; the command line uses the default patterns, "
                               "so there rename the series folders instead (e.g. 'Low Dose Images' and 'Full Dose "
                               "Images', or 'quarter_1mm' and 'full_1mm')." + self._hints.get(kind, ""))
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

