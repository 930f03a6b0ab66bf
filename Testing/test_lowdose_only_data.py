"""The user's own unpaired DICOM data: low-dose series only (no full-dose partners).

The DICOM files are real: every series is written here with pydicom (CT_small.dcm of pydicom's
test data as the template, as in test_datasets.py) from simulated low-dose slices, one folder
per patient, and read back through the project's DICOM reader. The fits are the tiny, seeded
fits of test_custom_denoisers.py (the bundled CNN-10 exported to TorchScript, 32-pixel patches,
TINY networks, 200 cVAE steps) with its consistency threshold C <= 0.8 (untrained models give
0.96-0.98); here on 8 patients of 2 slices of 64 pixels.
"""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from InvarianceExplorerLib.cli import main
from InvarianceExplorerLib.datasets import make_dataset, open_source, split_patients
from InvarianceExplorerLib.denoisers import load_denoiser, read_metadata
from InvarianceExplorerLib.dicom_dataset import LowDoseDicomDataset, PairedDicomDataset
from InvarianceExplorerLib.fidelity import NO_FULL_DOSE, NO_REALISATION, invariance_fidelity
from InvarianceExplorerLib.fit import fit
from InvarianceExplorerLib.io import CTInputError
from InvarianceExplorerLib.normalization import PAPER_NORMALIZATION
from InvarianceExplorerLib.sampler import load_invariance_models
from InvarianceExplorerLib.simulated_dataset import SimulatedDataset, build_simulated_dataset
from realdata import pydicom_test_file
from tiny_fit import FIT, MAX_CONSISTENCY, one_thread

PATIENTS, SLICES, SIZE = 8, 2, 64
GAP_MM = 2.5
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def write_series(folder, description, slices_hu, spacing_mm, patient, z0=-40.0):
    """One real CT series: ``slices_hu[k]`` (HU, stored as HU + 1024 with RescaleIntercept -1024)
    at z = z0 + 2.5 k mm, ``spacing_mm`` pixels, files in reverse order of position."""
    folder.mkdir(parents=True)
    uid = generate_uid(entropy_srcs=[str(folder)])
    n = len(slices_hu)
    for k, hu in enumerate(slices_hu):
        ds = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
        ds.PatientID, ds.PatientName, ds.SeriesInstanceUID, ds.SeriesDescription = patient, patient, uid, description
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(folder), str(k)])
        ds.Rows, ds.Columns = hu.shape
        ds.PixelSpacing = [f"{spacing_mm:.6f}"] * 2
        ds.SliceThickness = f"{GAP_MM:.3f}"
        ds.ImagePositionPatient = [-0.5 * spacing_mm * hu.shape[1], -0.5 * spacing_mm * hu.shape[0],
                                   f"{z0 + GAP_MM * k:.3f}"]
        ds.SliceLocation = f"{z0 + GAP_MM * k:.3f}"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        if "PixelPaddingValue" in ds:
            del ds.PixelPaddingValue
        ds.PixelData = (np.rint(hu) + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"1-{n - k:03d}.dcm")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """16 simulated 64-pixel slices (the test fits' size and noise): 2 per patient."""
    out = tmp_path_factory.mktemp("sim")
    build_simulated_dataset(out, PATIENTS * SLICES, size=SIZE, seed=3, photons=1e4, progress=False)
    return SimulatedDataset(out)


def _patients(simulated):
    """``{patient: [PairedSlice, ...]}``: items 2p and 2p + 1 are patient p's two slices."""
    return {f"P{p:02d}": [simulated[SLICES * p + k] for k in range(SLICES)] for p in range(PATIENTS)}


@pytest.fixture(scope="module")
def low_dose_tree(simulated, tmp_path_factory):
    """Low-dose-only DICOM: root/<patient>/<study>/<series>/*.dcm, one low-dose series per
    patient with a name that matches no pattern (the only series is taken)."""
    root = tmp_path_factory.mktemp("lowdose") / "my_low_dose_scans"
    for pid, items in _patients(simulated).items():
        write_series(root / pid / "study-1" / "2-Thorax 1.0 Br40", "Thorax 1.0 Br40",
                     [i.low_dose for i in items], items[0].spacing[0], pid)
    return root


@pytest.fixture(scope="module")
def paired_tree(simulated, tmp_path_factory):
    """The same slices as paired DICOM (TCIA names): low- and full-dose series per patient."""
    root = tmp_path_factory.mktemp("paired") / "my_paired_scans"
    for pid, items in _patients(simulated).items():
        for name, key in (("Low Dose Images", "low_dose"), ("Full Dose Images", "full_dose")):
            write_series(root / pid / "study-1" / name, name, [getattr(i, key) for i in items],
                         items[0].spacing[0], pid)
    return root


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory):
    network = load_denoiser("cnn10").network.float()
    path = tmp_path_factory.mktemp("ts") / "my_denoiser.pt"
    torch.jit.save(torch.jit.script(network), str(path))
    return path


# ----------------------------------------------------------------------------- reading


def test_low_dose_only_dicom_reads_low_dose_slices_with_patient_splits(low_dose_tree, simulated):
    data = open_source(low_dose_tree)  # no full-dose series anywhere: low-dose only
    assert isinstance(data, LowDoseDicomDataset) and not data.has_full_dose
    assert len(data) == PATIENTS * SLICES
    assert data.patient_ids == [f"P{p:02d}" for p in range(PATIENTS) for _ in range(SLICES)]
    for i, item in enumerate(data):
        np.testing.assert_array_equal(item.low_dose, simulated[i].low_dose)  # int16 HU round trip
        assert item.full_dose is None and item.labels is None and item.low_dose.dtype == np.float32
        assert item.spacing == pytest.approx((simulated[i].spacing[0], simulated[i].spacing[0], GAP_MM))
        assert item.origin[2] == pytest.approx(-40.0 + GAP_MM * (i % SLICES))
        low, full = item.images()
        assert full is None and low.array.shape == (SIZE, SIZE)
    # patient-level splits, as for the other sources; the batches carry no full dose
    splits = split_patients(data.patient_ids)
    assert sorted(sum(splits.values(), [])) == sorted(set(data.patient_ids)) and all(splits.values())
    train = list(make_dataset(data, "train", patch_size=32, seed=0))
    assert {s["patient_id"] for s in train} == set(splits["train"]) and len(train) == SLICES * len(splits["train"])
    assert "fd" not in train[0] and "labels" not in train[0] and train[0]["ld"].shape == (1, 32, 32)
    whole = make_dataset(data, "test", patch_size=None)[0]
    expected = PAPER_NORMALIZATION.normalize(torch.from_numpy(data[data.patient_ids.index(splits["test"][0])]
                                                              .low_dose))
    torch.testing.assert_close(whole["ld"][0], expected)


def test_the_kind_of_dicom_data_is_chosen_automatically_or_explicitly(paired_tree, low_dose_tree):
    paired = open_source(paired_tree)
    assert isinstance(paired, PairedDicomDataset) and paired[0].full_dose is not None
    # explicitly low-dose only: the full-dose series are ignored
    low = open_source(paired_tree, dicom="low-dose")
    assert isinstance(low, LowDoseDicomDataset) and low[0].full_dose is None
    np.testing.assert_array_equal(low[3].low_dose, paired[3].low_dose)
    assert len(LowDoseDicomDataset(low_dose_tree, patients=["P01", "P03"])) == 2 * SLICES
    with pytest.raises(CTInputError, match="patient P00: no CT series match the low-dose pattern"):
        open_source(low_dose_tree, dicom="paired")
    with pytest.raises(ValueError, match="dicom is one of auto, paired, low-dose"):
        open_source(low_dose_tree, dicom="unpaired")


# ----------------------------------------------------------------------------- fit end to end


def test_fit_on_low_dose_only_dicom_samples_consistent_invariances(torchscript_file, low_dose_tree, tmp_path):
    out = fit(torchscript_file, low_dose_tree, tmp_path / "my_model", normalization=PAPER_NORMALIZATION, **FIT)
    metadata = read_metadata(out)
    assert metadata["fit"]["plan"]["cvae_steps"] == 200
    assert metadata["fit"]["perceptual_term"].startswith("off")
    training = metadata["invariance"]["training"]["cvae"]
    assert training["hyperparameters"]["lam_perc"] == 0.0
    assert training["feature_network"]["used"] is False and "lam_perc is 0" in training["feature_network"]["reason"]
    assert training["data"]["kind"] == "LowDoseDicomDataset" and training["data"]["images"] == "low-dose only"
    assert training["data"]["patients"] == PATIENTS
    assert "noise_texture" not in metadata  # no full dose: no noise to measure
    fidelity = metadata["invariance"]["fidelity"]
    assert fidelity["consistency"] <= MAX_CONSISTENCY  # C needs no full dose
    for name, reason in (("nps_correlation", NO_FULL_DOSE), ("nps_log_error", NO_FULL_DOSE),
                         ("noise_std_ratio", NO_FULL_DOSE), ("noise_baseline", NO_REALISATION),
                         ("consistency_noise", NO_REALISATION)):
        value = fidelity[name] if name in fidelity else fidelity["completeness"][name]
        assert value is None and fidelity["not_measured"][name] == reason
    assert fidelity["bars"]["noise_baseline"]["met"] is None and fidelity["bars"]["nps_correlation"]["reason"]
    assert fidelity["completeness"]["output_error_hu"] > 0 and fidelity["diversity"]["pairwise_hu"] > 0
    card = (out / "MODEL_CARD.md").read_text()
    assert f"{PATIENTS * SLICES} slices of {PATIENTS} patients" in card and "low-dose only" in card
    assert "no perceptual term" in card and "not measured (nps_correlation, nps_log_error, noise_std_ratio, stripes_noise)" in card
    # sampling from the folder on held-out low-dose DICOM slices: consistent
    held_out = invariance_fidelity(load_invariance_models(out), low_dose_tree, slices=1, count=8)
    assert held_out["consistency"] <= MAX_CONSISTENCY and held_out["completeness"]["nps_correlation"] is None


def test_fit_on_paired_dicom_runs_end_to_end_with_the_noise_texture(torchscript_file, paired_tree, tmp_path):
    out = fit(torchscript_file, paired_tree, tmp_path / "paired_model", normalization=PAPER_NORMALIZATION,
              **{**FIT, "budget": "40steps"})
    info = read_metadata(out)["invariance"]
    assert info["training"]["cvae"]["data"]["kind"] == "PairedDicomDataset"
    assert info["training"]["cvae"]["feature_network"]["used"] is False  # DICOM has no tissue labels
    fidelity = info["fidelity"]
    assert np.isfinite(fidelity["consistency"])
    assert np.isfinite(fidelity["completeness"]["nps_correlation"])  # full dose: noise texture measured
    assert fidelity["noise_baseline"] is None and set(fidelity["not_measured"]) == {
        "consistency_noise", "noise_baseline", "realisation_change_hu", "realisation_output_change_hu"}
    texture = read_metadata(out)["noise_texture"]  # for analysing refined samples without scans
    assert "low- minus full-dose" in texture["measured_on"] and max(texture["nps_per_variance_mm2"]) > 0


# ----------------------------------------------------------------------------- wrong folders


def test_wrong_folders_are_refused_with_clear_messages(low_dose_tree, paired_tree, tmp_path):
    with pytest.raises(CTInputError, match="does not exist"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTInputError, match="holds no patient folders and no simulated data set.*"
                                           "Give the folder that holds one folder per patient"):
        open_source(tmp_path / "empty")
    # DICOM files straight in the root: a series folder given instead of the patients' folder
    flat = tmp_path / "flat"
    shutil.copytree(low_dose_tree / "P00" / "study-1" / "2-Thorax 1.0 Br40", flat)
    with pytest.raises(CTInputError, match="holds no patient folders .*; it holds 2 files itself, "
                                           "like a series folder"):
        open_source(flat)
    # a patient folder without DICOM
    mixed_up = tmp_path / "mixed_up"
    shutil.copytree(low_dose_tree, mixed_up)
    (mixed_up / "notes").mkdir()
    (mixed_up / "notes" / "readme.txt").write_text("not a scan")
    with pytest.raises(CTInputError, match=r"patient notes: no low-dose CT series \(series found: none; "
                                           r"without DICOM series: the patient folder itself \(holds no DICOM "
                                           r"image files"):
        open_source(mixed_up)
    # two unnamed series in one patient: which one is low dose?
    two = tmp_path / "two"
    shutil.copytree(low_dose_tree, two)
    series = two / "P02" / "study-1" / "2-Thorax 1.0 Br40"
    shutil.copytree(series, two / "P02" / "study-1" / "3-Thorax 3.0 Br40")
    for path in (two / "P02" / "study-1" / "3-Thorax 3.0 Br40").iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["second series"])
        ds.SeriesDescription = "Thorax 3.0 Br40"
        ds.save_as(path)
    with pytest.raises(CTInputError, match="patient P02: no CT series match the low-dose pattern") as info:
        open_source(two)
    assert "3-Thorax 3.0 Br40" in str(info.value) and "low_dose pattern" in str(info.value)
    assert len(open_source(two, low_dose=r"Thorax 1\.0")) == PATIENTS * SLICES
    # some patients paired, some not
    half = tmp_path / "half"
    shutil.copytree(paired_tree, half)
    for pid in ("P05", "P06"):
        shutil.rmtree(half / pid / "study-1" / "Full Dose Images")
    with pytest.raises(CTInputError, match="patients P00, P01, P02, P03, P04, P07 have a full-dose series .* but "
                                           "patients P05, P06 have none") as info:
        open_source(half)
    assert "dicom='low-dose'" in str(info.value) and "fit --dicom low-dose" in str(info.value)
    assert isinstance(open_source(half, dicom="low-dose"), LowDoseDicomDataset)
    with pytest.raises(CTInputError, match="patient P05: no CT series match the full-dose pattern") as info:
        open_source(half, dicom="paired")
    assert "low-dose-only data" in str(info.value)  # the error says how to read them


def test_the_cli_fit_names_a_wrong_data_folder(torchscript_file, tmp_path, capsys):
    (tmp_path / "scans" / "P00").mkdir(parents=True)
    code = main(["fit", "--denoiser", str(torchscript_file), "--normalization", "paper", "--data",
                 str(tmp_path / "scans"), "--out", str(tmp_path / "model"), "--device", "cpu", "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err
    assert "patient P00: no low-dose CT series" in error and not (tmp_path / "model").exists()


def test_the_cli_fit_reads_dicom_the_way_it_is_told(torchscript_file, paired_tree, tmp_path, capsys):
    half = tmp_path / "half"
    shutil.copytree(paired_tree, half)
    shutil.rmtree(half / "P05" / "study-1" / "Full Dose Images")
    base = ["fit", "--denoiser", str(torchscript_file), "--normalization", "paper", "--data", str(half),
            "--out", str(tmp_path / "model"), "--device", "cpu", "--no-progress"]
    assert main(base) == 2  # auto: a mix of paired and low-dose-only patients is refused
    assert "patients P05 have none" in capsys.readouterr().err
    assert main(base + ["--dicom", "paired"]) == 2  # paired: P05 lacks its full-dose series
    assert "patient P05: no CT series match the full-dose pattern" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_fit_told_to_read_mixed_dicom_as_low_dose_trains_on_it(torchscript_file, paired_tree, tmp_path):
    """The fix the mixed-data error suggests works: the cVAE and cINN trainings read the data
    as fit was told (they opened it as "auto" and refused the mix, after the denoiser check)."""
    half = tmp_path / "half"
    shutil.copytree(paired_tree, half)
    shutil.rmtree(half / "P05" / "study-1" / "Full Dose Images")
    out = fit(torchscript_file, half, tmp_path / "model", normalization=PAPER_NORMALIZATION, dicom="low-dose",
              **{**FIT, "budget": "8steps"})
    training = read_metadata(out)["invariance"]["training"]
    for stage in ("cvae", "cinn"):
        assert training[stage]["data"]["kind"] == "LowDoseDicomDataset"
        assert training[stage]["data"]["patients"] == PATIENTS


def test_what_needs_full_dose_says_so_on_low_dose_only_data(low_dose_tree, tmp_path):
    from InvarianceExplorerLib.evaluation import held_out_quality
    from InvarianceExplorerLib.train_denoiser import train_denoiser

    with pytest.raises(ValueError, match="training a denoiser needs paired"):
        train_denoiser("cnn10", low_dose_tree, tmp_path / "run", epochs=1, steps_per_epoch=1, device="cpu")
    with pytest.raises(ValueError, match="low-dose only"):
        held_out_quality(low_dose_tree, {})
    assert not (tmp_path / "run").exists()
