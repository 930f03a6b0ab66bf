"""The user's own denoiser: import (TorchScript, MONAI bundle, class + state dict), the checks,
``fit`` end to end, and the refusal of damaged or foreign model folders.

The denoiser brought here is the bundled, trained CNN-10 in each of the three forms (a real
network, not a stand-in). Fits are tiny and seeded: 8 simulated 64-pixel slices, 32-pixel
patches, a narrow cVAE and cINN, 200 cVAE steps (about 25 s on one CPU thread). Their
threshold: held-out consistency C <= 0.8, where the same models untrained give C of 0.96-0.98
(measured with these settings; C = 1 means the invariances change f's output as much as
they change the image).
"""

from __future__ import annotations

import json
import os
import re
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from InvarianceExplorerLib.cli import main
from InvarianceExplorerLib.custom_denoisers import (DenoiserCheckError, check_denoiser, import_denoiser,
                                                    read_declaration)
from InvarianceExplorerLib.denoisers import (load_denoiser, read_metadata, resolve_model_folder, save_denoiser,
                                            write_metadata)
from InvarianceExplorerLib.fidelity import invariance_fidelity
from InvarianceExplorerLib.fit import fit, parse_budget, plan, seconds_per_cvae_step
from InvarianceExplorerLib.normalization import PAPER_NORMALIZATION, HUNormalization
from InvarianceExplorerLib.sample_data import sample_ct_path
from InvarianceExplorerLib.sampler import load_invariance_models
from InvarianceExplorerLib.simulated_dataset import build_simulated_dataset
from imported_denoiser import changed_copy, imported_folder
from tiny_fit import FIT, MAX_CONSISTENCY, MIN_NPS_CORRELATION, TINY, one_thread

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def cnn10():
    """The bundled, trained CNN-10 network (float32)."""
    return load_denoiser("cnn10").network.float()


@pytest.fixture(scope="module")
def torchscript_file(cnn10, tmp_path_factory):
    path = tmp_path_factory.mktemp("ts") / "my_denoiser.pt"
    torch.jit.save(torch.jit.script(cnn10), str(path))
    return path


@pytest.fixture(scope="module")
def monai_bundle(cnn10, tmp_path_factory):
    """A MONAI bundle folder (configs/inference.json with network_def, configs/metadata.json,
    models/model.pt) holding the bundled CNN-10."""
    bundle = tmp_path_factory.mktemp("bundle") / "cnn10_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps({
        "bundle_root": ".", "device": "$torch.device('cpu')",
        "network_def": {"_target_": "InvarianceExplorerLib.denoisers.CNN10"},
        "network": "$@network_def.to(@device)"}))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({
        "version": "0.1.0", "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": ["*", "*"]}},
            "outputs": {"pred": {"type": "image", "num_channels": 1, "spatial_shape": ["*", "*"]}}}}))
    torch.save({"model": cnn10.state_dict()}, bundle / "models" / "model.pt")
    return bundle


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    build_simulated_dataset(out, 8, size=64, seed=3, photons=1e4, progress=False)
    return out


@pytest.fixture(scope="module")
def torchscript_fit(torchscript_file, pairs, tmp_path_factory):
    """The CLI's fit of the TorchScript denoiser: the model folder."""
    out = tmp_path_factory.mktemp("fit") / "my_model"
    sets = [f"--set={stage}.{k}={json.dumps(v)}" for stage, hp in TINY.items() for k, v in hp.items()]
    assert main(["fit", "--denoiser", str(torchscript_file), "--normalization", "paper", "--data", str(pairs),
                 "--out", str(out), "--budget", "200steps", "--device", "cpu", "--patch-size", "32",
                 "--batch-size", "4", "--fidelity-slices", "1", "--no-progress", *sets]) == 0
    return out


def _fidelity(folder, pairs) -> dict:
    """Fidelity figures of a fit's models on a held-out (test split) slice of ``pairs``."""
    return invariance_fidelity(load_invariance_models(folder), pairs, slices=1, count=8)


def _trained(fidelity: dict) -> None:
    """A tiny fit's bars (tiny_fit): consistent, and a noise texture only training gives."""
    assert fidelity["consistency"] <= MAX_CONSISTENCY
    assert fidelity["completeness"]["nps_correlation"] >= MIN_NPS_CORRELATION


# ----------------------------------------------------------------------------- end to end


def test_fit_of_a_torchscript_denoiser_samples_consistent_invariances(torchscript_fit, pairs, tmp_path, capsys):
    metadata = read_metadata(torchscript_fit)
    assert metadata["architecture"]["kind"] == "torchscript"
    assert metadata["fit"]["plan"]["cvae_steps"] == 200 and metadata["fit"]["wall_time_s"] > 0
    _trained(metadata["invariance"]["fidelity"])
    _trained(_fidelity(torchscript_fit, pairs))
    card = (torchscript_fit / "MODEL_CARD.md").read_text()
    assert "budget `200steps`" in card and "my_denoiser" in card
    assert not list(torchscript_fit.parent.glob(".*partial"))
    # everything else works unchanged: the sample command with --model FOLDER
    out = tmp_path / "sampled"
    assert main(["sample", "--model", str(torchscript_fit), "--input", str(sample_ct_path()), "--center",
                 "368,283,1", "--count", "4", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    assert (out / "invariances.nrrd").is_file()


def test_fit_of_a_monai_bundle_samples_consistent_invariances(monai_bundle, pairs, tmp_path):
    out = fit(monai_bundle, pairs, tmp_path / "bundle_model", normalization=PAPER_NORMALIZATION, **FIT)
    metadata = read_metadata(out)
    assert metadata["architecture"]["kind"] == "monai-bundle"
    assert (out / "bundle" / "inference.json").is_file()
    _trained(_fidelity(out, pairs))


def test_a_resumed_fit_of_a_finished_run_gives_the_same_models(torchscript_file, pairs, tmp_path):
    out = tmp_path / "model"
    fit(torchscript_file, pairs, out, normalization=PAPER_NORMALIZATION, **{**FIT, "budget": "40steps",
                                                                            "fidelity_slices": 0})
    first = read_metadata(out)["weights"]
    with pytest.raises(ValueError, match="--resume"):
        fit(torchscript_file, pairs, out, normalization=PAPER_NORMALIZATION, **{**FIT, "budget": "40steps"})
    fit(torchscript_file, pairs, out, normalization=PAPER_NORMALIZATION, resume=True,
        **{**FIT, "budget": "40steps", "fidelity_slices": 0})
    again = read_metadata(out)["weights"]
    assert {k: v["sha256"] for k, v in again.items()} == {k: v["sha256"] for k, v in first.items()}
    # resuming with another normalisation or another network is refused; the same file moved is not
    with pytest.raises(ValueError, match="holds a fit of another denoiser or setting .normalization was"):
        fit(torchscript_file, pairs, out, normalization=HUNormalization.parse("window:-1024,3072"), resume=True,
            **{**FIT, "budget": "40steps", "fidelity_slices": 0})
    other = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(nn.Conv2d(1, 1, 3, padding=1)), str(other))
    with pytest.raises(ValueError, match="source was"):
        fit(other, pairs, out, normalization=PAPER_NORMALIZATION, resume=True, **{**FIT, "budget": "40steps"})
    moved = tmp_path / "moved.pt"
    moved.write_bytes(torchscript_file.read_bytes())
    fit(moved, pairs, out, normalization=PAPER_NORMALIZATION, resume=True,
        **{**FIT, "budget": "40steps", "fidelity_slices": 0})
    assert {k: v["sha256"] for k, v in read_metadata(out)["weights"].items()} == \
        {k: v["sha256"] for k, v in first.items()}


class _NaNOut(nn.Module):
    def forward(self, x):
        return x / (x - x)


def test_fit_refuses_bad_settings_and_denoisers_before_it_writes(torchscript_file, pairs, tmp_path, capsys):
    """Hyperparameters, patch size and a denoiser that fails its check are refused before any
    training, and leave no work folder behind."""
    common = ["fit", "--denoiser", str(torchscript_file), "--normalization", "paper", "--data", str(pairs),
              "--budget", "8steps", "--device", "cpu", "--no-progress"]
    nan = tmp_path / "nan.pt"
    torch.jit.save(torch.jit.script(_NaNOut()), str(nan))
    for argv, message in (([*common, "--set", "cvae.no_such=1"], "not a cvae hyperparameter: no_such"),
                          ([*common, "--set", "cvae.z_dim=abc"], "cvae.z_dim='abc': must be a whole number"),
                          ([*common, "--set", "cinn.n_flows=2.5"], "cinn.n_flows=2.5: must be a whole number"),
                          ([*common, "--set", "cinn.n_flows=0"], "cinn.n_flows=0: must be a whole number >= 1"),
                          ([*common, "--set", "cvae.n_critic=0"], "cvae.n_critic=0: must be a whole number >= 1"),
                          ([*common, "--set", "cvae.lam_cons=-1"], "cvae.lam_cons=-1: must be a finite number >= 0"),
                          ([*common, "--set", "cvae.channels=[]"], "must be a non-empty list of whole numbers"),
                          ([*common, "--patch-size", "8"], "patch_size at least 24 pixels"),
                          ([*common, "--denoiser", str(nan), "--patch-size", "32"], "NaN or infinite"),
                          ([*common, "--patch-size", "128"], "patch size 128 (--patch-size) is larger than the slices")):
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2, argv
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt"]
    # a data set too small to split (found after the training before, which was then lost)
    few = tmp_path / "few"
    build_simulated_dataset(few, 4, size=32, seed=3, photons=1e4, progress=False)
    assert main([*common, "--data", str(few), "--patch-size", "32", "--out", str(tmp_path / "out")]) == 2
    assert (f"{few}: the test split holds no slice: its 4 patients are split 70/20/10 % by patient; give a data set "
            "of more patients; or measure no fidelity figures on it (--fidelity-slices 0)") in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few", "nan.pt"]
    # --resume with a --work folder that is not a fit's: its files were deleted
    mine = tmp_path / "mine"
    (mine / "denoiser").mkdir(parents=True)
    (mine / "denoiser" / "thesis.txt").write_text("keep me")
    for resume in (["--resume"], []):  # without --resume it said to delete the folder to start over
        assert main([*common, "--patch-size", "32", "--work", str(mine), *resume, "--out", str(tmp_path / "out")]) == 2
        assert f"{mine} is not the work folder of a fit" in capsys.readouterr().err
    assert main([*common, "--patch-size", "32", "--work", str(tmp_path / "same"), "--out", str(tmp_path / "same")]) == 2
    assert "--work and --out are one folder" in capsys.readouterr().err
    assert (mine / "denoiser" / "thesis.txt").read_text() == "keep me"
    # a model folder is copied with its own files only: a link's target was copied in
    from InvarianceExplorerLib.denoisers import copy_model_folder

    linked = copy_model_folder(resolve_model_folder("cnn10"), tmp_path / "linked")
    (linked / "notes.txt").symlink_to(mine / "denoiser" / "thesis.txt")
    with pytest.raises(ValueError, match="notes.txt: a symbolic link in the model folder"):
        copy_model_folder(linked, tmp_path / "copy")
    with pytest.raises(ValueError, match="holds files but no model folder"):
        copy_model_folder(resolve_model_folder("cnn10"), mine / "denoiser")
    assert (mine / "denoiser" / "thesis.txt").read_text() == "keep me" and not (tmp_path / "copy").exists()
    # a bundled name is its folder (it asked for a normalisation)
    assert main(["fit", "--denoiser", "cnn10", "--check"]) == 0
    assert f"{resolve_model_folder('cnn10')}: passes the checks" in capsys.readouterr().out


def _fit_worker(rank: int, world: int, port: int, source, pairs, out) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fit(source, pairs, out, normalization=PAPER_NORMALIZATION, **{**FIT, "budget": "0.1m", "fidelity_slices": 0})
    finally:
        dist.destroy_process_group()


def test_fit_under_two_processes_writes_one_folder_with_identical_weights(torchscript_file, pairs, tmp_path):
    """As under torchrun: every process runs fit; rank 0 imports the denoiser and times the
    budget's steps, the others wait and take its plan; the weights end identical."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fit_worker, args=(2, port, torchscript_file, pairs, tmp_path / "model"), nprocs=2, join=True)
    info = read_metadata(tmp_path / "model")
    assert info["fit"]["world_size"] == 2 and info["fit"]["plan"]["seconds_per_cvae_step"] > 0
    for kind in ("cvae", "cinn"):
        digests = info["invariance"]["training"][kind]["distributed"]["final_weights_sha256"]
        assert len(digests) == 2 and digests[0] == digests[1]


def test_a_model_folder_of_train_denoiser_fits_as_it_is(pairs, tmp_path, capsys):
    from InvarianceExplorerLib.denoisers import copy_model_folder

    trained = copy_model_folder(resolve_model_folder("cnn10"), tmp_path / "trained")
    assert main(["fit", "--denoiser", str(trained), "--check"]) == 0
    with pytest.warns(UserWarning, match="budget 42steps: the cVAE trains 40 steps, 4 epochs of 10"):
        out = fit(trained, pairs, tmp_path / "model", **{**FIT, "budget": "42steps", "fidelity_slices": 0})
    metadata = read_metadata(out)
    assert metadata["architecture"]["name"] == "cnn10" and metadata["fit"]["plan"]["cvae_steps"] == 40
    assert "## Fit" in (out / "MODEL_CARD.md").read_text()
    assert load_invariance_models(out).denoiser.arch == "cnn10"


# ----------------------------------------------------------------------------- import forms


def test_a_model_folder_runs_its_code_only_where_it_is_trusted(tmp_path, capsys):
    """Loading a model folder ran the code it carries (network.py, a bundle config, TorchScript)
    whoever made it. Importing your own denoiser trusts its code (by content: a copy loads);
    a folder whose code was changed, with checksums to match, is refused before it runs, until
    `invariance-explorer trust FOLDER`."""
    from InvarianceExplorerLib.denoisers import copy_model_folder
    from InvarianceExplorerLib.trusted_code import UntrustedCodeError, trust_file

    mine = imported_folder(tmp_path)
    assert str(trust_file()) == os.environ["INVARIANCE_EXPLORER_TRUST"]  # the test session's, not the user's
    assert load_denoiser(copy_model_folder(mine, tmp_path / "copy")).arch == "custom"  # the same code, elsewhere
    marker = tmp_path / "ran"
    theirs = changed_copy(mine, tmp_path / "theirs", marker)
    with pytest.raises(UntrustedCodeError, match=re.escape(f"{theirs} holds code that runs when it loads (python: "
                                                           "network.py), and this machine has not been told")):
        load_denoiser(theirs)
    assert not marker.exists()
    assert main(["denoise", "--model", str(theirs), "--input", str(sample_ct_path()), "--output",
                 str(tmp_path / "out.nrrd")]) == 2
    assert f"`invariance-explorer trust {theirs}`" in capsys.readouterr().err and not marker.exists()
    assert main(["trust", str(theirs)]) == 0
    assert "its code (python: network.py) may now run on this machine" in capsys.readouterr().out
    load_denoiser(theirs)
    assert marker.exists()
    assert main(["trust", str(resolve_model_folder("cnn10"))]) == 0
    assert "holds weights only and runs no code" in capsys.readouterr().out


def test_a_class_file_and_state_dict_import_and_load_without_the_source(cnn10, tmp_path):
    code = tmp_path / "my_network.py"
    code.write_text(textwrap.dedent("""
        import torch
        import torch.nn as nn

        class Block(nn.Module):
            def __init__(self, cin, cout, k, act=True):
                super().__init__()
                self.conv, self.act = nn.Conv2d(cin, cout, k, padding=k // 2), act

            def forward(self, x):
                x = self.conv(x)
                return torch.relu(x) if self.act else x

        class SRCNN(nn.Sequential):
            def __init__(self, width=64):
                super().__init__(Block(1, width, 9), Block(width, 32, 3), Block(32, 1, 5, act=False))
    """))
    torch.save(cnn10.state_dict(), tmp_path / "weights.pt")
    folder = import_denoiser(tmp_path / "weights.pt", tmp_path / "model", normalization=PAPER_NORMALIZATION,
                             class_path=f"{code}:SRCNN", arguments={"width": 64})
    code.unlink()
    (tmp_path / "weights.pt").unlink()
    loaded = load_denoiser(folder)
    assert (folder / "network.py").is_file() and loaded.receptive_field == 15
    x = torch.randn(1, 1, 40, 40)
    assert torch.allclose(loaded.network(x), cnn10(x), atol=1e-6)
    # moved as the sampler moves it, the user's own network keeps its memory layout (its code may
    # assume contiguous tensors); only the bundled architectures are laid out channels-last
    assert all(p.is_contiguous() for p in loaded.to("cpu").network.parameters())
    assert not all(p.is_contiguous() for p in load_denoiser("cnn10").to("cpu").network.parameters())


def test_a_declaration_file_and_normalisation_forms(tmp_path):
    path = tmp_path / "denoiser.json"
    path.write_text(json.dumps({"normalization": "window:-1024,3072", "use": "full-image"}))
    assert read_declaration(path)["use"] == "full-image"
    window = HUNormalization.parse("window:-1024,3072")
    assert window.normalize(-1024.0) == 0.0 and window.normalize(3072.0) == 1.0
    assert HUNormalization.parse("identity").normalize(40.0) == 40.0
    assert HUNormalization.parse("mean-std:0,1000").normalize(500.0) == 0.5
    assert HUNormalization.parse("paper") == PAPER_NORMALIZATION
    for bad in ("window:3", "hu", "mean-std:a,b", "window:100,-100", "mean-std:nan,1"):
        with pytest.raises(ValueError):
            HUNormalization.parse(bad)
    path.write_text(json.dumps({"normalisation": "paper"}))
    with pytest.raises(ValueError, match=r"keys among .* \(unknown: normalisation\)"):
        read_declaration(path)


def test_budgets_parse_and_plan():
    assert parse_budget("3000steps") == {"steps": 3000} and parse_budget("500") == {"steps": 500}
    assert parse_budget("45m") == {"minutes": 45.0} and parse_budget("2h") == {"minutes": 120.0}
    for bad in ("soon", "0m", "3 apples", "5steps"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    steps = plan({"steps": 1000})
    assert steps["cvae_steps"] == 1000 and steps["adv_start"] == 250
    timed = plan({"minutes": 10.0}, seconds_per_step=0.5)
    assert 500 < timed["cvae_steps"] < 600  # 75 % of 600 s over 1.6 x 0.5 s


def test_a_time_budget_is_timed_on_the_representation_the_fit_trains(tmp_path):
    """The step is timed with the fit's cVAE overrides (a wrong name fails as in training;
    the pre-image branch, z modulation and consistency term run), and a wrong stage fails
    before anything is written."""
    folder, cpu = resolve_model_folder("cnn10"), torch.device("cpu")
    with pytest.raises(ValueError, match="not a cvae hyperparameter: z_dims"):
        seconds_per_cvae_step(folder, 32, 2, cpu, hyperparameters={"z_dims": 8})
    small = {"z_dim": 8, "channels": (4, 8, 8, 8, 8, 8), "preimage_layers": 2, "z_modulation": True, "lam_cons": 1.0,
             "critic_widths": (4, 4, 4, 4, 4, 4), "critic_hidden": 8}
    assert seconds_per_cvae_step(folder, 32, 2, cpu, repeats=1, hyperparameters=small) > 0
    with pytest.raises(ValueError, match="per stage"):
        fit(folder, tmp_path / "no data", tmp_path / "model", budget="1m", hyperparameters={"cvea": small})
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.work").exists()


# ----------------------------------------------------------------------------- checks


class _Wrong(nn.Module):
    """CNN-10 with one thing wrong (``how``)."""

    def __init__(self, base: nn.Module, how: str):
        super().__init__()
        self.base, self.how = base, how

    def forward(self, x):
        if self.how == "three_in":
            return self.base(x.repeat(1, 3, 1, 1)[:, :1]) if x.shape[1] == 3 else F.conv2d(x, torch.ones(1, 3, 3, 3))
        y = self.base(x)
        if self.how == "three_out":
            return y.repeat(1, 3, 1, 1)
        if self.how == "smaller":
            return y[..., 1:-1, 1:-1]
        if self.how == "nan":
            return y / (y - y)
        if self.how == "dropout":
            return F.dropout(y, 0.5, training=True)
        if self.how == "tuple":
            return y, x
        if self.how == "window_out":
            return (y + 1024.0) / 4096.0
        return y


@pytest.mark.parametrize("how, message", [
    ("three_in", "raised RuntimeError.*one channel"),
    ("three_out", "returned 3 channels"),
    ("smaller", r"returned shape \(2, 1, 126, 126\)"),
    ("nan", "NaN or infinite"),
    ("dropout", "not deterministic"),
    ("tuple", "returned a tuple"),
])
def test_each_failing_check_says_what_the_network_did(cnn10, how, message):
    with pytest.raises(DenoiserCheckError, match=message):
        check_denoiser(_Wrong(cnn10, how), PAPER_NORMALIZATION)


def test_a_wrong_normalisation_or_an_untrained_network_is_caught(cnn10):
    with pytest.raises(DenoiserCheckError, match="normalisation"):  # output in window units, input in HU
        check_denoiser(_Wrong(cnn10, "window_out"), HUNormalization.parse("identity"))
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    with pytest.raises(DenoiserCheckError, match="normalisation"):
        check_denoiser(BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(4, 4, 8, 8, 16, 4)),
                       PAPER_NORMALIZATION, use="full-image")
    report = check_denoiser(cnn10, PAPER_NORMALIZATION)
    assert report["receptive_field"] == 15 and 0 < report["mean_abs_change_hu"] < 60


def test_a_network_that_looks_far_must_be_declared_full_image():
    class GlobalMean(nn.Module):
        def forward(self, x):
            return 0.5 * x + 0.5 * x.mean(dim=(2, 3), keepdim=True)

    with pytest.raises(DenoiserCheckError, match="declare use full-image"):
        check_denoiser(GlobalMean(), PAPER_NORMALIZATION)


def test_a_unet_that_needs_even_sizes_passes_the_checks():
    """MONAI's UNet with two stride-2 levels runs only on sizes divisible by 4: the receptive
    field probe must be such a size too (it was 257 and crashed the check)."""
    from monai.networks.nets import UNet

    class SmallResidual(nn.Module):  # an untrained UNet, scaled so that it changes CT by little
        def __init__(self):
            super().__init__()
            self.unet = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8, 16), strides=(2, 2))

        def forward(self, x):
            return x + 1e-3 * self.unet(x)

    torch.manual_seed(0)
    report = check_denoiser(SmallResidual(), PAPER_NORMALIZATION, use="full-image")
    assert report["input_shape"] == [2, 1, 128, 128] and report["receptive_field"] > 15


def _bundle_with(bundle, tmp_path, name, config=None, suffix="json"):
    import shutil

    copy = shutil.copytree(bundle, tmp_path / name)
    if config is not None:
        (copy / "configs" / "inference.json").unlink()
        text = config if isinstance(config, str) else json.dumps(config)
        (copy / "configs" / f"inference.{suffix}").write_text(text)
    return copy


def test_what_the_users_files_raise_is_one_line_naming_them(cnn10, monai_bundle, tmp_path, capsys):
    """A class file that does not run, a constructor that refuses its arguments, weights of the
    wrong shape or damaged, a bundle whose network_def fails: one line each, no traceback."""
    torch.save(cnn10.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "weights.safetensors").write_bytes(b"\xff" * 64)
    wide32 = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 1, 3, padding=1)).state_dict()
    torch.save(wide32, tmp_path / "wide32.pt")  # the keys of net.py's Wide, at width 32
    (tmp_path / "syntax.py").write_text("class Net(\n")
    (tmp_path / "sibling.py").write_text("from my_blocks import Block\n")
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        class Needs(nn.Conv2d):
            def __init__(self, width, depth):
                super().__init__(1, 1, 3)

        class Wide(nn.Sequential):
            def __init__(self, width=16):
                super().__init__(nn.Conv2d(1, width, 3, padding=1), nn.Conv2d(width, 1, 3, padding=1))
    """))
    (tmp_path / "list.json").write_text(json.dumps({"class": f"{tmp_path / 'net.py'}:Wide", "arguments": [8],
                                                    "normalization": "paper"}))
    common = ["fit", "--normalization", "paper", "--check", "--device", "cpu"]
    weights = ["--denoiser", str(tmp_path / "weights.pt")]
    cases = [
        ([*common, *weights, "--class", f"{tmp_path / 'syntax.py'}:Net"], "syntax.py cannot be run (SyntaxError"),
        ([*common, *weights, "--class", f"{tmp_path / 'sibling.py'}:Net"],
         "No module named 'my_blocks'); it must be one self-contained file"),
        ([*common, *weights, "--class", f"{tmp_path / 'net.py'}:Needs"],
         "cannot be built with arguments {} (TypeError: Needs.__init__() missing 2 required positional arguments"),
        (["fit", "--check", *weights, "--declaration", str(tmp_path / "list.json")],
         "are the class's constructor keywords"),
        ([*common, "--denoiser", str(tmp_path / "wide32.pt"), "--class", f"{tmp_path / 'net.py'}:Wide"],
         "the weights do not fit the network (size mismatch for 0.weight"),
        ([*common, "--denoiser", str(tmp_path / "weights.safetensors"), "--class", f"{tmp_path / 'net.py'}:Wide"],
         "cannot read it as safetensors"),
        ([*common, "--denoiser", str(_bundle_with(monai_bundle, tmp_path, "missing_arg", {
            "network_def": {"_target_": "torch.nn.Conv2d", "in_channels": 1, "out_channels": 1}}))],
         "network_def cannot be built (TypeError: Conv2d.__init__() missing 1 required positional argument"),
        ([*common, "--denoiser", str(_bundle_with(monai_bundle, tmp_path, "broken_json", "{bad", suffix="json"))],
         "cannot be read as a MONAI bundle config"),
    ]
    cases += [([*common, "--denoiser", str(monai_bundle), "--class", f"{tmp_path / 'net.py'}:Wide"],
               "is a MONAI bundle folder, whose network_def builds the network: drop --class"),
              ([*common, "--denoiser", str(monai_bundle), "--arguments", '{"width": 8}'], "drop --arguments")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    yaml_bundle = _bundle_with(monai_bundle, tmp_path, "yaml", "network_def:\n  _target_: "
                               "InvarianceExplorerLib.denoisers.CNN10\n", suffix="yaml")
    assert main([*common, "--denoiser", str(yaml_bundle)]) == 0  # PyYAML is a dependency
    assert "passes the checks" in capsys.readouterr().out


def test_the_cli_checks_only_and_explains_a_missing_declaration(torchscript_file, capsys):
    assert main(["fit", "--denoiser", str(torchscript_file), "--normalization", "paper", "--check",
                 "--device", "cpu"]) == 0
    assert "passes the checks" in capsys.readouterr().out
    assert main(["fit", "--denoiser", str(torchscript_file), "--check"]) == 2
    assert "normalisation" in capsys.readouterr().err
    state = torch.nn.Conv2d(1, 1, 3).state_dict()
    torch.save(state, torchscript_file.with_name("plain.pt"))
    assert main(["fit", "--denoiser", str(torchscript_file.with_name("plain.pt")), "--normalization", "paper",
                 "--check"]) == 2
    assert "--class" in capsys.readouterr().err
    assert main(["fit", "--denoiser", str(torchscript_file), "--normalization", "paper", "--check", "--class",
                 "my_network.py:Net"]) == 2
    assert "is a TorchScript file, which holds its network: drop --class" in capsys.readouterr().err


# ----------------------------------------------------------------------------- refused folders


def test_damaged_or_foreign_model_folders_are_refused(torchscript_fit, pairs, tmp_path):
    import shutil

    damaged = shutil.copytree(torchscript_fit, tmp_path / "damaged")
    with open(damaged / "denoiser.torchscript.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="checksum"):
        load_invariance_models(damaged)
    newer = shutil.copytree(torchscript_fit, tmp_path / "newer")
    metadata = read_metadata(newer)
    metadata["version"] = 99
    write_metadata(newer, metadata)
    with pytest.raises(ValueError, match="format version 99"):
        load_invariance_models(newer)
    cnn10 = load_denoiser("cnn10")  # a model folder as `train denoiser` writes it: fit must not overwrite it
    trained = save_denoiser(tmp_path / "trained", cnn10.network, "cnn10", {}, cnn10.normalization)
    with pytest.raises(ValueError, match="fit did not make"):
        fit(torchscript_fit / "denoiser.torchscript.pt", pairs, trained,
            normalization=PAPER_NORMALIZATION, **FIT)
    from InvarianceExplorerLib.denoisers import bundled_models_dir

    copied = shutil.copytree(bundled_models_dir() / "cnn10", tmp_path / "bundled_copy")  # made by another fit
    assert "fit" in read_metadata(copied)
    with pytest.raises(ValueError, match="this fit did not make"):
        fit(torchscript_fit / "denoiser.torchscript.pt", pairs, copied, normalization=PAPER_NORMALIZATION, **FIT)
    with pytest.raises(ValueError, match="no such file or folder"):
        fit(tmp_path / "nothing.pt", pairs, tmp_path / "fresh", **FIT)
