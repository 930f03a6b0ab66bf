"""The invariance engine: representation (cVAE), invariance flow (cINN), sampler, patches,
model folders and the ``sample`` command.

Tiny, seeded settings throughout (32-pixel patches, z of 16 numbers, a CNN-10 with random
weights as the denoiser f, a simulated 64-pixel low-dose slice); the default sizes are
checked for shapes, cost (GFLOP per decoded 128x128 patch) and invertibility.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from InvarianceExplorerLib.cli import main
from InvarianceExplorerLib.result_folder import FILES as SAMPLE_OUTPUTS
from InvarianceExplorerLib.result_folder import read_volume
from InvarianceExplorerLib.denoisers import (Denoiser, build_denoiser, read_metadata, resolve_model_folder,
                                             save_denoiser, write_metadata)
from InvarianceExplorerLib.image import CTImage
from InvarianceExplorerLib.inference import apply_network
from InvarianceExplorerLib.invariance_flow import InvarianceFlow, nll_per_dimension
from InvarianceExplorerLib.io import read_image, write_nrrd
from InvarianceExplorerLib.lowdose import LowDoseSimulator
from InvarianceExplorerLib.normalization import PAPER_NORMALIZATION
from InvarianceExplorerLib.phantom import chest_phantom
from InvarianceExplorerLib.representation import (Representation, build_representation, kl_divergence,
                                                   reconstruction_loss, representation_loss)
from InvarianceExplorerLib.sampler import (AIR_HU, BATCH_SIZE, InvarianceModels, InvarianceSampler, Refinement,
                                           crop_patch, has_invariance_models, load_invariance_models,
                                           refine_invariances, run_with_memory_fallback, save_invariance_models)

TINY_REPRESENTATION = dict(patch_size=32, z_dim=16, channels=(8, 16, 16, 32))
TINY_FLOW = dict(z_dim=16, n_flows=4, hidden=32, embedding_dim=8, embedding_channels=(8, 8))
SIZE = 64  # simulated slice, pixels


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb_couplings(flow: InvarianceFlow, scale: float, seed: int = 0) -> InvarianceFlow:
    """Give the zero-initialised last layers of the coupling MLPs random weights, so that the
    flow is a real (non-identity) transform, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in flow.flow:
            for name in ("subnet1", "subnet2"):
                last = getattr(block, name, None)
                if last is not None:
                    last[-1].weight.copy_(scale * torch.randn(last[-1].weight.shape, generator=g))
                    last[-1].bias.copy_(scale * torch.randn(last[-1].bias.shape, generator=g))
    return flow


def tiny_models(seed: int = 0, conditional: bool = True) -> InvarianceModels:
    torch.manual_seed(seed)
    network = build_denoiser("cnn10")
    representation = Representation(**TINY_REPRESENTATION, conditional=conditional)
    flow = _perturb_couplings(InvarianceFlow(**TINY_FLOW), 0.05, seed)
    denoiser = Denoiser(network, PAPER_NORMALIZATION, {"architecture": {"name": "cnn10"}})
    return InvarianceModels(denoiser, representation, flow)


@pytest.fixture(scope="module")
def low_dose_slice() -> CTImage:
    """A simulated quarter-dose chest slice, 64 x 64 pixels of 5.6 mm."""
    spacing = 0.7 * 512 / SIZE
    phantom = chest_phantom(3, size=SIZE, spacing=spacing)
    pair = LowDoseSimulator(SIZE, spacing, photons=1e4).simulate(phantom.hu, dose=0.25, seed=1)
    return phantom.to_ctimage().with_array(pair.low_dose)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A CNN-10 model folder (random weights) with tiny invariance models."""
    models = tiny_models()
    folder = save_denoiser(tmp_path_factory.mktemp("models") / "cnn10", models.denoiser.network, "cnn10", {},
                           PAPER_NORMALIZATION)
    return save_invariance_models(folder, models.representation, models.flow, {"training": {"steps": 0}})


# ----------------------------------------------------------------------------- representation


@pytest.mark.parametrize("conditional", [True, False])
def test_representation_shapes(conditional):
    torch.manual_seed(0)
    model = Representation(**TINY_REPRESENTATION, conditional=conditional).eval()
    x, y = torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32)
    mean, logvar = model.encode(x, y)
    assert mean.shape == logvar.shape == (3, 16)
    out = model(x, y, sample=False)
    assert out.reconstruction.shape == x.shape and torch.equal(out.z, mean)
    # one f(x) shared by several codes, with its conditioning computed once
    z = torch.randn(5, 16)
    shared = model.decode(z, y[:1], model.condition(y[:1]))
    assert shared.shape == (5, 1, 32, 32)
    assert torch.allclose(shared, model.decode(z, y[:1].expand(5, -1, -1, -1)), atol=1e-5)
    if conditional:  # decoded images are f(x) plus a residual
        assert not torch.allclose(model.decode(z, y[:1]), model.decode(z, y[1:2]))
    else:  # the unconditional VAE never looks at f(x)
        assert torch.equal(model.decode(z), model.decode(z, y[1:2]))
        assert torch.equal(model.encode(x)[0], mean)
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        model.encode(torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="multiple of"):
        Representation(patch_size=100)


def test_z_modulation_reaches_every_decoder_stage():
    """With ``z_modulation`` z changes the decoded image even when its 4 x 4 map path is cut;
    models saved before the option existed (no key in their arguments) build without it."""
    torch.manual_seed(0)
    model = Representation(**TINY_REPRESENTATION, z_modulation=True).eval()
    assert model.arguments["z_modulation"] is True
    with torch.no_grad():
        model.project.weight.zero_()
        model.project.bias.zero_()
        for layer in model.z_modulations:  # trained weights, not the zero start
            layer.weight.normal_(0.0, 0.1)
    y, z = torch.randn(1, 1, 32, 32), torch.randn(2, 16)
    with torch.no_grad():
        a, b = model.decode(z, y.expand(2, -1, -1, -1))
    assert (a - b).abs().mean() > 1e-3
    old = {k: v for k, v in Representation(**TINY_REPRESENTATION).arguments.items() if k != "z_modulation"}
    assert build_representation(**old).z_modulation is False
    assert not hasattr(build_representation(**old), "z_modulations")


def test_preimage_branch_is_computed_once_per_patch_and_trains():
    """With ``preimage_layers`` the residual is added to f(x) + P(f(x)): P is part of the
    per-patch conditioning (decoding many codes of one patch costs what it did without it),
    it learns (gradients of the reconstruction reach it), and models saved without the option
    build with none; an unconditional model has no f(x) to invert and refuses it."""
    torch.manual_seed(0)
    model = Representation(**TINY_REPRESENTATION, preimage_layers=4).eval()
    plain = Representation(**TINY_REPRESENTATION).eval()
    assert model.arguments["preimage_layers"] == 4 and len(model.preimage) == 4
    y, z = torch.randn(1, 1, 32, 32), torch.randn(3, 16)
    with torch.no_grad():
        condition = model.condition(y)
        modulations, base, responses = condition
        assert torch.allclose(base, y + model.preimage(y)) and not torch.equal(base, y) and responses is None
        assert plain.condition(y)[1] is y
        shared = model.decode(z, y, condition)
        assert torch.allclose(shared, model.decode(z, y.expand(3, -1, -1, -1)), atol=1e-5)
    with FlopCounterMode(display=False) as with_branch:
        model.decode(z, y, condition)
    plain_condition = plain.condition(y)
    with FlopCounterMode(display=False) as without:
        plain.decode(z, y, plain_condition)
    assert with_branch.get_total_flops() == without.get_total_flops()
    model.train()
    x = torch.randn(2, 1, 32, 32)
    reconstruction_loss(model(x, y.expand(2, -1, -1, -1)).reconstruction, x).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.preimage.parameters())
    old = {k: v for k, v in plain.arguments.items() if k != "preimage_layers"}
    assert build_representation(**old).preimage_layers == 0 and not hasattr(build_representation(**old), "preimage")
    with pytest.raises(ValueError, match="no f\\(x\\)"):
        Representation(**TINY_REPRESENTATION, conditional=False, preimage_layers=4)


def test_bilinear_upsampling_has_no_block_edges():
    """Nearest-neighbour upsampling makes the bottleneck map constant over 8 x 8 blocks of a
    32-pixel patch, so the decoded images of different codes differ most where those blocks
    meet; with bilinear upsampling (same weights) they differ as much everywhere. Models saved
    before the option build with nearest; other modes are refused."""
    torch.manual_seed(0)
    nearest = Representation(**TINY_REPRESENTATION).eval()
    bilinear = Representation(**TINY_REPRESENTATION, upsample="bilinear").eval()
    bilinear.load_state_dict(nearest.state_dict())
    assert (nearest.arguments["upsample"], bilinear.arguments["upsample"]) == ("nearest", "bilinear")
    y, z = torch.randn(1, 1, 32, 32).expand(64, -1, -1, -1), torch.randn(64, 16)
    ratios = []
    with torch.no_grad():
        for model in (nearest, bilinear):
            model.output.conv.weight.mul_(10.0)  # undo the small start of the residual
            x = model.decode(z, y)
            deviation = x - x.mean(dim=0, keepdim=True)  # how the samples of one f(x) differ
            jumps = (deviation[..., 1:] - deviation[..., :-1]).abs().mean(dim=(0, 1, 2))  # per column pair
            inside = [k for k in range(31) if k % 8 != 7]
            ratios.append(float(jumps[7::8].mean() / jumps[inside].mean()))
    assert ratios[0] > 1.8 and ratios[1] < 1.3, ratios
    old = {k: v for k, v in nearest.arguments.items() if k != "upsample"}
    assert build_representation(**old).upsample == "nearest"
    with pytest.raises(ValueError, match="upsample must be one of nearest, bilinear, pixelshuffle"):
        Representation(**TINY_REPRESENTATION, upsample="bicubic")


def test_pixel_shuffle_upsampling_starts_as_nearest_and_learns_each_subpixel():
    """The learned sub-pixel upsampling decodes exactly as nearest-neighbour upsampling with
    the same other weights until its 1x1 convolutions are trained; then the four pixels of a
    2x2 cell get different mixes of the lower stage's features, and a training step moves them."""
    torch.manual_seed(0)
    nearest = Representation(**TINY_REPRESENTATION).eval()
    shuffle = Representation(**TINY_REPRESENTATION, upsample="pixelshuffle").eval()
    missing = shuffle.load_state_dict(nearest.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("upsamplers.") for key in missing)
    y, z = torch.randn(4, 1, 32, 32), torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(shuffle.decode(z, y), nearest.decode(z, y), rtol=0, atol=1e-6)
    start = shuffle.upsamplers[-1][0].weight.detach().clone()
    optimiser = torch.optim.SGD(shuffle.upsamplers.parameters(), lr=0.1)
    (shuffle.decode(z, y) - torch.randn(4, 1, 32, 32)).abs().mean().backward()
    optimiser.step()
    step = (shuffle.upsamplers[-1][0].weight.detach() - start)[:, :, 0, 0]  # (4 C, C): sub-pixel k of channel c is row 4 c + k
    subpixels = step.view(-1, 4, step.shape[1])
    assert float((subpixels - subpixels[:, :1]).abs().max()) > 0.1 * float(step.abs().max()) > 0  # the 2x2 pixels learn apart
    assert build_representation(**shuffle.arguments).upsample == "pixelshuffle"


def test_z_scales_the_preimage_features_once_trained():
    """``z_preimage``: the model decodes as the one without it (same other weights) until its
    layers are trained; its conditioning (computed once per patch) carries P's hidden maps, and
    after a step the decodes of different codes differ by a mix of those maps. It needs P."""
    torch.manual_seed(0)
    arguments = dict(TINY_REPRESENTATION, preimage_layers=3, upsample="bilinear")
    plain = Representation(**arguments).eval()
    model = Representation(**arguments, z_preimage=True).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    y, z = torch.randn(1, 1, 32, 32), torch.randn(4, 16)
    with torch.no_grad():
        condition = model.condition(y)
        hidden = model.preimage[:-1](y)  # P's hidden maps
        assert condition[2].shape == hidden.shape == (1, 2 * TINY_REPRESENTATION["channels"][0], 32, 32)
        assert plain.condition(y)[2] is None
        torch.testing.assert_close(model.decode(z, y, condition), plain.decode(z, y), rtol=0, atol=1e-6)
    optimiser = torch.optim.SGD(model.preimage_scales.parameters(), lr=1.0)
    (model.decode(z, y) - torch.randn(4, 1, 32, 32)).abs().mean().backward()
    optimiser.step()
    with torch.no_grad():
        change = model.decode(z, y, model.condition(y)) - plain.decode(z, y)
        expected = model.preimage_output(hidden * model.preimage_scales(z)[:, :, None, None])  # as defined
        torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.decode(z, y.expand(4, -1, -1, -1)), model.decode(z, y), rtol=1e-5, atol=1e-6)
        assert float((change[0] - change[1]).abs().max()) > 0  # codes now differ through P's maps
    assert build_representation(**model.arguments).z_preimage
    assert not build_representation(**{k: v for k, v in plain.arguments.items() if k != "z_preimage"}).z_preimage
    with pytest.raises(ValueError, match="z_preimage needs the pre-image branch"):
        Representation(**TINY_REPRESENTATION, z_preimage=True)


def test_replicate_padding_keeps_a_uniform_condition_uniform_to_the_border():
    """With zero padding the convolutions of a uniform f(x) see a dark frame, so its
    conditioning features (and the pre-image branch) change near the patch border; with
    ``padding="replicate"`` (same weights) they stay uniform up to the edge. Models saved
    before the option build with zeros; other modes are refused."""
    torch.manual_seed(0)
    zeros = Representation(**TINY_REPRESENTATION, preimage_layers=3).eval()
    replicate = Representation(**TINY_REPRESENTATION, preimage_layers=3, padding="replicate").eval()
    replicate.load_state_dict(zeros.state_dict())
    y = torch.full((1, 1, 32, 32), 0.7)
    with torch.no_grad():
        spreads = []
        for model in (zeros, replicate):
            modulations, base, _ = model.condition(y)
            maps = [base] + [m for pair in modulations for m in pair]
            spreads.append(max(float((m - m.mean(dim=(-2, -1), keepdim=True)).abs().max()) for m in maps))
    assert spreads[0] > 1e-2 and spreads[1] < 1e-5, spreads
    assert replicate.arguments["padding"] == "replicate"
    old = {k: v for k, v in zeros.arguments.items() if k != "padding"}
    assert build_representation(**old).padding == "zeros"
    with pytest.raises(ValueError, match="padding must be one of zeros, replicate"):
        Representation(**TINY_REPRESENTATION, padding="circular")


def test_default_representation_is_cheap_enough_for_the_cpu():
    """The default cVAE at 128 pixels, z of 256: decoding one patch (its f(x) conditioning
    computed once) costs under 1 GFLOP, against the reference decoder's 42."""
    torch.manual_seed(0)
    model = Representation().eval()
    x, y, z = torch.randn(1, 1, 128, 128), torch.randn(1, 1, 128, 128), torch.randn(1, 256)
    with torch.inference_mode():
        assert model.encode(x, y)[0].shape == (1, 256)
        condition = model.condition(y)
        with FlopCounterMode(display=False) as flops:
            out = model.decode(z, y, condition)
    assert out.shape == (1, 1, 128, 128)
    assert 0.2e9 < flops.get_total_flops() < 1.0e9
    assert sum(p.numel() for p in model.parameters()) < 4e6


def test_tiny_cvae_training_lowers_its_loss(low_dose_slice):
    """40 Adam steps on patches of the simulated slice (f: a 3x3 mean filter) lower the
    L1 + KL loss of a tiny cVAE well below its start."""
    torch.manual_seed(0)
    hu = torch.from_numpy(low_dose_slice.array)
    patches = torch.stack([hu[r:r + 32, c:c + 32] for r in (0, 16, 32) for c in (0, 16, 32)])[:, None]
    x = PAPER_NORMALIZATION.normalize(patches)
    y = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    model = Representation(**TINY_REPRESENTATION)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss(sample=True, generator=None):
        return representation_loss(model(x, y, sample=sample, generator=generator), x, kl_weight=1e-3)

    with torch.no_grad():
        before = loss(sample=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        optimizer.zero_grad()
        loss(generator=g)["total"].backward()
        optimizer.step()
    with torch.no_grad():
        after = loss(sample=False)
    assert after["total"] < 0.7 * before["total"], (before, after)
    assert after["l1"] < before["l1"]
    assert torch.allclose(kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


# ----------------------------------------------------------------------------- invariance flow


@pytest.mark.parametrize("arguments", [TINY_FLOW, {}], ids=["tiny", "default"])
def test_flow_is_invertible(arguments):
    torch.manual_seed(1)
    flow = _perturb_couplings(InvarianceFlow(**arguments), 0.02).eval()
    d = flow.z_dim
    z, y = 2.0 * torch.randn(8, d) + 0.5, torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        v, log_det = flow(z, y)
        assert v.shape == z.shape and log_det.shape == (8,)
        assert (v - z).abs().mean() > 0.05  # a real transform, not the identity
        assert torch.allclose(flow.reverse(v, y), z, atol=1e-4)
        # the embedding computed once equals the condition given as an image
        embedding = flow.embed(y)
        assert torch.allclose(flow.reverse(v, embedding=embedding), z, atol=1e-4)
        _, log_det_reverse = flow.flow(v, c=[embedding], rev=True, jac=True)
        assert torch.allclose(log_det_reverse, -log_det, atol=1e-3)


def test_flow_log_determinant_is_the_jacobians():
    torch.manual_seed(2)
    flow = _perturb_couplings(InvarianceFlow(z_dim=6, n_flows=3, hidden=16, embedding_dim=4,
                                             embedding_channels=(4,)), 0.3).double().eval()
    z, y = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 1, 16, 16, dtype=torch.float64)
    embedding = flow.embed(y).detach()
    jacobian = torch.autograd.functional.jacobian(lambda a: flow(a[None], embedding=embedding)[0][0], z[0])
    assert torch.allclose(flow(z, embedding=embedding)[1][0], torch.linalg.slogdet(jacobian)[1], atol=1e-8)


def test_flow_initialisation_and_maximum_likelihood_training():
    """ActNorm starts from data (v standardised); 60 steps lower the NLL of codes whose
    distribution depends on the condition."""
    torch.manual_seed(3)
    flow = InvarianceFlow(**TINY_FLOW)
    level = torch.rand(256, 1, 1, 1) * 2 - 1
    y = level.expand(-1, 1, 16, 16) + 0.01 * torch.randn(256, 1, 16, 16)
    direction = torch.randn(1, 16)
    z = 3.0 * level.view(-1, 1) * direction + 0.3 * torch.randn(256, 16) + 1.0
    flow.initialize(z, y)
    with torch.no_grad():
        v, log_det = flow(z, y)
        start = nll_per_dimension(v, log_det)
    assert torch.allclose(v.mean(0), torch.zeros(16), atol=1e-4) and torch.allclose(v.std(0), torch.ones(16), atol=1e-3)
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for step in range(60):
        batch = slice(64 * (step % 4), 64 * (step % 4 + 1))
        optimizer.zero_grad()
        flow.negative_log_likelihood(z[batch], y[batch]).backward()
        optimizer.step()
    with torch.no_grad():
        end = flow.negative_log_likelihood(z, y)
    assert end < start - 0.3, (start, end)
    # the standard normal under the identity flow: 0.5 * log(2 pi e) per dimension
    assert nll_per_dimension(torch.zeros(1, 4), torch.zeros(1)).item() == pytest.approx(0.5 * np.log(2 * np.pi))


# ----------------------------------------------------------------------------- model folders


def test_save_and_load_invariance_models(model_folder, tmp_path):
    metadata = read_metadata(model_folder)
    assert {"denoiser", "cvae", "cinn"} <= set(metadata["weights"])
    info = metadata["invariance"]
    assert info["patch_size"] == 32 and info["conditional"] and info["training"] == {"steps": 0}
    assert info["cvae"]["channels"] == [8, 16, 16, 32] and info["cinn"]["n_flows"] == 4
    loaded = load_invariance_models(model_folder)
    built = tiny_models()
    for a, b in ((loaded.representation, built.representation), (loaded.flow, built.flow)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    assert has_invariance_models(model_folder)

    # float16 storage: half the size, same sampling up to fp16 rounding
    half = save_denoiser(tmp_path / "half", built.denoiser.network, "cnn10", {}, PAPER_NORMALIZATION)
    save_invariance_models(half, built.representation, built.flow, dtype="float16")
    assert read_metadata(half)["weights"]["cvae"]["dtype"] == "float16"
    x = np.random.default_rng(0).normal(-500.0, 20.0, (32, 32)).astype(np.float32)
    a = InvarianceSampler(loaded, device="cpu").sample(x, count=2, seed=0)
    b = InvarianceSampler(half, device="cpu").sample(x, count=2, seed=0)
    assert np.abs(a.invariances - b.invariances).max() < 5.0  # HU

    # a damaged file is refused, naming it
    (half / "cinn.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="cinn.safetensors"):
        load_invariance_models(half)
    # a denoiser without invariance models: a clear error saying what to do
    bare = save_denoiser(tmp_path / "bare", built.denoiser.network, "cnn10", {}, PAPER_NORMALIZATION)
    assert not has_invariance_models(bare)
    with pytest.raises(ValueError, match="no invariance models"):
        load_invariance_models(bare)


# ----------------------------------------------------------------------------- sampler


def test_sampler_is_deterministic_and_consistent(low_dose_slice):
    sampler = InvarianceSampler(tiny_models(), device="cpu")
    x = crop_patch(low_dose_slice, (30, 34, 0), 32).array
    a = sampler.sample(x, count=7, seed=11, batch_size=3)
    b = sampler.sample(x, count=7, seed=11, batch_size=3)
    for name in ("invariances", "denoised_invariances", "reconstruction", "std", "v"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    c = sampler.sample(x, count=7, seed=12, batch_size=3)
    assert not np.allclose(a.invariances, c.invariances)
    d = sampler.sample(x, count=7, seed=11, batch_size=8)  # same codes, other batches
    assert np.allclose(a.invariances, d.invariances, atol=1e-2)
    e = sampler.sample(x, count=12, seed=11)  # no batch size: the device's (10 on the CPU)
    assert e.batch_size == BATCH_SIZE["cpu"] == 10 and np.allclose(e.invariances[:7], a.invariances, atol=1e-2)

    assert a.invariances.shape == a.denoised_invariances.shape == (7, 32, 32) and a.count == 7
    assert a.x.shape == a.denoised.shape == a.reconstruction.shape == a.std.shape == (32, 32)
    assert np.array_equal(a.x, x) and a.device == "cpu" and a.seed == 11 and a.seconds > 0
    models = sampler.models
    with torch.inference_mode():  # f(x) is the denoiser applied to the patch
        y = apply_network(models.denoiser.network, PAPER_NORMALIZATION.normalize(torch.from_numpy(x))[None, None])
    assert np.allclose(a.denoised, PAPER_NORMALIZATION.denormalize(y)[0, 0].numpy(), atol=1e-3)
    assert np.allclose(a.std, a.invariances.std(axis=0)) and a.std.max() > 0
    change = np.abs(a.invariances - a.x).mean(axis=(1, 2))
    output_change = np.abs(a.denoised_invariances - a.denoised).mean(axis=(1, 2))
    assert np.allclose(a.mean_abs_change_hu, change) and np.allclose(a.mean_abs_output_change_hu, output_change)
    assert a.consistency == pytest.approx(output_change.mean() / change.mean(), rel=1e-5)

    with pytest.raises(ValueError, match="32 x 32 patches"):
        sampler.sample(low_dose_slice.array, count=2)


def test_refinement_keeps_one_minus_gain_squared_of_what_f_passes_on():
    """For f = g * identity, one step keeps (1 - g^2) of x~'s difference from the pre-image;
    a step that would raise an image's loss (g^2 > 2) is not taken and its size halves."""
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    d = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for g, steps, kept in ((0.6, 1, 0.64), (0.6, 3, 0.64 ** 3), (1.5, 1, 1.0), (1.5, 2, 1 - 0.5 * 2.25)):
        refined, out = refine_invariances(lambda t: g * t, x + d, g * x, steps)
        assert torch.allclose(refined - x, kept * d, atol=1e-5), (g, steps)
        assert torch.allclose(out, g * refined) and not refined.requires_grad


def test_refinement_settings_are_checked():
    assert Refinement.parse(None) == Refinement() and not Refinement()
    assert Refinement.parse("5,1") == Refinement.parse((5, 1)) == Refinement.parse({"centre": 5, "sample": 1})
    assert Refinement(5, 1).as_dict() == {"centre": 5, "sample": 1} and Refinement(0, 2)
    for bad in ("5", "a,1", (1, 2, 3), (-1, 0), (1.5, 0), (True, 0), {"centre": 1, "steps": 2}):
        with pytest.raises(ValueError, match="consistency refinement"):
            Refinement.parse(bad)


def test_sampler_refinement_moves_invariances_towards_f_of_x(low_dose_slice, model_folder):
    sampler = InvarianceSampler(tiny_models(), device="cpu")
    assert not sampler.models.refinement  # models built in memory: no refinement unless asked
    x = crop_patch(low_dose_slice, (30, 34, 0), 32).array
    plain = sampler.sample(x, count=6, seed=3, batch_size=4)
    assert plain.refinement == Refinement()
    outputs = {}
    for refinement in ((3, 0), (0, 2), (3, 1)):
        result = sampler.sample(x, count=6, seed=3, batch_size=4, refinement=refinement)
        again = sampler.sample(x, count=6, seed=3, batch_size=4, refinement=refinement)
        assert np.array_equal(result.invariances, again.invariances)  # deterministic
        assert result.refinement == Refinement(*refinement)
        # every sample's output moved towards f(x), and f of the refined samples is what is reported
        assert (result.mean_abs_output_change_hu < plain.mean_abs_output_change_hu).all(), refinement
        with torch.inference_mode():
            y = apply_network(sampler.models.denoiser.network,
                              PAPER_NORMALIZATION.normalize(torch.from_numpy(result.invariances))[:, None])
        assert np.allclose(result.denoised_invariances, PAPER_NORMALIZATION.denormalize(y)[:, 0].numpy(), atol=1e-3)
        outputs[refinement] = result
    # the centre steps add one image to every sample: how the samples differ stays; sample steps change it
    shift = outputs[(3, 0)].invariances - plain.invariances
    assert np.allclose(shift, shift[0], atol=1e-2) and np.abs(shift).mean() > 0.1
    spread = np.abs(plain.invariances - plain.invariances.mean(0)).mean()
    assert np.abs(outputs[(0, 2)].invariances - outputs[(0, 2)].invariances.mean(0)).mean() != pytest.approx(spread)
    # the null of the analysis refined the same way: noise-only images move towards f(x) too
    rng = np.random.default_rng(5)
    null = (x[None] + rng.normal(0.0, 20.0, (5,) + x.shape)).astype(np.float32)
    assert np.array_equal(sampler.refine_null(x, null), null)  # no refinement: unchanged

    def distance(images):
        with torch.inference_mode():
            net, norm = sampler.models.denoiser.network, PAPER_NORMALIZATION
            out = apply_network(net, norm.normalize(torch.from_numpy(np.asarray(images, np.float32)))[:, None])
            y = apply_network(net, norm.normalize(torch.from_numpy(x))[None, None])
        return (out - y).abs().flatten(1).mean(1).numpy()

    refined_null = sampler.refine_null(x, null, (3, 1))
    assert refined_null.shape == null.shape and (distance(refined_null) < distance(null)).all()
    assert np.allclose(refined_null, sampler.refine_null(x, null, (3, 1), batch_size=2), atol=1e-2)
    with pytest.raises(ValueError, match="stack"):
        sampler.refine_null(x, null[0], (3, 1))
    # a model folder's setting is the sampler's default; folders without it refine nothing
    assert load_invariance_models(model_folder).refinement == Refinement()
    metadata = read_metadata(model_folder)
    metadata["invariance"]["refinement"] = {"centre": 2, "sample": 1}
    write_metadata(model_folder, metadata)
    try:
        assert InvarianceSampler(model_folder, device="cpu").sample(x, count=2, seed=0).refinement == Refinement(2, 1)
    finally:
        del metadata["invariance"]["refinement"]
        write_metadata(model_folder, metadata)


def test_unconditional_representation_samples_too(low_dose_slice):
    sampler = InvarianceSampler(tiny_models(conditional=False), device="cpu")
    result = sampler.sample(sampler.crop(low_dose_slice, (32, 32)).array, count=3, seed=0)
    assert result.invariances.shape == (3, 32, 32) and np.isfinite(result.invariances).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fall-back on a machine without a GPU")
def test_cuda_request_falls_back_to_the_cpu(low_dose_slice):
    with pytest.warns(RuntimeWarning, match="no CUDA GPU"):
        sampler = InvarianceSampler(tiny_models(), device="cuda")
    assert sampler.device.type == "cpu"
    result = sampler.sample(sampler.crop(low_dose_slice, (32, 32, 0)).array, count=2, seed=0)
    assert result.device == "cpu" and result.invariances.shape == (2, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_captured_graphs_sample_as_eager_repeatably_and_near_the_cpu(low_dose_slice):
    """On CUDA the cINN + decoder run eagerly the first time a batch shape is met, then from a
    graph of it, with the eager samples (within float rounding), bit-identical for a seed, for
    every patch (new arguments are copied into the graph's), dropped when the weights move,
    and within float rounding of the CPU's."""
    sampler = InvarianceSampler(tiny_models(), device="cuda")
    patches = [sampler.crop(low_dose_slice, centre).array for centre in ((32, 32, 0), (20, 40, 0))]
    sampler.cuda_graphs = False
    eager = [sampler.sample(x, count=7, seed=3, batch_size=5) for x in patches]  # batches of 5 and 2
    assert not sampler._graphs and eager[0].device == "cuda"
    sampler.cuda_graphs = True
    first = sampler.sample(patches[0], count=7, seed=3, batch_size=5)  # first pass of each shape: eager
    assert not sampler._graphs and np.abs(first.invariances - eager[0].invariances).max() < 1e-3
    graphed = [sampler.sample(x, count=7, seed=3, batch_size=5) for x in patches]
    assert sampler.cuda_graphs and sorted(sampler._graphs) == [(2, 16), (5, 16)]
    np.testing.assert_array_equal(sampler.sample(patches[0], count=7, seed=3, batch_size=5).invariances,
                                  graphed[0].invariances)
    for e, g in zip(eager, graphed):
        gap = np.abs(g.invariances - e.invariances).max()
        assert gap < 0.5, f"graph vs eager: up to {gap:.4f} HU"
    moved = [p.detach().clone() for p in sampler.models.representation.parameters()]
    sampler.models.to("cpu").to("cuda")  # new weight memory: the old graphs would read freed memory
    again = sampler.sample(patches[0], count=7, seed=3, batch_size=5)
    assert all(torch.equal(a, b) for a, b in zip(moved, sampler.models.representation.parameters()))
    assert np.abs(again.invariances - eager[0].invariances).max() < 0.5
    cpu = InvarianceSampler(tiny_models(), device="cpu")
    for x, g in zip(patches, graphed):
        on_cpu = cpu.sample(x, count=7, seed=3)
        change, gap = np.abs(on_cpu.invariances - x).mean(), np.abs(g.invariances - on_cpu.invariances).mean()
        assert gap < 0.02 * change, f"CUDA vs CPU: {gap:.4f} HU against a mean change of {change:.3f} HU"
        assert abs(g.consistency - on_cpu.consistency) < 0.01, (g.consistency, on_cpu.consistency)


def test_cuda_graph_arguments_are_nested_tuples_or_lists_of_tensors():
    from InvarianceExplorerLib.devices import _map_tensors

    tree = (torch.ones(2), [torch.zeros(1), (torch.ones(3), None)], None)
    doubled = _map_tensors(lambda t: 2 * t, tree)
    assert torch.equal(doubled[1][1][0], 2 * torch.ones(3)) and doubled[1][1][1] is None and doubled[2] is None
    with pytest.raises(TypeError, match="tuples or lists only; got a dict"):
        _map_tensors(torch.clone, ({"gamma": torch.ones(1)},))


def test_out_of_memory_halves_the_batch_then_uses_the_cpu():
    """The retry policy, with a job that runs out of CUDA memory above a batch size."""
    calls = []

    def job(limit):
        def run(device, batch_size):
            calls.append((device.type, batch_size))
            if device.type == "cuda" and batch_size > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
            return "ok"
        return run

    with pytest.warns(RuntimeWarning) as record:
        assert run_with_memory_fallback(job(4), torch.device("cuda"), 16) == ("ok", torch.device("cuda"), 4)
    assert calls == [("cuda", 16), ("cuda", 8), ("cuda", 4)]
    assert [str(w.message) for w in record] == [f"CUDA out of memory; retrying with batch size {n}" for n in (8, 4)]
    with pytest.warns(RuntimeWarning) as record:
        assert run_with_memory_fallback(job(0), torch.device("cuda"), 2)[1:] == (torch.device("cpu"), 2)
    assert "continuing on the CPU with batch size 2" in str(record[-1].message)
    calls.clear()  # the CPU takes the batch first asked for, at most its own default
    with pytest.warns(RuntimeWarning):
        assert run_with_memory_fallback(job(0), torch.device("cuda"), 100)[1:] == (torch.device("cpu"), 10)
    assert calls == [("cuda", n) for n in (100, 50, 25, 12, 6, 3, 1)] + [("cpu", 10)]
    def always(device, batch_size):
        raise torch.cuda.OutOfMemoryError("out of memory (test)")

    with pytest.raises(torch.cuda.OutOfMemoryError):  # on the CPU there is nothing to fall back to
        run_with_memory_fallback(always, torch.device("cpu"), 2)


# ----------------------------------------------------------------------------- patches


def _rotation(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def test_crop_keeps_the_physical_position(tmp_path):
    array = np.arange(5 * 40 * 50, dtype=np.float32).reshape(5, 40, 50) * 0.1 - 1000.0  # HU, all different
    volume = CTImage(array, spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0), direction=_rotation(30).ravel())
    patch = crop_patch(volume, (25, 20, 3), 16)
    with pytest.raises(ValueError, match=r"\(i, j, k\)"):  # a volume needs its slice index
        crop_patch(volume, (25, 20), 16)
    assert np.array_equal(patch.array, array[3, 12:28, 17:33]) and patch.padded_pixels == 0
    assert patch.corner_ij == (17, 12) and patch.center_ijk == (25, 20, 3)
    corner = np.asarray(volume.origin) + volume.direction_matrix @ (np.array([17, 12, 3]) * volume.spacing)
    assert np.allclose(patch.image.origin, corner)
    assert patch.image.spacing == volume.spacing and patch.image.direction == volume.direction
    # the centre voxel is the patch's pixel [size // 2, size // 2]
    assert patch.array[8, 8] == array[3, 20, 25]
    # written as NRRD it lands where it was cut
    back = read_image(write_nrrd(patch.image, tmp_path / "patch.nrrd"))
    assert np.allclose(back.origin, corner, atol=1e-4) and np.allclose(back.direction, volume.direction, atol=1e-6)


def test_crop_pads_with_air_at_the_border_and_refuses_small_images():
    image = CTImage(np.zeros((40, 50), np.float32), spacing=(0.7, 0.7, 1.0))
    patch = crop_patch(image, (0, 0), 16)
    assert patch.corner_ij == (-8, -8) and patch.padded_pixels == 16 * 16 - 8 * 8
    assert (patch.array[:8] == AIR_HU).all() and (patch.array[:, :8] == AIR_HU).all() and (patch.array[8:, 8:] == 0).all()
    assert np.allclose(patch.image.origin, (-8 * 0.7, -8 * 0.7, 0.0))
    right = crop_patch(image, (49, 39, 0), 16)
    assert (right.array[:, 9:] == AIR_HU).all() and (right.array[9:] == AIR_HU).all()
    assert right.padded_pixels == 16 * 16 - 9 * 9 and (right.array[:9, :9] == 0).all()
    with pytest.raises(ValueError, match=r"smaller than the 64 x 64 patch"):
        crop_patch(image, (20, 20), 64)
    with pytest.raises(ValueError, match="outside the volume"):
        crop_patch(image, (50, 10), 16)
    with pytest.raises(ValueError, match="outside the volume"):
        crop_patch(image, (5, 5, 1), 16)
    with pytest.raises(ValueError, match="whole voxel index"):
        crop_patch(image, (5.5, 5), 16)


# ----------------------------------------------------------------------------- the sample command


def _events(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_sample_command_writes_every_output(model_folder, low_dose_slice, tmp_path, capsys):
    ct = write_nrrd(low_dose_slice, tmp_path / "ld.nrrd")
    out = tmp_path / "results" / "sample"
    argv = ["sample", "--model", str(model_folder), "--input", ct, "--center", "40,20,0", "--count", "5",
            "--seed", "3", "--batch-size", "2", "--device", "auto", "--out", str(out), "--progress", "json",
            "--refine", "2,1"]
    assert main(argv) == 0
    events = _events(capsys.readouterr().out)
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["loading", "encoding", "sampling", "writing"]
    sampling = [e for e in events if e["event"] == "progress" and e["stage"] == "sampling"]
    assert sampling[-1]["done"] == sampling[-1]["total"] == 5
    assert events[-1]["event"] == "done" and set(events[-1]["outputs"]) == set(SAMPLE_OUTPUTS)
    for name, path in events[-1]["outputs"].items():
        assert path == str(out / SAMPLE_OUTPUTS[name])
    assert sorted(p.name for p in out.iterdir()) == sorted(SAMPLE_OUTPUTS.values())  # nothing else, no leftovers
    assert [p.name for p in out.parent.iterdir()] == ["sample"]

    crop = crop_patch(low_dose_slice, (40, 20, 0), 32)
    for name in ("input", "denoised", "reconstruction", "std"):
        image = read_volume(out / SAMPLE_OUTPUTS[name])  # not read_image: a std map is no CT in HU
        assert image.array.shape[-2:] == (32, 32) and image.array.size == 32 * 32, name
        assert np.allclose(image.origin, crop.image.origin, atol=1e-4) and image.spacing[:2] == pytest.approx(
            crop.image.spacing[:2])
    assert np.allclose(read_image(out / "input.nrrd").array, crop.array)
    stack = read_image(out / "invariances.nrrd")
    assert stack.array.shape == (5, 32, 32) and np.allclose(stack.origin, crop.image.origin, atol=1e-4)
    assert stack.spacing[:2] == pytest.approx(crop.image.spacing[:2])
    assert read_image(out / "denoised_invariances.nrrd").array.shape == (5, 32, 32)

    numbers = json.loads((out / "numbers.json").read_text())
    assert numbers["center_ijk"] == [40, 20, 0] and numbers["patch_size"] == 32 and numbers["count"] == 5
    assert numbers["seed"] == 3 and numbers["device"] == "cpu" and numbers["model"] == str(model_folder)
    assert numbers["model_folder"] == str(model_folder.resolve())  # found again from any working directory
    assert numbers["input"] == ct and numbers["seconds"] > 0 and len(numbers["samples"]) == 5
    assert [s["index"] for s in numbers["samples"]] == list(range(5))
    assert numbers["consistency"] == pytest.approx(
        np.mean([s["mean_abs_output_change_hu"] for s in numbers["samples"]]) /
        np.mean([s["mean_abs_change_hu"] for s in numbers["samples"]]), rel=1e-5)
    assert numbers["refinement"] == {"centre": 2, "sample": 1}  # --refine over the folder's setting (none)
    # the same numbers as the engine gives for that patch and seed
    engine = InvarianceSampler(model_folder, device="cpu").sample(crop.array, count=5, seed=3, batch_size=2,
                                                                  refinement=(2, 1))
    assert np.allclose(stack.array, engine.invariances, atol=1e-3)

    from PIL import Image

    with Image.open(out / "figure.png") as figure:  # x, f(x), three invariances, std: six 32-pixel tiles
        assert figure.size == (6 * (32 + 4) + 4, 32 + 4 + 14 + 4)


def test_sample_command_errors_are_clear_and_write_nothing(model_folder, low_dose_slice, tmp_path, capsys):
    ct = write_nrrd(low_dose_slice, tmp_path / "ld.nrrd")
    bare = save_denoiser(tmp_path / "bare", build_denoiser("cnn10"), "cnn10", {}, PAPER_NORMALIZATION)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "old.txt").write_text("keep me")

    def run(model, center, out):
        code = main(["sample", "--model", str(model), "--input", ct, "--center", center, "--count", "2",
                     "--out", str(out), "--progress", "json"])
        captured = capsys.readouterr()
        return code, _events(captured.out), captured.err

    for model, center, out, message in [
            (bare, "32,32,0", tmp_path / "a", "no invariance models"),
            (model_folder, "64,10,0", tmp_path / "b", "outside the volume"),
            (model_folder, "10;10", tmp_path / "c", "give the voxel as i,j,k"),
            (model_folder, "-5,10,0", tmp_path / "d", "outside the volume"),  # not taken for an option
            (bare, "64,10,0", tmp_path / "e", "outside the volume"),  # told before the models load
            (model_folder, "32,32,0", taken, "not empty"),
            (model_folder, "32,32,0", tmp_path / "ld.nrrd", "is a file"),
            (model_folder, "32,32,0", tmp_path / "ld.nrrd" / "out", "cannot be made")]:  # found before sampling
        code, events, err = run(model, center, out)
        event = events[-1]
        assert code == 2 and event["event"] == "error" and event["kind"] == "input"
        assert message in event["message"] and message in err and "Traceback" not in err
        assert "sampling" not in [e.get("stage") for e in events]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "ld.nrrd", "taken"]
    assert (taken / "old.txt").read_text() == "keep me"
    air = low_dose_slice.array.copy()
    air[:, :20] = -1000.0  # the air outside a scanner's field of view, constant
    write_nrrd(low_dose_slice.with_array(air), tmp_path / "air.nrrd")
    with pytest.warns(RuntimeWarning, match="reaches over the image's border"):
        assert main(["sample", "--model", str(model_folder), "--input", str(tmp_path / "air.nrrd"), "--center",
                     "2,2,0", "--count", "2", "--out", str(tmp_path / "e"), "--progress", "none"]) == 2
    assert "holds no image content: it is -1000 HU throughout (where it lies in the image)" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    (tmp_path / "air.nrrd").unlink()
    # an existing empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spacing warning: the model records no training spacing
        assert main(["sample", "--model", str(model_folder), "--input", ct, "--center", "32,32", "--count", "1",
                     "--out", str(empty), "--progress", "none"]) == 0
    assert (empty / "figure.png").is_file()
    # a link to an empty folder, or to one yet to be made, is followed (it failed after sampling)
    (tmp_path / "linked").mkdir()
    for target in (tmp_path / "linked", tmp_path / "not yet"):
        link = tmp_path / f"link to {target.name}"
        link.symlink_to(target)
        assert main(["sample", "--model", str(model_folder), "--input", ct, "--center", "32,32", "--count", "1",
                     "--out", str(link), "--progress", "none"]) == 0
        assert link.is_symlink() and (target / "figure.png").is_file()


def test_sample_command_on_a_real_dicom_slice_near_its_border(model_folder, tmp_path):
    """pydicom's CT_small.dcm (128 x 128, 0.66 mm): the patch around a voxel 5 pixels from
    the left border is padded with air and keeps the DICOM position."""
    from realdata import pydicom_test_file

    src = pydicom_test_file("CT_small.dcm")
    out = tmp_path / "real"
    with pytest.warns(RuntimeWarning, match=r"over the image's border: 352 of 1024 pixels \(34 %\) are filled with air"):
        assert main(["sample", "--model", str(model_folder), "--input", src, "--center", "5,60,0", "--count", "3",
                     "--out", str(out), "--progress", "none"]) == 0
    numbers = json.loads((out / "numbers.json").read_text())
    assert numbers["padded_pixels"] == 32 * 11 and numbers["center_ijk"] == [5, 60, 0]
    assert numbers["content_pixels"] == 32 * 21  # the figures' pixels: inside the image, and CT_small's all vary
    assert numbers["batch_size"] == 10  # no --batch-size: the sampler's for the CPU
    dicom = read_image(src)
    crop = read_image(out / "input.nrrd")
    corner = np.asarray(dicom.origin) + dicom.direction_matrix @ (np.array([5 - 16, 60 - 16, 0]) * dicom.spacing)
    assert np.allclose(crop.origin, corner, atol=1e-3)
    assert np.allclose(numbers["center_lps_mm"], corner + dicom.direction_matrix @ (np.array([16, 16, 0]) * dicom.spacing),
                       atol=1e-3)
    assert np.array_equal(crop.array[:, 11:], dicom.array[44:76, :21]) and (crop.array[:, :11] == AIR_HU).all()
    stack = read_image(out / "invariances.nrrd").array
    assert np.isfinite(stack).all()
    change = np.abs(stack - crop.array)[:, :, 11:].mean(axis=(1, 2))  # the padding does not dilute the figures
    assert np.allclose([s["mean_abs_change_hu"] for s in numbers["samples"]], change, rtol=1e-4)


def test_metal_and_fill_values_beyond_the_standard_ct_scale_are_flagged(model_folder):
    """Extended-scale CT keeps metal at up to about 30000 HU, and scanners fill what lies
    outside their field of view with, e.g., -3024 HU: no training slice held either."""
    sampler = InvarianceSampler(model_folder, device="cpu")
    x = np.random.default_rng(0).normal(40, 20, (sampler.patch_size,) * 2).astype(np.float32)
    x[10:13, 10:13], x[:2, :] = 30000.0, -3024.0
    with pytest.warns(RuntimeWarning) as caught:
        sampler.sample(x, count=2, seed=0)
    messages = [str(w.message) for w in caught]
    assert any("9 pixels of the patch lie above 3071 HU (up to 30000 HU: metal" in m for m in messages)
    assert any(f"{2 * sampler.patch_size} pixels of the patch lie below -2000 HU (down to -3024 HU: a fill value"
               in m for m in messages)


def test_the_sample_help_states_the_samplers_batch_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {BATCH_SIZE['cpu']} on the CPU, {BATCH_SIZE['cuda']} on CUDA)" in help_text


def test_bundled_networks_run_channels_last_with_the_same_samples(monkeypatch):
    """The sampler lays its networks out channels-last (faster on CPUs); the samples are those
    of the default layout up to float rounding."""
    from InvarianceExplorerLib.denoisers import bundled_models_dir
    from InvarianceExplorerLib.io import read_image
    from InvarianceExplorerLib.sampler import InvarianceModels, InvarianceSampler

    image = read_image(bundled_models_dir().parent / "SampleData" / "InvarianceExplorerChestLD.nrrd")
    fast = InvarianceSampler("cnn10", device="cpu")
    models = fast.models
    convs = [p for m in (models.denoiser.network, models.representation, models.flow)
             for p in m.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)
    patch = fast.crop(image, (368, 283, 1)).array
    a = fast.sample(patch, count=4, seed=3, refinement="1,1")

    def contiguous(self, device):
        for m in (self.denoiser.network, self.representation, self.flow):
            m.to(device, memory_format=torch.contiguous_format)
        return self

    monkeypatch.setattr(InvarianceModels, "to", contiguous)
    plain = InvarianceSampler("cnn10", device="cpu")
    b = plain.sample(patch, count=4, seed=3, refinement="1,1")
    assert all(p.is_contiguous() for p in plain.models.representation.parameters())
    assert np.abs(a.invariances - b.invariances).max() < 0.01  # HU
    assert np.abs(a.denoised_invariances - b.denoised_invariances).max() < 0.01
    assert np.abs(a.invariances - a.x).mean() > 1  # the samples are not x itself


def test_sample_figures_leave_out_the_air_a_scanner_leaves_constant(tmp_path):
    """The sample CT keeps constant air outside its field of view: near its corner (voxel 100,100)
    the bundled CNN-10's figures average over the pixels that vary, not over that fill."""
    from InvarianceExplorerLib.analysis import varying
    from InvarianceExplorerLib.sample_data import sample_ct_path

    out = tmp_path / "edge"
    assert main(["sample", "--model", "cnn10", "--input", str(sample_ct_path()), "--center", "100,100,1",
                 "--count", "2", "--device", "cpu", "--out", str(out), "--progress", "none"]) == 0
    numbers = json.loads((out / "numbers.json").read_text())
    x, stack = read_image(out / "input.nrrd").array, read_image(out / "invariances.nrrd").array
    content = varying(x)
    assert numbers["padded_pixels"] == 0 and 0.2 < content.mean() < 0.9
    assert numbers["content_pixels"] == content.sum()
    change = np.abs(stack - x)[:, content].mean(axis=1)
    assert np.allclose([s["mean_abs_change_hu"] for s in numbers["samples"]], change, rtol=1e-4)


@pytest.mark.parametrize("where, change, said", [
    ("architecture", {"channels": 4096}, "do not fit the network metadata.json describes"),
    ("architecture", {"colour": 1}, "do not build the network of denoiser.safetensors"),
    ("cvae", {"channels": [4096, 24, 48, 96, 128, 64]}, "cvae.safetensors: its tensors do not fit"),
    ("cinn", {"hidden": 4096}, "cinn.safetensors: its tensors do not fit"),
    ("cinn", {"n_flows": "twelve"}, "do not build the network of cinn.safetensors"),
])
def test_metadata_that_builds_another_network_than_its_weights_is_refused_first(tmp_path, where, change, said):
    """metadata.json's constructor arguments are checked against the weight files' tensors
    before a network is built (metadata.json carries no checksum: an altered one could ask
    for any size), with the file and what to do."""
    import shutil

    from InvarianceExplorerLib.sampler import load_invariance_models

    folder = tmp_path / "redcnn"
    shutil.copytree(resolve_model_folder("redcnn"), folder)
    metadata = read_metadata(folder)
    arguments = metadata["architecture"]["arguments"] if where == "architecture" else metadata["invariance"][where]
    arguments.update(change)
    write_metadata(folder, metadata)
    with pytest.raises(ValueError, match=said) as error:
        load_invariance_models(folder)
    assert "the model folder is damaged: copy it again from where it was made" in str(error.value)


def test_sample_takes_what_a_pytorch_user_passes_and_refuses_the_rest(low_dose_slice):
    """A Patch's content mask is used (padding does not dilute the figures); a tensor, even
    one that requires grad, is read; counts and seeds must be whole numbers; a patch that is
    not in HU (HU / 1000, the paper's normalisation, HU + 1024) is refused with a fix that
    sample() can take; torch's default dtype does not matter."""
    sampler = InvarianceSampler(tiny_models(), device="cpu")
    padded = sampler.crop(low_dose_slice, (60, 32, 0))  # reaches over the right border
    assert padded.padded_pixels > 0
    as_patch = sampler.sample(padded, count=3, seed=1)
    assert as_patch.consistency == sampler.sample(padded.array, count=3, seed=1, content=padded.content).consistency
    assert as_patch.consistency != sampler.sample(padded.array, count=3, seed=1).consistency
    x = sampler.crop(low_dose_slice, (32, 32, 0)).array
    tensor = torch.tensor(x, requires_grad=True)
    np.testing.assert_array_equal(sampler.sample(tensor, count=2).invariances, sampler.sample(x, count=2).invariances)
    for bad, said in ((dict(count=1.5), "count must be a whole number from 1 up; got 1.5"),
                      (dict(count=True), "count must be a whole number"), (dict(count="4"), "count must be"),
                      (dict(seed=None), "seed must be a whole number from 0 to"), (dict(seed=2 ** 64), "seed must"),
                      (dict(batch_size=2.5), "batch_size must be a whole number")):
        with pytest.raises(ValueError, match=said):
            sampler.sample(x, **{"count": 2, **bad})
    for scaled, said in ((x / 1000, "look normalised or scaled"), (PAPER_NORMALIZATION.normalize(x), "normalised"),
                         (x + 1024, "subtract 1024")):
        with pytest.raises(ValueError, match=said):
            sampler.sample(scaled.astype(np.float32), count=2)
    from InvarianceExplorerLib.sample_data import sample_ct_path

    bundled = InvarianceSampler("cnn10", device="cpu")
    patch = bundled.crop(read_image(sample_ct_path()), (368, 283, 1))
    expected = (sampler.sample(x, count=2, seed=4).invariances, bundled.sample(patch, count=2, seed=4).invariances)
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        np.testing.assert_array_equal(sampler.sample(x, count=2, seed=4).invariances, expected[0])
        loaded = InvarianceSampler("cnn10", device="cpu")  # a folder loaded under it too
        np.testing.assert_array_equal(loaded.sample(patch, count=2, seed=4).invariances, expected[1])
    finally:
        torch.set_default_dtype(before)


def test_loading_models_leaves_the_callers_random_numbers_and_devices_are_checked(low_dose_slice):
    """Loading a model folder does not advance torch's or numpy's global random state (its
    networks are built with random weights, then loaded); device names torch would not run
    on, or a GPU index the machine lacks, are refused before any model moves."""
    from InvarianceExplorerLib.devices import resolve_device
    from InvarianceExplorerLib.sampler import load_invariance_models

    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    load_invariance_models("cnn10")
    assert torch.equal(torch_state, torch.get_rng_state()) and np.array_equal(numpy_state, np.random.get_state()[1])
    models = tiny_models()
    for device in ("meta", "xla", "cuda:abc", "gpu", "cpu:1", True):
        with pytest.raises(ValueError, match="unknown device .*: use 'auto', 'cpu', 'cuda' \\(or 'cuda:N'\\) or 'mps'"):
            InvarianceSampler(models, device=device)
    assert next(models.representation.parameters()).device.type == "cpu"
    assert resolve_device(None) == resolve_device("") == resolve_device("auto")
    if torch.cuda.is_available():
        assert resolve_device(0) == torch.device("cuda:0")
        with pytest.raises(ValueError, match="CUDA GPU\\(s\\), numbered from 0"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.warns(RuntimeWarning, match="no CUDA GPU is available; using the CPU"):
            assert resolve_device(0) == torch.device("cpu")
