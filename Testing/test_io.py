"""CT images in and out: real DICOM (pydicom's and pydicom-data's test files), series this
test writes, NRRD/NIfTI/MetaImage round trips, and every kind of bad input.

SimpleITK's own DICOM reader (GDCM) is the reference for geometry. Bad inputs are made by
editing copies of real files in tmp_path; nothing is written anywhere else.
"""

import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "InvarianceExplorer"))

from InvarianceExplorerLib.image import CTImage  # noqa: E402
from InvarianceExplorerLib.io import (  # noqa: E402
    CTInputError, check_hu, list_dicom_series, read_dicom_series, read_image, write_nrrd)

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT_SMALL = TEST_FILES / "CT_small.dcm"
CT5N = TEST_FILES / "dicomdirtests" / "98892001" / "CT5N"
#: pydicom-data's files (the dev extra installs it; the tests need it).
DATA_STORE = Path(importlib.util.find_spec("data_store").origin).parent / "data"


# ----------------------------------------------------------------------------- helpers


def rotation(degrees_z, degrees_x):
    """A proper rotation: about z, then about x."""
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def ds_numbers(values):
    return [f"{v:.6f}" for v in values]


def write_series(folder, n=4, gap=1.25, axes=np.eye(3), pixel_spacing=(0.5, 0.8), origin=(-20.0, 30.0, 40.0)):
    """Write ``n`` CT slices (copies of CT_small, slice k = CT_small + 10 k) at ``gap`` mm along
    ``axes[:, 2]`` in shuffled file order with lying InstanceNumbers; returns stored values (z, y, x)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid(entropy_srcs=[str(folder)])
    base = pydicom.dcmread(CT_SMALL).pixel_array.astype(np.int16)
    file_order = np.random.default_rng(7).permutation(n)
    for k in range(n):
        ds = pydicom.dcmread(CT_SMALL)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(folder), str(k)])
        ds.InstanceNumber = int(file_order[k]) + 1  # unrelated to the position
        ds.ImageOrientationPatient = ds_numbers(np.r_[axes[:, 0], axes[:, 1]])
        ds.ImagePositionPatient = ds_numbers(np.asarray(origin) + k * gap * axes[:, 2])
        ds.PixelSpacing = ds_numbers(pixel_spacing)
        ds.PixelData = (base + 10 * k).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{file_order[k]:03d}")  # no extension: found by the DICM marker
    return np.stack([base + 10 * k for k in range(n)])


def copy_ct5n(folder):
    """A copy of the CT5N series; its files in slice order (increasing z)."""
    shutil.copytree(CT5N, folder)
    return sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def edit(path, change, to=None):
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(to or path)
    return to or path


def sitk_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_same_geometry(image, reference, atol=1e-5):
    """``image`` (CTImage or SimpleITK image) has the geometry of the SimpleITK image ``reference``."""
    get = (lambda name: getattr(image, name)) if isinstance(image, CTImage) else \
        (lambda name: getattr(image, "Get" + name.capitalize())())
    for name in ("spacing", "origin", "direction"):
        assert np.allclose(get(name), getattr(reference, "Get" + name.capitalize())(), atol=atol), name


def to_sitk(image):
    out = sitk.GetImageFromArray(image.array)
    out.SetSpacing(image.spacing)
    out.SetOrigin(image.origin)
    out.SetDirection(image.direction)
    return out


def snapshot(paths):
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


def raises(match_all, call, *args, **kwargs):
    """Call, expect a CTInputError, and check that its message holds every string in ``match_all``."""
    with pytest.raises(CTInputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    for text in match_all:
        assert str(text) in message, f"{text!r} not in {message!r}"
    return message


@pytest.fixture
def oblique_volume():
    axes = rotation(30, 20)
    array = np.random.default_rng(0).normal(0, 300, (6, 7, 8)).astype(np.float32)
    return CTImage(array, (0.7, 0.9, 2.5), (-100.0, 20.0, 55.5), tuple(axes.ravel()))


# ----------------------------------------------------------------------------- reading real DICOM


def test_ct_small_gives_hu_and_geometry():
    ds = pydicom.dcmread(CT_SMALL)
    image = read_image(CT_SMALL)
    assert image.is_slice and image.array.shape == (128, 128) and image.array.dtype == np.float32
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for y, x in [(0, 0), (64, 64), (100, 20), (5, 120)]:
        assert image.array[y, x] == expected[y, x]
    assert float(ds.RescaleIntercept) == -1024 and image.array.min() < -800
    assert image.spacing == pytest.approx((0.661468, 0.661468, 5.0))
    assert image.origin == pytest.approx((-158.135803, -179.035797, -75.699997))
    assert image.direction == pytest.approx(np.eye(3).ravel())
    assert_same_geometry(image, sitk.ReadImage(str(CT_SMALL)))


def test_ct5n_series_matches_simpleitk(tmp_path):
    reference = sitk_series(CT5N)
    image = read_image(CT5N)
    assert image.array.shape == (5, 16, 16)
    assert np.array_equal(image.array, sitk.GetArrayFromImage(reference).astype(np.float32))
    assert_same_geometry(image, reference)
    assert image.spacing[2] == pytest.approx(2.5) and image.origin[2] == pytest.approx(-1.2375)
    written = sitk.ReadImage(write_nrrd(image, tmp_path / "ct5n.nrrd"))
    assert_same_geometry(written, reference)
    assert np.array_equal(sitk.GetArrayFromImage(written), image.array)


def test_oblique_shuffled_series_sorts_by_position_and_matches_simpleitk(tmp_path):
    axes = rotation(30, 20)
    stored = write_series(tmp_path / "series", n=5, gap=1.25, axes=axes, pixel_spacing=(0.5, 0.8))
    (tmp_path / "series" / "notes.txt").write_text("not DICOM: skipped")
    image = read_dicom_series(tmp_path / "series")
    assert np.array_equal(image.array, stored - 1024.0)  # slice k is the k-th along the normal
    assert image.spacing == pytest.approx((0.8, 0.5, 1.25), abs=1e-5)  # PixelSpacing is (y, x)
    assert image.direction_matrix == pytest.approx(axes, abs=1e-5)
    assert image.origin == pytest.approx((-20.0, 30.0, 40.0), abs=1e-5)
    reference = sitk_series(tmp_path / "series")
    assert_same_geometry(image, reference)
    assert np.array_equal(image.array, sitk.GetArrayFromImage(reference).astype(np.float32))
    assert_same_geometry(sitk.ReadImage(write_nrrd(image, tmp_path / "series.nrrd")), reference)


def test_files_without_the_part10_preamble_are_read_as_dicom(tmp_path):
    """Some archives hold DICOM without the 128-byte preamble and 'DICM' marker: with its file
    meta group, or as a bare data set (implicit VR little endian, no transfer syntax). Both
    read as the Part 10 file they came from, alone and as a series; other files stay skipped."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    stored = write_series(tmp_path / "series", n=3, axes=rotation(10, 0))
    files = sorted((tmp_path / "series").iterdir())
    expected = read_dicom_series(tmp_path / "series")
    (tmp_path / "series" / "notes.txt").write_text("not DICOM: skipped")
    files[0].write_bytes(files[0].read_bytes()[132:])  # file meta, no preamble
    bare = DicomBytesIO()
    bare.is_little_endian, bare.is_implicit_VR = True, True
    write_dataset(bare, pydicom.dcmread(files[1]))  # no file meta at all
    files[1].write_bytes(bare.getvalue())
    assert all(f.read_bytes()[128:132] != b"DICM" for f in files[:2])
    image = read_dicom_series(tmp_path / "series")
    assert np.array_equal(image.array, expected.array) and np.array_equal(image.array, stored - 1024.0)
    assert image.direction_matrix == pytest.approx(expected.direction_matrix) and image.origin == expected.origin
    for f in files[:2]:
        assert read_image(f).array.shape == expected.array.shape[1:]


def test_series_along_minus_normal_starts_at_lowest_projection(tmp_path):
    stored = write_series(tmp_path / "s", n=3, gap=-2.0)  # positions decrease as k grows
    image = read_image(tmp_path / "s")
    assert np.array_equal(image.array, stored[::-1] - 1024.0)
    assert image.origin == pytest.approx((-20.0, 30.0, 36.0))
    assert image.spacing[2] == pytest.approx(2.0)
    assert_same_geometry(image, sitk_series(tmp_path / "s"))


def test_one_slice_series_is_2d(tmp_path):
    write_series(tmp_path / "one", n=1)
    image = read_image(tmp_path / "one")
    assert image.is_slice and image.spacing == pytest.approx((0.8, 0.5, 5.0))


def test_693_head_ct():
    path = DATA_STORE / "693_UNCI.dcm"
    ds = pydicom.dcmread(path)
    image = read_image(path)
    assert image.array.shape == (512, 512)
    assert np.array_equal(image.array, ds.pixel_array.astype(np.float32) - 1024.0)
    reference = sitk.ReadImage(str(path))  # GDCM takes z spacing from SpacingBetweenSlices (20 mm)
    assert image.spacing == pytest.approx((*reference.GetSpacing()[:2], float(ds.SliceThickness)))
    assert image.origin == pytest.approx(reference.GetOrigin())
    assert image.direction == pytest.approx(reference.GetDirection())


def test_enhanced_multiframe_ct_frames_are_slices():
    path = DATA_STORE / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    image = read_image(path)
    assert image.array.shape == (2, 512, 512)
    frames = ds.PerFrameFunctionalGroupsSequence
    for k in range(2):  # each slice sits where its frame says, with its frame's values
        where = np.asarray(image.origin) + k * image.spacing[2] * image.direction_matrix[:, 2]
        i = next(i for i, f in enumerate(frames)
                 if np.allclose(f.PlanePositionSequence[0].ImagePositionPatient, where, atol=1e-4))
        assert np.array_equal(image.array[k], ds.pixel_array[i] - 1024.0)
    assert image.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    assert np.linalg.det(image.direction_matrix) == pytest.approx(1.0)


def test_list_dicom_series(tmp_path):
    copy_ct5n(tmp_path / "mixed")
    write_series(tmp_path / "mixed", n=2)
    listed = {s["uid"]: s for s in list_dicom_series(tmp_path / "mixed")}
    ct5n_uid = str(pydicom.dcmread(next(CT5N.iterdir())).SeriesInstanceUID)
    assert listed[ct5n_uid] == dict(uid=ct5n_uid, description="SmartScore - Gated 0.5 sec",
                                    modality="CT", number=5, n_files=5)
    assert sorted(s["n_files"] for s in listed.values()) == [2, 5]


def test_reading_never_changes_inputs(tmp_path, oblique_volume):
    files = copy_ct5n(tmp_path / "ct")
    nrrd = Path(write_nrrd(oblique_volume, tmp_path / "v.nrrd"))
    before = snapshot(files + [nrrd])
    read_image(tmp_path / "ct")
    read_image(files[0])
    list_dicom_series(tmp_path / "ct")
    read_image(nrrd)
    assert snapshot(files + [nrrd]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "v.nrrd"]


# ----------------------------------------------------------------------------- round trips, writing


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd"])
def test_itk_formats_round_trip(tmp_path, oblique_volume, suffix):
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(to_sitk(oblique_volume), str(path))
    image = read_image(path, hu_offset=10.0)
    assert np.allclose(image.array, oblique_volume.array + 10.0)
    for name in ("spacing", "origin", "direction"):
        assert getattr(image, name) == pytest.approx(getattr(oblique_volume, name), abs=1e-4), name


@pytest.mark.parametrize("compress", [True, False])
def test_write_nrrd_round_trip(tmp_path, oblique_volume, compress):
    path = write_nrrd(oblique_volume, tmp_path / "out" / "v.nrrd", compress=compress)
    assert path == str(tmp_path / "out" / "v.nrrd")
    image = read_image(path)
    assert np.array_equal(image.array, oblique_volume.array)
    for name in ("spacing", "origin", "direction"):
        assert getattr(image, name) == pytest.approx(getattr(oblique_volume, name), abs=1e-9), name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v.nrrd"]  # no temporary left


def test_write_nrrd_labels_keep_dtype_and_geometry(tmp_path, oblique_volume):
    labels = (oblique_volume.array > 0).astype(np.uint8)
    written = sitk.ReadImage(write_nrrd(oblique_volume, tmp_path / "labels.nrrd", array=labels))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(written), labels)
    assert_same_geometry(oblique_volume, written)
    with pytest.raises(ValueError, match="shape"):
        write_nrrd(oblique_volume, tmp_path / "bad.nrrd", array=labels[:2])
    with pytest.raises(ValueError, match=".nii"):
        write_nrrd(oblique_volume, tmp_path / "v.nii")


def test_write_nrrd_slices(tmp_path):
    axial = read_image(CT_SMALL)
    written = sitk.ReadImage(write_nrrd(axial, tmp_path / "axial.nrrd"))
    assert written.GetDimension() == 3 and written.GetSize()[2] == 1  # one-slice 3D: z position kept
    assert written.GetOrigin() == pytest.approx(axial.origin) and written.GetSpacing() == pytest.approx(axial.spacing)
    back = read_image(tmp_path / "axial.nrrd")
    assert back.is_slice and np.array_equal(back.array, axial.array)
    for name in ("spacing", "origin", "direction"):
        assert getattr(back, name) == pytest.approx(getattr(axial, name)), name
    oblique = CTImage(axial.array, axial.spacing, axial.origin, tuple(rotation(30, 20).ravel()))
    back = read_image(write_nrrd(oblique, tmp_path / "oblique.nrrd"))  # kept as one-slice 3D
    assert back.is_slice and np.array_equal(back.array, oblique.array)
    for name in ("spacing", "origin", "direction"):
        assert getattr(back, name) == pytest.approx(getattr(oblique, name)), name


def test_write_nrrd_is_all_or_nothing(tmp_path, oblique_volume):
    target = tmp_path / "v.nrrd"
    target.mkdir()  # os.replace cannot put a file over a folder: the write fails at the last step
    (target / "keep").write_text("untouched")
    with pytest.raises(OSError):
        write_nrrd(oblique_volume, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nrrd"]
    assert (target / "keep").read_text() == "untouched"
    old = tmp_path / "old.nrrd"
    write_nrrd(oblique_volume, old)
    write_nrrd(oblique_volume.with_array(oblique_volume.array + 1), old)  # replaces a file
    assert np.array_equal(read_image(old).array, oblique_volume.array + 1)


# ----------------------------------------------------------------------------- bad inputs


def test_error_type_is_value_error():
    assert issubclass(CTInputError, ValueError)
    error = CTInputError("/x/y.dcm", "the problem", "The fix.")
    assert str(error) == "/x/y.dcm: the problem. The fix." and error.path == "/x/y.dcm"


def test_missing_path_and_unsupported_type(tmp_path):
    raises([tmp_path / "nothing", "does not exist"], read_image, tmp_path / "nothing")
    png = tmp_path / "slice.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    raises(["slice.png", "unsupported file type '.png'", ".nrrd"], read_image, png)
    fake = tmp_path / "fake.dcm"
    fake.write_text("hello")
    raises(["fake.dcm", "not a DICOM image file"], read_image, fake)
    fake.write_bytes(b"\x08\x00" + bytes(300))  # starts like a data set without preamble, but is none
    raises(["fake.dcm", "not a DICOM image file"], read_image, fake)


def test_empty_folder_and_folder_without_dicom(tmp_path):
    raises([tmp_path, "is empty"], read_image, tmp_path)
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "sub").mkdir()
    raises([tmp_path, "no DICOM image files", "sub"], read_image, tmp_path)
    raises(["is not a folder"], list_dicom_series, tmp_path / "a.txt")


@pytest.mark.parametrize("name, modality", [("MR_small.dcm", "MR (not CT)"), ("CR", "CR"), ("liver.dcm", "SEG (3 frames)"),
                                            ("US1_UNCI.dcm", "US"), ("SC_rgb.dcm", "OT"),
                                            ("emri_small.dcm", "MR (10 frames)"), ("RG1_UNCI.dcm", "CR")])
def test_not_ct(name, modality):
    if name == "CR":
        path = TEST_FILES / "dicomdirtests" / "77654033" / "CR1"
        named = "6154"
    elif name == "MR_small.dcm":
        path = named = TEST_FILES / name
        modality = "MR"
    else:
        path = named = DATA_STORE / name
    raises([named, f"modality is {modality}", "not CT"], read_image, path)


def test_non_ct_slice_in_ct_series(tmp_path):
    files = copy_ct5n(tmp_path / "ct")
    edit(files[2], lambda ds: setattr(ds, "Modality", "MR"))
    raises([files[2], "modality is MR"], read_image, tmp_path / "ct")


@pytest.mark.parametrize("source, photometric", [("SC_rgb.dcm", "RGB"), ("SC_ybr_full_uncompressed.dcm", "YBR_FULL"),
                                                 ("CT_small.dcm", "PALETTE COLOR")])
def test_colour(tmp_path, source, photometric):
    path = CT_SMALL if source == "CT_small.dcm" else DATA_STORE / source

    def make_ct(ds):
        ds.Modality = "CT"
        ds.PhotometricInterpretation = photometric

    copy = edit(path, make_ct, tmp_path / "colour.dcm")
    raises([copy, "colour image", photometric], read_image, copy)


def test_missing_pixel_data_and_geometry(tmp_path):
    no_pixels = edit(CT_SMALL, lambda ds: ds.__delattr__("PixelData"), tmp_path / "no_pixels.dcm")
    raises([no_pixels, "no pixel data"], read_image, no_pixels)
    no_position = edit(CT_SMALL, lambda ds: ds.__delattr__("ImagePositionPatient"), tmp_path / "no_position.dcm")
    raises([no_position, "no ImagePositionPatient"], read_image, no_position)

    def truncate(ds):
        ds.PixelData = ds.PixelData[:-100]

    short = edit(CT_SMALL, truncate, tmp_path / "short.dcm")
    raises([short, "pixel data cannot be decoded", "truncated", "export it again"], read_image, short)


def test_mixed_series_need_a_chosen_uid(tmp_path):
    copy_ct5n(tmp_path / "mixed")
    write_series(tmp_path / "mixed", n=2)
    ct5n_uid = str(pydicom.dcmread(next(CT5N.iterdir())).SeriesInstanceUID)
    other_uid = next(s["uid"] for s in list_dicom_series(tmp_path / "mixed") if s["uid"] != ct5n_uid)
    raises([tmp_path / "mixed", "holds 2 DICOM series", ct5n_uid, "'SmartScore - Gated 0.5 sec' (CT, 5 files)",
            other_uid, "(CT, 2 files)", "series_uid=", "--series-uid"], read_image, tmp_path / "mixed")
    assert read_image(tmp_path / "mixed", series_uid=ct5n_uid).array.shape == (5, 16, 16)
    assert read_image(tmp_path / "mixed", series_uid=other_uid).array.shape == (2, 128, 128)
    raises([tmp_path / "mixed", "no series with SeriesInstanceUID 1.2.3", ct5n_uid, other_uid],
           read_image, tmp_path / "mixed", series_uid="1.2.3")
    raises(["IM000", "belongs to series"], read_image, tmp_path / "mixed" / "IM000", series_uid=ct5n_uid)


@pytest.mark.parametrize("change, problem", [
    (lambda ds: setattr(ds, "PixelSpacing", ["0.5", "0.5"]), "pixel spacing (x, y) mm (0.5, 0.5)"),
    (lambda ds: setattr(ds, "ImageOrientationPatient", ds_numbers(np.r_[rotation(10, 0)[:, 0], rotation(10, 0)[:, 1]])),
     "orientation"),
    (lambda ds: (setattr(ds, "Rows", 8), setattr(ds, "Columns", 8), setattr(ds, "PixelData", ds.PixelData[:128])),
     "size (rows, columns) (8, 8)"),
])
def test_inconsistent_slices(tmp_path, change, problem):
    files = copy_ct5n(tmp_path / "ct")
    edit(files[3], change)
    raises([tmp_path / "ct", files[3].name, problem, "must share"], read_image, tmp_path / "ct")


def test_duplicate_positions(tmp_path):
    files = copy_ct5n(tmp_path / "ct")

    def new_instance(ds):
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["duplicate"])

    edit(files[1], new_instance, tmp_path / "ct" / "copy")
    raises([tmp_path / "ct", files[1].name, "copy", "same slice position", "1.262"], read_image, tmp_path / "ct")


def test_missing_slice_gives_uneven_gaps(tmp_path):
    files = copy_ct5n(tmp_path / "ct")
    files[2].unlink()
    raises([tmp_path / "ct", "not evenly spaced", "5.000 mm", files[1].name, files[3].name, "2.500 mm typical"],
           read_image, tmp_path / "ct")


def test_gantry_tilt(tmp_path):
    files = copy_ct5n(tmp_path / "ct")
    for k, path in enumerate(files):
        edit(path, lambda ds: setattr(ds, "ImagePositionPatient", ds_numbers(
            np.asarray(ds.ImagePositionPatient, dtype=float) + [0, 0.4 * k, 0])))
    raises([tmp_path / "ct", "drift sideways", "1.60 mm", "gantry tilt"], read_image, tmp_path / "ct")
    one = read_image(files[2])  # the workaround the message gives: one slice's file alone is a 2D image
    assert one.is_slice and one.array.shape == (16, 16)  # CT5N: 16 x 16 pixels


def test_stored_values_without_intercept(tmp_path):
    no_intercept = edit(CT_SMALL, lambda ds: setattr(ds, "RescaleIntercept", "0"), tmp_path / "raw.dcm")
    raises([no_intercept, "128..2191", "not HU", "hu_offset=-1024", "--hu-offset -1024"], read_image, no_intercept)
    fixed = read_image(no_intercept, hu_offset=-1024)
    assert np.array_equal(fixed.array, read_image(CT_SMALL).array)
    stored = read_image(CT_SMALL).with_array(read_image(CT_SMALL).array + 1024)
    path = write_nrrd(stored, tmp_path / "stored.nrrd")
    raises([path, "hu_offset=-1024"], read_image, path)


@pytest.mark.parametrize("suffix, bad, dtype", [(".nrrd", np.nan, np.float32), (".nii.gz", np.inf, np.float32),
                                                (".nii", np.nan, np.float64), (".mha", -np.inf, np.float32)])
def test_nan_and_inf_voxels(tmp_path, oblique_volume, suffix, bad, dtype):
    array = oblique_volume.array.astype(dtype)
    array[2, 3, 4] = array[0, 0, 0] = bad
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(to_sitk(oblique_volume))
    path = tmp_path / f"bad{suffix}"
    sitk.WriteImage(image, str(path))  # (ITK's NIfTI reader would turn these voxels into 0 HU)
    raises([path, "2 of 336 voxels are NaN or infinite"], read_image, path)


def test_normalised_values(tmp_path, oblique_volume):
    path = write_nrrd(oblique_volume.with_array(np.linspace(0, 1, 336).reshape(6, 7, 8)), tmp_path / "n.nrrd")
    raises([path, "look normalised"], read_image, path)


def test_vector_4d_and_corrupt_files(tmp_path):
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    raises(["rgb.nrrd", "3 values per voxel", "scalar"], read_image, tmp_path / "rgb.nrrd")
    volume = sitk.GetImageFromArray(np.full((3, 4, 5), -1000.0, np.float32))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(tmp_path / "t.nii.gz"))
    raises(["t.nii.gz", "is 4D", "(5, 4, 3, 2)"], read_image, tmp_path / "t.nii.gz")
    (tmp_path / "broken.nrrd").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n1234")
    raises(["broken.nrrd", "cannot be read", "endian"], read_image, tmp_path / "broken.nrrd")


def test_files_whose_content_is_not_their_format_or_nothing_are_named_as_such(tmp_path, oblique_volume):
    """An NRRD that is text, a NIfTI that is an NRRD, an empty file, a folder named .nrrd (ITK
    said "cannot be read" and the fix "check that the file is complete"; HDF5 printed pages of
    diagnostics for a folder), and a series UID given with a one-image file (ignored before)."""
    from InvarianceExplorerLib.result_folder import read_volume

    write_nrrd(oblique_volume, tmp_path / "ok.nrrd")
    (tmp_path / "notes.nrrd").write_text("patient 7, lung window\n")
    raises(["notes.nrrd", "is named .nrrd but its content is not that format (it looks like text)",
            "true extension"], read_image, tmp_path / "notes.nrrd")
    (tmp_path / "renamed.nii").write_bytes((tmp_path / "ok.nrrd").read_bytes())
    raises(["renamed.nii", "is named .nii", "looks like an NRRD file"], read_image, tmp_path / "renamed.nii")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    raises(["empty.nii.gz", "is empty (0 bytes)", "copy or export it again"], read_image, tmp_path / "empty.nii.gz")
    (tmp_path / "stack.nrrd").mkdir()
    raises(["stack.nrrd", "is a folder, not an image file"], read_volume, tmp_path / "stack.nrrd")
    raises(["ok.nrrd", "a series UID was given", "drop series_uid"], read_image, tmp_path / "ok.nrrd",
           series_uid="1.2.3")
    assert read_image(tmp_path / "ok.nrrd").array.shape == oblique_volume.array.shape  # the check passes real files
    for suffix in (".nii", ".nii.gz", ".mha"):
        sitk.WriteImage(sitk.ReadImage(str(tmp_path / "ok.nrrd")), str(tmp_path / f"ok{suffix}"))
        assert read_image(tmp_path / f"ok{suffix}").array.shape == oblique_volume.array.shape


def test_check_hu_direct():
    check_hu(np.array([[-1000.0, 40.0], [1500.0, 3000.0]]), "ok")
    check_hu(np.array([[-33792.0, 30000.0]]), "extended scale; a stored fill of -32768 with its intercept")
    check_hu(np.zeros((4, 4)), "constant water")  # a flat phantom is fine
    check_hu(np.array([[0.0, 200.0]]), "soft tissue crop")  # no air, but no bone either: a patch may be so
    raises(["src", "NaN or infinite"], check_hu, np.array([np.nan, 0.0]), "src")
    raises(["src", "0..4095", "hu_offset=-1024"], check_hu, np.array([0.0, 4095.0]), "src")
    raises(["src", "-1..1", "normalised"], check_hu, np.array([-1.0, 1.0]), "src")
    water = np.random.default_rng(0).normal(0.0, 4.0, (64, 64))
    check_hu(water, "a patch inside a water phantom at full dose")
    for values in ([-1.02, 0.04, 1.27], [-1.1, 3.6]):  # HU / 1000; the paper's normalisation
        check_hu(np.array(values) * 1000, "as HU")
        raises(["src", f"{values[0]:g}..{values[-1]:g}", "normalised or scaled"], check_hu, np.array(values), "src",
               whole_image=True)
    raises(["src", "3e+38", "beyond any CT scale"], check_hu, np.array([-1000.0, 3e38], np.float32), "src")
    raises(["src", "0 to 255", "windowed display image"], check_hu, np.array([[0.0, 17.0, 255.0]]), "src",
           whole_image=True)
    check_hu(np.array([[19.0, 60.0, 180.0]]), "a full-dose crop of liver", whole_image=True)
    check_hu(np.array([[0.5, 60.0, 255.0]]), "not grey levels", whole_image=True)


def test_implausible_images_are_refused(tmp_path, oblique_volume):
    """Whole images that are not HU: a windowed display image (0..255), HU / 1000, a fill value of 3e38."""
    windowed = np.clip((oblique_volume.array + 160) / 400 * 255, 0, 255).round()
    path = write_nrrd(oblique_volume.with_array(windowed), tmp_path / "windowed.nrrd")
    raises([path, "none below 0", "windowed display image", "original CT in HU"], read_image, path)
    path = write_nrrd(oblique_volume.with_array(oblique_volume.array / 1000), tmp_path / "scaled.nrrd")
    raises([path, "normalised or scaled"], read_image, path)
    huge = oblique_volume.array.copy()
    huge[1, 2, 3] = 3e38
    path = write_nrrd(oblique_volume.with_array(huge), tmp_path / "fill.nrrd")
    raises([path, "beyond any CT scale", "fill value"], read_image, path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_refused(tmp_path, oblique_volume, suffix):
    """ITK's NIfTI reader fills a truncated file's missing voxels with 0 HU and says nothing."""
    image = sitk.GetImageFromArray(oblique_volume.array.astype(np.int16))
    image.CopyInformation(to_sitk(oblique_volume))
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(image, str(whole))
    np.testing.assert_array_equal(read_image(whole).array, oblique_volume.array.astype(np.int16))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[:-200 if suffix == ".nii" else -40])
    raises([cut, "Copy or export the file again"], read_image, cut)


def test_truncated_metaimage_says_what_is_missing(tmp_path, oblique_volume):
    """ITK refuses a truncated or headless MetaImage with a stale 'No such file or directory';
    the message says what is wrong instead."""
    image = sitk.GetImageFromArray(oblique_volume.array.astype(np.int16))
    need = 2 * image.GetNumberOfPixels()
    for name in ("cut.mha", "cut.mhd"):
        sitk.WriteImage(image, str(tmp_path / name))
        data = tmp_path / ("cut.mha" if name.endswith(".mha") else "cut.raw")
        data.write_bytes(data.read_bytes()[:-100])
        raises([name, f"holds {need - 100} bytes of voxel data where its header declares {need}"],
               read_image, tmp_path / name)
    (tmp_path / "cut.raw").unlink()
    raises(["cut.mhd", "its voxel data file cut.raw is missing next to it"], read_image, tmp_path / "cut.mhd")


def test_jpeg_lossless_dicom_is_decoded(tmp_path):
    """JPEG Lossless (process 14), common in CT archives, decodes through pylibjpeg: a CT built
    from pydicom-data's JPEG-LL.dcm reads as its pixels times the rescale, in HU."""
    ds = pydicom.dcmread(DATA_STORE / "JPEG-LL.dcm")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    ds.Modality, ds.RescaleSlope, ds.RescaleIntercept = "CT", 1, -1024
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, 0], [1, 0, 0, 0, 1, 0], [0.7, 0.7]
    ds.save_as(tmp_path / "ll.dcm")
    image = read_image(tmp_path / "ll.dcm")
    np.testing.assert_array_equal(image.array, pydicom.dcmread(tmp_path / "ll.dcm").pixel_array - 1024.0)


def test_malformed_header_value_names_the_file(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    ds.NumberOfFrames = 11
    ds.save_as(tmp_path / "good.dcm")
    element = b"\x28\x00\x08\x00IS\x02\x00"  # (0028,0008) NumberOfFrames, explicit VR little endian, 2 bytes
    data = (tmp_path / "good.dcm").read_bytes()
    assert data.count(element + b"11") == 1
    (tmp_path / "bad.dcm").write_bytes(data.replace(element + b"11", element + b"1A"))
    with pytest.warns(UserWarning, match="Invalid value for VR IS"):  # pydicom's own
        raises(["bad.dcm", "malformed NumberOfFrames", "1A"], read_image, tmp_path / "bad.dcm")


def test_a_folder_is_written_whole_or_the_earlier_one_stays(tmp_path, monkeypatch):
    """written_whole: the new folder replaces an earlier one at once; a failing block, or an
    interruption between moving the earlier folder aside and moving the new one in (Ctrl-C
    arrives between two Python statements), leaves the earlier folder as it was and no hidden
    folders beside it."""
    import os

    from InvarianceExplorerLib import io

    out = tmp_path / "results"
    with io.written_whole(out) as partial:
        (partial / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError, match="sampling failed"):
        with io.written_whole(out) as partial:
            (partial / "a.txt").write_text("second")
            raise RuntimeError("sampling failed")
    assert (out / "a.txt").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["results"]

    moves = []

    def interrupted_second_move(source, destination):
        moves.append(Path(source).name)
        if len(moves) == 2:
            raise KeyboardInterrupt
        os.rename(source, destination)

    monkeypatch.setattr(io.os, "replace", interrupted_second_move)
    with pytest.raises(KeyboardInterrupt):
        with io.written_whole(out) as partial:
            (partial / "a.txt").write_text("third")
    monkeypatch.undo()
    assert moves[0] == "results" and moves[1].endswith(".partial")
    assert (out / "a.txt").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["results"]
    with io.written_whole(out) as partial:
        (partial / "b.txt").write_text("fourth")
    assert sorted(os.listdir(out)) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["results"]
