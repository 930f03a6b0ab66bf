"""Held-out evaluation: noise in uniform regions, tables and model cards (small synthetic inputs)."""

from __future__ import annotations

import numpy as np
import pytest

from InvarianceExplorerLib.evaluation import noise_std, quality_table, uniform_regions
from InvarianceExplorerLib.phantom import Label


def test_noise_std_pools_components_about_their_own_means():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64))
    mask = np.zeros((64, 64), bool)
    mask[5:25, 5:25] = mask[35:60, 30:60] = True
    image[5:25, 5:25] = 40 + rng.normal(0, 10, (20, 20))  # two structures of different mean HU,
    image[35:60, 30:60] = -100 + rng.normal(0, 10, (25, 30))  # the same noise
    assert noise_std(image, mask) == pytest.approx(10.0, rel=0.08)
    assert np.std(image[mask]) > 50  # a plain std would count the structures
    small = np.zeros_like(mask)
    small[0:3, 0:3] = True
    assert noise_std(image, small) is None  # components under MIN_COMPONENT_PX are ignored


def test_uniform_regions_are_eroded_label_masks():
    labels = np.zeros((40, 40), np.uint8)
    labels[10:30, 10:30] = Label.HEART
    regions = uniform_regions(labels, erosion_px=3)
    assert regions["heart"].sum() == 14 * 14 and not regions["soft_tissue"].any()


def test_quality_table_rows():
    figures = {"low_dose": {"rmse_hu": 15.0, "psnr_db": 45.0, "ssim": 0.98, "noise_std_hu": {"heart": 30.0}},
               "cnn10": {"rmse_hu": 9.0, "psnr_db": 50.0, "ssim": 0.99, "rmse_reduction": 0.4,
                         "noise_std_hu": {"heart": 8.0}},
               "full_dose": {"noise_std_hu": {"heart": 15.0}}}
    table = quality_table({"figures": figures}).splitlines()
    assert len(table) == 5 and "| cnn10 | 9.0 | 40 % |" in table[3] and table[4].startswith("| full dose")
