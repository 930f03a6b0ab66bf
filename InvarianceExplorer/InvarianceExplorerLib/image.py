"""Two small types: a CT image (voxels in HU plus geometry in millimetres) and the paired
low-/full-dose slice that every data source gives (:mod:`.datasets`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import numpy as np

Vec3 = Tuple[float, float, float]
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class CTImage:
    """A CT slice (2D) or volume (3D) in Hounsfield units.

    Attributes:
        array: float32 voxels in HU, numpy axis order ``(y, x)`` for a slice or
            ``(z, y, x)`` for a volume (row-major, as pydicom and SimpleITK give them).
        spacing: voxel size in mm in ITK/DICOM order ``(x, y, z)``; for a slice, ``z`` is
            the slice thickness (1.0 when unknown).
        origin: position in mm of the centre of voxel ``[0, 0(, 0)]`` in the patient's
            LPS frame (DICOM ImagePositionPatient), ``(x, y, z)``.
        direction: 3x3 direction cosines, row-major; column ``k`` is the LPS direction of
            image axis ``k`` (x = columns, y = rows, z = slices), as in ITK.
    """

    array: np.ndarray
    spacing: Vec3 = (1.0, 1.0, 1.0)
    origin: Vec3 = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = field(default=_IDENTITY)

    def __post_init__(self):
        arr = np.asarray(self.array)
        if arr.ndim not in (2, 3):
            raise ValueError(f"a CT image is 2D (y, x) or 3D (z, y, x); got shape {arr.shape}")
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        object.__setattr__(self, "array", arr)
        for name in ("spacing", "origin"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) == 2:  # a slice given with in-plane geometry only
                value = value + ((1.0,) if name == "spacing" else (0.0,))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (x, y, z) in mm; got {value}")
            object.__setattr__(self, name, value)
        if any(s <= 0 or not np.isfinite(s) for s in self.spacing):
            raise ValueError(f"spacing must be positive and finite (mm); got {self.spacing}")
        direction = tuple(float(v) for v in np.asarray(self.direction, dtype=float).ravel())
        if len(direction) != 9:
            raise ValueError(f"direction must be a 3x3 matrix; got {len(direction)} values")
        object.__setattr__(self, "direction", direction)

    @property
    def is_slice(self) -> bool:
        return self.array.ndim == 2

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def pixel_spacing(self) -> Tuple[float, float]:
        """In-plane voxel size in mm, ``(x, y)``."""
        return self.spacing[0], self.spacing[1]

    def slices(self):
        """Yield the axial slices of a volume (or the slice itself) as 2D CTImages."""
        if self.is_slice:
            yield self
            return
        step = self.direction_matrix[:, 2] * self.spacing[2]
        for k in range(self.array.shape[0]):
            origin = tuple(np.asarray(self.origin) + k * step)
            yield CTImage(self.array[k], self.spacing, origin, self.direction)

    def with_array(self, array: np.ndarray) -> "CTImage":
        """The same geometry with other voxels (e.g. a denoised or simulated image)."""
        if np.shape(array) != self.array.shape:
            raise ValueError(f"new array shape {np.shape(array)} differs from {self.array.shape}")
        return replace(self, array=np.asarray(array, dtype=np.float32))


@dataclass(frozen=True)
class PairedSlice:
    """One axial slice of a patient scanned at low and at full dose.

    Attributes:
        low_dose, full_dose: float32 HU, ``(y, x)``, same geometry; ``full_dose`` is None
            for low-dose-only data (:class:`~.dicom_dataset.LowDoseDicomDataset`).
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
    direction: Tuple[float, ...] = _IDENTITY
    labels: Optional[np.ndarray] = None
    nodule_map: Optional[np.ndarray] = None

    def images(self) -> Tuple[CTImage, Optional[CTImage]]:
        """``(low_dose, full_dose)`` as CTImages with this slice's geometry (full dose None when absent)."""
        return tuple(None if a is None else CTImage(a, self.spacing, self.origin, self.direction)
                     for a in (self.low_dose, self.full_dose))
