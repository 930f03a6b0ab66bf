"""CT images in and out: DICOM series and files, NRRD, NIfTI and MetaImage in; NRRD out.

Readers return a :class:`CTImage` (float32 HU, geometry in mm in the patient's LPS frame)
or raise :class:`CTInputError`, whose message names the file, the problem and the fix.
Input files are only ever read. The NRRD writer is atomic: the file appears whole or not at all.

DICOM geometry: ImagePositionPatient is the LPS centre of the first transmitted pixel;
ImageOrientationPatient holds the direction of the rows (image x, along the column index)
then of the columns (image y, along the row index); PixelSpacing is (between rows, between
columns) = (y, x). Slices are ordered by their position along the slice normal
(row x column) and the slice spacing comes from those positions, not from SliceThickness.
Enhanced (multi-frame) CT files are supported: each frame is a slice.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import pydicom
import SimpleITK as sitk

from .image import CTImage

ITK_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom")
_SUPPORTED = "a DICOM series folder, a DICOM file, or " + ", ".join(ITK_SUFFIXES)
_HU_OFFSET_FIX = "pass hu_offset=-1024 (CLI: --hu-offset -1024)"

# Where enhanced multi-frame files keep the per-frame attributes that classic files hold at top level.
_FUNCTIONAL_GROUP = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
}


class CTInputError(ValueError):
    """A CT input that cannot be used; the message says which file, what is wrong and what to do."""

    def __init__(self, path, problem: str = "", fix: str = ""):
        self.path, self.problem, self.fix = str(path), problem, fix
        message = f"{path}: {problem}" if problem else str(path)
        super().__init__(f"{message}. {fix}" if fix else message)


# ----------------------------------------------------------------------------- reading


def read_image(path, *, series_uid: Optional[str] = None, hu_offset: float = 0.0) -> CTImage:
    """Read a CT image in HU from a DICOM series folder, a DICOM file or an NRRD/NIfTI/MetaImage file.

    A single slice gives a 2D CTImage, several slices a 3D one. ``series_uid`` chooses one
    series in a folder that holds several; ``hu_offset`` (HU) is added to every voxel after
    the DICOM rescale, to fix files whose stored values are not HU (e.g. -1024 for HU + 1024).
    """
    path = Path(path)
    if not path.exists():
        raise CTInputError(path, "does not exist", f"Check the path; give {_SUPPORTED}.")
    if path.is_dir():
        return read_dicom_series(path, series_uid=series_uid, hu_offset=hu_offset)
    suffix = _suffix(path)
    if suffix in ITK_SUFFIXES:
        if series_uid is not None:
            raise CTInputError(path, f"is a {suffix} file, which holds one image, and a series UID was given",
                               "Series UIDs choose among DICOM series: drop series_uid (--series-uid).")
        return _read_itk(path, hu_offset)
    if suffix in DICOM_SUFFIXES or _dicom_kind(path):
        ds = _dcmread(path)
        if ds is None:
            raise CTInputError(path, "is not a DICOM image file (no 'DICM' marker at byte 128, nor a DICOM image "
                               "data set without it)", "Export it again as a standard DICOM Part 10 file.")
        if series_uid is not None and ds.get("SeriesInstanceUID") != series_uid:
            raise CTInputError(path, f"belongs to series {ds.get('SeriesInstanceUID')}, not {series_uid}",
                               "Drop series_uid (--series-uid) or pick a file of that series.")
        return _assemble(_frames(path, ds), path, hu_offset)
    raise CTInputError(path, f"unsupported file type '{suffix or '(no extension)'}'", f"Give {_SUPPORTED}.")


def read_dicom_series(folder, *, series_uid: Optional[str] = None, hu_offset: float = 0.0) -> CTImage:
    """Read the CT series in ``folder`` (its files, not subfolders) as HU; see :func:`read_image`.

    Non-DICOM files (and DICOMDIR) are skipped. A folder with several series needs ``series_uid``.
    """
    folder = Path(folder)
    series = _scan(folder)
    if series_uid is None:
        if len(series) > 1:
            raise CTInputError(folder, f"holds {len(series)} DICOM series: {_listing(series)}",
                               "Choose one with series_uid='<uid>' (CLI: --series-uid <uid>), "
                               "or put each series in its own folder.")
        files = next(iter(series.values()))
    elif series_uid in series:
        files = series[series_uid]
    else:
        raise CTInputError(folder, f"has no series with SeriesInstanceUID {series_uid}; "
                                   f"it holds {_listing(series)}", "Pass one of the UIDs listed.")
    return _assemble([frame for path, ds in files for frame in _frames(path, ds)], folder, hu_offset)


def list_dicom_series(folder) -> list:
    """The DICOM series in ``folder``: one dict per series with ``uid``, ``description``,
    ``modality``, ``number`` (SeriesNumber or None) and ``n_files``, in file-name order."""
    series = _scan(Path(folder))
    return [dict(uid=uid, description=str(ds.get("SeriesDescription", "")), modality=str(ds.get("Modality", "")),
                 number=None if ds.get("SeriesNumber") in (None, "") else int(ds.SeriesNumber), n_files=len(files))
            for uid, files in series.items() for ds in [files[0][1]]]


#: HU beyond any CT scale (extended-scale CT with metal reaches about 30000 HU; the fill
#: values scanners write outside the field of view, e.g. a stored -32768 with its intercept,
#: go down to about -34000): such values are not HU.
HU_SCALE = (-100000.0, 100000.0)
#: The standard 12-bit CT scale (HU) the bundled models were trained within: above it lies
#: metal on extended-scale CT; below -2000, fill values outside the field of view.
STANDARD_HU = (-2000.0, 3071.0)


def check_hu(array, source: str, whole_image: bool = False) -> None:
    """Raise :class:`CTInputError` naming ``source`` if ``array`` is not plausibly CT in HU:
    NaN or infinite voxels, values beyond any CT scale (:data:`HU_SCALE`), values normalised
    to -1..1, or no value below 0 but values up to bone (stored CT numbers read without their
    rescale intercept). ``whole_image``: ``array`` is a whole CT image, not a patch (which may
    lie inside a water phantom), so it must also span more than -10..10 (HU / 1000 and the
    paper's normalisation do not) and not be 8-bit grey levels 0..255 (a windowed display
    image); a crop of soft tissue, with nothing below 0 HU, is accepted. A patch must span
    10 HU or more where it lies within -10..10 (CT noise alone spans tens of HU; HU / 1000 and
    the paper's normalisation span a few units)."""
    a = np.asarray(array)
    _check_finite(int(np.count_nonzero(~np.isfinite(a))), a.size, source)
    lo, hi = float(a.min()), float(a.max())
    if lo < HU_SCALE[0] or hi > HU_SCALE[1]:
        raise CTInputError(source, f"values range {lo:g}..{hi:g}, beyond any CT scale ({HU_SCALE[0]:g}.."
                                   f"{HU_SCALE[1]:g} HU), so they are not HU (a fill value or a damaged file?)",
                           "Replace such voxels (e.g. with -1024 HU, air) or convert the image to HU.")
    if whole_image and lo == hi:
        raise CTInputError(source, f"every voxel is {lo:g}, so the image holds no anatomy (an empty or blanked file?)",
                           "Load the CT image itself.")
    if -1 <= lo < hi <= 1 or (-10 <= lo < hi <= 10 and (whole_image or hi - lo < 10)):  # (water: 40 HU of noise)
        raise CTInputError(source, f"values lie in {lo:g}..{hi:g}, so they look normalised or scaled, not HU "
                                   "(CT in HU spans about -1000, air, to over 100, soft tissue and bone)",
                           "Convert the image back to HU before loading it.")
    if whole_image and (lo, hi) == (0, 255) and np.array_equal(a, np.round(a)):
        raise CTInputError(source, "values are whole numbers from 0 to 255 with none below 0, so they look like a "
                                   "windowed display image (8-bit grey levels), not HU",
                           "Load the original CT in HU (DICOM with its rescale, or a volume saved in HU).")
    if lo >= 0 and hi >= 900:
        fix = _HU_OFFSET_FIX if whole_image else "subtract 1024 (or read the image with hu_offset=-1024)"
        raise CTInputError(source, f"values range {lo:g}..{hi:g} with none below 0, so they look like "
                                   "stored CT numbers without the rescale intercept, not HU (air is about -1000 HU)",
                           f"If they are stored values HU + 1024, {fix}.")


def _check_finite(bad: int, size: int, source) -> None:
    if bad:
        raise CTInputError(source, f"{bad} of {size} voxels are NaN or infinite",
                           "Replace them (e.g. with -1024 HU, air) and save the image again.")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _dicom_kind(path: Path) -> Optional[str]:
    """"part10" for a DICOM Part 10 file ('DICM' at byte 128), "bare" for possibly one written
    without the 128-byte preamble and marker, as some older archives hold (its first element is
    of group 0002, file meta, or 0008, identification, little-endian: :func:`_dcmread` decides),
    None otherwise."""
    with open(path, "rb") as f:
        head = f.read(132)
    return "part10" if head[128:] == b"DICM" else "bare" if head[:2] in (b"\x02\x00", b"\x08\x00") else None


def last_line(error: BaseException) -> str:
    """The last non-empty line of an error's message: what went wrong, without the trace that
    SimpleITK (its source file and line) or TorchScript put before it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else str(error)


def read_itk(path) -> "sitk.Image":
    """``sitk.ReadImage``, with a :class:`CTInputError` naming the file when it cannot be read:
    a folder, a file that may not be read, one whose content is not the format its name says,
    or one cut short."""
    path = Path(path)
    if not path.exists():
        raise CTInputError(path, "does not exist", "Check the path.")
    if path.is_dir():  # ITK would try each of its readers on it (HDF5's print pages of diagnostics)
        raise CTInputError(path, "is a folder, not an image file", f"Give one of the files {', '.join(ITK_SUFFIXES)}.")
    try:
        with open(path, "rb") as f:
            head = f.read(352)
    except OSError as exc:
        raise CTInputError(path, f"cannot be opened ({exc.strerror or exc})",
                           "Check that the file may be read (its permissions), or copy it somewhere "
                           "readable.") from None
    if not head:
        raise CTInputError(path, "is empty (0 bytes)", "It was cut short or never written: copy or export it again.")
    problem = _format_problem(path, head)
    if problem:
        raise CTInputError(path, problem, "Give the file its true extension, or export the image again.")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        problem = _metaimage_problem(path) if _suffix(path) in (".mha", ".mhd") else None
        raise CTInputError(path, problem or f"cannot be read ({last_line(exc)})",
                           "Check that the file is complete (for .nhdr/.mhd also its data file next to it).") from None


def _format_problem(path: Path, head: bytes) -> Optional[str]:
    """How the first bytes ``head`` of ``path`` contradict the format its extension names (an NRRD
    without its "NRRD" magic, a NIfTI without "n+1"/"ni1"/"n+2" or gzip's 1f 8b, a
    MetaImage without its "Key = value" header), saying what the file looks like instead; None if they fit."""
    suffix = _suffix(path)
    nifti = head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] in (b"n+2\0", b"ni2\0")
    metaimage = b"=" in head.split(b"\n", 1)[0] and head[:1].isalpha()  # "Key = value" lines
    fits = {".nrrd": head.startswith(b"NRRD"), ".nhdr": head.startswith(b"NRRD"), ".nii": nifti,
            ".nii.gz": head.startswith(b"\x1f\x8b"), ".mha": metaimage, ".mhd": metaimage}
    if fits.get(suffix, True):
        return None
    looks = ("an NRRD file" if head.startswith(b"NRRD") else "a NIfTI file" if nifti else
             "gzip-compressed data" if head.startswith(b"\x1f\x8b") else
             "a DICOM file" if head[128:132] == b"DICM" else
             "a MetaImage file" if metaimage else
             "a PNG image" if head.startswith(b"\x89PNG") else
             "text" if all(32 <= c < 127 or c in b"\t\r\n" for c in head[:64]) else "data of another kind")
    return f"is named {suffix} but its content is not that format (it looks like {looks})"


#: Bytes per value of MetaImage's ElementType.
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _metaimage_problem(path: Path) -> Optional[str]:
    """What is wrong with the voxel data of an uncompressed MetaImage (.mha / .mhd) that ITK
    cannot read (its own message then names a stale system error): a missing data file, or
    fewer bytes than the header declares. None where this cannot be told."""
    try:
        with open(path, "rb") as f:
            header, fields = 0, {}
            for line in f:
                header += len(line)
                key, _, value = line.decode("latin-1").partition("=")
                fields[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile":
                    break
        data = fields.get("ElementDataFile", "")
        if fields.get("CompressedData", "False").lower() == "true" or not data or " " in data or data == "LIST":
            return None
        need = int(np.prod([int(n) for n in fields["DimSize"].split()])) * \
            int(fields.get("ElementNumberOfChannels", 1)) * _MET_BYTES[fields["ElementType"]]
        if data == "LOCAL":
            found = path.stat().st_size - header
        elif not (path.parent / data).is_file():
            return f"its voxel data file {data} is missing next to it"
        else:
            found = (path.parent / data).stat().st_size
    except (OSError, KeyError, ValueError):
        return None
    return f"holds {found} bytes of voxel data where its header declares {need}" if found < need else None


def read_json_object(path, fix: str) -> dict:
    """The JSON object ``{...}`` in the file ``path``; a ``ValueError`` naming the file, what is
    wrong with it and ``fix`` (what to do) when it is missing, unreadable or not an object."""
    import json

    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc}); {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, found a {type(value).__name__}; {fix}")
    return value


def _read_itk(path: Path, hu_offset: float) -> CTImage:
    image = read_itk(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTInputError(path, f"has {image.GetNumberOfComponentsPerPixel()} values per voxel "
                                 "(a vector or colour image), not one HU value",
                           "Save the CT as a single-component (scalar) image.")
    if image.GetDimension() not in (2, 3):
        raise CTInputError(path, f"is {image.GetDimension()}D (size {image.GetSize()}); a CT image is 2D or 3D",
                           "Extract one 3D volume (e.g. one time point) and save it on its own.")
    if _suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_data(path, image.GetNumberOfPixels())
    array = sitk.GetArrayViewFromImage(image).astype(np.float32)  # one copy of the voxels, not three
    if hu_offset:
        array += np.float32(hu_offset)
    check_hu(array, str(path), whole_image=True)
    spacing, origin = image.GetSpacing(), image.GetOrigin()
    direction = np.asarray(image.GetDirection(), dtype=float)
    if image.GetDimension() == 2:
        direction = np.pad(direction.reshape(2, 2), (0, 1)) + np.diag([0.0, 0.0, 1.0])
    elif array.shape[0] == 1:  # one slice
        array = array[0]
    return CTImage(array, spacing, origin, tuple(direction.ravel()))


def _check_nifti_data(path: Path, voxels: int) -> None:
    """Raise :class:`CTInputError` when a NIfTI-1/2 file holds fewer bytes of voxel data than
    ``voxels`` need, or NaN/Inf voxels: ITK's NIfTI reader fills a truncated file's missing
    voxels with 0 and turns NaN/Inf into 0, silently."""
    fix = "Copy or export the file again; it is truncated or damaged."
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            header = f.read(540)
            for order in "<>":
                version = {348: 1, 540: 2}.get(struct.unpack(order + "i", header[:4])[0])
                if version:
                    break
            else:
                return
            if version == 1:
                (datatype, bitpix), offset = struct.unpack(order + "hh", header[70:74]), \
                    struct.unpack(order + "f", header[108:112])[0]
            else:
                (datatype, bitpix), offset = struct.unpack(order + "hh", header[12:16]), \
                    struct.unpack(order + "q", header[168:176])[0]
            dtype = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}.get(datatype)
            f.seek(int(offset))
            if bitpix <= 0:  # a header ITK still reads: the datatype gives the voxel size
                bitpix = 8 * {2: 1, 4: 2, 8: 4, 16: 4, 64: 8, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8}.get(datatype, 0)
            need, found, bad, rest = voxels * bitpix // 8, 0, 0, b""
            while found < need:  # in pieces: a large volume is not held twice
                chunk = f.read(min(need - found, 1 << 24))
                if not chunk:
                    break
                found += len(chunk)
                if dtype is not None:
                    data = rest + chunk
                    whole = len(data) // int(dtype[1:]) * int(dtype[1:])
                    bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:whole], dtype=order + dtype))))
                    rest = data[whole:]
    except (EOFError, OSError, zlib.error) as exc:  # a gzip stream cut short
        raise CTInputError(path, f"cannot be read to its end ({exc})", fix) from None
    if found < need:
        raise CTInputError(path, f"holds {found} bytes of voxel data where its header declares {need}", fix)
    _check_finite(bad, voxels, path)


# ----------------------------------------------------------------------------- DICOM


@dataclass
class _Frame:
    """One DICOM slice: a classic file, or one frame of an enhanced multi-frame file."""

    path: Path
    name: str  # file name, plus the frame number for multi-frame files
    pixels: np.ndarray  # stored values, (rows, columns)
    position: np.ndarray  # ImagePositionPatient, mm LPS
    row: np.ndarray  # unit LPS direction of image x (along a row)
    col: np.ndarray  # unit LPS direction of image y (down a column)
    spacing: Tuple[float, float]  # (x, y) mm
    thickness: Optional[float]  # mm
    slope: float
    intercept: float


def _dcmread(path: Path):
    """The dataset (large values read on access), or None if ``path`` is not DICOM. A file
    without the Part 10 preamble is read when it parses as an image data set (SOP class and
    pixel data); without file meta its transfer syntax is the encoding it was read in."""
    kind = _dicom_kind(path)
    if kind is None:
        return None
    part10 = kind == "part10"
    try:
        ds = pydicom.dcmread(str(path), defer_size="1 KB", force=not part10)
    except Exception as exc:
        if not part10:
            return None
        raise CTInputError(path, f"is a DICOM file but cannot be parsed ({exc})",
                           "It may be truncated or corrupt; export it again.") from None
    if part10:
        return ds
    try:
        if "SOPClassUID" not in ds or "PixelData" not in ds:
            return None
    except Exception:  # bytes that only looked like a data set
        return None
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                                          pydicom.uid.ExplicitVRLittleEndian if little else
                                          pydicom.uid.ExplicitVRBigEndian)
    return ds


def _scan(folder: Path) -> dict:
    """The DICOM files in ``folder`` grouped by SeriesInstanceUID: {uid: [(path, dataset), ...]}."""
    if not folder.exists():
        raise CTInputError(folder, "does not exist", f"Check the path; give {_SUPPORTED}.")
    if not folder.is_dir():
        raise CTInputError(folder, "is not a folder", "Give the folder that holds the DICOM slices.")
    entries = sorted(folder.iterdir())
    series = {}
    for path in entries:
        ds = _dcmread(path) if path.is_file() else None
        if ds is not None and "DirectoryRecordSequence" not in ds:  # DICOMDIR is an index, not an image
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not series:
        n_files = sum(p.is_file() for p in entries)
        subfolders = [p.name for p in entries if p.is_dir()]
        problem = "is empty" if not entries else f"holds no DICOM image files ({n_files} other files)"
        fix = "Give the folder that holds the CT slices (.dcm files)"
        if subfolders:
            fix += f"; subfolders are not searched, and this one has: {', '.join(subfolders[:8])}"
        raise CTInputError(folder, problem, fix + ".")
    return series


def _listing(series: dict) -> str:
    return "; ".join(f"{uid or '(no SeriesInstanceUID)'} '{ds.get('SeriesDescription', '')}' "
                     f"({ds.get('Modality', '?')}, {len(files)} files)"
                     for uid, files in series.items() for ds in [files[0][1]])


def _header_int(ds, keyword: str, path: Path) -> int:
    """An integer DICOM element (1 when absent), or a :class:`CTInputError` naming the file."""
    value = ds.get(keyword, 1)
    try:
        return int(value or 1)
    except (TypeError, ValueError):
        raise CTInputError(path, f"has a malformed {keyword} ({value!r})", "It may be corrupt; export it again.") from None


def _frames(path: Path, ds) -> list:
    """The CT slices of one DICOM file, checked to be greyscale CT with pixel data and geometry."""
    modality, frames = str(ds.get("Modality", "")) or "missing", str(ds.get("NumberOfFrames", "") or "1")
    if modality != "CT":
        frames = f" ({frames} frames)" if frames != "1" else ""
        raise CTInputError(path, f"modality is {modality}{frames}, not CT",
                           "InvarianceExplorer needs CT images in HU; choose a CT series or file.")
    n, samples = _header_int(ds, "NumberOfFrames", path), _header_int(ds, "SamplesPerPixel", path)
    if "PixelData" not in ds:
        raise CTInputError(path, "has no pixel data (no PixelData element)",
                           "Export the CT images with their pixels, not a header-only or report object.")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise CTInputError(path, f"is a colour image (PhotometricInterpretation {photometric}, "
                                 f"{samples} samples per pixel), not greyscale HU",
                           "Use the original CT series, not a screenshot or secondary capture.")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID")
        compressed = getattr(syntax, "is_compressed", False)
        raise CTInputError(path, f"pixel data cannot be decoded ({getattr(syntax, 'name', syntax)}: "
                                 f"{' '.join(str(exc).split())})",
                           "Install a decoder for this compression (pip install pylibjpeg pylibjpeg-libjpeg "
                           "pylibjpeg-openjpeg) or export the series uncompressed" if compressed else
                           "The file may be truncated or its header wrong; export it again") from None
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if n > 1:
            raise CTInputError(path, f"has {n} frames but no per-frame geometry",
                               "Export the series as one file per slice, or as enhanced CT.")
        return [_frame(path, path.name, pixels, ds, ())]
    per_frame = ds.PerFrameFunctionalGroupsSequence
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    pixels = pixels.reshape(-1, *pixels.shape[-2:])
    if len(per_frame) != len(pixels):
        raise CTInputError(path, f"has {len(pixels)} frames but geometry for {len(per_frame)}",
                           "The file is inconsistent; export it again.")
    return [_frame(path, f"{path.name} frame {i + 1}", pixels[i], ds, (item, shared))
            for i, item in enumerate(per_frame)]


def _frame(path: Path, name: str, pixels: np.ndarray, ds, groups) -> _Frame:
    where = path.parent / name

    def value(keyword, required=True, size=0):
        found = ds.get(keyword)
        for group in groups:  # enhanced multi-frame: this frame's groups, then the shared ones
            sequence = group.get(_FUNCTIONAL_GROUP[keyword]) if group is not None else None
            if sequence and keyword in sequence[0]:
                found = sequence[0][keyword].value
                break
        if found is None or found == "":
            if required:
                raise CTInputError(where, f"has no {keyword}, so its place in the patient is unknown",
                                   "Use the original CT export from the scanner or PACS.")
            return None
        values = np.atleast_1d(np.asarray(found, dtype=float))
        if (size and values.shape != (size,)) or not np.isfinite(values).all():
            raise CTInputError(where, f"has an invalid {keyword} {list(values)}", "Export it again.")
        return values

    position, orientation = value("ImagePositionPatient", size=3), value("ImageOrientationPatient", size=6)
    spacing = value("PixelSpacing", size=2)
    row, col = orientation[:3], orientation[3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(row @ col) > 1e-3 or (spacing <= 0).any()):
        raise CTInputError(where, f"has an invalid geometry (ImageOrientationPatient {list(orientation)}, "
                                  f"PixelSpacing {list(spacing)})", "Export it again.")
    thickness, slope, intercept = (value(k, required=False) for k in ("SliceThickness", "RescaleSlope",
                                                                       "RescaleIntercept"))
    return _Frame(path, name, pixels, position, row / np.linalg.norm(row), col / np.linalg.norm(col),
                  (float(spacing[1]), float(spacing[0])),
                  float(thickness[0]) if thickness is not None and thickness[0] > 0 else None,
                  1.0 if slope is None else float(slope[0]), 0.0 if intercept is None else float(intercept[0]))


def _assemble(frames: list, source: Path, hu_offset: float) -> CTImage:
    """Check that ``frames`` form one evenly spaced stack and build the HU image."""
    ref = frames[0]
    for f in frames[1:]:
        for what, mine, theirs, same in (
                ("size (rows, columns)", f.pixels.shape, ref.pixels.shape, f.pixels.shape == ref.pixels.shape),
                ("pixel spacing (x, y) mm", f.spacing, ref.spacing, np.allclose(f.spacing, ref.spacing, rtol=1e-4)),
                ("orientation (ImageOrientationPatient)", _round(f.row, f.col), _round(ref.row, ref.col),
                 np.allclose(np.r_[f.row, f.col], np.r_[ref.row, ref.col], atol=1e-4))):
            if not same:
                raise CTInputError(source, f"{f.name} has {what} {mine} but {ref.name} has {theirs}",
                                   "All slices of a series must share size, pixel spacing and orientation; "
                                   "keep one scan or reconstruction per folder (or choose series_uid).")
    normal = np.cross(ref.row, ref.col)
    frames = sorted(frames, key=lambda f: f.position @ normal)
    depth = np.array([f.position @ normal for f in frames])
    thickness = ref.thickness or 1.0
    if len(frames) > 1:
        thickness = _slice_spacing(frames, depth, normal, source)
    hu = np.empty((len(frames), *ref.pixels.shape), dtype=np.float32)
    for k, f in enumerate(frames):
        hu[k] = f.pixels * f.slope + (f.intercept + hu_offset)
    check_hu(hu, str(source), whole_image=True)
    direction = np.column_stack([ref.row, ref.col, normal])
    return CTImage(hu[0] if len(frames) == 1 else hu, (*ref.spacing, thickness),
                   tuple(frames[0].position), tuple(direction.ravel()))


def _slice_spacing(frames: list, depth: np.ndarray, normal: np.ndarray, source: Path) -> float:
    """The spacing (mm) of sorted slices at ``depth`` along ``normal``, checked to be even."""
    gaps = np.diff(depth)
    k = int(np.argmin(gaps))
    if gaps[k] < max(1e-3, 0.01 * np.median(gaps)):
        raise CTInputError(source, f"{frames[k].name} and {frames[k + 1].name} are at the same slice position "
                                   f"({depth[k]:.3f} mm along the slice normal)",
                           "Remove duplicate files, or put each acquisition (e.g. each phase) in its own folder.")
    step = (depth[-1] - depth[0]) / (len(frames) - 1)
    off_grid = np.abs(depth - depth[0] - step * np.arange(len(frames)))
    if off_grid.max() > max(0.01, 0.1 * step):
        k = int(np.argmax(np.abs(gaps - np.median(gaps))))
        raise CTInputError(source, f"slices are not evenly spaced: {gaps[k]:.3f} mm between {frames[k].name} and "
                                   f"{frames[k + 1].name}, {np.median(gaps):.3f} mm typical",
                           "A slice may be missing or the folder mixes reconstructions; "
                           "give a complete, evenly spaced series (or resample it first).")
    shift = np.array([f.position - frames[0].position for f in frames])
    sideways = np.linalg.norm(shift - np.outer(shift @ normal, normal), axis=1)
    if sideways.max() > 0.1 * min(frames[0].spacing):
        raise CTInputError(source, f"slice positions drift sideways by up to {sideways.max():.2f} mm "
                                   "(gantry tilt or a sheared stack)",
                           "Resample the series to a regular grid first (in 3D Slicer: the DICOM module's "
                           "acquisition geometry regularization, then harden the transform), or give the one slice "
                           "you study as its own DICOM file (a slice reads as a 2D image, and sampling works on "
                           "one slice).")
    return float(step)


def _round(*vectors) -> tuple:
    return tuple(round(float(v), 4) for v in np.concatenate(vectors))


# ----------------------------------------------------------------------------- writing


@contextmanager
def written_file(path) -> Iterator[Path]:
    """Yield a hidden temporary path beside the file ``path`` (same extension) to write it in;
    when the block ends the temporary replaces ``path`` at once, and when it fails (or is
    interrupted) it is removed: the file appears whole or not at all."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_json(path, value, indent: int = 1) -> Path:
    """Write ``value`` as JSON to ``path`` whole or not at all (:func:`written_file`)."""
    import json

    with written_file(path) as temporary:
        temporary.write_text(json.dumps(value, indent=indent))
    return Path(path)


@contextmanager
def written_whole(folder: Path):
    """Yield a hidden sibling folder to write the folder ``folder`` in; when the block ends
    it replaces ``folder`` (an earlier export) at once, and when it fails (or is interrupted)
    it is removed: a model folder appears whole or not at all. A symbolic link ``folder`` is
    followed: its target is written (the link stays). Interrupted between moving the earlier
    folder aside and moving the new one in, the earlier folder is put back."""
    folder = Path(folder)
    if folder.is_symlink():
        folder = folder.resolve()
    token = uuid.uuid4().hex[:8]
    partial, old = (folder.with_name(f".{folder.name}.{token}.{end}") for end in ("partial", "old"))
    partial.mkdir(parents=True)
    try:
        yield partial
        if folder.exists():
            os.replace(folder, old)
        os.replace(partial, folder)
    finally:
        if old.exists() and not folder.exists():
            os.replace(old, folder)
        for left in (old, partial):
            if left.exists():
                shutil.rmtree(left, ignore_errors=True)


def write_nrrd(image: CTImage, path, *, array: Optional[np.ndarray] = None, compress: bool = True) -> str:
    """Write ``image`` (or ``array``, any numeric dtype, e.g. uint8 labels, with ``image``'s
    geometry) to the .nrrd file ``path`` atomically, creating its folder; returns the path.

    A 2D image becomes a one-slice 3D NRRD, so that its position, orientation and thickness
    are kept and it lines up with its volume in a viewer (:func:`read_image` reads it back
    as 2D).
    """
    path = Path(path)
    if path.suffix.lower() != ".nrrd":
        raise ValueError(f"{path}: write_nrrd writes single-file .nrrd; got '{path.suffix}'")
    data = image.array if array is None else np.asarray(array)
    if data.shape != image.array.shape:
        raise ValueError(f"array shape {data.shape} differs from the image's {image.array.shape}")
    if data.dtype == bool or data.dtype == np.float16:
        data = data.astype(np.uint8 if data.dtype == bool else np.float32)
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise ValueError(f"cannot write {data.dtype} voxels; give a numeric array")
    out = sitk.GetImageFromArray(np.ascontiguousarray(data if data.ndim == 3 else data[None]))
    out.SetSpacing(image.spacing)
    out.SetOrigin(image.origin)
    out.SetDirection(tuple(image.direction_matrix.ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with written_file(path) as temporary:
            sitk.WriteImage(out, str(temporary), useCompression=compress)
    except RuntimeError as exc:
        raise OSError(f"{path}: cannot be written ({last_line(exc)}); check that its folder is writable and has "
                      "space") from None
    return str(path)
