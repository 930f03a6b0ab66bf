"""The command line: demo, data commands, clear errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from InvarianceExplorerLib import CTImage
from InvarianceExplorerLib.cli import main
from InvarianceExplorerLib.io import read_image, write_nrrd
from realdata import pydicom_test_file


def test_demo_writes_nrrd_png_and_json(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "128", "--no-progress"]) == 0
    for name in ("low_dose.nrrd", "full_dose.nrrd", "labels.nrrd", "low_dose_pair.png", "demo.json"):
        assert (out / name).is_file(), name
    ld, fd = read_image(out / "low_dose.nrrd"), read_image(out / "full_dose.nrrd")
    assert ld.array.shape == fd.array.shape == (128, 128) and ld.spacing[0] == pytest.approx(2.8)
    info = json.loads((out / "demo.json").read_text())
    noise = info["noise_std_soft_tissue_hu"]
    assert noise["low_dose"] > 1.5 * noise["full_dose"] > 0
    assert str(out) in capsys.readouterr().out


def test_data_simulate_command(tmp_path):
    out = tmp_path / "set"
    assert main(["data", "simulate", "--count", "3", "--size", "64", "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["items"]) == 3 and manifest["parameters"]["dose"] == 0.25


def test_data_lowdose_on_a_real_dicom_slice_and_a_nrrd_volume(tmp_path):
    out = tmp_path / "ld.nrrd"
    src = pydicom_test_file("CT_small.dcm")
    before = open(src, "rb").read()
    assert main(["data", "lowdose", "--input", src, "--output", str(out), "--no-progress"]) == 0
    assert open(src, "rb").read() == before  # input untouched
    fd, ld = read_image(src), read_image(out)
    assert ld.array.shape == fd.array.shape and ld.spacing[:2] == pytest.approx(fd.spacing[:2])
    assert ld.origin == pytest.approx(fd.origin)
    assert np.isfinite(ld.array).all() and 0 < np.std(ld.array - fd.array) < 60  # noise, corners kept

    vol = CTImage(np.stack([np.full((32, 32), v, np.float32) for v in (-1000, 0)]), spacing=(4, 4, 5))
    vol.array[:, 4:28, 4:28] += 40
    write_nrrd(vol, tmp_path / "fd.nrrd")
    assert main(["data", "lowdose", "--input", str(tmp_path / "fd.nrrd"), "--output", str(tmp_path / "v.nrrd"),
                 "--dose", "0.5", "--no-progress"]) == 0
    assert read_image(tmp_path / "v.nrrd").array.shape == (2, 32, 32)


def test_errors_are_one_clear_line_with_status_2(tmp_path, capsys):
    assert main(["data", "lowdose", "--input", str(tmp_path / "missing.nrrd"), "--output", str(tmp_path / "o.nrrd")]) == 2
    err = capsys.readouterr().err
    assert "missing.nrrd" in err and "does not exist" in err and "Traceback" not in err
    mr = pydicom_test_file("MR_small.dcm")
    assert main(["data", "lowdose", "--input", mr, "--output", str(tmp_path / "o.nrrd")]) == 2
    assert "not CT" in capsys.readouterr().err
    assert not (tmp_path / "o.nrrd").exists()
    write_nrrd(CTImage(np.zeros((8, 12), np.float32) - 500), tmp_path / "rect.nrrd")
    assert main(["data", "lowdose", "--input", str(tmp_path / "rect.nrrd"), "--output", str(tmp_path / "o.nrrd")]) == 2
    assert "square" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["data", "simulate", "--count", "2", "--dose", "1.5", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "dose" in capsys.readouterr().err


def test_module_entry_point_runs():
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-m", "InvarianceExplorerLib", "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "demo" in res.stdout and "data" in res.stdout


def test_help_and_a_mistyped_command_answer_without_importing_torch():
    """Only the command being run gets its arguments (their choices come from engine modules
    that import torch): --help and an unknown command need no torch, every command's own help
    still has all of its options."""
    probe = ("import sys\nfrom InvarianceExplorerLib.cli import main\n"
             "for words in (['--help'], ['denoize']):\n"
             "    try:\n        main(words)\n    except SystemExit as exc:\n        print('exit', exc.code)\n"
             "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.stdout.splitlines()[-3:] == ["exit 0", "exit 2", "False"], res.stdout + res.stderr
    assert "invalid choice: 'denoize'" in res.stderr and "denoise" in res.stdout
    res = subprocess.run([sys.executable, "-m", "InvarianceExplorerLib", "train", "denoiser", "--help"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "--precision {float32,bfloat16}" in res.stdout and "--arch" in res.stdout


def test_error_after_a_progress_bar_starts_on_its_own_line(tmp_path, capsys):
    """A bar still drawn when the input turns out bad is finished first: the error is the last line, once."""
    assert main(["sample", "--model", "cnn10", "--input", str(tmp_path / "missing.nrrd"), "--center", "1,1,0",
                 "--out", str(tmp_path / "run")]) == 2
    lines = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Loading the models" in lines[0]  # the bar was drawn
    assert lines[-1].startswith("invariance-explorer: error: ") and "does not exist" in lines[-1]
    assert sum("error:" in line for line in lines) == 1
    assert not (tmp_path / "run").exists()
