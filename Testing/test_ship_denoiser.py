"""Shipping a trained denoiser folder as a bundled one (evaluation.ship_denoiser)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from InvarianceExplorerLib.denoisers import (copy_model_folder, load_denoiser, read_metadata, resolve_model_folder,
                                           save_weights, write_metadata)
from InvarianceExplorerLib.evaluation import ship_denoiser
from InvarianceExplorerLib.sampler import InvarianceSampler, load_invariance_models
from InvarianceExplorerLib.simulated_dataset import build_simulated_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A float32 model folder of CNN-10 with invariance models: the bundled folder with its
    denoiser weights stored as float32, as `train denoiser` and `train invariance` leave it."""
    root = tmp_path_factory.mktemp("ship")
    folder = copy_model_folder(resolve_model_folder("cnn10"), root / "trained")
    record = read_metadata(folder)
    record["weights"]["denoiser"] = save_weights(load_denoiser(folder).network.float(),
                                                 folder / record["weights"]["denoiser"]["file"], "float32")
    write_metadata(folder, record)
    build_simulated_dataset(root / "data", 10, size=128, seed=5, progress=False)
    return folder, root / "data"


def test_shipping_keeps_the_invariance_models_and_their_checksums(trained, tmp_path):
    folder, data = trained
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="2.80 mm pixels but cnn10 was trained on 0.70 mm"):  # 128² test data
        choice = ship_denoiser(folder, tmp_path / "cnn10", data, limit=2)
    shipped = read_metadata(tmp_path / "cnn10")
    assert choice["dtype"] == "float16" and shipped["weights"]["denoiser"]["dtype"] == "float16"
    assert shipped["weights"]["cvae"] == read_metadata(folder)["weights"]["cvae"]
    assert shipped["weights"]["cinn"] == read_metadata(folder)["weights"]["cinn"]
    assert (tmp_path / "cnn10" / "MODEL_CARD.md").is_file()
    models = load_invariance_models(tmp_path / "cnn10")  # checksums checked on load
    size = models.patch_size
    result = InvarianceSampler(models).sample(np.random.default_rng(0).normal(-700.0, 20.0, (size, size)).astype(np.float32), count=2, seed=0)
    assert result.invariances.shape == (2, size, size)
    # a denoiser without invariance models shipped over this folder: they go, and it is said
    plain = copy_model_folder(folder, tmp_path / "plain")
    record = read_metadata(plain)
    for name in ("cvae", "cinn"):
        (plain / record["weights"].pop(name)["file"]).unlink()
    write_metadata(plain, record)
    with pytest.warns(RuntimeWarning, match="2.80 mm pixels"), \
            pytest.warns(RuntimeWarning, match="its cinn, cvae weights, trained for the denoiser shipped there before"):
        ship_denoiser(plain, tmp_path / "cnn10", data, limit=2)
    assert set(read_metadata(tmp_path / "cnn10")["weights"]) == {"denoiser"}
