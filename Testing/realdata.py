"""Real CT files shipped by pydicom (test files) and pydicom-data, found on disk (offline)."""

from __future__ import annotations

import os

import pydicom


def pydicom_test_file(name: str) -> str:
    """A file from pydicom's own test data (e.g. ``CT_small.dcm``)."""
    path = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", name)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


def pydicom_data_file(name: str) -> str:
    """A file of the pydicom-data package (e.g. ``693_UNCI.dcm``, a 512x512 CT slice)."""
    import data_store  # the import name of the pydicom-data distribution

    path = os.path.join(os.path.dirname(data_store.__file__), "data", name)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


def dicom_hu(path: str):
    """(HU array float32, pixel spacing (x, y) mm) of a single-slice DICOM file, by pydicom
    directly (independent of the project's reader)."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype("float32") * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    row, col = (float(v) for v in ds.PixelSpacing)
    return hu, (col, row)
