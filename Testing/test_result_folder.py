"""Reading `sample` results folders and the geometry the Slicer layer gives their nodes (plain
functions, no Qt, no slicer), and the bundled sample CT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from InvarianceExplorerLib.image import CTImage
from InvarianceExplorerLib.io import read_image
from InvarianceExplorerLib.result_folder import (FILES, check_center, geometry_from_ijk_to_ras, ijk_to_ras,
                                                 load_result, ras_to_ijk_index, result_node_names, sample_table)
from InvarianceExplorerLib.sample_data import SAMPLE_CT, sample_ct_path
from ui_helpers import crop_image, make_volume, write_sample_folder


def test_ijk_to_ras_negates_lps_x_and_y():
    # axis-aligned: RAS = (-x, -y, z) of LPS; columns are the spacings along the axes
    image = CTImage(np.zeros((2, 3, 4)), (0.5, 0.75, 2.0), (10.0, 20.0, 30.0))
    expected = np.array([[-0.5, 0, 0, -10.0], [0, -0.75, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(ijk_to_ras(image), expected)
    # oblique: voxel (i, j, k) lands where origin + D @ (S * ijk) says, with x and y negated
    volume = make_volume()
    m = ijk_to_ras(volume)
    lps = np.asarray(volume.origin) + volume.direction_matrix @ (np.asarray(volume.spacing) * [3, 5, 1])
    np.testing.assert_allclose((m @ [3, 5, 1, 1])[:3], lps * [-1, -1, 1])
    spacing, origin, direction = geometry_from_ijk_to_ras(m)
    np.testing.assert_allclose(spacing, volume.spacing)
    np.testing.assert_allclose(origin, volume.origin)
    np.testing.assert_allclose(direction, volume.direction, atol=1e-12)
    assert ras_to_ijk_index((m @ [7.4, 2.6, 2.2, 1])[:3], m) == (7, 3, 2)


def test_check_center_names_the_volume_size():
    check_center((0, 0, 0), (1, 4, 5))
    with pytest.raises(ValueError, match=r"voxel 5, 0, 0\) lies outside the volume \(5 x 4 x 1 voxels\)"):
        check_center((5, 0, 0), (1, 4, 5))


def test_load_result_reads_the_folder_with_the_crop_geometry(tmp_path):
    volume = make_volume()
    outputs = write_sample_folder(tmp_path / "run", volume, (20, 24, 2), patch=16, count=5)
    result = load_result(tmp_path / "run")
    assert result.count == 5 and result.crop.array.shape == (1, 16, 16)
    assert set(result.volumes) == {"input", "denoised", "reconstruction", "invariances", "denoised_invariances",
                                   "std"}
    crop = crop_image(volume, (20, 24, 2), 16)
    np.testing.assert_allclose(result.crop_ijk_to_ras(), ijk_to_ras(crop), atol=1e-4)
    frames = result.frames("invariances")
    assert len(frames) == 5 and frames[2].shape == (1, 16, 16)
    np.testing.assert_array_equal(frames[2][0], read_image(outputs["invariances"]).array[2])
    table = result.table()
    assert list(table) == ["sample", "mean |x~ - x| (HU)", "mean |f(x~) - f(x)| (HU)"]
    np.testing.assert_array_equal(table["sample"], np.arange(5))
    assert result.figure is None
    # incomplete or inconsistent folders are refused with the reason
    (tmp_path / "run" / FILES["invariances"]).unlink()
    with pytest.raises(ValueError, match="missing invariances.nrrd"):
        load_result(tmp_path / "run")
    write_sample_folder(tmp_path / "bad", volume, (20, 24, 2), patch=16, count=5)
    numbers = json.loads((tmp_path / "bad" / FILES["numbers"]).read_text())
    (tmp_path / "bad" / FILES["numbers"]).write_text(json.dumps({**numbers, "count": 6}))
    with pytest.raises(ValueError, match="5 samples, numbers.json says 6"):
        load_result(tmp_path / "bad")
    with pytest.raises(ValueError, match="no such results folder"):
        load_result(tmp_path / "none")


def test_table_is_in_sample_order_and_names_follow_the_input():
    numbers = {"samples": [{"index": 1, "mean_abs_change_hu": 2.0, "mean_abs_output_change_hu": 0.2},
                           {"index": 0, "mean_abs_change_hu": 1.0, "mean_abs_output_change_hu": 0.1}]}
    table = sample_table(numbers)
    np.testing.assert_array_equal(table["mean |x~ - x| (HU)"], [1.0, 2.0])
    names = result_node_names("chest")
    assert names["invariances"] == "chest invariances" and names["std"] == "chest std of invariances"
    assert len(set(names.values())) == len(names)


def test_bundled_sample_ct_matches_its_checksum_and_is_a_low_dose_chest():
    from InvarianceExplorerLib.denoisers import sha256

    path = sample_ct_path()
    assert path.is_file() and sha256(path) == SAMPLE_CT["sha256"]
    image = read_image(path)
    assert image.array.shape == (3, 512, 512) and image.spacing == (0.7, 0.7, 2.0)
    assert image.array.min() <= -900 and image.array.max() >= 300  # air and bone
    assert 100 < path.stat().st_size < 1_000_000
