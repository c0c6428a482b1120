"""The dock widget on a 3D image: Run segments the whole volume, 3D boxes are edited on any slice."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_threshold_model, make_tiny_model
from napari_segthenseg.engine import Engine, save_model
from napari_segthenseg.engine.volume import segment_volume
from napari_segthenseg.plugin.volume_session import BOX_ID
from napari_segthenseg.plugin.widget import THIS_SLICE, WHOLE_VOLUME, SegThenSegWidget

S = 32
SHAPE = (10, 96, 128)
PLUGIN, WIDGET = "napari-segthenseg", "Segment-then-Segment"


def volume() -> np.ndarray:
    """Three bright objects: one across slices 2-7, one on slice 8 only, one on slices 0-2."""
    zz, yy, xx = np.indices(SHAPE)
    on = ((yy - 40) ** 2 + (xx - 50) ** 2 <= 100) & (zz >= 2) & (zz <= 7)
    on |= ((yy - 70) ** 2 + (xx - 100) ** 2 <= 49) & (zz == 8)
    on |= (yy >= 80) & (xx >= 110) & (zz <= 2)
    return np.where(on, 200, 20).astype(np.uint8)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_model(make_tiny_model(S, channels=1), tmp_path_factory.mktemp("m") / "gray.pt")


@pytest.fixture
def opened(make_napari_viewer, model_file):
    viewer = make_napari_viewer()
    layer = viewer.add_image(volume(), name="ct", scale=(2.5, 0.5, 0.5), translate=(4.0, 10.0, -3.0))
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    assert isinstance(widget, SegThenSegWidget) and widget.volume.value == WHOLE_VOLUME
    assert widget.load_model_file(model_file)
    crops: list[np.ndarray] = []

    def spying_engine(model, device):  # the threshold "network": predictable boxes on this volume
        engine = Engine(make_threshold_model(S), device)
        cut = engine.crops

        def spy(image, boxes, *args, **kwargs):
            crops.append(np.asarray(boxes).copy())
            return cut(image, boxes, *args, **kwargs)

        engine.crops = spy
        return engine

    widget.make_engine = spying_engine
    return viewer, layer, widget, crops


@pytest.fixture
def ran(opened, qtbot):
    viewer, _, widget, _ = opened
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=30000)
    return opened


def direct(boxes=None):
    return segment_volume(Engine(make_threshold_model(S), "cpu"), volume(), boxes)


def rectangles_of(layer, box: int) -> list[int]:
    return [i for i in range(len(layer.data)) if layer.features[BOX_ID].iloc[i] == box]


def test_run_on_a_volume_gives_3d_layers_aligned_with_the_image(ran):
    viewer, layer, widget, _ = ran
    rough, boxes, seg = (viewer.layers[f"ct {k}"] for k in ("rough", "boxes", "segmentation"))
    expected = direct()
    assert len(expected.boxes) == 3
    assert rough.data.shape == (SHAPE[0], S, S) and seg.data.shape == SHAPE and boxes.ndim == 3
    np.testing.assert_allclose(seg.scale, layer.scale)
    np.testing.assert_allclose(seg.translate, layer.translate)
    np.testing.assert_allclose(rough.scale, np.asarray(layer.scale) * (1, SHAPE[1] / S, SHAPE[2] / S))
    np.testing.assert_allclose(rough.translate[0], layer.translate[0])  # slice k over slice k
    np.testing.assert_array_equal(widget.current_boxes(), expected.boxes)
    np.testing.assert_array_equal(seg.data > 0, expected.mask)
    np.testing.assert_array_equal(rough.data > 0, expected.rough.mask)
    # one rectangle per slice of each 3D box, on its slice
    assert len(boxes.data) == int((expected.boxes[:, 3] - expected.boxes[:, 0]).sum())
    for k, (z0, *_rest) in enumerate(expected.boxes):
        zs = sorted(int(boxes.data[i][0, 0]) for i in rectangles_of(boxes, k))
        assert zs == list(range(z0, expected.boxes[k, 3]))
    zz, yy, xx = np.indices(SHAPE)
    ids = seg.data[((yy - 40) ** 2 + (xx - 50) ** 2 <= 100) & (zz >= 2) & (zz <= 7)]
    assert (ids > 0).mean() > 0.9 and len(np.unique(ids[ids > 0])) == 1  # one 3D id across its slices
    assert seg.data.max() == 3


def test_editing_a_box_on_one_slice_resegments_that_3d_box_only(ran, qtbot):
    viewer, _, widget, crops = ran
    boxes_layer, seg = viewer.layers["ct boxes"], viewer.layers["ct segmentation"]
    before = widget.current_boxes()
    k = int(np.argmax(before[:, 3] - before[:, 0]))  # the box across most slices
    z0, z1 = before[k, 0], before[k, 3]
    on_slice = next(i for i in rectangles_of(boxes_layer, k) if boxes_layer.data[i][0, 0] == z0 + 2)
    crops.clear()
    data = list(boxes_layer.data)
    data[on_slice] = data[on_slice] + np.array([0.0, 6.0, -4.0])  # moved on one slice
    boxes_layer.data = data
    qtbot.waitUntil(lambda: not widget.busy, timeout=30000)
    after = widget.current_boxes()
    moved = np.array([z0, before[k, 1] + 6, before[k, 2] - 4, z1, before[k, 4] + 6, before[k, 5] - 4])
    np.testing.assert_array_equal(after[k], moved)  # the whole 3D box's window moved
    np.testing.assert_array_equal(np.delete(after, k, 0), np.delete(before, k, 0))
    refined = np.concatenate(crops)
    assert len(refined) == z1 - z0 and {tuple(b) for b in refined.tolist()} == {tuple(moved[[1, 2, 4, 5]])}
    for i in rectangles_of(boxes_layer, k):  # redrawn on every slice it spans
        np.testing.assert_allclose(boxes_layer.data[i][:, 1:].min(0) + 0.5, moved[[1, 2]])
    np.testing.assert_array_equal(seg.data > 0, direct(after).mask)


def test_z_range_from_the_panel_and_boxes_drawn_or_deleted_by_hand(ran, qtbot):
    viewer, _, widget, crops = ran
    boxes_layer, seg = viewer.layers["ct boxes"], viewer.layers["ct segmentation"]
    before = widget.current_boxes()
    k = int(np.argmax(before[:, 3] - before[:, 0]))
    boxes_layer.selected_data = {rectangles_of(boxes_layer, k)[0]}
    widget._on_box_selection()
    assert widget.z_from.enabled
    assert (widget.z_from.value, widget.z_to.value) == (before[k, 0], before[k, 3] - 1)
    crops.clear()
    widget.z_to.value = SHAPE[0] - 1  # down to the last slice
    qtbot.waitUntil(lambda: not widget.busy, timeout=30000)
    after = widget.current_boxes()
    assert after[k, 3] == SHAPE[0] and len(rectangles_of(boxes_layer, k)) == SHAPE[0] - before[k, 0]
    assert len(np.concatenate(crops)) == SHAPE[0] - before[k, 0]  # that box's slices only
    np.testing.assert_array_equal(seg.data > 0, direct(after).mask)
    # a box drawn by hand on slice 5 spans the set number of slices around it
    widget.z_span.value = 1
    crops.clear()
    corners = [[5, 10.5, 80.5], [5, 10.5, 100.5], [5, 30.5, 100.5], [5, 30.5, 80.5]]
    boxes_layer.add_rectangles([np.array(corners)])
    qtbot.waitUntil(lambda: not widget.busy, timeout=30000)
    drawn = widget.current_boxes()
    assert drawn[-1].tolist() == [4, 11, 81, 7, 31, 101] and len(np.concatenate(crops)) == 3
    # deleting its rectangle on one slice deletes the 3D box
    boxes_layer.selected_data = {rectangles_of(boxes_layer, len(drawn) - 1)[1]}
    boxes_layer.remove_selected()
    qtbot.waitUntil(lambda: not widget.busy, timeout=30000)
    np.testing.assert_array_equal(widget.current_boxes(), after)
    np.testing.assert_array_equal(seg.data > 0, direct(after).mask)


def test_this_slice_only_and_the_3d_view(opened, qtbot):
    viewer, _, widget, _ = opened
    viewer.dims.ndisplay = 3  # a volume is segmented whole in the 3D view too
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=30000)
    assert viewer.layers["ct segmentation"].data.shape == SHAPE
    viewer.dims.ndisplay = 2
    widget.volume.value = THIS_SLICE
    viewer.dims.set_current_step(0, 3)
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=30000)
    seg = viewer.layers["ct segmentation"]
    assert seg.data.shape == (1, *SHAPE[1:])
    np.testing.assert_array_equal(seg.data[0] > 0, Engine(make_threshold_model(S), "cpu").segment(
        volume()[3]).mask)


def test_save_and_reopen_3d_boxes_and_segmentation(ran, tmp_path):
    from napari_segthenseg.engine import omezarr
    from napari_segthenseg.engine.boxio import read_boxes_csv
    from napari_segthenseg.plugin.fileio import write_boxes

    viewer, _, widget, _ = ran
    seg_path, boxes_path = widget.save(tmp_path / "ct")
    saved = omezarr.open_label_image(seg_path)
    assert saved.shape == SHAPE
    np.testing.assert_array_equal(saved.levels[0][:], viewer.layers["ct segmentation"].data)
    np.testing.assert_array_equal(read_boxes_csv(boxes_path), widget.current_boxes())
    [layer] = viewer.open(str(boxes_path), plugin=PLUGIN)
    assert layer.ndim == 3 and len(layer.data) == len(viewer.layers["ct boxes"].data)
    again = write_boxes(str(tmp_path / "again.boxes.csv"), layer.data, {"features": layer.features})
    np.testing.assert_array_equal(read_boxes_csv(again[0]), widget.current_boxes())


def test_a_layer_labelled_as_a_time_series_is_segmented_a_frame_at_a_time(make_napari_viewer):
    from napari_segthenseg.plugin.widget import is_volume

    viewer = make_napari_viewer()
    assert is_volume(viewer.add_image(volume()))
    assert not is_volume(viewer.add_image(volume(), axis_labels=("t", "y", "x")))
    assert is_volume(viewer.add_image(np.zeros((2, 3, 8, 8, 3), np.uint8), rgb=True))
    assert not is_volume(viewer.add_image(np.zeros((8, 8, 3), np.uint8), rgb=True))


def test_a_volume_is_not_added_to_a_training_set(ran, tmp_path, monkeypatch):
    """The trainer takes 2D images: Add to training set says so and writes nothing."""
    from napari_segthenseg.plugin import widget as widget_module

    _, _, widget, _ = ran
    errors: list[str] = []
    monkeypatch.setattr(widget_module, "show_error", errors.append)
    widget.training_folder = tmp_path / "training"
    assert widget.add_to_training_set() is None
    assert "a volume cannot be added" in errors[0] and not (tmp_path / "training").exists()
