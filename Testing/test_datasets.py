"""Paired data sets: the simulated builder (manifest, resume, reproducibility), the paired
DICOM loader on a small Mayo-like tree written here from real DICOM, the patient-level
split and the MONAI training pipeline."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid
from scipy import ndimage

from InvarianceExplorerLib.datasets import ItemCache, make_dataset, split_patients
from InvarianceExplorerLib.dicom_dataset import PairedDicomDataset
from InvarianceExplorerLib.io import CTInputError
from InvarianceExplorerLib.normalization import PAPER_NORMALIZATION
from InvarianceExplorerLib.simulated_dataset import (BLOCK, DatasetMismatchError, SimulatedDataset,
                                                     build_simulated_dataset, item_seeds)
from realdata import pydicom_test_file

SIZE, COUNT, SEED = 64, 6, 11
PHOTONS = 1e4  # a tenth of the default: noise well above the streaks of the coarse 64-pixel scan


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("simulated")
    build(out, COUNT)
    return out


def build(out, count, **changes):
    options = dict(size=SIZE, seed=SEED, contrast_fraction=0.5, photons=PHOTONS, progress=False)
    return build_simulated_dataset(out, count, **{**options, **changes})


def load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def air_noise(hu, labels):
    """Standard deviation in HU in the air around the body inside the field of view, where
    the true value is -1000 HU at both doses."""
    n = len(labels)
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    air = ~ndimage.binary_dilation(labels > 0, iterations=2) & (x**2 + y**2 < (n / 2 - 1) ** 2)
    return float(hu[air].std())


# ----------------------------------------------------------------------------- builder


def test_manifest_records_parameters_seeds_geometry_and_statistics(simulated):
    manifest = json.loads((simulated / "manifest.json").read_text())
    p = manifest["parameters"]
    assert (p["size"], p["seed"], p["dose"], p["block"]) == (SIZE, SEED, 0.25, BLOCK)
    assert p["spacing_mm"] == pytest.approx(0.7 * 512 / SIZE)
    assert p["simulator"]["geometry"]["size"] == SIZE
    assert manifest["photons"] == {"full_dose": PHOTONS, "low_dose": pytest.approx(0.25 * PHOTONS)}
    assert manifest["complete"] and manifest["count"] == COUNT
    items = manifest["items"]
    assert [r["index"] for r in items] == list(range(COUNT))
    assert len({r["patient_id"] for r in items}) == COUNT
    for r in items:
        assert r["phantom_seed"] == item_seeds(SEED, r["index"])[0]
        assert (simulated / r["file"]).is_file()
        fd, ld = r["statistics"]["full_dose"], r["statistics"]["low_dose"]
        assert fd["pixels"] == SIZE * SIZE and fd["min"] <= fd["percentiles"]["p50"] <= fd["max"]
        assert ld["std"] > 0 and abs(ld["mean"] - fd["mean"]) < 20.0  # noise, not a shift
    assert {r["contrast"] for r in items} == {True, False}  # contrast_fraction 0.5 of 6 items
    overall = manifest["statistics"]
    assert overall["full_dose"]["pixels"] == COUNT * SIZE * SIZE
    means = [r["statistics"]["full_dose"]["mean"] for r in items]
    assert overall["full_dose"]["mean"] == pytest.approx(np.mean(means), abs=1e-3)  # equal-sized items
    assert SimulatedDataset(simulated).normalization.mean == pytest.approx(overall["both"]["mean"] + 1024.0)
    assert not list((simulated / "pairs").glob(".*"))  # no temporary files left


def test_items_hold_int16_pairs_with_labels_and_ld_is_noisier(simulated):
    data = SimulatedDataset(simulated)
    assert len(data) == COUNT and data.patient_ids == [f"sim-{i:06d}" for i in range(COUNT)]
    raw = load(simulated / "pairs" / "pair_000000.npz")
    assert raw["low_dose"].dtype == raw["full_dose"].dtype == np.int16
    assert raw["labels"].dtype == np.uint8 and raw["nodule_map"].dtype == np.int16
    for item in data:
        assert item.low_dose.shape == item.full_dose.shape == item.labels.shape == (SIZE, SIZE)
        assert item.low_dose.dtype == np.float32 and item.spacing[0] == pytest.approx(0.7 * 512 / SIZE)
        assert item.labels.max() > 0 and item.labels.max() <= 11
        assert air_noise(item.low_dose, item.labels) > 1.3 * air_noise(item.full_dose, item.labels)


def test_resume_regenerates_only_missing_items_with_identical_values(simulated, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(simulated, out)
    pairs = out / "pairs"
    before = load(pairs / "pair_000003.npz")
    (pairs / "pair_000003.npz").unlink()
    (pairs / ".pair_000004.npz.1a2b3c4d.part.npz").write_bytes(b"half an item")  # an interrupted write
    untouched = {p.name: p.stat().st_mtime_ns for p in pairs.glob("pair_*.npz")}
    build(out, COUNT)
    after = load(pairs / "pair_000003.npz")
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    assert {p.name: p.stat().st_mtime_ns for p in pairs.glob("pair_*.npz") if p.name in untouched} == untouched
    assert not list(pairs.glob(".*"))
    assert json.loads((out / "manifest.json").read_text())["items"] == \
        json.loads((simulated / "manifest.json").read_text())["items"]


def test_item_depends_on_seed_and_index_only(simulated, tmp_path):
    build(tmp_path, 2)
    for i in range(2):
        a, b = load(simulated / "pairs" / f"pair_{i:06d}.npz"), load(tmp_path / "pairs" / f"pair_{i:06d}.npz")
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = tmp_path / "other"
    build(other, 1, seed=SEED + 1)
    assert not np.array_equal(load(other / "pairs" / "pair_000000.npz")["full_dose"], a["full_dose"])


def test_refuses_a_folder_built_with_other_parameters(simulated, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(simulated, out)
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(DatasetMismatchError, match="dose: 0.25 there, 0.5 now"):
        build(out, COUNT, dose=0.5)
    with pytest.raises(DatasetMismatchError, match="seed"):
        build(out, COUNT, seed=SEED + 1)
    with pytest.raises(ValueError, match=f"holds a data set of {COUNT} pairs; --count 2 would drop {COUNT - 2}"):
        build(out, 2)  # it silently shrank the set, leaving its other pairs behind
    assert (out / "manifest.json").read_bytes() == manifest
    begun_on_gpu = json.loads(manifest)
    begun_on_gpu["parameters"]["device"] = "cuda"
    (out / "manifest.json").write_text(json.dumps(begun_on_gpu))
    with pytest.raises(DatasetMismatchError, match=r"device: 'cuda' there, 'cpu' now.*finished on the same kind "
                                                   r"\(--device cuda\)"):  # said nothing of why before
        build(out, COUNT)


# ----------------------------------------------------------------------------- split


def test_split_is_patient_level_disjoint_seeded_and_follows_fractions():
    ids = [f"P{i:02d}" for i in range(20) for _ in range(3)]  # three slices per patient
    split = split_patients(ids, seed=0)
    sets = [set(split[s]) for s in ("train", "val", "test")]
    assert [len(s) for s in sets] == [14, 4, 2]
    assert set.union(*sets) == set(ids) and sum(map(len, sets)) == 20
    assert split_patients(ids, seed=0) == split
    assert split_patients(ids, seed=1) != split
    assert [len(v) for v in split_patients([f"P{i}" for i in range(6)]).values()] == [4, 1, 1]
    with pytest.raises(ValueError, match="adding up to 1"):
        split_patients(ids, fractions=(0.7, 0.2, 0.2))


# ----------------------------------------------------------------------------- MONAI pipeline

P = 32


def dihedral(image):
    """The 8 flips/rotations of a square image."""
    for k in range(4):
        r = np.rot90(image, k)
        yield r
        yield r[::-1]


def locate(patch, image):
    """(symmetry number, row, column) where ``patch`` is found exactly in a flip/rotation of ``image``."""
    for t, turned in enumerate(dihedral(image)):
        windows = np.lib.stride_tricks.sliding_window_view(turned, patch.shape)
        hits = np.argwhere((windows == patch).all(axis=(-2, -1)))
        if len(hits):
            return (t, *hits[0])
    return None


def hu_patch(sample, key):
    return np.rint(PAPER_NORMALIZATION.denormalize(sample[key][0].numpy().astype(np.float64)))


def test_training_samples_crop_and_turn_ld_fd_and_labels_together(simulated):
    source = SimulatedDataset(simulated)
    data = make_dataset(source, "train", patch_size=P, seed=3)
    train_ids = set(split_patients(source.patient_ids)["train"])
    assert len(data) == len(train_ids) == 4
    turns = set()
    for _ in range(3):  # three epochs
        for sample in data:
            assert sample["patient_id"] in train_ids
            assert sample["ld"].shape == sample["fd"].shape == sample["labels"].shape == (1, P, P)
            assert sample["ld"].dtype == torch.float32 and type(sample["ld"]) is torch.Tensor
            item = source[sample["index"]]
            where = locate(hu_patch(sample, "fd"), item.full_dose)
            assert where is not None
            t, y, x = where
            turned = list(dihedral(item.low_dose))[t], list(dihedral(item.labels))[t]
            np.testing.assert_array_equal(hu_patch(sample, "ld"), turned[0][y:y + P, x:x + P])
            np.testing.assert_array_equal(sample["labels"][0].numpy(), turned[1][y:y + P, x:x + P])
            turns.add(t)
    assert len(turns) > 2


def test_pipeline_is_deterministic_per_seed(simulated):
    def epoch(seed):
        data = make_dataset(simulated, "train", patch_size=P, seed=seed)
        return [torch.cat([s["ld"], s["fd"]]) for s in data]

    first, again, other = epoch(5), epoch(5), epoch(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_item_cache_decodes_each_file_once_within_its_budget_and_changes_no_sample(simulated):
    source = SimulatedDataset(simulated)
    opened = []
    source_getitem = SimulatedDataset.__getitem__

    class Counting(SimulatedDataset):
        def __getitem__(self, index):
            opened.append(index)
            return source_getitem(self, index)

    one_item = sum(a.nbytes for a in (source[0].low_dose, source[0].full_dose, source[0].labels, source[0].nodule_map))
    cached = ItemCache(Counting(simulated), max_bytes=2 * one_item)
    assert len(cached) == COUNT and cached.patient_ids == source.patient_ids  # the source's attributes
    for index in (0, 1, 2, 0, 1, 2):
        item = cached[index]
        np.testing.assert_array_equal(item.low_dose, source[index].low_dose)
    assert opened == [0, 1, 2, 2] and cached.bytes == 2 * one_item  # item 2 did not fit: loaded on each use
    # training patches drawn through the cache are the same as those drawn from the files
    through = [s["ld"] for s in make_dataset(ItemCache(source), "train", patch_size=P, seed=3)] * 2
    direct = [s["ld"] for s in make_dataset(source, "train", patch_size=P, seed=3)] * 2
    assert all(torch.equal(a, b) for a, b in zip(through, direct))


def test_validation_is_deterministic_center_crop_normalised_with_hunormalization(simulated):
    source = SimulatedDataset(simulated)
    data = make_dataset(source, "val", patch_size=P, seed=1)
    assert {s["patient_id"] for s in data} == set(split_patients(source.patient_ids)["val"])
    sample = data[0]
    item = source[sample["index"]]
    c = (SIZE - P) // 2
    expected = PAPER_NORMALIZATION.normalize(item.low_dose[c:c + P, c:c + P])
    np.testing.assert_allclose(sample["ld"][0].numpy(), expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(data[0]["fd"], sample["fd"])
    whole = make_dataset(source, "test", patch_size=None)[0]
    assert whole["fd"].shape == (1, SIZE, SIZE)


# ----------------------------------------------------------------------------- paired DICOM

CT_SMALL = pydicom_test_file("CT_small.dcm")


def write_series(folder, description, positions_z, pixels, patient):
    """One CT series (copies of CT_small) with ``pixels[k]`` (stored values) at z = positions_z[k] mm,
    files in reverse order of position."""
    folder.mkdir(parents=True)
    uid = generate_uid(entropy_srcs=[str(folder)])
    for k, z in enumerate(positions_z):
        ds = pydicom.dcmread(CT_SMALL)
        ds.PatientID, ds.SeriesInstanceUID, ds.SeriesDescription = patient, uid, description
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(folder), str(k)])
        ds.ImagePositionPatient = [-158.135803, -179.035797, f"{z:.3f}"]
        ds.SliceLocation = f"{z:.3f}"
        ds.PixelData = pixels[k].astype(np.int16).tobytes()
        ds.save_as(folder / f"1-{len(positions_z) - k:03d}.dcm")


def write_patient(root, patient, n=3, z0=-80.0, gap=2.5, seed=0):
    """A Mayo/TCIA-like patient: full- and low-dose image series (LD = FD + noise) and a
    projection series to be ignored; returns the FD and LD stored values (z, y, x)."""
    base = pydicom.dcmread(CT_SMALL).pixel_array.astype(np.int16)
    full = np.stack([base + 20 * k for k in range(n)])
    low = full + np.random.default_rng(seed).integers(-40, 41, full.shape).astype(np.int16)
    study = root / patient / "08-13-2018-NA-NA-12345"
    z = [z0 + gap * k for k in range(n)]
    write_series(study / "1.000000-Full Dose Images-11111", "Full Dose Images", z, full, patient)
    write_series(study / "2.000000-Low Dose Images-22222", "Low Dose Images", z, low, patient)
    write_series(study / "3.000000-Full dose projections-33333", "Full Dose Projections", z[:1], full, patient)
    return full, low


@pytest.fixture
def mayo_tree(tmp_path):
    root = tmp_path / "LDCT-and-Projection-data"
    stored = {"L067": write_patient(root, "L067", n=3, seed=1), "L096": write_patient(root, "L096", n=2, seed=2)}
    return root, stored


def test_paired_dicom_pairs_slices_by_position(mayo_tree):
    root, stored = mayo_tree
    data = PairedDicomDataset(root)
    assert len(data) == 5 and data.patient_ids == ["L067"] * 3 + ["L096"] * 2
    for i, item in enumerate(data):
        full, low = stored[item.patient_id]
        k = i if item.patient_id == "L067" else i - 3
        np.testing.assert_array_equal(item.full_dose, full[k] - 1024.0)  # RescaleIntercept -1024
        np.testing.assert_array_equal(item.low_dose, low[k] - 1024.0)
        assert item.low_dose.dtype == np.float32 and item.labels is None
        assert item.spacing == pytest.approx((0.661468, 0.661468, 2.5))
        assert item.origin[2] == pytest.approx(-80.0 + 2.5 * k)
    samples = list(make_dataset(data, "all", patch_size=None))
    assert "labels" not in samples[0] and samples[0]["ld"].shape == (1, 128, 128)
    assert [s["patient_id"] for s in samples] == data.patient_ids


def test_paired_dicom_patterns_choose_the_series(tmp_path):
    gc = tmp_path / "gc"
    base = pydicom.dcmread(CT_SMALL).pixel_array.astype(np.int16)
    for name, offset in (("full_1mm", 0), ("quarter_1mm", 5), ("full_3mm", 0), ("quarter_3mm", 9)):
        write_series(gc / "L109" / name, "", [0.0, 1.0], np.stack([base + offset] * 2), "L109")
    with pytest.raises(CTInputError, match="patient L109: 2 CT series match the low-dose pattern"):
        PairedDicomDataset(gc)
    data = PairedDicomDataset(gc, full_dose="^full_3mm$", low_dose="^quarter_3mm$")
    assert len(data) == 2
    np.testing.assert_array_equal(data[0].low_dose - data[0].full_dose, 9.0)


def test_paired_dicom_missing_series_is_named(mayo_tree):
    root, _ = mayo_tree
    shutil.rmtree(root / "L096" / "08-13-2018-NA-NA-12345" / "2.000000-Low Dose Images-22222")
    with pytest.raises(CTInputError, match="patient L096: no CT series match the low-dose pattern") as info:
        PairedDicomDataset(root)
    assert "Full Dose Images" in str(info.value)  # lists what was found
    assert len(PairedDicomDataset(root, patients=["L067"])) == 3


def test_paired_dicom_mismatched_slices_are_named(mayo_tree):
    root, _ = mayo_tree
    low = root / "L067" / "08-13-2018-NA-NA-12345" / "2.000000-Low Dose Images-22222"
    os.remove(low / "1-001.dcm")  # the last slice
    with pytest.raises(CTInputError, match="patient L067: the low-dose series has 2 slices, the full-dose series 3"):
        PairedDicomDataset(root)
    for path in low.iterdir():  # two slices again, but 1 mm off
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 1.0]
        ds.save_as(path)
    os.remove(root / "L067" / "08-13-2018-NA-NA-12345" / "1.000000-Full Dose Images-11111" / "1-001.dcm")
    with pytest.raises(CTInputError, match="patient L067: slice positions differ by up to 1.00 mm"):
        PairedDicomDataset(root)


# ----------------------------------------------------------------------------- subsets


def test_a_damaged_or_missing_pair_file_is_named_in_one_line(simulated, tmp_path, capsys):
    """A pair file cut short, missing or of the wrong size stops a training with one line that
    names it and says how to rewrite it (it was a traceback through MONAI's transform)."""
    from InvarianceExplorerLib.cli import main

    out = tmp_path / "damaged"
    shutil.copytree(simulated, out)
    pair = out / SimulatedDataset(out).items[0]["file"]
    command = ["train", "denoiser", "--arch", "cnn10", "--data", str(out), "--epochs", "1", "--val-slices", "2",
               "--steps-per-epoch", "2", "--batch-size", "2", "--patch-size", "32", "--no-progress"]
    for damage, said in ((lambda: pair.write_bytes(pair.read_bytes()[:3000]), "BadZipFile"),
                         (pair.unlink, "FileNotFoundError")):
        damage()
        for item in range(COUNT):  # every item, whichever split it is in
            with pytest.raises(ValueError, match="the pair file is missing or damaged") if item == 0 else \
                    warnings.catch_warnings():
                SimulatedDataset(out)[item]
        assert main(command + ["--out", str(tmp_path / f"run_{said}")]) == 2
        err = capsys.readouterr().err
        assert f"{pair}: the pair file is missing or damaged ({said}" in err and "Traceback" not in err
    with np.load(simulated / pair.relative_to(out)) as z:
        np.savez_compressed(pair, **{**z, "low_dose": z["low_dose"][:32]})
    with pytest.raises(ValueError, match="not the set's 64 x 64"):
        SimulatedDataset(out)[0]


def test_training_on_an_unfinished_set_warns_and_records_it(simulated, tmp_path):
    """A `data simulate` stopped before its end leaves a manifest of the pairs written so far
    (complete: false); a training on it says so, and its metadata records it."""
    from InvarianceExplorerLib.training import describe_data

    out = tmp_path / "unfinished"
    shutil.copytree(simulated, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["items"], manifest["complete"] = manifest["items"][:2], False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match=f"unfinished: 2 of {COUNT} pairs written"):
        record = describe_data(SimulatedDataset(out), out)
    assert record["pairs"] == 2 and record["unfinished"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "unfinished" not in describe_data(SimulatedDataset(simulated), simulated)


def test_subset_keeps_the_patient_split_and_says_what_it_is(simulated, tmp_path):
    """benchmarks/subset_data.py copies the validation and test items the trainings pick and
    as many evenly spaced training items as fit: the copy splits its patients exactly as the
    whole set, and training records which items it saw."""
    import subprocess
    import sys
    from pathlib import Path

    from InvarianceExplorerLib.datasets import split_indices
    from InvarianceExplorerLib.training import describe_data

    whole = SimulatedDataset(simulated)
    sizes = [(simulated / r["file"]).stat().st_size for r in whole.items]
    out = tmp_path / "subset"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "subset_data.py"
    command = [sys.executable, str(script), "--data", str(simulated), "--out", str(out),
               "--megabytes", str(0.8 * sum(sizes) / 1e6), "--val", "1", "--test", "1"]
    subprocess.run(command, check=True, capture_output=True)
    part = SimulatedDataset(out)
    assert part.split_ids == whole.split_ids
    ids = lambda source, split, limit=None: [source.patient_ids[i] for i in split_indices(source, split, limit)]  # noqa: E731
    assert ids(part, "test") == ids(whole, "test", 1) and ids(part, "val") == ids(whole, "val", 1)
    assert set(ids(part, "train")) < set(ids(whole, "train"))
    record = describe_data(part, out)["subset_of"]
    assert [whole.patient_ids[i] for i in record["items"]] == part.patient_ids
    assert record["training_slices"] == len(ids(part, "train"))
    for i, item in enumerate(part.items):  # the same bytes
        assert (out / item["file"]).read_bytes() == (simulated / whole.items[record["items"][i]]["file"]).read_bytes()
    failed = subprocess.run(command, capture_output=True, text=True)  # never over an existing folder
    assert failed.returncode != 0 and "exists" in failed.stderr
