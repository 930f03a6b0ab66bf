"""Procedural chest phantoms: HU per tissue, anatomy and its layout, seeding, nodule
records, grid invariance, stacks and the field of view."""

from __future__ import annotations


import numpy as np
import pytest
from scipy import ndimage

from InvarianceExplorerLib.image import CTImage
from InvarianceExplorerLib.phantom import (
    CONTRAST_HU_RANGES,
    HU_RANGES,
    Label,
    Nodule,
    chest_phantom,
    chest_stack,
)

FAST = dict(size=256, spacing=1.4)
NODULE_LABEL = {"solid": Label.NODULE_SOLID, "ground-glass": Label.NODULE_GROUND_GLASS}


def _interior(labels, label):
    """Pixels of ``label`` whose 3x3 neighbourhood holds the same label (no partial volume)."""
    return ndimage.binary_erosion(labels == label, np.ones((3, 3), bool))


def _centroid(mask):
    rows, cols = np.nonzero(mask)
    return rows.mean(), cols.mean()


def test_shapes_dtypes_and_geometry():
    p = chest_phantom(0, **FAST)
    assert p.hu.shape == p.labels.shape == p.nodule_map.shape == (256, 256)
    assert (p.hu.dtype, p.labels.dtype, p.nodule_map.dtype) == (np.float32, np.uint8, np.int16)
    assert p.spacing == (1.4, 1.4, 1.0) and p.seed == 0 and p.contrast is False
    assert set(np.unique(p.labels)) <= {int(label) for label in Label}
    assert all(isinstance(n, Nodule) for n in p.nodules)
    image = p.to_ctimage()
    assert isinstance(image, CTImage) and image.is_slice and image.spacing == p.spacing
    assert np.array_equal(image.array, p.hu)
    np.testing.assert_allclose(image.origin[:2], [-127.5 * 1.4] * 2)  # field-of-view centre at 0

    stack = chest_stack(0, 3, **FAST, slice_thickness=2.0)
    assert stack.hu.shape == stack.labels.shape == stack.nodule_map.shape == (3, 256, 256)
    assert stack.spacing == (1.4, 1.4, 2.0)
    volume = stack.to_ctimage()
    assert not volume.is_slice and volume.origin[2] == pytest.approx(-2.0)


@pytest.mark.parametrize("contrast", [False, True])
def test_hu_of_every_label_lies_in_its_nominal_range(contrast):
    ranges = CONTRAST_HU_RANGES if contrast else HU_RANGES
    values = {label: [] for label in Label}
    for seed in range(4):
        p = chest_phantom(seed, contrast=contrast)
        for label in Label:
            values[label].append(p.hu[_interior(p.labels, label)])
    for label in Label:
        v = np.concatenate(values[label])
        if label in NODULE_LABEL.values():
            if v.size == 0:
                continue  # few, small and maybe absent: their records are checked below
        else:
            assert v.size > 50, f"{label.name}: too few pixels away from edges"
        lo, hi = ranges[label]
        assert lo <= np.median(v) <= hi, f"{label.name}: median {np.median(v):.0f} HU outside {ranges[label]}"
        inside = np.mean((v >= lo) & (v <= hi))
        assert inside >= 0.98, f"{label.name}: only {inside:.1%} of its pixels in {ranges[label]} HU"
    if contrast:  # blood is brighter than without contrast agent
        plain = chest_phantom(0)
        enhanced = chest_phantom(0, contrast=True)
        aorta = _interior(plain.labels, Label.AORTA)
        assert np.array_equal(plain.labels, enhanced.labels)
        assert enhanced.hu[aorta].mean() > plain.hu[aorta].mean() + 100


def test_air_outside_the_body_is_exactly_minus_1000_and_edges_are_partial_volume():
    p = chest_phantom(1, **FAST)
    body = ndimage.binary_fill_holes(p.labels != Label.AIR)
    far_outside = ~ndimage.binary_dilation(body, iterations=2)
    assert far_outside.sum() > 10000
    assert np.all(p.hu[far_outside] == -1000.0)
    assert np.all(p.labels[~body] == Label.AIR)
    assert not np.any(p.labels[body] == Label.AIR)  # no air label inside the body
    # skin: pixels between air and fat take intermediate HU (smooth, not aliased, edges)
    skin = ndimage.binary_dilation(body, iterations=1) & ~ndimage.binary_erosion(body, iterations=1)
    partial = (p.hu[skin] > -990) & (p.hu[skin] < -200)
    assert partial.sum() > 100


def test_every_structure_is_present_and_in_place():
    for seed in range(6):
        p = chest_phantom(seed, **FAST)
        present = set(np.unique(p.labels).tolist())
        required = set(Label) - {Label.NODULE_SOLID, Label.NODULE_GROUND_GLASS}
        assert required <= present, f"seed {seed}: missing {sorted(required - present)}"
        for kind in NODULE_LABEL:
            assert (NODULE_LABEL[kind] in present) == any(n.kind == kind for n in p.nodules)

        lungs, n = ndimage.label(p.labels == Label.LUNG)
        sizes = np.sort(np.bincount(lungs.ravel())[1:])[::-1]
        assert n >= 2 and sizes[1] > 0.3 * sizes[0], f"seed {seed}: two lungs expected"

        body_row, body_col = _centroid(p.labels != Label.AIR)
        spine_row, spine_col = _centroid(p.labels == Label.TRABECULAR_BONE)
        heart_row, heart_col = _centroid(p.labels == Label.HEART)
        aorta = ndimage.label(p.labels == Label.AORTA)[0]
        assert abs(spine_col - body_col) < 15 and spine_row > body_row  # posterior midline
        assert heart_row < spine_row - 20 and heart_col > body_col  # anterior, patient's left
        descending = max(range(1, aorta.max() + 1), key=lambda k: _centroid(aorta == k)[0])
        aorta_row, aorta_col = _centroid(aorta == descending)
        assert aorta_col > spine_col and abs(aorta_row - spine_row) < 25  # left of the spine

        fat, muscle = p.labels == Label.FAT, p.labels == Label.SOFT_TISSUE
        skin = ndimage.binary_dilation(p.labels == Label.AIR) & (p.labels != Label.AIR)
        assert np.mean(fat[skin]) > 0.9  # subcutaneous fat under the skin
        ribs = ndimage.label(p.labels == Label.CORTICAL_BONE)[1]
        assert ribs >= 8  # ribs, sternum and vertebra
        assert muscle.sum() > fat.sum() * 0.2


def test_same_seed_same_phantom_and_seeds_vary():
    a, b = chest_phantom(7, **FAST), chest_phantom(7, **FAST)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.nodule_map, b.nodule_map) and a.nodules == b.nodules
    phantoms = [chest_phantom(seed, **FAST) for seed in range(12)]
    areas = [np.sum(p.labels != Label.AIR) for p in phantoms]
    assert np.std(areas) / np.mean(areas) > 0.05  # body size varies
    assert len({len(p.nodules) for p in phantoms}) >= 3
    hu = np.stack([p.hu for p in phantoms])
    assert all(np.mean(np.abs(hu[i] - hu[i + 1])) > 20 for i in range(len(hu) - 1))
    vessels = [np.sum(p.labels == Label.VESSEL) for p in phantoms]
    assert len(set(vessels)) == len(vessels)


def test_nodule_records_match_the_maps():
    kinds, diameters = set(), []
    for seed in range(20):
        p = chest_phantom(seed, **FAST)
        assert [n.index for n in p.nodules] == list(range(1, len(p.nodules) + 1))
        assert set(np.unique(p.nodule_map)) == set(range(len(p.nodules) + 1))
        in_nodule = np.isin(p.labels, list(NODULE_LABEL.values()))
        assert np.array_equal(in_nodule, p.nodule_map > 0)
        for n in p.nodules:
            mask = p.nodule_map == n.index
            assert 2.0 <= n.diameter_mm <= 15.0 and n.z_mm == 0.0
            assert np.all(p.labels[mask] == NODULE_LABEL[n.kind])
            row, col = _centroid(mask)
            assert abs(col * 1.4 - n.center_mm[0]) < 1.0 and abs(row * 1.4 - n.center_mm[1]) < 1.0
            area = mask.sum() * 1.4**2
            assert area == pytest.approx(np.pi * n.diameter_mm**2 / 4, abs=6.0, rel=0.25)
            ring = ndimage.binary_dilation(mask, iterations=2) & ~ndimage.binary_dilation(mask)
            assert np.isin(p.labels[ring], [Label.LUNG, Label.VESSEL, Label.AIRWAY]).mean() > 0.8  # in a lung
            kinds.add(n.kind)
            diameters.append(n.diameter_mm)
    assert kinds == {"solid", "ground-glass"}
    assert min(diameters) < 5.0 < max(diameters)


def test_the_anatomy_is_the_same_on_a_finer_grid():
    coarse, fine = chest_phantom(3, 256, 1.4), chest_phantom(3, 512, 0.7)
    binned = fine.hu.reshape(256, 2, 256, 2).mean(axis=(1, 3))
    assert np.corrcoef(binned.ravel(), coarse.hu.ravel())[0, 1] > 0.98
    assert np.median(np.abs(binned - coarse.hu)) < 10
    for c, f in zip(coarse.nodules, fine.nodules):
        assert (c.kind, c.diameter_mm) == (f.kind, f.diameter_mm)
        # pixel [0, 0] of the fine grid lies half a fine pixel before that of the coarse one
        np.testing.assert_allclose(np.subtract(f.center_mm, c.center_mm), 0.35, atol=1e-9)
    for label in (Label.LUNG, Label.HEART, Label.TRABECULAR_BONE):
        area_coarse = np.sum(coarse.labels == label) * 1.4**2
        area_fine = np.sum(fine.labels == label) * 0.7**2
        assert area_coarse == pytest.approx(area_fine, rel=0.05)


def test_stacks_are_continuous_and_centred_on_the_single_slice():
    stack = chest_stack(5, 7, **FAST, slice_thickness=1.0)
    single = chest_phantom(5, **FAST)
    # the middle slice is the single slice except where nodules (drawn within the stack) lie
    away = ~ndimage.binary_dilation((stack.nodule_map[3] > 0) | (single.nodule_map > 0), iterations=3)
    assert np.array_equal(stack.hu[3][away], single.hu[away])
    lungs = np.isin(stack.labels[3], [Label.LUNG, Label.VESSEL, Label.AIRWAY])
    lungs = ndimage.binary_erosion(ndimage.binary_fill_holes(lungs), iterations=3)

    def similarity(i, j):  # of the vessels and texture in the lungs
        return np.corrcoef(stack.hu[i][lungs], stack.hu[j][lungs])[0, 1]

    near = [similarity(k, k + 1) for k in range(6)]
    assert min(near) > 0.6 and similarity(0, 6) < min(near) - 0.3  # adjacent slices alike, far ones not
    assert np.all(np.mean(stack.labels[:-1] == stack.labels[1:], axis=(1, 2)) > 0.97)
    for n in stack.nodules:  # spheres: largest in the slice nearest their centre
        assert 0.0 <= n.z_mm <= 6.0
        areas = [(stack.nodule_map[k] == n.index).sum() for k in range(7)]
        if max(areas) > 0:
            assert abs(int(np.argmax(areas)) - n.z_mm) <= 1.0


@pytest.mark.parametrize("size, spacing", [(256, 1.4), (512, 0.7), (128, 1.4)])
def test_everything_lies_inside_the_field_of_view(size, spacing):
    c = (np.arange(size) - (size - 1) / 2) * spacing
    outside = np.hypot(c[None, :], c[:, None]) > size * spacing / 2 - 2 * spacing
    for seed in range(4):
        p = chest_phantom(seed, size, spacing)
        assert np.all(p.hu[outside] == -1000.0) and np.all(p.labels[outside] == Label.AIR)
        assert np.all(p.hu >= -1000.0) and np.all(np.isfinite(p.hu))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        chest_phantom(0, size=4)
    with pytest.raises(ValueError):
        chest_stack(0, 0)
    with pytest.raises(ValueError):
        chest_phantom(0, spacing=0.0)
