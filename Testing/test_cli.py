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

    # noise insertion: on a noise-free phantom slice the output minus the input is noise alone,
    # with no trace of the anatomy's edges (re-scanning the slice blurred them: correlation
    # 0.93 with its Laplacian), and its variance grows as 1/dose - 1 (the quanta not kept)
    from scipy.ndimage import laplace

    from InvarianceExplorerLib.phantom import chest_phantom

    clean = chest_phantom(7, size=128, spacing=2.8).hu
    write_nrrd(CTImage(clean, spacing=(2.8, 2.8, 5.0)), tmp_path / "clean.nrrd")
    added = {}
    for dose in (0.25, 0.5):
        assert main(["data", "lowdose", "--input", str(tmp_path / "clean.nrrd"), "--output",
                     str(tmp_path / f"ld{dose}.nrrd"), "--dose", str(dose), "--seed", "3", "--no-progress"]) == 0
        added[dose] = read_image(tmp_path / f"ld{dose}.nrrd").array - clean
        assert abs(np.corrcoef(added[dose].ravel(), laplace(clean.astype(np.float64)).ravel())[0, 1]) < 0.05
        assert abs(added[dose].mean()) < 0.1 * added[dose].std()
    assert np.std(added[0.25]) / np.std(added[0.5]) == pytest.approx(np.sqrt(3), rel=0.1)

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
    write_nrrd(CTImage(np.random.default_rng(0).normal(-500, 20, (8, 12)).astype(np.float32)), tmp_path / "rect.nrrd")
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
    assert "Loading the image and the models" in lines[0]  # the bar was drawn
    assert lines[-1].startswith("invariance-explorer: error: ") and "does not exist" in lines[-1]
    assert sum("error:" in line for line in lines) == 1
    assert not (tmp_path / "run").exists()


def test_demo_keeps_a_folder_of_other_files_and_replaces_an_earlier_demo(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "low_dose.nrrd").write_text("the user's own file")
    assert main(["demo", "--out", str(taken), "--size", "64", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (taken / "low_dose.nrrd").read_text() == "the user's own file" and len(list(taken.iterdir())) == 1
    earlier = tmp_path / "demo"
    for seed in ("0", "1"):  # a second run replaces the first demo's folder whole
        assert main(["demo", "--out", str(earlier), "--size", "64", "--seed", seed, "--no-progress"]) == 0
    assert "phantom seed 1" in capsys.readouterr().out
    record = json.loads((earlier / "demo.json").read_text())
    assert record["files"]["low_dose"] == str(earlier / "low_dose.nrrd") and sorted(os.listdir(tmp_path)) == \
        ["demo", "taken"]  # no hidden folder left beside it
    # a data set is not written into a folder of the user's files, nor a demo of a constant image read
    assert main(["data", "simulate", "--count", "1", "--size", "32", "--out", str(taken)]) == 2
    assert "holds files that are not a simulated data set (low_dose.nrrd); choose an empty or new folder" in \
        capsys.readouterr().err and sorted(os.listdir(taken)) == ["low_dose.nrrd"]
    write_nrrd(CTImage(np.zeros((64, 64), np.float32)), tmp_path / "blank.nrrd")
    assert main(["data", "lowdose", "--input", str(tmp_path / "blank.nrrd"), "--output", str(tmp_path / "o.nrrd")]) == 2
    assert "every voxel is 0, so the image holds no anatomy" in capsys.readouterr().err
    assert main(["trust", "cnn10"]) == 2
    assert "no such model folder; a bundled model holds weights only and needs no trust" in capsys.readouterr().err


def test_bad_numbers_and_file_system_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", "cnn10", "--input", "x.nrrd", "--center", "1,1,0", "--count", "many", "--out", "o"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--count: must be a positive whole number up to 10000; got 'many'" in err
    assert "_positive" not in err and "_at_most" not in err
    with pytest.raises(SystemExit):
        main(["data", "simulate", "--count", "2", "--dose", "quarter", "--out", str(tmp_path / "s")])
    assert "dose is a fraction of full dose in (0, 1]" in capsys.readouterr().err
    (tmp_path / "a file").write_text("kept")
    assert main(["data", "simulate", "--count", "1", "--size", "32", "--out", str(tmp_path / "a file" / "set"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invariance-explorer: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    assert (tmp_path / "a file").read_text() == "kept"


def test_warnings_print_as_one_line_without_the_source(tmp_path, capsys):
    """An image of 1.4 mm pixels for a denoiser trained on 0.7 mm: the spacing warning, as a user reads it."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--size", "256", "--no-progress"]) == 0
    res = subprocess.run([sys.executable, "-m", "InvarianceExplorerLib", "denoise", "--model", "cnn10", "--input",
                          str(tmp_path / "demo" / "low_dose.nrrd"), "--output", str(tmp_path / "d.nrrd"),
                          "--progress", "none"], capture_output=True, text=True)  # as a user sees it: no pytest
    err = res.stderr
    assert res.returncode == 0, err
    assert "invariance-explorer: warning: " in err and "1.4" in err
    assert ".py:" not in err and "warnings.warn" not in err


def test_damaged_model_and_results_files_are_named_with_what_to_do(tmp_path, capsys):
    import shutil

    from InvarianceExplorerLib.denoisers import bundled_models_dir
    from InvarianceExplorerLib.sample_data import sample_ct_path

    model = shutil.copytree(bundled_models_dir() / "cnn10", tmp_path / "model")
    sample = ["sample", "--input", str(sample_ct_path()), "--center", "368,283,1", "--count", "3", "--progress", "none"]
    assert main([*sample, "--model", str(model), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    for text, problem in (('[1, 2]', "expected a JSON object {...}, found a list"),
                          ('{"format": "invariance', "not valid JSON (Unterminated string")):
        (model / "metadata.json").write_text(text)
        assert main([*sample, "--model", str(model), "--out", str(tmp_path / "again")]) == 2
        err = capsys.readouterr().err
        assert f"{model / 'metadata.json'}: {problem}" in err and "copy it again" in err and "Traceback" not in err
    assert not (tmp_path / "again").exists()
    for name, text, problem in (("invariances.nrrd", "garbage", "is named .nrrd but its content is not that format"),
                                ("input.nrrd", "NRRD0004\ngarbage", "cannot be read"),
                                ("numbers.json", "{'count': 3}", "not valid JSON")):
        damaged = shutil.copytree(tmp_path / "run", tmp_path / f"damaged {name}")
        (damaged / name).write_text(text)
        assert main(["analyze", str(damaged), "--progress", "none"]) == 2
        err = capsys.readouterr().err
        assert f"{damaged / name}: {problem}" in err and "Traceback" not in err
        assert not (damaged / "analysis").exists()


def test_analyze_refuses_bad_settings_and_finds_a_moved_model_only_when_told(tmp_path, capsys, monkeypatch):
    """numbers.json records the model folder absolute (a relative --model is found from anywhere);
    a folder gone since is an error, not a silent switch to an uncalibrated analysis."""
    import shutil

    from InvarianceExplorerLib.denoisers import bundled_models_dir
    from InvarianceExplorerLib.sample_data import sample_ct_path

    shutil.copytree(bundled_models_dir() / "cnn10", tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--model", "model", "--input", str(sample_ct_path()), "--center", "368,283,1",
                 "--count", "3", "--out", "run", "--progress", "none"]) == 0
    numbers = json.loads((tmp_path / "run" / "numbers.json").read_text())
    assert numbers["model"] == "model" and numbers["model_folder"] == str((tmp_path / "model").resolve())
    for option, message in ((["--fdr", "2"], "fdr must be in (0, 1)"),
                            (["--min-area=-5"], "min_area_mm2 must be >= 0")):
        assert main(["analyze", "run", *option, "--progress", "none"]) == 2
        assert message in capsys.readouterr().err
    for width in ("0", "1e9"):  # a width of a billion mm ran out of memory in a traceback
        with pytest.raises(SystemExit):
            main(["analyze", "run", "--sigma-mm", width, "--progress", "none"])
        assert f"--sigma-mm: must be a positive finite number up to 50; got '{width}'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "analysis").exists()
    (tmp_path / "model").rename(tmp_path / "moved")
    assert main(["analyze", "run", "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "the model folder that sampled these invariances cannot be read" in err and "--model" in err
    assert main(["analyze", "run", "--model", "redcnn", "--progress", "none"]) == 2  # ran, calibrated for RED-CNN
    assert "holds a redcnn denoiser, but run was sampled with cnn10" in capsys.readouterr().err
    assert not (tmp_path / "run" / "analysis").exists()
    assert main(["analyze", "run", "--model", "moved", "--progress", "none"]) == 0
    record = json.loads((tmp_path / "run" / "analysis" / "analysis.json").read_text())
    assert "refined_samples_note" not in record["method_a"]  # calibrated by the model's noise texture


@pytest.mark.parametrize("stop, code, said", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_or_sigterm_exits_in_one_line_and_leaves_no_partial_folder(tmp_path, stop, code, said):
    """Ctrl-C, and SIGTERM (the panel's Cancel, ``timeout``, a job scheduler), remove the hidden
    folder the results were being written to."""
    import signal

    from InvarianceExplorerLib.sample_data import sample_ct_path

    command = [sys.executable, "-m", "InvarianceExplorerLib", "sample", "--model", "redcnn", "--input",
               str(sample_ct_path()), "--center", "368,283,1", "--count", "400", "--out", str(tmp_path / "run"),
               "--device", "cpu", "--progress", "json"]  # a minute of work: still sampling when interrupted
    # as from a terminal: a suite started in the background by a non-interactive shell inherits
    # SIGINT ignored (POSIX), and Python then leaves it ignored
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:  # interrupted while sampling
        if json.loads(line).get("stage") == "sampling":
            break
    process.send_signal(getattr(signal, stop))
    rest, err = process.communicate(timeout=120)
    assert process.returncode == code and err.strip().splitlines()[-1] == f"invariance-explorer: {said}"
    assert "Traceback" not in err
    assert json.loads(rest.splitlines()[-1]) == {"event": "error", "message": "interrupted", "kind": "cancelled"}
    assert list(tmp_path.iterdir()) == []
