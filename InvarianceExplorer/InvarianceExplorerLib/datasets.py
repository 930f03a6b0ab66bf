"""Paired low-/full-dose CT slices for training and analysing denoisers, and low-dose slices
alone for the invariance models.

Every source is a sequence of :class:`~.image.PairedSlice` (HU float32 slices plus geometry in mm
and a patient id), so training and analysis do not care where the pairs come from:

* :func:`~.simulated_dataset.build_simulated_dataset` writes simulated pairs (chest phantom
  scanned by :class:`~.lowdose.LowDoseSimulator`) to a folder;
  :class:`~.simulated_dataset.SimulatedDataset` reads it.
* :class:`~.dicom_dataset.PairedDicomDataset` reads a user's own paired DICOM series, e.g.
  the Mayo "LDCT and Projection data" used in the paper.
* :class:`~.dicom_dataset.LowDoseDicomDataset` reads a user's low-dose DICOM series without
  full-dose partners (items with ``full_dose=None``): enough for the invariance models (cVAE,
  cINN), which train on low-dose images only. :func:`open_source` opens any of the three.
* :func:`split_patients` and :func:`make_dataset` give the patient-level split and the MONAI
  training pipeline (patches, flips and 90-degree rotations, :class:`HUNormalization`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .dicom_dataset import (DICOM_KINDS, FULL_DOSE_PATTERN, LowDoseDicomDataset, PairedDicomDataset,
                            scan_dicom_patients)
from .image import PairedSlice
from .io import CTInputError
from .normalization import PAPER_NORMALIZATION, HUNormalization
from .simulated_dataset import MANIFEST, SimulatedDataset

#: Fractions of patients in the train, validation and test splits (as in the paper).
PAPER_FRACTIONS = (0.7, 0.2, 0.1)
SPLITS = ("train", "val", "test")


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


def split_indices(source, split: str, limit: Optional[int] = None, *,
                  fractions: Sequence[float] = PAPER_FRACTIONS, seed: int = 0) -> List[int]:
    """Item indices of the patient-level ``split`` of ``source`` (:func:`split_patients` with
    ``fractions`` and ``seed``; "all": every item), at most ``limit`` of them, evenly spaced.
    A data set still being written splits over its planned ids (``SimulatedDataset.split_ids``)."""
    if split == "all":
        indices = list(range(len(source)))
    else:
        chosen = set(split_patients(getattr(source, "split_ids", source.patient_ids), fractions, seed)[split])
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
    indices = split_indices(source, split, fractions=fractions, seed=split_seed)
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
