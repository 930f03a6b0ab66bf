"""The one HU normalisation and the CT image type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from InvarianceExplorerLib import CTImage
from InvarianceExplorerLib.normalization import PAPER_NORMALIZATION, HUNormalization


def test_paper_normalisation_numbers():
    n = PAPER_NORMALIZATION
    # (HU + 1024 - 481.45) / 502.19, as in the paper and eeulig/ldct-benchmark
    assert n.normalize(np.float64(-1024.0)) == pytest.approx(-481.45 / 502.19)
    assert n.normalize(np.float64(481.45 - 1024.0)) == pytest.approx(0.0)
    assert n.normalize(np.float64(0.0)) == pytest.approx((1024 - 481.45) / 502.19)


def test_normalise_denormalise_round_trip_numpy_and_torch():
    hu = np.linspace(-1024, 3000, 101, dtype=np.float32)
    np.testing.assert_allclose(PAPER_NORMALIZATION.denormalize(PAPER_NORMALIZATION.normalize(hu)), hu, atol=1e-3)
    t = torch.from_numpy(hu)
    torch.testing.assert_close(PAPER_NORMALIZATION.denormalize(PAPER_NORMALIZATION.normalize(t)), t, atol=1e-3, rtol=0)


def test_monai_transform_is_the_same_map():
    hu = np.random.default_rng(0).uniform(-1000, 1500, (1, 16, 16)).astype(np.float32)
    out = PAPER_NORMALIZATION.monai_transform()(hu)
    np.testing.assert_allclose(np.asarray(out), PAPER_NORMALIZATION.normalize(hu), rtol=1e-5, atol=1e-5)
    d = PAPER_NORMALIZATION.monai_transform(keys=["ld", "fd"])({"ld": hu, "fd": hu + 10})
    np.testing.assert_allclose(np.asarray(d["fd"]) - np.asarray(d["ld"]), 10 / 502.19, rtol=1e-4)


def test_parameterised_and_serialisable():
    n = HUNormalization(offset=0.0, mean=-500.0, std=250.0)
    assert n.normalize(-500.0) == 0.0 and n.normalize(-250.0) == 1.0
    assert HUNormalization.from_dict(n.to_dict()) == n
    with pytest.raises(ValueError, match="std"):
        HUNormalization(std=0.0)


def test_ctimage_geometry_and_slices():
    vol = CTImage(np.zeros((3, 4, 5), np.int16), spacing=(0.5, 0.6, 2.0), origin=(1, 2, 3))
    assert vol.array.dtype == np.float32 and not vol.is_slice
    slices = list(vol.slices())
    assert len(slices) == 3 and slices[2].origin == (1.0, 2.0, 7.0) and slices[2].is_slice
    s = CTImage(np.zeros((4, 5)), spacing=(0.7, 0.7))
    assert s.spacing == (0.7, 0.7, 1.0) and s.pixel_spacing == (0.7, 0.7)
    assert s.with_array(np.ones((4, 5))).array.sum() == 20
    with pytest.raises(ValueError, match="shape"):
        s.with_array(np.ones((5, 4)))
    with pytest.raises(ValueError, match="2D"):
        CTImage(np.zeros(5))
    with pytest.raises(ValueError, match="spacing"):
        CTImage(np.zeros((2, 2)), spacing=(0.0, 1.0, 1.0))
