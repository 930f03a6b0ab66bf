"""The Slicer layer (InvarianceExplorer/InvarianceExplorer.py) under the SLICER STAND-IN
(Testing/slicer_standin: slicer.util / MRML calls on the real vtk wheel; not 3D Slicer).

Checked: the parameter node's defaults, the point -> voxel and ROI centre -> voxel conversion,
export of the input without touching the scene, the crop geometry of every result node
(IJK-to-RAS of the crop, NRRD/LPS vs RAS), sequence contents and their browser, table columns
and chart, the analysis's anatomy changes as a segmentation, placement in the input's study,
replace-not-duplicate on re-run (asking about renamed results), and a scene left unchanged by
a failing import, by an engine error and by cancel (real engine processes); the widget: point
or ROI, one Show button per output, and an input selector that does not offer the results.
The real-Slicer check is the module's self-test.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import vtk  # noqa: E402

import slicer_standin  # noqa: E402
from InvarianceExplorerLib.io import read_image  # noqa: E402
from InvarianceExplorerLib.result_folder import FILES, result_node_names  # noqa: E402
from InvarianceExplorerLib.ui.process import process_group_alive  # noqa: E402
from ui_helpers import write_analysis_folder, write_sample_folder  # noqa: E402

#: An oblique RAS geometry typed out by hand (rows of IJK-to-RAS), independent of the code under test.
C, S = np.cos(np.deg2rad(30.0)), np.sin(np.deg2rad(30.0))
VOLUME_IJK_TO_RAS = np.array([[-0.7 * C, 0.8 * S, 0.0, 121.0],
                              [-0.7 * S, -0.8 * C, 0.0, 95.5],
                              [0.0, 0.0, 2.5, -33.0],
                              [0.0, 0.0, 0.0, 1.0]])
SHAPE = (4, 48, 56)  # (k, j, i)
CENTER = (30, 20, 2)  # (i, j, k)
PATCH = 16


@pytest.fixture()
def slicer():
    module = slicer_standin.install()
    yield module
    slicer_standin.uninstall()


@pytest.fixture()
def module(slicer):
    import importlib

    import InvarianceExplorer

    return importlib.reload(InvarianceExplorer)


def vtk_matrix(array):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


def numpy_matrix(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def add_volume(slicer, name="LD chest"):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    array = np.random.default_rng(0).normal(-700, 60, SHAPE).astype(np.float32)
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(vtk_matrix(VOLUME_IJK_TO_RAS))
    node.CreateDefaultDisplayNodes()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    study = sh.CreateStudyItem(sh.GetSceneItemID(), "study")
    sh.SetItemParent(sh.GetItemByDataNode(node), study)
    return node, array, study


def voxel_ras(i, j, k):
    return (VOLUME_IJK_TO_RAS @ np.array([i, j, k, 1.0]))[:3]


def snapshot(slicer):
    """Everything the tests can see of a scene: nodes, names, attributes, subject hierarchy parents."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    return sorted((n.GetID(), n.GetClassName(), n.GetName(), tuple(sorted(n._attributes.items())),
                   sh.GetItemParent(sh.GetItemByDataNode(n)) if not n.IsA("vtkMRMLColorTableNode") else 0)
                  for n in slicer.mrmlScene.GetNodes())


def results_folder(module, slicer, volume, tmp_path, count=5, seed=0):
    """Export the volume as the module does, and write a sample folder cropped from the export."""
    logic = module.InvarianceExplorerLogic()
    exported = logic.exportVolume(volume, tmp_path / f"export{seed}.nrrd")
    image = read_image(exported)
    out = tmp_path / f"result{seed}"
    write_sample_folder(out, image, CENTER, patch=PATCH, count=count, seed=seed)
    return out, image


@pytest.fixture()
def python_slicer(tmp_path, monkeypatch):
    """PythonSlicer on PATH (this interpreter), as in a Slicer installation."""
    bin_dir = tmp_path / "slicer-bin"
    bin_dir.mkdir()
    launcher = bin_dir / "PythonSlicer"  # like Slicer's, a launcher of the real interpreter
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    return temp_root


def test_parameter_node_defaults_and_ranges(module):
    p = module.InvarianceExplorerLogic().getParameterNode()
    assert (p.sampleCount, p.seed, p.device, p.denoiser) == (32, 0, "auto", "cnn10")
    assert p.inputVolume is None and p.point is None and p.roi is None
    assert p.centerFrom == "point" and p.analyze is False and p.refine is True
    p.sampleCount = 8
    assert module.InvarianceExplorerLogic().getParameterNode().sampleCount == 8
    with pytest.raises(ValueError):
        p.sampleCount = 0
    with pytest.raises(ValueError):
        p.device = "tpu"
    with pytest.raises(ValueError):
        p.centerFrom = "segment"
    with pytest.raises(TypeError):  # typed as in Slicer: the GUI must hand over ints, strs, bools and nodes
        p.sampleCount = "8"
    with pytest.raises(ValueError):
        p.denoiser = None
    with pytest.raises(TypeError):
        p.point = module.slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "not a point list")


def test_point_to_voxel_and_export_keep_the_scene(module, slicer, tmp_path):
    logic = module.InvarianceExplorerLogic()
    volume, array, _ = add_volume(slicer)
    point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    point.AddControlPoint(*(voxel_ras(*CENTER) + [0.2, -0.2, 0.9]))  # within the voxel
    assert logic.centerIJK(volume, point) == CENTER
    assert logic.centerIJK(volume, tuple(voxel_ras(0, 47, 3))) == (0, 47, 3)
    with pytest.raises(ValueError, match="outside the volume"):
        logic.centerIJK(volume, tuple(voxel_ras(56, 10, 1)))
    with pytest.raises(ValueError, match="has no placed point"):
        logic.centerIJK(volume, slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "empty"))
    # only placed points count: not one whose position was unset, nor the preview in place mode
    moved = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "moved")
    moved.AddControlPoint(*voxel_ras(0, 47, 3))
    moved.UnsetNthControlPointPosition(0)
    moved.AddControlPoint(*voxel_ras(*CENTER))
    moved.AddControlPoint(*voxel_ras(2, 2, 2))
    moved.ResetNthControlPointPosition(2)
    assert logic.centerIJK(volume, moved) == CENTER
    moved.UnsetNthControlPointPosition(1)
    with pytest.raises(ValueError, match="has no placed point"):
        logic.centerIJK(volume, moved)
    before = snapshot(slicer)
    path = logic.exportVolume(volume, tmp_path / "input.nrrd")
    assert snapshot(slicer) == before
    written = sitk.ReadImage(path)
    # NRRD is LPS: x and y of RAS change sign; the voxels are stored as they are
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ VOLUME_IJK_TO_RAS
    np.testing.assert_allclose(written.GetOrigin(), lps[:3, 3], atol=1e-6)
    np.testing.assert_allclose(written.GetSpacing(), (0.7, 0.8, 2.5), atol=1e-9)
    np.testing.assert_allclose(np.reshape(written.GetDirection(), (3, 3)) * (0.7, 0.8, 2.5), lps[:3, :3], atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), array)


def test_roi_centre_picks_the_voxel_and_the_slice(module, slicer, tmp_path, python_slicer):
    logic = module.InvarianceExplorerLogic()
    volume, _, _ = add_volume(slicer)
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    with pytest.raises(ValueError, match="not placed"):
        logic.centerIJK(volume, roi)  # created, not placed yet (no control point)
    roi.SetCenter(*(voxel_ras(*CENTER) + [-0.2, 0.3, -1.0]))  # within the voxel (k spacing 2.5 mm)
    roi.SetSize(40.0, 25.0, 10.0)  # the size is not used: the crop is the model's patch
    assert logic.centerIJK(volume, roi) == CENTER
    roi.SetCenter(*voxel_ras(40, 5, 0))
    assert logic.centerIJK(volume, roi) == (40, 5, 0)
    roi.SetCenter(*voxel_ras(*CENTER))
    job = logic.prepareSampling(volume, "cnn10", roi, count=2, analyze=True)
    try:
        args = job.command[3:]
        assert args[args.index("--center") + 1] == "30,20,2" and job.centerIJK == CENTER
        assert "--analyze" in args
    finally:
        job.cleanup()
    plain = logic.prepareSampling(volume, "cnn10", roi, count=2)
    plain.cleanup()
    assert "--analyze" not in plain.command


def test_results_become_nodes_with_the_crop_geometry(module, slicer, tmp_path):
    logic = module.InvarianceExplorerLogic()
    volume, array, study = add_volume(slicer)
    folder, image = results_folder(module, slicer, volume, tmp_path, count=5)
    nodes = logic.importResults(volume, folder)
    names = result_node_names("LD chest")
    assert set(nodes) == {"crop", "denoised", "reconstruction", "std", "invariances", "denoised_invariances",
                          "browser", "invariances_proxy", "denoised_invariances_proxy", "table", "chart",
                          "series_change", "series_output_change"}
    for role, node in nodes.items():
        assert node.GetScene() is slicer.mrmlScene
        assert node.GetAttribute("InvarianceExplorer.InputVolumeID") == volume.GetID()
        assert node.GetAttribute("InvarianceExplorer.Role") == role
        assert node.GetName() == names[role.replace("_proxy", "")]

    # geometry: the crop's IJK-to-RAS is the volume's, moved to the crop's corner voxel
    i0, j0, k = CENTER[0] - PATCH // 2, CENTER[1] - PATCH // 2, CENTER[2]
    expected = VOLUME_IJK_TO_RAS.copy()
    expected[:3, 3] = voxel_ras(i0, j0, k)
    crop_array = array[k, j0:j0 + PATCH, i0:i0 + PATCH]
    for role in ("crop", "denoised", "reconstruction", "std", "invariances_proxy", "denoised_invariances_proxy"):
        np.testing.assert_allclose(numpy_matrix(nodes[role]), expected, atol=1e-4, err_msg=role)
        assert slicer.util.arrayFromVolume(nodes[role]).shape == (1, PATCH, PATCH)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(nodes["crop"])[0], crop_array)
    # the point's voxel is the crop's centre
    np.testing.assert_allclose((numpy_matrix(nodes["crop"]) @ [PATCH // 2, PATCH // 2, 0, 1])[:3],
                               voxel_ras(*CENTER), atol=1e-4)

    # sequences: one frame per sample, in order, with the crop geometry; one browser for both
    stack = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / FILES["invariances"])))
    denoised_stack = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / FILES["denoised_invariances"])))
    for role, values in (("invariances", stack), ("denoised_invariances", denoised_stack)):
        seq = nodes[role]
        assert seq.GetNumberOfDataNodes() == 5 and seq.GetIndexName() == "sample"
        assert [seq.GetNthIndexValue(n) for n in range(5)] == ["0", "1", "2", "3", "4"]
        for n in range(5):
            frame = seq.GetNthDataNode(n)
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(frame)[0], values[n])
            np.testing.assert_allclose(numpy_matrix(frame), expected, atol=1e-4)
    browser = nodes["browser"]
    assert browser.GetMasterSequenceNode() is nodes["invariances"]
    assert browser.IsSynchronizedSequenceNodeID(nodes["denoised_invariances"].GetID())
    assert browser.GetProxyNode(nodes["invariances"]) is nodes["invariances_proxy"]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(nodes["invariances_proxy"])[0], stack[0])

    # display: lung window, std map in a colour map
    for role in ("crop", "denoised", "invariances_proxy", "denoised_invariances_proxy"):
        display = nodes[role].GetDisplayNode()
        assert not display.GetAutoWindowLevel() and (display.GetWindow(), display.GetLevel()) == (1500.0, -600.0)
    assert nodes["std"].GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeFileInferno.txt"

    # table and chart of the per-sample numbers
    numbers = json.loads((folder / FILES["numbers"]).read_text())
    table = nodes["table"].GetTable()
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert columns == ["sample", "mean |x~ - x| (HU)", "mean |f(x~) - f(x)| (HU)"]
    assert table.GetNumberOfRows() == 5
    np.testing.assert_allclose([table.GetValue(r, 1).ToDouble() for r in range(5)],
                               [s["mean_abs_change_hu"] for s in numbers["samples"]])
    assert [table.GetValue(r, 0).ToInt() for r in range(5)] == [0, 1, 2, 3, 4]
    assert nodes["table"].GetAttribute("InvarianceExplorer.Consistency") == "0.5"
    chart = nodes["chart"]
    series = [slicer.mrmlScene.GetNodeByID(chart.GetNthPlotSeriesNodeID(n)) for n in range(2)]
    assert [(s.GetXColumnName(), s.GetYColumnName(), s.GetTableNodeID()) for s in series] == \
        [("sample", c, nodes["table"].GetID()) for c in columns[1:]]
    colours = [s.GetColor() for s in series]  # told apart (Slicer makes every new series black)
    assert (0.0, 0.0, 0.0) not in colours and max(abs(a - b) for a, b in zip(*colours)) >= 0.1
    # in the input's study
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    assert {sh.GetItemParent(sh.GetItemByDataNode(n)) for n in nodes.values()} == {study}
    assert logic.resultNodes(volume) == nodes


def test_rerun_replaces_the_previous_results_and_asks_about_renamed_ones(module, slicer, tmp_path):
    logic = module.InvarianceExplorerLogic()
    volume, _, _ = add_volume(slicer)
    other, _, _ = add_volume(slicer, "other CT")
    first_folder, _ = results_folder(module, slicer, volume, tmp_path, seed=0)
    second_folder, _ = results_folder(module, slicer, volume, tmp_path, seed=1)
    other_nodes = logic.importResults(other, first_folder)
    first = logic.importResults(volume, first_folder)
    count = slicer.mrmlScene.GetNumberOfNodes()
    # the user moves the sample slider: Slicer copies item 2 into the proxies, attributes and all
    first["browser"].SetSelectedItemNumber(2)
    proxy = first["invariances_proxy"]
    assert np.array_equal(slicer.util.arrayFromVolume(proxy),
                          slicer.util.arrayFromVolume(first["invariances"].GetNthDataNode(2)))
    assert proxy.GetAttribute("InvarianceExplorer.InputVolumeID") is None  # so results are found via the browser
    assert logic.resultNodes(volume) == first and proxy.GetID() in logic.resultVolumeIDs()
    second = logic.importResults(volume, second_folder)
    assert slicer.mrmlScene.GetNumberOfNodes() == count  # replaced, not duplicated
    assert all(node.GetScene() is None for node in first.values())
    assert all(node.GetScene() is slicer.mrmlScene for node in list(second.values()) + list(other_nodes.values()))
    assert slicer.answers.asked == []
    # a renamed result: the user is asked; "no" keeps it as the user's own node
    second["std"].SetName("my std map")
    slicer.answers.reply = False
    third = logic.importResults(volume, first_folder)
    assert len(slicer.answers.asked) == 1
    assert second["std"].GetScene() is slicer.mrmlScene and second["std"].GetAttribute(
        "InvarianceExplorer.InputVolumeID") is None
    assert all(n.GetScene() is slicer.mrmlScene for n in list(second.values()) + list(third.values()))
    assert logic.resultNodes(volume) == third
    third["crop"].SetName("renamed crop")
    slicer.answers.reply = True
    logic.importResults(volume, second_folder)
    assert len(slicer.answers.asked) == 2 and third["crop"].GetScene() is None


def test_a_failing_import_leaves_the_scene_unchanged(module, slicer, tmp_path):
    logic = module.InvarianceExplorerLogic()
    volume, _, _ = add_volume(slicer)
    good, _ = results_folder(module, slicer, volume, tmp_path, seed=0)
    logic.importResults(volume, good)
    bad, _ = results_folder(module, slicer, volume, tmp_path, seed=1)
    before = snapshot(slicer)
    update_table = slicer.util.updateTableFromArray

    def failing(*args, **named):  # fails after the volumes and sequences were made
        raise RuntimeError("the table could not be filled")

    slicer.util.updateTableFromArray = failing
    try:
        with pytest.raises(RuntimeError, match="table could not be filled"):
            logic.importResults(volume, bad)
    finally:
        slicer.util.updateTableFromArray = update_table
    assert snapshot(slicer) == before
    numbers = json.loads((bad / FILES["numbers"]).read_text())
    for sample in numbers["samples"]:
        del sample["mean_abs_output_change_hu"]  # a damaged folder: refused before any node is made
    (bad / FILES["numbers"]).write_text(json.dumps(numbers))
    with pytest.raises(ValueError, match="lacks a number"):
        logic.importResults(volume, bad)
    assert snapshot(slicer) == before


def test_engine_error_and_cancel_leave_the_scene_unchanged(module, slicer, tmp_path, python_slicer):
    logic = module.InvarianceExplorerLogic()
    volume, _, _ = add_volume(slicer)
    point = tuple(voxel_ras(*CENTER))
    before = snapshot(slicer)
    # a real engine process (PythonSlicer -m InvarianceExplorerLib sample ...) that fails
    events = []
    with pytest.raises(RuntimeError) as failure:
        logic.sampleInvariances(volume, str(tmp_path / "no-model"), point, count=2, device="cpu",
                                progressCallback=events.append)
    assert "no-model: neither a model folder nor a bundled denoiser name" in str(failure.value)
    assert snapshot(slicer) == before and list(python_slicer.iterdir()) == []
    # cancel while the engine runs
    job = logic.prepareSampling(volume, str(tmp_path / "no-model"), point, count=2)
    assert job.command[0] == str(tmp_path / "slicer-bin" / "PythonSlicer")
    args = job.command[3:]
    assert args[args.index("--center") + 1] == "30,20,2" and Path(job.temp_dir, "input.nrrd").is_file()
    job.start()
    assert job.running
    job.cancel()
    assert job.finished_event["event"] == "cancelled" and not process_group_alive(job.process.pid)
    assert not job.temp_dir.exists() and list(python_slicer.iterdir()) == []
    assert snapshot(slicer) == before


def test_widget_plugs_node_selectors_into_the_panel_and_keeps_the_parameter_node(module, slicer, tmp_path,
                                                                                 python_slicer):
    from InvarianceExplorerLib.ui.panel import DENOISERS, RUN_TEXT
    from InvarianceExplorerLib.ui.qtshim import application, qt
    from ui_helpers import wait_until

    application()
    volume, _, _ = add_volume(slicer)
    widget = module.InvarianceExplorerWidget()
    widget.setup()
    panel = widget.panel
    form = panel.inputsForm
    assert [form.itemAt(r, qt.QFormLayout.LabelRole).widget().text() for r in range(3)] == \
        ["Input volume:", "Centre:", "Denoiser:"]
    p = widget.logic.getParameterNode()
    assert p.inputVolume is volume and widget.volumeSelector.currentNode() is volume  # the first CT is picked
    panel.countSpin.setValue(8)
    panel.denoiserCombo.setCurrentIndex(len(DENOISERS))  # "Custom model folder…", then as Browse…
    panel.customFolderEdit.setText(str(tmp_path / "no-model"))  # does, or as the user types it
    assert (p.denoiser, p.customModelFolder) == ("custom", str(tmp_path / "no-model"))
    widget.enter()  # back from placing the point in Markups: the folder is kept
    assert panel.settings()["model"] == str(tmp_path / "no-model")
    panel.deviceCombo.setCurrentIndex(1)
    assert (p.sampleCount, p.denoiser, p.customModelFolder, p.device) == (8, "custom", str(tmp_path / "no-model"),
                                                                          "cpu")
    assert p.centerFrom == "point" and not p.analyze
    assert not panel.start() and "Place a point" in panel.errorText()
    point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    point.AddControlPoint(*voxel_ras(*CENTER))
    widget.pointWidget.setCurrentNode(point)
    assert p.point is point
    # a second widget (module re-entered) shows the saved settings
    again = module.InvarianceExplorerWidget()
    again.setup()
    assert again.panel.settings() == panel.settings() and again.pointWidget.currentNode() is point
    scene = slicer.mrmlScene  # scene observers come from VTKObservationMixin, as in Slicer, and go on cleanup
    assert again.hasObserver(scene, scene.NodeAddedEvent, again.onNodeAdded)
    again.cleanup()
    assert not again.hasObserver(scene, scene.NodeAddedEvent, again.onNodeAdded)
    # File > Close scene: the parameter node is reset, the panel shows it, a new CT is picked
    scene.Clear()
    assert p.inputVolume is None and p.point is None and p.sampleCount == 32
    assert widget.volumeSelector.currentNode() is None and panel.countSpin.value() == 32
    newVolume, _, _ = add_volume(slicer, "next CT")
    widget.enter()
    assert p.inputVolume is newVolume and widget.volumeSelector.currentNode() is newVolume
    before = snapshot(slicer)
    assert p.denoiser == "cnn10"  # reset with the scene: the bundled CNN-10
    assert panel.start(), panel.errorText()  # a real engine process; it refuses the CT, smaller than a patch
    wait_until(lambda: not panel.running, timeout=60)
    assert "the image is 56 x 48 pixels, smaller than the 128 x 128 patch" in panel.errorText()
    assert panel.lastEvent["kind"] == "input" and panel.runButton.text() == RUN_TEXT
    assert snapshot(slicer) == before and list(python_slicer.iterdir()) == []


def analysis_labels():
    """Method A's labelmaps of 5 samples (1 added, 2 removed) and method B's, by hand."""
    altered = np.zeros((5, PATCH, PATCH), np.uint8)
    altered[0, 2:5, 3:6] = 1
    altered[1, 2:3, 10:12] = 1
    altered[3, 8:10, 8:12] = 2
    altered[4, 3:4, 4:5] = 2  # overlaps sample 0's added region: both segments hold it
    significant = np.zeros((PATCH, PATCH), np.uint8)
    significant[12:14, 1:4] = 1
    return altered, significant


def segments_by_name(node):
    segmentation = node.GetSegmentation()
    return {segmentation.GetNthSegment(n).GetName(): segmentation.GetNthSegmentID(n)
            for n in range(segmentation.GetNumberOfSegments())}


def test_analysis_becomes_a_segmentation_in_the_crop_geometry_replaced_on_rerun(module, slicer, tmp_path):
    logic = module.InvarianceExplorerLogic()
    volume, _, study = add_volume(slicer)
    folder, _ = results_folder(module, slicer, volume, tmp_path, seed=0)
    altered, significant = analysis_labels()
    write_analysis_folder(folder, altered, significant)
    nodes = logic.importResults(volume, folder)
    seg = nodes["anatomy_changes"]
    assert seg.IsA("vtkMRMLSegmentationNode") and seg.GetName() == "LD chest anatomy changes"
    assert seg.GetAttribute("InvarianceExplorer.InputVolumeID") == volume.GetID()
    assert seg.GetAttribute("InvarianceExplorer.Role") == "anatomy_changes"
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    ids = segments_by_name(seg)
    added, removed, flagged = (name for _, _, name, _ in module.ANATOMY_SEGMENTS)
    assert list(ids) == [added, removed, flagged]
    expected = {added: (altered == 1).any(axis=0), removed: (altered == 2).any(axis=0), flagged: significant == 1}
    for name, mask in expected.items():
        # on the crop's grid (the stand-in resamples only between aligned grids: any other geometry raises)
        voxels = slicer.util.arrayFromSegmentBinaryLabelmap(seg, ids[name], nodes["crop"])
        assert voxels.shape == (1, PATCH, PATCH)
        np.testing.assert_array_equal(voxels[0], mask.astype(np.uint8), err_msg=name)
    assert seg.GetSegmentation().GetSegment(ids[removed]).GetColor() == (0.2, 0.6, 1.0)
    assert seg.GetDisplayNode() is not None and seg.GetDisplayNode().GetVisibility()
    assert slicer.util.getNodesByClass("vtkMRMLLabelMapVolumeNode") == []  # the import's labelmaps are gone

    # method A's change maps: a third sequence of the browser, frame k beside invariance k, on the crop's grid
    changes, browser = nodes["change_maps"], nodes["browser"]
    assert changes.GetName() == "LD chest change maps (method A, z)" and changes.GetNumberOfDataNodes() == 5
    assert browser.IsSynchronizedSequenceNodeID(changes.GetID())
    for n in range(5):
        frame = changes.GetNthDataNode(n)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(frame)[0], 3.0 * altered[n])
        np.testing.assert_allclose(numpy_matrix(frame), numpy_matrix(nodes["crop"]), atol=1e-6)
    display = nodes["change_maps_proxy"].GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"
    assert (display.GetWindow(), display.GetLevel()) == (12.0, 0.0)  # symmetric: -max|z| .. +max|z| (6)
    # method B's significance map: a volume in a heat colour map
    significance = nodes["significance"]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(significance)[0], 2.5 * significant)
    np.testing.assert_allclose(numpy_matrix(significance), numpy_matrix(nodes["crop"]), atol=1e-6)
    assert significance.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeFileInferno.txt"

    # a re-run replaces it; without method B (and nothing found by method A) the segments are empty
    second, _ = results_folder(module, slicer, volume, tmp_path, seed=1)
    write_analysis_folder(second, np.zeros_like(altered))
    again = logic.importResults(volume, second)
    assert seg.GetScene() is None and len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 1
    ids = segments_by_name(again["anatomy_changes"])
    assert list(ids) == [added, removed]
    assert "significance" not in again and significance.GetScene() is None and changes.GetScene() is None
    assert not slicer.util.arrayFromSegmentBinaryLabelmap(again["anatomy_changes"], ids[added], again["crop"]).any()
    # a run without the analysis removes the earlier one's segmentation
    third, _ = results_folder(module, slicer, volume, tmp_path, seed=2)
    assert "anatomy_changes" not in logic.importResults(volume, third)
    assert slicer.util.getNodesByClass("vtkMRMLSegmentationNode") == []


def offered_volumes(selector):
    return [selector.nodeFromIndex(i) for i in range(selector.nodeCount())]


def test_widget_centre_from_an_roi_and_the_analysis_option(module, slicer, tmp_path, python_slicer):
    from InvarianceExplorerLib.ui.qtshim import application

    application()
    volume, _, _ = add_volume(slicer)
    widget = module.InvarianceExplorerWidget()
    widget.setup()
    panel, p = widget.panel, widget.logic.getParameterNode()
    assert not widget.pointWidget.isHidden() and widget.roiRow.isHidden()
    assert "128 x 128 pixels" in widget.patchNote.text() and "128 x 128 pixels" in module.InvarianceExplorer(
        type("Parent", (), {})()).parent.helpText
    widget.centerFromROIButton.setChecked(True)
    assert p.centerFrom == "roi" and widget.pointWidget.isHidden() and not widget.roiRow.isHidden()
    assert not panel.start() and "Select an ROI" in panel.errorText()
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    widget.roiSelector.setCurrentNode(roi)
    assert p.roi is roi and widget.roiPlaceWidget.currentNode() is roi
    assert not panel.start() and "Select an ROI" in panel.errorText()  # not placed yet
    roi.SetCenter(*voxel_ras(*CENTER))
    roi.SetSize(30.0, 30.0, 5.0)
    panel.analyzeCheck.setChecked(True)
    assert p.analyze is True
    job = widget.prepareJob(panel.settings())
    try:
        assert job.centerIJK == CENTER and "--analyze" in job.command and "--refine" not in job.command
    finally:
        job.cleanup()
    panel.refineCheck.setChecked(False)  # the samples as drawn: the folder's refinement turned off
    assert p.refine is False
    job = widget.prepareJob(panel.settings())
    try:
        assert job.command[job.command.index("--refine") + 1] == "0,0"
    finally:
        job.cleanup()
    # the settings come back in a new widget (module re-entered)
    again = module.InvarianceExplorerWidget()
    again.setup()
    assert again.centerFromROIButton.isChecked() and again.roiSelector.currentNode() is roi
    assert again.panel.analyzeCheck.isChecked() and again.centerNode() is roi
    assert not again.panel.refineCheck.isChecked()
    widget.centerFromPointButton.setChecked(True)
    assert p.centerFrom == "point" and widget.centerNode() is None


def test_widget_shows_each_output_and_hides_results_from_the_input_selector(module, slicer, tmp_path):
    import types

    from InvarianceExplorerLib.ui.qtshim import application
    from ui_helpers import wait_until

    app = application()
    volume, _, _ = add_volume(slicer)
    other, _, _ = add_volume(slicer, "other CT")
    labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "some labels")
    widget = module.InvarianceExplorerWidget()
    widget.setup()
    selector = widget.volumeSelector
    assert offered_volumes(selector) == [volume, other]  # no labelmaps
    folder, _ = results_folder(module, slicer, volume, tmp_path)
    write_analysis_folder(folder, *analysis_labels())
    widget._jobVolume = volume
    items = widget.collectResults({}, types.SimpleNamespace(outDir=folder))
    nodes = widget.logic.resultNodes(volume)
    assert offered_volumes(selector) == [volume, other]  # none of the result volumes
    assert selector.sortFilterProxyModel().hiddenNodeIDs == widget.logic.resultVolumeIDs()
    assert {nodes[r].GetID() for r in ("crop", "std", "invariances_proxy")} <= set(widget.logic.resultVolumeIDs())
    # the run's results were shown: current sample, std overlay, browser, chart, anatomy changes
    views = slicer.views
    assert views.layers["background"] is nodes["invariances_proxy"] and views.layers["foreground"] is nodes["std"]
    assert views.browser is nodes["browser"] and views.chart is nodes["chart"]

    # one row and one Show button per output
    panel = widget.panel
    panel.setOutputs(items)
    names = result_node_names("LD chest")
    roles = ["invariances", "denoised_invariances", "crop", "denoised", "reconstruction", "std", "table", "chart",
             "anatomy_changes", "change_maps", "significance"]
    assert panel.outputLabels() == [nodes[r].GetName() for r in roles]
    assert panel.outputLabels()[:-3] == [names[r] for r in roles[:-3]]  # the engine's names for its roles
    assert panel.outputLabels()[-3:] == ["LD chest anatomy changes", "LD chest change maps (method A, z)",
                                         "LD chest significance (method B, -log10 q)"]
    buttons = panel.outputButtons()
    assert len(buttons) == len(roles) and all(b.isEnabled() and b.text() == "Show" for b in buttons)

    def click(role):
        slicer.views.__init__()  # forget what was shown
        nodes["anatomy_changes"].GetDisplayNode().SetVisibility(False)
        buttons[roles.index(role)].click()
        return slicer.views

    for role in ("invariances", "denoised_invariances"):
        shown = click(role)
        assert shown.layers["background"] is nodes[role + "_proxy"] and shown.browser is nodes["browser"], role
        assert shown.toolbarVisible
    for role in ("crop", "denoised", "reconstruction"):
        assert click(role).layers == {"background": nodes[role]}, role
    assert click("std").layers == {"foreground": nodes["std"], "foregroundOpacity": 0.4}
    shown = click("table")
    assert shown.table is nodes["table"] and shown.layout == slicer_standin.TABLE_LAYOUT and shown.chart is None
    shown = click("chart")
    assert shown.chart is nodes["chart"] and shown.table is None
    shown = click("anatomy_changes")
    assert nodes["anatomy_changes"].GetDisplayNode().GetVisibility()
    assert shown.layers["background"] is nodes["invariances_proxy"]
    shown = click("change_maps")  # over the current sample, scrolled with it by the browser
    assert shown.layers == {"background": nodes["invariances_proxy"], "foreground": nodes["change_maps_proxy"],
                            "foregroundOpacity": 0.5}
    assert shown.browser is nodes["browser"] and shown.toolbarVisible
    assert click("significance").layers == {"background": nodes["crop"], "foreground": nodes["significance"],
                                            "foregroundOpacity": 0.5}

    # results made from the console (no widget involved) are hidden too, once the events are processed
    other_nodes = widget.logic.importResults(other, folder)
    wait_until(lambda: other_nodes["crop"].GetID() in selector.sortFilterProxyModel().hiddenNodeIDs, timeout=5,
               app=app)
    assert offered_volumes(selector) == [volume, other]
    # a result the user keeps as their own (renamed, "no" to replacing) is an input again
    other_nodes["std"].SetName("my std")
    slicer.answers.reply = False
    widget.logic.importResults(other, folder)
    wait_until(lambda: other_nodes["std"] in offered_volumes(selector), timeout=5, app=app)
    assert labels not in offered_volumes(selector)


def test_missing_packages_are_asked_for_and_named_when_they_cannot_be_installed(module, slicer, monkeypatch):
    logic = module.InvarianceExplorerLogic()
    assert logic.missingDependencies() == []  # this environment has the engine's packages
    assert logic.installDependencies(askUser=True) and slicer.answers.asked == []
    monkeypatch.setitem(module.ENGINE_REQUIREMENTS, "no_such_package_xyz", "no-such-package-xyz>=1")
    assert logic.missingDependencies() == ["no-such-package-xyz>=1"]
    assert "no-such-package-xyz>=1" in logic.engineStatusText()
    slicer.answers.reply = False  # the user says no: nothing is installed
    assert not logic.installDependencies(askUser=True)
    assert len(slicer.answers.asked) == 1 and "no-such-package-xyz>=1" in slicer.answers.asked[0]
    slicer.answers.reply = True  # yes, but offline (the stand-in's pip_install installs nothing)
    with pytest.raises(RuntimeError, match=r"PythonSlicer -m pip install no-such-package-xyz>=1"):
        logic.installDependencies(askUser=True)


def test_the_self_test_passes_under_the_standin(module, slicer, python_slicer, capsys):
    """InvarianceExplorerTest (written for real Slicer) runs whole under the stand-in: the sample
    data through SampleData, then real engine processes with the bundled CNN-10 invariance
    models: at a markups point, at an ROI's centre, and with the analysis as a segmentation."""
    from InvarianceExplorerLib.ui.qtshim import application

    application()
    parent = type("Parent", (), {})()
    module.InvarianceExplorer(parent)
    slicer.modules.invarianceexplorer = parent  # the loaded module, with its icon
    test = module.InvarianceExplorerTest()
    test.runTest()
    shown = capsys.readouterr().out
    assert "Resources found" in shown
    assert "Invariances sampled and checked" in shown and "at the ROI's centre" in shown
    assert "Anatomy changes: 2 segments on the crop's grid" in shown
    assert not [p for p in python_slicer.iterdir() if p.name.startswith("InvarianceExplorer-")]  # temp folders gone


def test_the_self_test_skips_its_sampling_checks_offline(module, slicer, monkeypatch, capsys):
    """Without a package index (the stand-in's pip installs nothing, as offline), the self-test
    asks, tries, and skips its sampling checks with the packages to install, instead of failing:
    the unittest runner (ctest) reports a skip, and runTest (Reload and Test,
    slicer.selfTests, which call it without a runner) says so and goes on."""
    import unittest

    from InvarianceExplorerLib.ui.qtshim import application

    application()
    monkeypatch.setitem(module.ENGINE_REQUIREMENTS, "no_such_package_xyz", "no-such-package-xyz>=1")
    test = module.InvarianceExplorerTest("test_SampleInvariances")
    result = unittest.TestResult()
    test.run(result)
    assert not result.failures and not result.errors
    assert len(result.skipped) == 1 and "PythonSlicer -m pip install no-such-package-xyz>=1" in result.skipped[0][1]
    assert "Sampling checks skipped" in capsys.readouterr().out
    assert len(slicer.answers.asked) == 1 and "no-such-package-xyz>=1" in slicer.answers.asked[0]

    parent = type("Parent", (), {})()
    module.InvarianceExplorer(parent)
    slicer.modules.invarianceexplorer = parent
    module.InvarianceExplorerTest().runTest()  # raises nothing
    shown = capsys.readouterr().out
    assert "Resources found" in shown
    for name in ("test_SampleInvariances", "test_SampleInvariancesAtROICentre", "test_AnatomyChangesSegmentation"):
        assert f"{name} skipped: engine packages could not be installed" in shown


def test_the_self_test_installs_nothing_under_ctest_unless_asked_and_nothing_when_declined(module, slicer,
                                                                                             monkeypatch, capsys):
    """In testing mode (ctest) missing packages are not installed (torch is several GB) unless
    INVARIANCE_EXPLORER_TEST_INSTALL=1; interactively, a user who declines gets a skip."""
    import unittest

    from InvarianceExplorerLib.ui.qtshim import application

    application()
    installs = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirements: installs.append(requirements))
    monkeypatch.setitem(module.ENGINE_REQUIREMENTS, "no_such_package_xyz", "no-such-package-xyz>=1")
    monkeypatch.delenv(module.InvarianceExplorerTest.INSTALL_VARIABLE, raising=False)

    def run():
        result = unittest.TestResult()
        module.InvarianceExplorerTest("test_SampleInvariances").run(result)
        assert not result.errors
        return result

    monkeypatch.setattr(slicer.app, "testing", True)
    result = run()
    assert len(result.skipped) == 1 and "INVARIANCE_EXPLORER_TEST_INSTALL=1" in result.skipped[0][1]
    assert installs == [] and slicer.answers.asked == []
    monkeypatch.setenv(module.InvarianceExplorerTest.INSTALL_VARIABLE, "1")  # opted in: installed, not asked
    result = run()
    assert installs == ["no-such-package-xyz>=1"] and slicer.answers.asked == []
    assert len(result.failures) == 1 and "missing after installing" in result.failures[0][1]  # pip did nothing

    monkeypatch.setattr(slicer.app, "testing", False)
    installs.clear()
    slicer.answers.reply = False
    result = run()
    assert len(result.skipped) == 1 and "were not installed" in result.skipped[0][1]
    assert installs == [] and len(slicer.answers.asked) == 1


def test_slicer_installs_every_engine_dependency_that_slicer_lacks(module):
    """What the module pip-installs in Slicer's Python, with torch from PyTorchUtils and what
    Slicer itself bundles (numpy, SimpleITK), is exactly pyproject.toml's dependencies."""
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = set(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
    bundled_with_slicer = {"numpy>=1.23", "SimpleITK>=2.3"}
    assert set(module.ENGINE_REQUIREMENTS.values()) | {module.TORCH_REQUIREMENT} | bundled_with_slicer == declared
