"""Training the invariance models (cVAE, then cINN) of a frozen denoiser, and their fidelity figures.

Tiny, seeded settings throughout: 8 simulated 64-pixel slices made here, 32-pixel patches,
z of 16 numbers, narrow critic and flow, a few steps per epoch, a CNN-10 with random weights
as the frozen denoiser f. Checked: losses fall, a resumed run ends bit-identical to an
uninterrupted one, the export loads and samples, two processes under DistributedDataParallel
(gloo) end with identical weights, the CLI, and the fidelity figures on cases with a known answer.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
import torch.nn as nn

from InvarianceExplorerLib.cli import main
from InvarianceExplorerLib.denoisers import Denoiser, build_denoiser, read_metadata, save_denoiser
from InvarianceExplorerLib.fidelity import (_pairwise_mean_abs, another_realisation, held_out_patches,
                                            invariance_fidelity, noise_power_spectrum, noise_texture,
                                            periodicity, stripe_figures, stripe_shares)
from InvarianceExplorerLib.invariance_flow import InvarianceFlow
from InvarianceExplorerLib.invariance_losses import (local_mean_loss, noise_spectrum_loss, sample_texture_loss,
                                                     spread_loss)
from InvarianceExplorerLib.normalization import PAPER_NORMALIZATION
from InvarianceExplorerLib.representation import Representation
from InvarianceExplorerLib.sampler import (CHECKED_REFINEMENT, InvarianceModels, InvarianceSampler,
                                           has_invariance_models, load_invariance_models, load_representation)
from InvarianceExplorerLib.simulated_dataset import SimulatedDataset, build_simulated_dataset
from InvarianceExplorerLib.train_invariance import (HYPERPARAMETERS, _CVAEObjective, _weights_digest, train_cinn,
                                                    train_cvae)

CVAE_TINY = dict(z_dim=16, channels=[8, 16, 16, 32], critic_widths=[8, 8, 16, 16, 16, 16], critic_hidden=32,
                 feature_steps=5, adv_start=10)
CINN_TINY = dict(n_flows=4, hidden=32, embedding_dim=8, embedding_channels=[8, 8], init_batches=2)
CVAE_RUN = dict(steps_per_epoch=10, batch_size=4, patch_size=32, lr=3e-3, seed=5, device="cpu", val_patches=4,
                hyperparameters=CVAE_TINY, fidelity_slices=1, weights_dtype="float16", progress=False)
CINN_RUN = dict(steps_per_epoch=6, batch_size=8, lr=2e-3, seed=5, device="cpu", val_patches=4,
                hyperparameters=CINN_TINY, fidelity_slices=1, fidelity_count=4, weights_dtype="float16", progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every run of this module on one thread, the module-scoped reference runs included (they
    are set up before any function-scoped fixture): bit-exact resume compares runs whose
    arithmetic must be identical, and some CPU kernels sum in a thread-count-dependent order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    build_simulated_dataset(out, 8, size=64, seed=3, photons=1e4, progress=False)
    return out


@pytest.fixture(scope="module")
def denoiser_folder(tmp_path_factory):
    """A CNN-10 with seeded random weights as the frozen denoiser f."""
    torch.manual_seed(0)
    return save_denoiser(tmp_path_factory.mktemp("cnn10"), build_denoiser("cnn10"), "cnn10", {}, PAPER_NORMALIZATION,
                         {"patch_size": 32})


@pytest.fixture(scope="module")
def cvae_run(pairs, denoiser_folder, tmp_path_factory):
    """The cVAE trained for 3 epochs at once: its run folder."""
    out = tmp_path_factory.mktemp("cvae") / "run"
    train_cvae(denoiser_folder, pairs, out, epochs=3, **CVAE_RUN)
    return out


@pytest.fixture(scope="module")
def cinn_run(pairs, cvae_run, tmp_path_factory):
    """The cINN trained for 3 epochs on the codes of that cVAE: its run folder."""
    out = tmp_path_factory.mktemp("cinn") / "run"
    train_cinn(cvae_run / "model", pairs, out, epochs=3, **CINN_RUN)
    return out


def _history(run):
    return json.loads((run / "history.json").read_text())


def _checkpoint(run):
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def _same_networks(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for key, tensor in a[name].items():
            assert torch.equal(tensor, b[name][key]), f"{name}.{key} differs"


# ----------------------------------------------------------------------------- the representation


def test_cvae_training_lowers_the_losses_and_validates_every_epoch(cvae_run):
    history = _history(cvae_run)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["val"]["l1"] < history[0]["val"]["l1"]
    assert history[-1]["val"]["mae_hu"] < history[0]["val"]["mae_hu"]
    assert history[-1]["train"]["perceptual"] < history[0]["train"]["perceptual"]
    assert history[0]["train"]["adv_weight"] == 0 < history[1]["train"]["adv_weight"]  # adversarial after 10 steps
    for h in history:
        assert {"l1", "kl", "perceptual", "consistency", "adv", "critic", "gp"} <= set(h["train"])
        assert {"l1", "mae_hu", "kl", "output_error_hu"} <= set(h["val"])
        assert (cvae_run / "validation" / f"cvae_epoch_{h['epoch']:03d}.png").is_file()


def test_consistency_term_is_l1_through_the_frozen_denoiser(denoiser_folder):
    """``lam_cons`` adds L1(f(D(z, f(x))), f(x)) with f frozen: its gradient reaches the
    decoder, never f; with ``lam_cons`` 0 f is not even loaded."""
    hp = {**HYPERPARAMETERS["cvae"], "z_dim": 16, "channels": (8, 16, 16, 32), "lam_perc": 0.0, "adv_start": 100,
          "lam_cons": 1.0, "z_modulation": True}
    torch.manual_seed(0)
    objective = _CVAEObjective(hp, 32, denoiser_folder)
    objective.wrapped = dict(objective.networks)  # alone: no DistributedDataParallel wrappers
    f = objective.networks["denoiser"]
    assert not any(p.requires_grad for p in f.parameters())
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        y = f(x)
    rep = objective.networks["representation"]
    before = {k: v.clone() for k, v in f.state_dict().items()}
    with torch.no_grad():
        expected = (f(rep(x, y, noise=torch.zeros(4, 16)).reconstruction) - y).abs().mean().item()
    # the step draws its own z; with the posterior at its start the draw moves little
    losses = objective.step(x, y, 1, torch.Generator().manual_seed(2))
    assert losses["consistency"] == pytest.approx(expected, rel=0.5) and losses["consistency"] > 0
    assert all(torch.equal(v, f.state_dict()[k]) for k, v in before.items())
    assert "denoiser" not in _CVAEObjective({**hp, "lam_cons": 0.0}, 32, denoiser_folder).networks
    # past adv_start the adaptive adversarial weight is on, and max_adv_weight caps it
    assert 0 < objective.step(x, y, 101, torch.Generator().manual_seed(3))["adv_weight"]
    objective.hp = {**hp, "max_adv_weight": 1e-6}
    assert 0 < objective.step(x, y, 102, torch.Generator().manual_seed(4))["adv_weight"] <= 1e-6
    # ... and adv_min_separation keeps it off while the critic does not separate real from reconstructed
    objective.hp = {**hp, "adv_min_separation": 1e6}
    assert objective.step(x, y, 103, torch.Generator().manual_seed(5))["adv_weight"] == 0


def test_consistency_on_a_crop_compares_f_of_the_same_square_of_r_and_x(denoiser_folder):
    """``cons_crop`` > 0: f(r) against f(x) on one random square per step, f re-applied to the
    crop of x (it sees the crop's borders, as on r's); 0 is the whole patch, y itself."""
    hp = {**HYPERPARAMETERS["cvae"], "z_dim": 16, "channels": (8, 16, 16, 32), "lam_perc": 0.0, "adv_start": 100,
          "lam_cons": 1.0, "cons_crop": 16, "z_modulation": True}
    torch.manual_seed(0)
    objective = _CVAEObjective(hp, 32, denoiser_folder)
    objective.wrapped = dict(objective.networks)
    f = objective.networks["denoiser"]
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        y = f(x)
    corners = set()
    for seed in range(6):
        region, target = objective.consistency_target(x, y, torch.Generator().manual_seed(seed))
        assert x[region].shape == (4, 1, 16, 16)
        torch.testing.assert_close(target, f(x[region]))
        corners.add((region[1].start, region[2].start))
    assert len(corners) > 1  # a new square each step
    assert objective.step(x, y, 1, torch.Generator().manual_seed(2))["consistency"] > 0
    objective.hp = {**hp, "cons_crop": 0}
    region, target = objective.consistency_target(x, y, torch.Generator().manual_seed(0))
    assert target is y and torch.equal(x[region], x)
    with pytest.raises(ValueError, match="cons_crop"):
        _CVAEObjective({**hp, "cons_crop": 33}, 32, denoiser_folder)


def test_noise_spectrum_term_asks_for_the_noise_f_removes(denoiser_folder):
    """S compares the radial noise power spectra of r - f(x) and x - f(x) ring by ring, in
    log units: zero for r = x, log 4 for twice the removed noise, and its gradient raises a
    reconstruction that keeps too little noise. ``lam_nps`` adds it to the cVAE step."""
    rng = torch.Generator().manual_seed(0)
    y = torch.nn.functional.avg_pool2d(torch.randn(4, 1, 32, 32, generator=rng), 3, 1, 1)  # smooth "f(x)"
    x = y + 0.2 * torch.randn(4, 1, 32, 32, generator=rng)
    assert noise_spectrum_loss(x, x, y).item() == pytest.approx(0.0, abs=1e-6)
    assert noise_spectrum_loss(y + 2 * (x - y), x, y).item() == pytest.approx(np.log(4.0), rel=1e-4)
    a = torch.tensor(0.5, requires_grad=True)  # r keeps half the removed noise
    noise_spectrum_loss(y + a * (x - y), x, y).backward()
    assert a.grad < 0  # descending S restores it
    assert noise_spectrum_loss(y + 1e-3 * (x - y), x, y) > noise_spectrum_loss(y + 0.5 * (x - y), x, y)
    # a ring average cannot see direction; split by direction, stripes are charged
    stripes = y + torch.fft.ifft2(torch.fft.fft2(x - y) * (torch.fft.fftfreq(32).abs()[None, :] >
                                                        torch.fft.fftfreq(32).abs()[:, None])).real * 2 ** 0.5
    assert noise_spectrum_loss(stripes, x, y, sectors=2) > 3 * noise_spectrum_loss(stripes, x, y)
    assert noise_spectrum_loss(x, x, y, sectors=2).item() == pytest.approx(0.0, abs=1e-6)
    hp = {**HYPERPARAMETERS["cvae"], "z_dim": 16, "channels": (8, 16, 16, 32), "lam_perc": 0.0, "adv_start": 100}
    with pytest.raises(ValueError, match="nps_sectors must be 1 .* got 4"):
        _CVAEObjective({**hp, "lam_nps": 0.01, "nps_sectors": 4}, 32, denoiser_folder)
    torch.manual_seed(0)
    for lam_nps in (0.0, 0.01):
        objective = _CVAEObjective({**hp, "lam_nps": lam_nps}, 32, denoiser_folder)
        objective.wrapped = dict(objective.networks)
        losses = objective.step(0.1 * x, 0.1 * y, 1, torch.Generator().manual_seed(2))
        assert (losses["spectrum"] > 0) == (lam_nps > 0)


def test_local_mean_term_sees_what_pixel_l1_misses(denoiser_folder):
    """M compares the means of r and x over blocks: blind to noise that averages out within
    each block, equal to a shift of a region's mean, and its gradient removes the shift that
    the pixel L1 hardly sees under noise. ``lam_local_mean`` adds it to the cVAE step."""
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32, generator=rng)
    checker = torch.ones(32, 32)
    checker[::2] *= -1  # zero mean over every 8 x 8 block
    assert local_mean_loss(x + 0.5 * checker, x, 8).item() == pytest.approx(0.0, abs=1e-6)
    shift = torch.zeros(1, 1, 32, 32)
    shift[..., :16, :16] = 0.05  # one quadrant's mean raised by 0.05 (1/20 of the noise std)
    assert local_mean_loss(x + shift, x, 8).item() == pytest.approx(0.05 / 4, rel=1e-5)
    a = torch.tensor(1.0, requires_grad=True)
    local_mean_loss(x + a * shift, x, 8).backward()
    m_grad = a.grad.item()
    a.grad = None
    noisy = x + torch.randn(4, 1, 32, 32, generator=rng)  # the reconstruction's own noise
    torch.nn.functional.l1_loss(noisy + a * shift, x).backward()
    assert m_grad > 0 and abs(a.grad.item()) < 0.2 * m_grad  # L1 barely sees the shift under noise
    hp = {**HYPERPARAMETERS["cvae"], "z_dim": 16, "channels": (8, 16, 16, 32), "lam_perc": 0.0, "adv_start": 100}
    with pytest.raises(ValueError, match="local_mean_pixels must divide the patch size 32"):
        _CVAEObjective({**hp, "lam_local_mean": 1.0, "local_mean_pixels": 12}, 32, denoiser_folder)
    torch.manual_seed(0)
    for lam in (0.0, 1.0):
        objective = _CVAEObjective({**hp, "lam_local_mean": lam, "local_mean_pixels": 8}, 32, denoiser_folder)
        objective.wrapped = dict(objective.networks)
        losses = objective.step(0.1 * x, 0.1 * x, 1, torch.Generator().manual_seed(2))
        assert (losses["local_mean"] > 0) == (lam > 0)


def test_sample_texture_term_asks_samples_to_differ_like_noise(denoiser_folder):
    """T compares the texture and direction (not the level) of the difference between two
    decodes of one f(x) with the noise f removes: zero for a scaled copy of that noise, large
    for stripes; ``lam_sample_texture`` adds it to the cVAE step, whose representation then
    decodes every f(x) with a second code too."""
    rng = torch.Generator().manual_seed(0)
    y = torch.zeros(8, 1, 32, 32)
    noise = torch.randn(8, 1, 32, 32, generator=rng)
    x = y + noise
    r = y + 0.5 * torch.randn(8, 1, 32, 32, generator=rng)
    other_noise = torch.randn(8, 1, 32, 32, generator=rng)
    assert sample_texture_loss(r + 0.1 * noise, r, x, y).item() == pytest.approx(0.0, abs=1e-5)  # level-free
    like_noise = sample_texture_loss(r + 0.1 * other_noise, r, x, y).item()
    stripes = torch.randn(8, 1, 1, 32, generator=rng).expand(8, 1, 32, 32) + 0.05 * other_noise
    assert like_noise < 0.3 < 1.0 < sample_texture_loss(r + 0.1 * stripes, r, x, y).item()
    grid = torch.zeros(8, 1, 32, 32)  # lines along both axes: no direction, yet nothing like noise
    grid[..., ::4, :] += torch.randn(8, 1, 8, 1, generator=rng)
    grid[..., :, ::4] += torch.randn(8, 1, 1, 8, generator=rng)
    assert sample_texture_loss(r + 0.1 * (grid + 0.05 * other_noise), r, x, y).item() > 3 * like_noise
    a = torch.tensor(0.5, requires_grad=True)  # a mix of noise and stripes: the gradient removes the stripes
    sample_texture_loss(r + 0.1 * ((1 - a) * other_noise + a * stripes), r, x, y).backward()
    assert a.grad.item() > 0
    hp = {**HYPERPARAMETERS["cvae"], "z_dim": 16, "channels": (8, 16, 16, 32), "lam_perc": 0.0, "adv_start": 100}
    torch.manual_seed(0)
    for lam in (0.0, 1.0):
        objective = _CVAEObjective({**hp, "lam_sample_texture": lam}, 32, denoiser_folder)
        objective.wrapped = dict(objective.networks)
        rep = objective.networks["representation"]
        out = rep(0.1 * x[:4], 0.1 * x[:4], noise=torch.zeros(4, 16), swapped=True)
        codes = out.z.roll(1, dims=0)
        assert torch.allclose(out.swapped, rep.decode(codes, 0.1 * x[:4]), atol=1e-6)
        losses = objective.step(0.1 * x[:4], 0.1 * x[:4], 1, torch.Generator().manual_seed(2))
        assert (losses["sample_texture"] > 0) == (lam > 0)


def test_sample_terms_ask_decodes_of_one_output_to_differ_where_f_does_not_look(denoiser_folder):
    """P is zero once two decodes of one f(x) differ as much as the reconstruction differs
    from x, positive (and pushing them apart) below that; ``lam_swap_cons`` and ``lam_spread``
    add the swapped consistency and P to the cVAE step, and P's step also lets the critic
    judge the swapped decodes."""
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32, generator=rng)
    r = x + 0.2 * torch.randn(4, 1, 32, 32, generator=rng)
    error = (x - r).abs().mean()
    apart = torch.randn(4, 1, 32, 32, generator=rng)
    apart = apart / apart.abs().mean()
    assert spread_loss(r + 2 * error * apart, r, x).item() == 0.0
    assert spread_loss(r + 0.25 * error * apart, r, x).item() == pytest.approx(0.75 * error.item(), rel=1e-4)
    a = torch.tensor(0.25, requires_grad=True)
    spread_loss(r + a * error * apart, r, x).backward()
    assert a.grad.item() < 0  # descending the term moves the decodes apart
    hp = {**HYPERPARAMETERS["cvae"], "z_dim": 16, "channels": (8, 16, 16, 32), "lam_perc": 0.0, "adv_start": 100}
    torch.manual_seed(0)
    for name, lam in (("lam_swap_cons", 1.0), ("lam_spread", 1.0), ("lam_spread", 0.0)):
        objective = _CVAEObjective({**hp, name: lam}, 32, denoiser_folder)
        assert ("denoiser" in objective.networks) == (name == "lam_swap_cons")
        objective.wrapped = dict(objective.networks)
        judged = []
        hook = objective.networks["critic"].register_forward_hook(lambda m, i, o: judged.append(o.shape[0]))
        losses = objective.step(0.1 * x, 0.1 * x, 1, torch.Generator().manual_seed(2))
        hook.remove()
        assert (losses["swap_consistency"] > 0) == (name == "lam_swap_cons")
        # P itself is checked above; whether it is positive here depends on the random start (0
        # where two decodes already differ by more than the reconstruction error), so only its use
        assert (losses["spread"] >= 0) and (name == "lam_spread" and lam > 0 or losses["spread"] == 0)
        assert judged[-1] == (8 if name == "lam_spread" and lam > 0 else 4)  # the adversarial term's batch
    rep = objective.networks["representation"]  # the second code: another draw of the patch's own posterior
    second = torch.randn(4, 16, generator=rng)
    out = rep(0.1 * x, 0.1 * x, noise=torch.zeros(4, 16), second_noise=second)
    assert torch.allclose(out.swapped, rep.decode(out.mean + torch.exp(0.5 * out.logvar) * second, 0.1 * x), atol=1e-6)
    objective = _CVAEObjective({**hp, "lam_spread": 1.0, "second_code": "posterior"}, 32, denoiser_folder)
    objective.wrapped = dict(objective.networks)
    assert objective.step(0.1 * x, 0.1 * x, 1, torch.Generator().manual_seed(2))["spread"] > 0
    with pytest.raises(ValueError, match="second_code must be 'other'"):
        _CVAEObjective({**hp, "second_code": "mine"}, 32, denoiser_folder)


def test_cvae_resumes_exactly(pairs, denoiser_folder, cvae_run, tmp_path):
    out = tmp_path / "run"
    train_cvae(denoiser_folder, pairs, out, epochs=1, **CVAE_RUN)
    with pytest.raises(ValueError, match="already holds a training run"):
        train_cvae(denoiser_folder, pairs, out, epochs=3, **CVAE_RUN)
    with pytest.raises(ValueError, match="other settings"):
        train_cvae(denoiser_folder, pairs, out, epochs=3, resume=True, **{**CVAE_RUN, "batch_size": 2})
    train_cvae(denoiser_folder, pairs, out, epochs=3, resume=True, **CVAE_RUN)
    resumed, straight = _checkpoint(out), _checkpoint(cvae_run)
    _same_networks(resumed["networks"], straight["networks"])
    assert [h["train"] for h in resumed["history"]] == [h["train"] for h in straight["history"]]


def test_cvae_export_is_the_denoiser_folder_plus_the_representation(cvae_run, denoiser_folder):
    model = cvae_run / "model"
    metadata = read_metadata(model)
    assert metadata["weights"]["denoiser"] == read_metadata(denoiser_folder)["weights"]["denoiser"]
    assert "cvae" in metadata["weights"] and "cinn" not in metadata["weights"]
    assert not has_invariance_models(model)  # the flow is still missing
    info = metadata["invariance"]
    record = info["training"]["cvae"]
    best = min(_history(cvae_run), key=lambda h: h["val"]["l1"])
    assert record["best_epoch"] == best["epoch"] and record["steps"] == 30 and record["world_size"] == 1
    assert record["parameters"] > 0 and record["file_mb"] > 0 and record["machine"]["device"] == "cpu"
    assert record["feature_network"]["steps"] == 5  # trained here: CNN-10 folders have none
    assert set(info["completeness"]) >= {"output_error_hu", "reconstruction_error_hu", "nps_correlation",
                                        "noise_std_ratio"}
    denoiser, representation = load_representation(model)
    assert representation.patch_size == 32 and representation.z_dim == 16
    card = (model / "MODEL_CARD.md").read_text()
    assert "## Invariance models" in card and "Completeness of the cVAE" in card


# ----------------------------------------------------------------------------- the invariance flow


def test_cinn_training_lowers_the_likelihood_loss(cinn_run):
    history = _history(cinn_run)
    assert history[-1]["train"]["nll"] < history[0]["train"]["nll"]
    assert history[-1]["val"]["nll_per_dim"] < history[0]["val"]["nll_per_dim"]
    assert all({"nll_per_dim", "v_mean", "v_std"} <= set(h["val"]) for h in history)


def test_cinn_resumes_exactly(pairs, cvae_run, cinn_run, tmp_path):
    out = tmp_path / "run"
    train_cinn(cvae_run / "model", pairs, out, epochs=2, **{**CINN_RUN, "fidelity_slices": 0})
    train_cinn(cvae_run / "model", pairs, out, epochs=3, resume=True, **{**CINN_RUN, "fidelity_slices": 0})
    _same_networks(_checkpoint(out)["networks"], _checkpoint(cinn_run)["networks"])


def test_a_diverging_cinn_stops_keeping_the_last_finite_epoch(pairs, cvae_run, tmp_path):
    """The cINN's likelihood loss turns NaN or infinite at a huge learning rate: the run stops
    in that epoch, its checkpoint keeps the epoch before and no model folder is written."""
    import re

    from InvarianceExplorerLib.training import TrainingDiverged, stop_if_diverged

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as stop:
        train_cinn(cvae_run / "model", pairs, out, epochs=4, **{**CINN_RUN, "lr": 1e8, "fidelity_slices": 0})
    said = re.match(r"the cinn training diverged in epoch (\d): (training|validation) \w+ is (nan|inf|-inf); "
                    r"nothing was exported \(([^)]*)\)", str(stop.value))
    assert said, stop.value
    epoch = int(said.group(1))
    assert said.group(4) == (f"{out / 'checkpoints' / 'last.pt'} keeps epoch {epoch - 1}" if epoch > 1
                             else "no epoch finished")
    assert _checkpoint(out)["epoch"] == epoch - 1 and not (out / "model").exists()
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch 3: validation nll is inf; nothing was exported "
                                               r"\(.*last.pt keeps epoch 2\)"):
        stop_if_diverged("cinn", 3, {"nll": 1.5}, {"nll": float("inf"), "note": "text"},
                         out / "checkpoints" / "last.pt")


def test_a_patch_pool_trains_and_resumes_exactly(pairs, denoiser_folder, cvae_run, tmp_path):
    """--pool: f(x) and the encoder's posterior computed once for a fixed pool of patches."""
    run = dict(CINN_RUN, fidelity_slices=0, pool_patches=20)
    train_cinn(cvae_run / "model", pairs, tmp_path / "straight", epochs=2, **run)
    train_cinn(cvae_run / "model", pairs, tmp_path / "resumed", epochs=1, **run)
    train_cinn(cvae_run / "model", pairs, tmp_path / "resumed", epochs=2, resume=True, **run)
    _same_networks(_checkpoint(tmp_path / "resumed")["networks"], _checkpoint(tmp_path / "straight")["networks"])
    history = _history(tmp_path / "straight")
    assert history[-1]["train"]["nll"] < history[0]["train"]["nll"]
    assert read_metadata(tmp_path / "straight" / "model")["invariance"]["training"]["cinn"]["pool_patches"] == 20
    with pytest.raises(ValueError, match="other settings"):
        train_cinn(cvae_run / "model", pairs, tmp_path / "resumed", epochs=3, resume=True, **CINN_RUN)
    train_cvae(denoiser_folder, pairs, tmp_path / "cvae", epochs=1,
               **dict(CVAE_RUN, pool_patches=8, steps_per_epoch=2, fidelity_slices=0))
    assert _history(tmp_path / "cvae")[0]["train"]["l1"] > 0


def test_cinn_export_loads_samples_and_reports_fidelity(cinn_run, cvae_run, pairs):
    model = cinn_run / "model"
    assert has_invariance_models(model)
    info = read_metadata(model)["invariance"]
    assert set(info["training"]) == {"cvae", "cinn"}
    assert info["training"]["cvae"] == read_metadata(cvae_run / "model")["invariance"]["training"]["cvae"]
    assert info["training"]["cinn"]["act_norm"]["act_norm_initialised_on"] == 16
    fidelity = info["fidelity"]
    for key in ("consistency", "consistency_noise", "noise_baseline"):
        assert np.isfinite(fidelity[key]) and fidelity[key] >= 0
    assert fidelity["diversity"]["pairwise_hu"] > 0 and fidelity["bars"]["diversity_hu"]["met"]
    assert fidelity["flow"]["patches"] == 2 and fidelity["measured_on"]["split"] == "test"
    # measured with the consistency refinement written into the folder, the figures without it beside
    assert info["refinement"] == {"centre": 0, "sample": 0} == fidelity["refinement"]  # the default: none
    refined = fidelity["alternative"]
    assert refined["refinement"] == CHECKED_REFINEMENT.as_dict()
    assert refined["output_change_hu"] < fidelity["output_change_hu"] and refined["change_hu"] > 0
    card = (model / "MODEL_CARD.md").read_text()
    assert "Fidelity figures (held-out)" in card and "noise baseline B" in card and "(fidelity.png)" in card
    assert "cpu; no consistency refinement)" in card
    assert f"the same samples with the consistency refinement ({CHECKED_REFINEMENT.centre} steps" in card
    assert (model / "fidelity.png").is_file()
    models = load_invariance_models(model)
    # the card describes the weights as stored (float16 here), not the trained float32 ones
    assert read_metadata(model)["weights"]["cinn"]["dtype"] == "float16"
    again = invariance_fidelity(models, pairs, "test", slices=1, count=4)
    assert (again["consistency"], again["diversity"], again["flow"], again["completeness"]) == \
        (fidelity["consistency"], fidelity["diversity"], fidelity["flow"], fidelity["completeness"])
    x = SimulatedDataset(pairs)[0].low_dose[16:48, 16:48]
    result = InvarianceSampler(models, device="cpu").sample(x, count=3, seed=1, batch_size=2)
    assert result.invariances.shape == (3, 32, 32) and np.isfinite(result.invariances).all()


# ----------------------------------------------------------------------------- torch.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, pairs, denoiser_folder, out) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run = dict(CVAE_RUN, steps_per_epoch=2, fidelity_slices=0,
                   hyperparameters=dict(CVAE_TINY, adv_start=0))  # the adaptive adversarial weight from step 1
        model = train_cvae(denoiser_folder, pairs, out / "cvae", epochs=1, **run)
        train_cinn(model, pairs, out / "cinn", epochs=1, **dict(CINN_RUN, steps_per_epoch=2, fidelity_slices=0))
    finally:
        dist.destroy_process_group()


def test_two_processes_end_with_identical_weights(pairs, denoiser_folder, tmp_path):
    """DistributedDataParallel over gloo with two CPU processes: every process records the
    SHA-256 of its final weights, rank 0 checks them (and would raise) and writes them."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), pairs, denoiser_folder, tmp_path), nprocs=2, join=True)
    assert _history(tmp_path / "cvae")[0]["train"]["adv_weight"] > 0
    for kind, name in (("cvae", "representation"), ("cinn", "flow")):
        record = read_metadata(tmp_path / kind / "model")["invariance"]["training"][kind]
        digests = record["distributed"]["final_weights_sha256"]
        assert record["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
        network = (Representation(32, z_dim=16, channels=(8, 16, 16, 32)) if kind == "cvae"
                   else InvarianceFlow(16, **{k: v for k, v in CINN_TINY.items() if k != "init_batches"}, seed=5))
        network.load_state_dict(_checkpoint(tmp_path / kind)["networks"][name])
        assert _weights_digest(network) == digests[0]


# ----------------------------------------------------------------------------- command line


def test_cli_trains_cvae_then_cinn(pairs, denoiser_folder, tmp_path, capsys):
    common = ["--data", str(pairs), "--epochs", "1", "--steps-per-epoch", "2", "--seed", "1", "--device", "cpu",
              "--val-patches", "2", "--fidelity-slices", "0", "--no-progress"]
    tiny_cvae = [a for k, v in CVAE_TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    tiny_cinn = [a for k, v in CINN_TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["train", "cvae", "--denoiser", str(denoiser_folder), "--out", str(tmp_path / "cvae"),
                 "--batch-size", "2", "--patch-size", "32", *common, *tiny_cvae]) == 0
    assert main(["train", "cinn", "--denoiser", str(tmp_path / "cvae" / "model"), "--out", str(tmp_path / "cinn"),
                 "--batch-size", "4", "--refine", "2,1", *common, *tiny_cinn]) == 0
    printed = capsys.readouterr().out
    assert "train cinn --denoiser" in printed and "invariance models in" in printed
    assert has_invariance_models(tmp_path / "cinn" / "model")
    assert load_invariance_models(tmp_path / "cinn" / "model").refinement.as_dict() == {"centre": 2, "sample": 1}
    capsys.readouterr()
    assert main(["train", "cinn", "--denoiser", str(tmp_path / "cvae" / "model"), "--out", str(tmp_path / "bad3"),
                 "--refine", "2", *common]) == 2  # a malformed refinement: one clear line, nothing trained
    assert "give two whole numbers" in capsys.readouterr().err and not (tmp_path / "bad3").exists()
    assert main(["train", "cvae", "--denoiser", str(denoiser_folder), "--out", str(tmp_path / "bad"),
                 "--patch-size", "32", *common, "--set", "no_such=1"]) == 2
    assert main(["train", "cinn", "--denoiser", str(denoiser_folder), "--out", str(tmp_path / "bad2"),
                 *common]) == 2  # no cVAE in that folder
    capsys.readouterr()  # a feature network a recipe without perceptual term would not use (ignored before)
    assert main(["train", "cvae", "--denoiser", str(denoiser_folder), "--out", str(tmp_path / "bad4"),
                 "--patch-size", "32", "--feature-network", str(denoiser_folder), *common, "--set", "lam_perc=0"]) == 2
    assert "lam_perc is 0: this recipe has no perceptual term to use it" in capsys.readouterr().err
    assert not (tmp_path / "bad4").exists()
    for resume in ([], ["--resume"]):  # the cVAE's run folder given to the cINN: it said to pass --resume
        assert main(["train", "cinn", "--denoiser", str(tmp_path / "cvae" / "model"), "--out", str(tmp_path / "cvae"),
                     *resume, *common, *tiny_cinn]) == 2
        assert "holds a cvae training run, and this is a cinn training" in capsys.readouterr().err


def test_resume_without_a_run_says_a_new_one_starts(tmp_path):
    from InvarianceExplorerLib.training import run_checkpoint

    with pytest.warns(RuntimeWarning, match="holds no training run to resume .*: starting a new one"):
        assert run_checkpoint(tmp_path / "run", True, "cvae") == tmp_path / "run" / "checkpoints" / "last.pt"


# ----------------------------------------------------------------------------- fidelity figures


def test_noise_texture_has_known_answers():
    rng = np.random.default_rng(0)
    white = rng.normal(0, 10, (16, 32, 32))
    nps = noise_power_spectrum(white)
    assert nps.shape == (16,) and np.allclose(nps[1:], 100.0, rtol=0.2)  # white: flat at the variance
    same = noise_texture(white, white)
    assert same["nps_correlation"] == pytest.approx(1.0) and same["noise_std_ratio"] == pytest.approx(1.0)
    doubled = noise_texture(2 * white, white)
    assert doubled["nps_correlation"] == pytest.approx(1.0) and doubled["noise_std_ratio"] == pytest.approx(2.0)
    from scipy.ndimage import uniform_filter

    low = uniform_filter(white, size=(1, 3, 3), mode="wrap")  # low-pass noise: power falls with frequency
    high = white - low  # high-pass noise: power rises with frequency
    other = uniform_filter(rng.normal(0, 10, white.shape), size=(1, 3, 3), mode="wrap")
    assert noise_texture(other, low)["nps_correlation"] > 0.95  # same texture, new realisation
    assert noise_texture(high, low)["nps_correlation"] < -0.5
    assert same["nps_log_error"] == pytest.approx(0.0) and doubled["nps_log_error"] == pytest.approx(0.0)  # shape only
    assert noise_texture(other, low)["nps_log_error"] < 0.3
    blurred = uniform_filter(low, size=(1, 3, 3), mode="wrap")  # the weak high frequencies go: correlation keeps high
    assert noise_texture(blurred, low)["nps_correlation"] > 0.9 and noise_texture(blurred, low)["nps_log_error"] > 1.0
    constant = np.stack([np.full((4, 4), v) for v in (0.0, 1.0, 3.0)])
    assert _pairwise_mean_abs(constant) == pytest.approx(2.0)  # pairs differ by 1, 3, 2


def test_stripe_figures_tell_stripes_and_grids_from_noise():
    rng = np.random.default_rng(0)
    white = rng.normal(0, 10, (16, 32, 32))
    vertical, horizontal = stripe_shares(white)  # each sector holds about a quarter of the frequencies
    assert 0.2 < vertical < 0.3 and 0.2 < horizontal < 0.3
    noise = stripe_figures(white)
    assert noise["ratio"] == pytest.approx(1.0, abs=0.15) and 0.4 < noise["axis_share"] < 0.6
    columns = rng.normal(0, 10, (16, 1, 32)) + rng.normal(0, 1, white.shape)  # varies along rows: vertical stripes
    stripes = stripe_figures(columns)
    assert stripe_shares(columns)[0] > 0.9 and stripes["ratio"] > 20 and stripes["axis_share"] > 0.9
    assert stripe_figures(columns.transpose(0, 2, 1))["ratio"] == pytest.approx(1 / stripes["ratio"])
    grid = np.zeros_like(white)
    grid[:, ::8, :] += rng.normal(0, 10, (16, 4, 1))  # lines along both axes, every 8 pixels
    grid[:, :, ::8] += rng.normal(0, 10, (16, 1, 4))
    lines = stripe_figures(grid + rng.normal(0, 0.5, white.shape))
    assert 0.5 < lines["ratio"] < 2 and lines["axis_share"] > 0.8  # no direction, yet nothing like noise
    assert np.isnan(stripe_figures(np.ones((2, 8, 8)))["ratio"])  # no variation: no direction


def test_periodicity_tells_a_grid_or_a_lattice_from_a_std_that_follows_the_image():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:128, :128]
    anatomy = 1.0 + 0.5 * np.exp(-((y - 70) ** 2 + (x - 50) ** 2) / 400.0) + rng.normal(0, 0.05, (128, 128))
    rim = anatomy.copy()
    rim[:4], rim[-4:], rim[:, :4], rim[:, -4:] = 5.0, 5.0, 5.0, 5.0  # a border rim: left out by the frame
    grid = anatomy + 1.0 * (np.isin(y % 32, (0, 31)) | np.isin(x % 32, (0, 31)))  # block edges of 32 px
    lattice = anatomy + 2.0 * ((y % 8 == 3) & (x % 8 == 5))  # dots 8 px apart
    for period in (8, 16, 32):
        assert periodicity(anatomy, period) < 1.15 and periodicity(rim, period) == periodicity(anatomy, period)
        assert periodicity(lattice, period) > 2.5
    assert periodicity(grid, 32) > 1.6 and periodicity(grid, 16) > 1.4  # a 32 px grid shows, diluted, at 16 px too
    assert np.isnan(periodicity(anatomy[:40, :40], 16)) and np.isnan(periodicity(np.zeros((64, 64)), 8))


def test_fresh_realisation_is_the_same_scan_with_new_noise(pairs):
    source = SimulatedDataset(pairs)
    item = source[0]
    fresh = another_realisation(source, 0, seed=11)
    assert fresh.shape == item.low_dose.shape and not np.array_equal(fresh, item.low_dose)
    inside = item.labels > 0  # the body
    ratio = np.std((fresh - item.full_dose)[inside]) / np.std((item.low_dose - item.full_dose)[inside])
    assert 0.85 < ratio < 1.15
    assert np.abs(fresh - item.full_dose)[inside].mean() < 2 * np.abs(item.low_dose - item.full_dose)[inside].mean()
    assert another_realisation(list(source), 0, 11) is None  # not a simulated data set


def test_consistency_of_an_identity_denoiser_is_one(pairs):
    """f = identity: every change reaches the output, so C = C' = 1, B = mean|x~ - x| / mean|x' - x|
    and the completeness error equals the reconstruction error."""
    torch.manual_seed(0)
    identity = Denoiser(nn.Identity(), PAPER_NORMALIZATION, {"architecture": {"name": "cnn10"}})
    rep = Representation(32, z_dim=16, channels=(8, 16, 16, 32))
    flow = InvarianceFlow(16, n_flows=2, hidden=16, embedding_dim=4, embedding_channels=(4, 4))
    models = InvarianceModels(identity, rep.eval(), flow.eval())
    figures = invariance_fidelity(models, pairs, "test", slices=1, per_slice=2, count=3)
    assert figures["consistency"] == pytest.approx(1.0, abs=1e-5)
    assert figures["consistency_noise"] == pytest.approx(1.0, abs=1e-5)
    assert figures["noise_baseline"] == pytest.approx(figures["change_hu"] / figures["realisation_change_hu"],
                                                      rel=1e-5)
    spread = figures["spread"]  # the samples' variation about their mean reaches f's output whole too
    assert spread["consistency"] == pytest.approx(1.0, abs=1e-5) and 0 < spread["change_hu"] < figures["change_hu"]
    assert spread["output_change_hu"] == pytest.approx(spread["change_hu"], rel=1e-5)
    d = figures["diversity"]
    assert d["relative"] == pytest.approx(d["pairwise_hu"] / d["realisation_hu"], rel=1e-9)
    c = figures["completeness"]
    assert c["output_error_hu"] == pytest.approx(c["reconstruction_error_hu"], rel=1e-4)
    assert figures["bars"]["consistency"]["met"] is False and figures["bars"]["noise_baseline"]["max"] == 1.5
    assert figures["measured_on"]["patches"] == 2 == len(held_out_patches(SimulatedDataset(pairs), "test", 32, 1))
    stripes = figures["stripes"]
    assert stripes["invariances"]["ratio"] > 0 and stripes["noise"]["ratio"] > 0  # two 32² patches: no more
    assert 0 < stripes["invariances"]["axis_share"] <= 1 and 0 < stripes["noise"]["axis_share"] <= 1
    # the identity has no invariances: one refinement step takes every sample to x itself
    assert figures["refinement"] == {"centre": 0, "sample": 0}
    assert figures["alternative"]["change_hu"] < 1e-3 and figures["alternative"]["output_change_hu"] < 1e-3
    refined = invariance_fidelity(InvarianceModels(identity, rep.eval(), flow.eval(), refinement=(0, 1)), pairs,
                                  "test", slices=1, per_slice=2, count=3)
    assert refined["change_hu"] < 1e-3 and refined["output_change_hu"] < 1e-3
    assert refined["alternative"]["refinement"] == {"centre": 0, "sample": 0}
    assert refined["alternative"]["change_hu"] == pytest.approx(figures["change_hu"], rel=1e-4)
    assert refined["alternative"]["consistency"] == pytest.approx(1.0, abs=1e-5)
