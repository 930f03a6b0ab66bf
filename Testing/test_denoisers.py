"""The four denoisers: shapes, receptive fields, full convolutionality, tiled inference,
training (loss goes down, exact resume, export), model folders (checksums, fp16), denoising
real CT and the CLI. Tiny settings throughout: 64-pixel simulated pairs, 32-pixel patches,
narrow RED-CNN and DU-GAN discriminators; the published sizes are checked for shapes and
receptive fields."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from InvarianceExplorerLib.cli import main
from InvarianceExplorerLib.denoisers import (DENOISERS, FeatureNetwork, UNetDiscriminator, WGANCritic,
                                             build_denoiser, bundled_models_dir, load_denoiser, read_metadata,
                                             receptive_field, save_denoiser)
from InvarianceExplorerLib.image import CTImage
from InvarianceExplorerLib.inference import apply_network, denoise, image_quality
from InvarianceExplorerLib.io import CTInputError, read_image, write_nrrd
from InvarianceExplorerLib.normalization import PAPER_NORMALIZATION
from InvarianceExplorerLib.phantom import Label
from InvarianceExplorerLib.simulated_dataset import build_simulated_dataset
from InvarianceExplorerLib.train_denoiser import train_denoiser
from realdata import dicom_hu, pydicom_test_file

#: Published receptive fields: CNN-10 9+3+5-2, RED-CNN 1+10*4, WGAN-VGG 1+8*2 pixels.
RECEPTIVE_FIELDS = {"cnn10": 15, "redcnn": 41, "wganvgg": 17, "dugan": 41}
#: Small but real training runs: (architecture arguments, hyperparameter overrides); WGAN-VGG
#: with a tenth of the adversarial weight, so that 16 steps show the perceptual loss fall.
TINY = {"cnn10": ({}, {}), "redcnn": ({"channels": 16}, {}), "wganvgg": ({}, {"feature_steps": 30, "lam_adv": 0.1}),
        "dugan": ({"channels": 16}, {"disc_levels": 2, "disc_channels": 8})}
#: The loss that compares the denoised with the full-dose patch, per training scheme.
CONTENT_LOSS = {"cnn10": "mse", "redcnn": "mse", "wganvgg": "perceptual", "dugan": "mse"}
RUN = dict(steps_per_epoch=8, batch_size=4, patch_size=32, lr=1e-3, seed=5, device="cpu", progress=False)


def network(arch, seed=0, **arguments):
    torch.manual_seed(seed)
    return build_denoiser(arch, **arguments).eval()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("pairs")
    build_simulated_dataset(out, 8, size=64, seed=3, photons=1e4, progress=False)
    return out


def train(arch, data, out, epochs=2, hyperparameters=None, **changes):
    arguments, tiny = TINY[arch]
    return train_denoiser(arch, data, out, epochs=epochs, arguments=arguments,
                          hyperparameters={**tiny, **(hyperparameters or {})}, **{**RUN, **changes})


@pytest.fixture(scope="module")
def runs(pairs, tmp_path_factory):
    """Each architecture trained for two tiny epochs: arch -> run folder."""
    root = tmp_path_factory.mktemp("runs")
    return {arch: train(arch, pairs, root / arch).parent for arch in DENOISERS}


# ----------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("arch", list(DENOISERS))
@pytest.mark.parametrize("size", [(37, 41), (64, 64)])
def test_output_has_the_input_shape(arch, size):
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        assert network(arch)(x).shape == x.shape


@pytest.mark.parametrize("arch", ["cnn10", "redcnn", "wganvgg"])
def test_receptive_field_is_where_one_pixel_acts(arch):
    """Perturb the centre pixel: the output changes exactly on the receptive-field square."""
    net = network(arch).double()
    n = 61
    x = torch.randn(1, 1, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, 0, n // 2, n // 2] += 10.0
    with torch.no_grad():
        changed = (net(y) - net(x)).abs()[0, 0] > 1e-9
    rows, cols = np.nonzero(changed.numpy())
    rf = receptive_field(net)
    assert rf == RECEPTIVE_FIELDS[arch]
    half = rf // 2
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (n // 2 - half, n // 2 + half) * 2
    assert changed.sum() > 0.9 * rf * rf


@pytest.mark.parametrize("arch", list(DENOISERS))
def test_fully_convolutional_patch_equals_whole_image_away_from_borders(arch):
    net = network(arch, **TINY[arch][0])
    x = torch.randn(1, 1, 96, 88)
    with torch.no_grad():
        whole = net(x)
        patch = net(x[..., 10:80, 5:70])
    m = receptive_field(net) // 2
    torch.testing.assert_close(patch[..., m:-m, m:-m], whole[..., 10 + m:80 - m, 5 + m:70 - m], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["cnn10", "redcnn"])
def test_tiled_inference_equals_whole_slice(arch):
    net = network(arch, **TINY[arch][0])
    rf = receptive_field(net)
    x = torch.randn(2, 1, 150, 131)
    with torch.no_grad():
        whole = apply_network(net, x, tile_size=None)
        tiled = apply_network(net, x, tile_size=rf + 30, tiles_per_batch=3)
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="tile size"):
        apply_network(net, x, tile_size=rf - 1)


def test_training_networks_have_the_published_outputs():
    critic = WGANCritic(patch_size=64)
    assert critic(torch.randn(3, 1, 64, 64)).shape == (3, 1)
    with pytest.raises(ValueError, match="at least 24"):
        WGANCritic(patch_size=20)
    features = FeatureNetwork()
    x = torch.randn(2, 1, 40, 36)
    assert features.classifier.out_channels == len(Label)
    assert features(x).shape == (2, 12, 40, 36) and features.features(x).shape == (2, 128, 10, 9)
    disc = UNetDiscriminator(levels=3, channels=8)
    encoder, decoder = disc(torch.randn(2, 1, 37, 41))
    assert encoder.shape == (2,) and decoder.shape == (2, 1, 37, 41)
    spectral = [name for name, _ in disc.named_modules() if name.endswith("parametrizations")]
    assert spectral and "encoder.0.convs.0.conv.parametrizations" not in spectral  # first conv has one channel in


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", list(DENOISERS))
def test_tiny_training_lowers_the_loss_and_exports_a_model_folder(runs, arch):
    run = runs[arch]
    history = json.loads((run / "history.json").read_text())
    loss = CONTENT_LOSS[arch]
    assert [h["epoch"] for h in history] == [1, 2]
    # the adversarial term makes WGAN-VGG's perceptual loss fall more slowly (measured 0.92x)
    assert history[1]["train"][loss] < (0.95 if arch == "wganvgg" else 0.9) * history[0]["train"][loss]
    assert all(np.isfinite(h["val"]["rmse_hu"]) for h in history)
    metadata = read_metadata(run / "model")
    assert metadata["architecture"] == {"name": arch, "class": DENOISERS[arch].__name__,
                                        "arguments": TINY[arch][0], "receptive_field": RECEPTIVE_FIELDS[arch]}
    assert metadata["normalization"] == PAPER_NORMALIZATION.to_dict()
    assert metadata["patch_size"] == 32
    training = metadata["training"]
    assert training["epochs"] == 2 and training["data"]["kind"] == "simulated" and training["wall_time_s"] > 0
    assert training["validation"] == min((h["val"] for h in history), key=lambda v: v["rmse_hu"])
    assert metadata["held_out"]["split"] == "test" and metadata["held_out"]["slices"] == 1
    assert set(metadata["weights"]) == ({"denoiser", "feature_network"} if arch == "wganvgg" else {"denoiser"})
    if arch == "wganvgg":
        assert 0.0 <= training["feature_network"]["val_pixel_accuracy"] <= 1.0
    loaded = load_denoiser(run / "model")
    best = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["best"]
    assert best["epoch"] == training["best_epoch"]
    for key, value in loaded.network.state_dict().items():
        assert torch.equal(value, best["weights"][key]), key


@pytest.mark.parametrize("arch", ["wganvgg", "dugan"])
def test_resumed_run_continues_exactly_as_the_uninterrupted_one(pairs, runs, tmp_path, arch):
    out = tmp_path / arch
    train(arch, pairs, out, epochs=1)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(arch, pairs, out, epochs=2)
    with pytest.raises(ValueError, match=r"other settings \(batch_size: \d+ then, 2 now\)"):
        train(arch, pairs, out, epochs=2, resume=True, batch_size=2)
    last = out / "checkpoints" / "last.pt"
    kept = last.read_bytes()
    last.write_bytes(kept[:5000])  # cut short
    with pytest.raises(ValueError, match="last.pt: the checkpoint is damaged .*delete it to train from the start"):
        train(arch, pairs, out, epochs=2, resume=True)
    last.write_bytes(kept)
    other = shutil.copytree(pairs, tmp_path / "other data")  # the same pairs elsewhere: not the run's data
    for data, changes, said in ((pairs, {"val_slices": 1}, "val_slices: 32 then, 1 now"),
                                (other, {}, f"data: {pairs} then, {other} now")):
        with pytest.raises(ValueError, match=re.escape(f"other settings ({said})")):
            train(arch, data, out, epochs=2, resume=True, **changes)
    older = torch.load(last, weights_only=True)  # a checkpoint of a version that recorded neither
    del older["config"]["data"], older["config"]["val_slices"]
    torch.save(older, last)
    train(arch, pairs, out, epochs=2, resume=True)
    resumed = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    straight = torch.load(runs[arch] / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2
    for name, state in straight["networks"].items():
        for key, value in state.items():
            assert torch.equal(resumed["networks"][name][key], value), f"{name}.{key}"
    assert [h["val"] for h in resumed["history"]] == [h["val"] for h in straight["history"]]


def test_wganvgg_reuses_the_feature_network_of_a_model_folder(pairs, runs, tmp_path):
    source = runs["wganvgg"] / "model"
    folder = train("wganvgg", pairs, tmp_path / "run", epochs=1, feature_network=source)
    record = read_metadata(folder)["training"]["feature_network"]
    assert record["source"] == str(source) and record["steps"] == TINY["wganvgg"][1]["feature_steps"]
    assert read_metadata(folder)["weights"]["feature_network"]["sha256"] == \
        read_metadata(source)["weights"]["feature_network"]["sha256"]
    with pytest.raises(ValueError, match="no feature network in this model folder"):
        train("wganvgg", pairs, tmp_path / "other", epochs=1, feature_network=runs["cnn10"] / "model")


def test_dugan_generator_starts_from_a_trained_redcnn(pairs, runs, tmp_path):
    source = runs["redcnn"] / "model"
    out = tmp_path / "dugan"
    folder = train("dugan", pairs, out, epochs=1, initial_weights=source)
    start = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["initialised_from"]
    assert start["folder"] == str(source) and start["architecture"] == "redcnn"
    assert read_metadata(folder)["training"]["initialised_from"] == start
    assert start["sha256"] == read_metadata(source)["weights"]["denoiser"]["sha256"]
    # the first validation of the fine-tuned generator is near the RED-CNN's, far from a random start's
    history = json.loads((out / "history.json").read_text())
    fresh = json.loads((runs["dugan"] / "history.json").read_text())
    redcnn = read_metadata(source)["training"]["validation"]["rmse_hu"]
    assert abs(history[0]["val"]["rmse_hu"] - redcnn) < abs(fresh[0]["val"]["rmse_hu"] - redcnn)
    with pytest.raises(ValueError, match="cannot start a dugan"):
        train("dugan", pairs, tmp_path / "other", epochs=1, initial_weights=runs["cnn10"] / "model")


def test_cli_overrides_hyperparameters_and_names_the_known_ones(pairs, tmp_path, capsys):
    args = ["train", "denoiser", "--arch", "cnn10", "--data", str(pairs), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--patch-size", "32", "--device", "cpu",
            "--val-slices", "1", "--no-progress"]
    assert main(args + ["--set", "betas=[0.5, 0.9]", "--lr-decay", "0.5"]) == 0
    training = read_metadata(tmp_path / "run" / "model")["training"]
    hp = training["hyperparameters"]
    assert hp["betas"] == [0.5, 0.9] and hp["lr_decay"] == 0.5 and training["val_slices"] == 1
    other = [str(tmp_path / "other") if a == str(tmp_path / "run") else a for a in args]
    assert main(other + ["--set", "disc_channels=8"]) == 2
    assert "not a hyperparameter of cnn10; it has betas, lr, lr_decay" in capsys.readouterr().err


def test_a_gan_generator_can_be_pretrained_on_mse_alone(pairs, tmp_path):
    folder = train("wganvgg", pairs, tmp_path / "run", epochs=1, hyperparameters={"scheme": "pixel"})
    metadata = read_metadata(folder)
    assert metadata["training"]["scheme"] == "pixel" and set(metadata["weights"]) == {"denoiser"}
    with pytest.raises(ValueError, match="unknown training scheme 'mse'"):
        train("cnn10", pairs, tmp_path / "other", epochs=1, hyperparameters={"scheme": "mse"})


def test_bfloat16_mixed_precision_trains_is_recorded_and_must_match_on_resume(pairs, runs, tmp_path):
    out = tmp_path / "run"
    folder = train("redcnn", pairs, out, precision="bfloat16")
    history = json.loads((out / "history.json").read_text())
    straight = json.loads((runs["redcnn"] / "history.json").read_text())  # the same run in float32
    assert history[1]["train"]["mse"] < 0.9 * history[0]["train"]["mse"]
    assert history[0]["train"]["mse"] != straight[0]["train"]["mse"]  # bfloat16 arithmetic did run
    assert history[1]["train"]["mse"] == pytest.approx(straight[1]["train"]["mse"], rel=0.2)
    assert read_metadata(folder)["training"]["precision"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in load_denoiser(folder).network.parameters())
    with pytest.raises(ValueError, match="other settings.*precision"):
        train("redcnn", pairs, out, epochs=3, resume=True)
    with pytest.raises(ValueError, match="unknown precision 'float8'; choose one of float32, bfloat16"):
        train("redcnn", pairs, tmp_path / "other", precision="float8")


# ----------------------------------------------------------------------------- model folders


def test_save_load_round_trip_fp16_and_checksum_refusal(tmp_path):
    net = network("redcnn", channels=16)
    x = torch.randn(1, 1, 48, 48)
    for dtype in ("float32", "float16"):
        folder = save_denoiser(tmp_path / dtype, net, "redcnn", {"channels": 16}, PAPER_NORMALIZATION,
                               {"patch_size": 32}, dtype=dtype)
        loaded = load_denoiser(folder)
        assert loaded.metadata["weights"]["denoiser"]["dtype"] == dtype and loaded.arch == "redcnn"
        assert not loaded.network.training and not any(p.requires_grad for p in loaded.network.parameters())
        with torch.no_grad():
            tolerance = 0.0 if dtype == "float32" else 2e-3
            torch.testing.assert_close(loaded.network(x), net(x), rtol=0, atol=tolerance)
    size = {d: (tmp_path / d / "denoiser.safetensors").stat().st_size for d in ("float32", "float16")}
    assert size["float16"] < 0.6 * size["float32"]
    weights = tmp_path / "float32" / "denoiser.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"denoiser\.safetensors: SHA-256 checksum .* does not match"):
        load_denoiser(tmp_path / "float32")
    with pytest.raises(ValueError, match="not a denoiser model folder"):
        load_denoiser(tmp_path)


def test_a_model_folder_keeps_its_own_files_and_a_bundled_name_is_the_bundled_folder(tmp_path, monkeypatch):
    """Records of metadata.json pointing outside the folder (an absolute path, '..', a link)
    loaded, and hashed, what they named; a folder named like a bundled denoiser in the working
    folder took the bundled name's place; a record without its checksum gave a KeyError."""
    from InvarianceExplorerLib.denoisers import copy_model_folder, write_metadata

    folder = copy_model_folder(bundled_models_dir() / "cnn10", tmp_path / "model")
    weights = folder / read_metadata(folder)["weights"]["denoiser"]["file"]
    outside = shutil.copy2(weights, tmp_path / "elsewhere.safetensors")
    (folder / "linked.safetensors").symlink_to(outside)
    for name in (str(outside), "../elsewhere.safetensors", "linked.safetensors"):
        metadata = read_metadata(folder)
        metadata["weights"]["denoiser"]["file"] = name
        write_metadata(folder, metadata)
        with pytest.raises(ValueError, match=re.escape(f"the file {name!r} does not lie inside the model folder")):
            load_denoiser(folder)
    metadata = read_metadata(folder)
    metadata["weights"]["denoiser"] = {"file": weights.name}
    write_metadata(folder, metadata)
    with pytest.raises(ValueError, match="a file record lacks its 'file' or 'sha256'"):
        load_denoiser(folder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").rename(tmp_path / "cnn10")  # a (broken) folder named cnn10 where the engine runs
    assert load_denoiser("cnn10").arch == "cnn10"  # the bundled one
    with pytest.raises(ValueError, match="a file record lacks"):
        load_denoiser("./cnn10")


def test_unknown_names_and_missing_bundled_weights_are_explained(tmp_path, monkeypatch):
    from InvarianceExplorerLib import denoisers

    with pytest.raises(ValueError, match="neither a model folder nor a bundled denoiser name"):
        load_denoiser("no-such-model")
    shutil.copytree(bundled_models_dir() / "cnn10", tmp_path / "cnn10")  # an extension copied without RED-CNN's
    monkeypatch.setattr(denoisers, "bundled_models_dir", lambda: tmp_path)
    assert load_denoiser("cnn10").arch == "cnn10"
    with pytest.raises(ValueError, match=re.escape(f"the bundled weights of redcnn are missing from {tmp_path / 'redcnn'}"
                                                   " (an incomplete copy of the extension")):
        load_denoiser("redcnn")


# ----------------------------------------------------------------------------- inference


def test_denoise_real_ct_slice_and_volume_keep_geometry(runs):
    denoiser = load_denoiser(runs["redcnn"] / "model")
    image = read_image(pydicom_test_file("CT_small.dcm"))
    hu, spacing = dicom_hu(pydicom_test_file("CT_small.dcm"))
    np.testing.assert_array_equal(image.array, hu)
    calls = []
    with pytest.warns(RuntimeWarning, match="trained on"):  # CT_small has 0.66 mm pixels, the model 5.6 mm
        result = denoise(denoiser, image, device="cpu", progress=lambda done, total: calls.append((done, total)))
    assert result.array.shape == hu.shape and result.array.dtype == np.float32 and np.isfinite(result.array).all()
    assert (result.spacing, result.origin, result.direction) == (image.spacing, image.origin, image.direction)
    assert calls == [(1, 1)]
    assert not np.array_equal(result.array, hu)
    volume = CTImage(np.stack([hu, hu + 20, hu - 20]), (spacing[0], spacing[1], 2.0))
    with pytest.warns(RuntimeWarning):
        out = denoise(denoiser, volume, device="cpu", batch_size=2, tile_size=100,
                      progress=lambda done, total: calls.append((done, total)))
    assert out.array.shape == volume.array.shape and calls[1:] == [(2, 3), (3, 3)]
    np.testing.assert_allclose(out.array[0], result.array, atol=0.05)  # tiled (100 px) vs whole slice


def test_denoise_rejects_bad_inputs(runs):
    denoiser = load_denoiser(runs["redcnn"] / "model")
    image = np.full((64, 64), -1000.0, dtype=np.float32)
    image[20:40, 20:40] = 40.0
    bad = image.copy()
    bad[3, 3] = np.nan
    spacing = (5.6, 5.6)  # the training data's pixels
    with pytest.raises(CTInputError, match="NaN or infinite"):
        denoise(denoiser, CTImage(bad, spacing), device="cpu")
    with pytest.raises(CTInputError, match="look normalised"):
        denoise(denoiser, CTImage(image / 1000.0, spacing), device="cpu")
    with pytest.raises(ValueError, match="smaller than the denoiser's receptive field"):
        denoise(denoiser, CTImage(image[:30, :30], spacing), device="cpu")
    with pytest.raises(TypeError, match="CTImage"):
        denoise(denoiser, image, device="cpu")


def test_image_quality_in_hu():
    ref = np.zeros((2, 32, 32), np.float32)
    pred = ref + 10.0
    q = image_quality(pred, ref)
    assert q["rmse_hu"] == pytest.approx(10.0, rel=1e-5)
    assert q["psnr_db"] == pytest.approx(20 * np.log10(2924.0 / 10.0), rel=1e-5)
    assert image_quality(ref, ref)["ssim"] == pytest.approx(1.0)
    assert image_quality(ref - 3000, ref - 1024)["rmse_hu"] == 0.0  # clipped to -1024 HU


# ----------------------------------------------------------------------------- CLI


def test_cli_denoise_writes_the_denoised_volume(runs, tmp_path, capsys):
    model = runs["cnn10"] / "model"
    hu, spacing = dicom_hu(pydicom_test_file("CT_small.dcm"))
    volume = CTImage(np.stack([hu, hu[::-1]]), (spacing[0], spacing[1], 3.0), origin=(-10.0, 5.0, 30.0))
    source = write_nrrd(volume, tmp_path / "ld.nrrd")
    out = tmp_path / "out.nrrd"
    with pytest.warns(RuntimeWarning):
        assert main(["denoise", "--model", str(model), "--input", source, "--output", str(out), "--device", "cpu",
                     "--no-progress"]) == 0
        expected = denoise(load_denoiser(model), volume, device="cpu")
    written = read_image(out)
    np.testing.assert_allclose(written.array, expected.array, atol=1e-4)
    np.testing.assert_allclose(written.spacing + written.origin, volume.spacing + volume.origin, rtol=1e-6)
    with pytest.warns(RuntimeWarning):  # as CT is stored: int16 HU, rounded
        assert main(["denoise", "--model", str(model), "--input", source, "--output", str(tmp_path / "int.nrrd"),
                     "--device", "cpu", "--dtype", "int16", "--no-progress"]) == 0
    import SimpleITK as sitk

    stored = sitk.ReadImage(str(tmp_path / "int.nrrd"))
    assert stored.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), np.rint(expected.array))
    capsys.readouterr()
    assert main(["denoise", "--model", str(model), "--input", source, "--output", str(tmp_path / "x.png")]) == 2
    assert main(["denoise", "--model", str(tmp_path), "--input", source, "--output", str(tmp_path / "new.nrrd")]) == 2
    before = out.read_bytes()
    assert main(["denoise", "--model", str(model), "--input", source, "--output", str(out)]) == 2
    assert main(["denoise", "--model", str(model), "--input", source, "--output", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and "must be a .nrrd file" in errors[0] and "not a denoiser model folder" in errors[1]
    assert "output already exists (it is not replaced). Write the denoised CT to a new file" in errors[2]
    assert "must be a .nrrd file" in errors[3] and out.read_bytes() == before


def test_cli_denoise_streams_the_json_progress_protocol(runs, tmp_path, capsys):
    model = runs["cnn10"] / "model"
    volume = CTImage(np.random.default_rng(1).normal(40.0, 10.0, (3, 40, 40)).astype(np.float32), (0.7, 0.7, 2.0))
    source, out = write_nrrd(volume, tmp_path / "ld.nrrd"), tmp_path / "out.nrrd"
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="0.70 mm pixels but cnn10 was trained on 5.60 mm"):  # a tiny run's data
        assert main(["denoise", "--model", str(model), "--input", source, "--output", str(out), "--device", "cpu",
                     "--batch-size", "2", "--progress", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in lines] == ["stage", "progress", "progress", "done"]
    assert lines[0]["stage"] == "denoising" and lines[0]["total"] == 3
    assert [(e["done"], e["fraction"]) for e in lines[1:3]] == [(2, 0.6667), (3, 1.0)]
    assert lines[-1]["outputs"] == {"denoised": str(out)} and out.is_file()
    assert main(["denoise", "--model", str(tmp_path), "--input", source, "--output", str(tmp_path / "new.nrrd"),
                 "--progress", "json"]) == 2
    (error,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert error["event"] == "error" and error["kind"] == "input" and "not a denoiser model folder" in error["message"]


def test_cli_trains_a_denoiser_and_refuses_to_overwrite_a_run(pairs, tmp_path, capsys):
    args = ["train", "denoiser", "--arch", "cnn10", "--data", str(pairs), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "2", "--patch-size", "32", "--device", "cpu",
            "--val-slices", "1", "--weights-dtype", "float16", "--no-progress"]
    assert main(args) == 0
    assert "best epoch 1 of 1" in capsys.readouterr().out
    metadata = load_denoiser(tmp_path / "run" / "model").metadata
    assert metadata["weights"]["denoiser"]["dtype"] == "float16"
    from InvarianceExplorerLib.noise import NoiseTexture  # the training noise, for the analysis of refined samples

    assert "low- minus full-dose" in metadata["noise_texture"]["measured_on"]
    assert 0 < NoiseTexture.from_dict(metadata["noise_texture"]).gaussian_fraction(1.0) < 1
    assert main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "run" / "model")
    assert main(args + ["--resume"]) == 0  # nothing left to train: exports again
    assert (tmp_path / "run" / "model" / "metadata.json").is_file()


def test_learning_rate_schedule():
    from InvarianceExplorerLib.train_denoiser import learning_rate

    assert [learning_rate({"lr": 1e-3}, e) for e in (1, 9)] == [1e-3, 1e-3]
    hp = {"lr": 1e-3, "lr_decay": 0.5, "lr_decay_start": 3}
    assert [learning_rate(hp, e) for e in (1, 2, 3, 4)] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])


def test_spacing_warning_looks_at_both_pixel_sides():
    """CNN-10 was trained on 0.7 mm square pixels: 0.6 x 1.3 mm ones are far off along y."""
    import warnings

    from InvarianceExplorerLib.inference import warn_on_spacing

    denoiser = load_denoiser("cnn10")
    with pytest.warns(RuntimeWarning, match="0.60 x 1.30 mm pixels but cnn10 was trained on 0.70 mm"):
        warn_on_spacing(denoiser, CTImage(np.zeros((8, 8), np.float32), (0.6, 1.3, 1.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_on_spacing(denoiser, CTImage(np.zeros((8, 8), np.float32), (0.75, 0.65, 1.0)))


def test_bad_settings_are_refused_before_any_folder_is_made(pairs, tmp_path):
    """Values of the wrong kind or range (a traceback or a silently diverging run before), and
    patches larger than the slices (a traceback and a checkpoint that blocked the rerun) or
    too small for a network."""

    for changes, said in ((dict(lr=None, hyperparameters={"lr": "abc"}), "lr='abc': must be a number"),
                          (dict(lr=float("inf")), "lr=inf: must be a finite number > 0"),
                          (dict(hyperparameters={"lr_decay": -0.5}), "must be a factor in (0, 1]"),
                          (dict(hyperparameters={"betas": 0.5}), "betas=0.5: must be a list"),
                          (dict(hyperparameters={"betas": [0.5, 1.5]}), "betas=[0.5, 1.5]: must be two numbers in [0, 1)"),
                          (dict(patch_size=1000), "patch size 1000 (--patch-size) is larger than the slices")):
        with pytest.raises(ValueError, match=re.escape(said)):
            train("cnn10", pairs, tmp_path / "run", epochs=1, **changes)
        assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=re.escape("patch size 7 (--patch-size) is less than half redcnn's receptive "
                                                   "field (41 pixels): each output pixel would see more padding than "
                                                   "CT; choose 64 or more")):  # a traceback before
        train("redcnn", pairs, tmp_path / "run", epochs=1, patch_size=7)
    with pytest.raises(ValueError, match=re.escape("less than half cnn10's receptive field (15 pixels)")):
        train("cnn10", pairs, tmp_path / "run", epochs=1, patch_size=1)  # trained on 1 pixel before
    with pytest.raises(ValueError, match=r"patch size 30 \(--patch-size\) is too small for dugan's image "
                                         r"discriminator \(Calculated padded input size .*\); choose a larger patch, "
                                         r"e.g. 64"):  # a traceback before
        train("dugan", pairs, tmp_path / "run", epochs=1, patch_size=30, hyperparameters={"disc_levels": 6})
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_and_exports_nothing(pairs, tmp_path):
    """NaN losses (a learning rate far too high) stop the run with the epoch named; before,
    it went on and exported NaN weights with exit status 0."""
    from InvarianceExplorerLib.training import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"cnn10 denoiser training diverged in epoch 1: training mse is nan; "
                                               r"nothing was exported \(no epoch finished\)"):
        train("cnn10", pairs, tmp_path / "run", epochs=2, lr=1e6)
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "history.json").exists()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 0


def test_a_run_does_not_mix_its_files_into_another_folder(pairs, tmp_path):
    """A data set's or model folder's place is refused as a run folder (checkpoints, history
    and a model/ were added to it)."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds files a training run does not write \(manifest.json\)"):
        train("cnn10", pairs, taken, epochs=1)
    assert sorted(p.name for p in taken.iterdir()) == ["manifest.json"]
    held = tmp_path / "held"  # a model folder in the run's place (its export would have replaced it)
    shutil.copytree(bundled_models_dir() / "cnn10", held / "model")
    with pytest.raises(ValueError, match=r"holds a model folder but no training run"):
        train("cnn10", pairs, held, epochs=1)
    assert sorted(p.name for p in held.iterdir()) == ["model"]
