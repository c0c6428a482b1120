"""The dock widget on a real dsb2018 image with a tiny model fitted for a few steps (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from napari_segthenseg.engine import Engine, ImageSource, StSModel, compute_stats, save_model
from napari_segthenseg.plugin.widget import BY_HAND, THIS_SLICE, SegThenSegWidget

S = 64
PLUGIN, WIDGET = "napari-segthenseg", "Segment-then-Segment"


@pytest.fixture(scope="session")
def fitted_model(dsb_image) -> StSModel:
    """A 4-feature U-Net fitted for 60 steps to the image's downsampled mask: gives real boxes."""
    img, mask = dsb_image
    model = make_tiny_model(size=S)
    src = ImageSource(img)
    small = src.read_downsampled(S, torch.device("cpu"))
    x = compute_stats(small, "minmax", src.dtype).apply(small)[None]
    y = F.interpolate(torch.from_numpy((mask > 0).astype(np.float32))[None, None], size=(S, S), mode="area")
    opt = torch.optim.Adam(model.rough.parameters(), lr=1e-2)
    model.rough.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a busy machine
    try:
        for _ in range(60):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(model.rough(x), (y > 0.3).float()).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.rough.eval()
    model.fine.load_state_dict(model.rough.state_dict())
    return model


@pytest.fixture(scope="session")
def model_file(fitted_model, tmp_path_factory):
    return save_model(fitted_model, tmp_path_factory.mktemp("m") / "fitted.pt")


def _open(make_napari_viewer, image, model_path, **image_kwargs):
    viewer = make_napari_viewer()
    layer = viewer.add_image(image, name="cells", **image_kwargs)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    assert isinstance(widget, SegThenSegWidget)
    assert widget.image.value is layer
    if model_path is not None:
        assert widget.load_model_file(model_path)
    calls: list[np.ndarray] = []

    def spying_engine(model, device):
        engine = Engine(model, device)
        refine = engine.refine

        def spy(image, boxes, stats=None, region=None):
            calls.append(np.asarray(boxes).copy())
            return refine(image, boxes, stats, region)

        engine.refine = spy
        return engine

    widget.make_engine = spying_engine
    return viewer, layer, widget, calls


def _wait(qtbot, widget, timeout=30000):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def _refined(calls) -> set[tuple]:
    return {tuple(b) for c in calls for b in c.tolist()}


def _world_bounds(layer, shape_hw):
    """World extent of the last two axes, pixel edges included (scale + translate only)."""
    sc, tr = np.asarray(layer.scale[-2:]), np.asarray(layer.translate[-2:])
    return tr - 0.5 * sc, tr + (np.asarray(shape_hw) - 0.5) * sc


@pytest.fixture
def ran(make_napari_viewer, qtbot, dsb_image, model_file):
    img, _ = dsb_image
    viewer, layer, widget, calls = _open(make_napari_viewer, img, model_file, scale=(0.5, 2.0),
                                         translate=(10.0, -4.0))
    widget.run()
    _wait(qtbot, widget)
    return viewer, layer, widget, calls


def test_run_gives_three_layers_tied_to_the_image(ran, dsb_image, fitted_model):
    viewer, layer, widget, calls = ran
    img, _ = dsb_image
    h, w = img.shape[:2]
    rough, boxes, seg = (viewer.layers[f"cells {k}"] for k in ("rough", "boxes", "segmentation"))
    assert rough.data.shape == (S, S) and seg.data.shape == (h, w)
    np.testing.assert_allclose(seg.scale, layer.scale)
    np.testing.assert_allclose(seg.translate, layer.translate)
    np.testing.assert_allclose(rough.scale, np.asarray(layer.scale) * (h / S, w / S))
    for a, b in zip(_world_bounds(rough, (S, S)), _world_bounds(layer, (h, w)), strict=True):
        np.testing.assert_allclose(a, b)  # the rough mask covers exactly the image
    direct = Engine(fitted_model, "cpu").segment(img)
    assert len(direct.boxes) >= 3
    np.testing.assert_array_equal(widget.current_boxes(), direct.boxes)
    assert set(boxes.shape_type) == {"rectangle"} and len(boxes.data) == len(direct.boxes)
    np.testing.assert_array_equal(rough.data, direct.rough.mask)
    np.testing.assert_array_equal(seg.data > 0, direct.mask)
    assert _refined(calls) == {tuple(b) for b in direct.boxes.tolist()}


def _rgb(colour: str) -> np.ndarray:
    """``#rrggbb`` -> RGB floats in [0, 1]."""
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255


def _hue(colour: str) -> float:
    import colorsys

    return 360 * colorsys.rgb_to_hsv(*_rgb(colour))[0]


def test_rough_boxes_and_segmentation_colours_cannot_be_confused(ran):
    """Rough mask one blue, boxes yellow, segmentation objects never blue or yellow."""
    from napari_segthenseg.plugin.layers import BOX_COLOUR, ROUGH_COLOUR, SEG_COLOURS

    viewer = ran[0]
    rough, boxes, seg = (viewer.layers[f"cells {k}"] for k in ("rough", "boxes", "segmentation"))
    assert 200 <= _hue(ROUGH_COLOUR) <= 230 and 45 <= _hue(BOX_COLOUR) <= 65
    for colour in SEG_COLOURS:
        assert not 170 <= _hue(colour) <= 270 and not 40 <= _hue(colour) <= 75, colour
    np.testing.assert_allclose(rough.colormap.map(np.array([1]))[0, :3], _rgb(ROUGH_COLOUR), atol=0.01)
    np.testing.assert_allclose(boxes.edge_color[0, :3], _rgb(BOX_COLOUR), atol=0.01)
    labels = np.arange(1, 2 * len(SEG_COLOURS) + 1)
    shown = {tuple(np.round(255 * c[:3]).astype(int)) for c in seg.colormap.map(labels)}
    assert shown == {tuple(np.round(255 * _rgb(c)).astype(int)) for c in SEG_COLOURS}
    assert seg.colormap.map(np.array([0]))[0, 3] == 0  # background transparent


def test_the_rough_mask_shows_through_the_segmentation_and_label_images_are_red(ran):
    """The rough layer lies under a half-transparent segmentation; the first segmentation colour is
    the red stored for label 1 in the OME-Zarr label images (predict's, and the plugin's slides)."""
    from napari_segthenseg.engine.omezarr import MASK_COLOUR
    from napari_segthenseg.plugin.layers import SEG_COLOURS

    viewer = ran[0]
    names = [lyr.name for lyr in viewer.layers]
    rough, seg = viewer.layers["cells rough"], viewer.layers["cells segmentation"]
    assert names.index("cells rough") < names.index("cells segmentation")
    assert seg.opacity <= 0.6 < rough.opacity  # a blend that leaves the rough blue visible under it
    assert _hue(SEG_COLOURS[0]) < 10 and np.allclose(_rgb(SEG_COLOURS[0]), np.array(MASK_COLOUR[:3]) / 255)


def test_the_saved_segmentation_picker_shows_only_for_slides(make_napari_viewer, dsb_image, model_file):
    """On an ordinary image the "segmentation layer" picker (continuing a saved slide) is hidden."""
    img, _ = dsb_image
    viewer, layer, widget, _ = _open(make_napari_viewer, img, model_file)
    assert widget.segmentation.native.isHidden()
    pyramid = viewer.add_image([img[..., 0], img[::2, ::2, 0]], multiscale=True, name="pyramid")
    widget.image.reset_choices()
    widget.image.value = pyramid
    assert not widget.segmentation.native.isHidden()
    widget.image.value = layer
    assert widget.segmentation.native.isHidden()
    assert widget.volume.native.isHidden() and widget.z_range.native.isHidden()  # 3D controls: 3D only
    stack = viewer.add_image(np.stack([img[..., 0]] * 4), name="stack")
    widget.image.reset_choices()
    widget.image.value = stack
    assert not widget.volume.native.isHidden() and not widget.z_span.native.isHidden()


def test_moving_one_box_refines_only_that_box(ran, qtbot, dsb_image, fitted_model):
    viewer, _, widget, calls = ran
    boxes_layer = viewer.layers["cells boxes"]
    before = widget.current_boxes()
    calls.clear()
    data = list(boxes_layer.data)
    data[1] = data[1] + np.array([7.0, -5.0])
    boxes_layer.data = data
    _wait(qtbot, widget)
    after = widget.current_boxes()
    moved = after[1]
    np.testing.assert_array_equal(np.delete(after, 1, 0), np.delete(before, 1, 0))
    assert _refined(calls) == {tuple(moved.tolist())}
    img, _ = dsb_image
    expected = Engine(fitted_model, "cpu").segment(img, boxes=after).mask
    np.testing.assert_array_equal(viewer.layers["cells segmentation"].data > 0, expected)


def test_deleting_a_box_removes_its_object(ran, qtbot):
    viewer, _, widget, calls = ran
    boxes_layer, seg = viewer.layers["cells boxes"], viewer.layers["cells segmentation"]
    before = widget.current_boxes()
    only_in_0 = np.zeros(seg.data.shape, bool)
    y0, x0, y1, x1 = before[0]
    only_in_0[y0:y1, x0:x1] = True
    for y0, x0, y1, x1 in before[1:]:
        only_in_0[y0:y1, x0:x1] = False
    calls.clear()
    boxes_layer.selected_data = {0}
    boxes_layer.remove_selected()
    _wait(qtbot, widget)
    assert len(widget.current_boxes()) == len(before) - 1
    assert calls == [] or all(len(c) == 0 for c in calls)  # nothing new to refine
    assert not (seg.data[only_in_0] > 0).any()


def test_hand_drawn_box_on_empty_area_is_segmented(ran, qtbot, dsb_image, fitted_model):
    viewer, _, widget, calls = ran
    img, gt = dsb_image
    boxes_layer, seg = viewer.layers["cells boxes"], viewer.layers["cells segmentation"]
    boxes = widget.current_boxes()
    covered = np.zeros(gt.shape, bool)
    for y0, x0, y1, x1 in boxes:
        covered[y0:y1, x0:x1] = True
    # a real nucleus that no box covers (fall back to the largest uncovered one)
    ids = [i for i in np.unique(gt[~covered]) if i]
    assert ids, "the fitted model boxes every nucleus; pick another image"
    target = max(ids, key=lambda i: (gt == i).sum())
    ys, xs = np.nonzero(gt == target)
    new = np.array([ys.min() - 3, xs.min() - 3, ys.max() + 4, xs.max() + 4]).clip(0, None)
    new[2:] = np.minimum(new[2:], gt.shape)
    calls.clear()
    y0, x0, y1, x1 = new - 0.5
    boxes_layer.add_rectangles([np.array([[y0, x0], [y1, x1]])])
    _wait(qtbot, widget)
    assert _refined(calls) == {tuple(new.tolist())}
    expected = Engine(fitted_model, "cpu").segment(img, boxes=widget.current_boxes()).mask
    np.testing.assert_array_equal(seg.data > 0, expected)


def test_boxes_by_hand_with_a_fine_only_model(make_napari_viewer, qtbot, dsb_image, fitted_model, tmp_path):
    img, _ = dsb_image
    fine_only = save_model(StSModel(fitted_model.settings, None, fitted_model.fine), tmp_path / "fine.pt")
    viewer, _, widget, calls = _open(make_napari_viewer, img, fine_only)
    assert widget.mode.value == BY_HAND
    widget.run()
    assert "cells rough" not in viewer.layers
    boxes_layer = viewer.layers["cells boxes"]
    assert boxes_layer.mode == "add_rectangle" and len(boxes_layer.data) == 0
    drawn = [np.array([[19.5, 29.5], [59.5, 79.5]]), np.array([[99.5, 9.5], [129.5, 49.5]])]
    boxes_layer.add_rectangles(drawn)
    _wait(qtbot, widget)
    assert _refined(calls) == {(20, 30, 60, 80), (100, 10, 130, 50)}
    hand = np.array([[20, 30, 60, 80], [100, 10, 130, 50]])
    expected = Engine(fitted_model, "cpu").segment(img, boxes=hand)
    np.testing.assert_array_equal(viewer.layers["cells segmentation"].data > 0, expected.mask)


def test_3d_stack_acts_on_the_current_slice(make_napari_viewer, qtbot, dsb_image, fitted_model, model_file):
    img, _ = dsb_image
    stack = np.stack([img // 4, img, img[::-1]])
    viewer, layer, widget, _ = _open(make_napari_viewer, stack, model_file, rgb=True, scale=(3.0, 1.0, 1.0))
    # A 3D image is segmented whole by default (tests/test_widget_volume.py); this checks the option
    # that keeps the plane on screen.
    widget.volume.value = THIS_SLICE
    viewer.dims.set_current_step(0, 1)
    widget.run()
    _wait(qtbot, widget)
    seg, rough = viewer.layers["cells segmentation"], viewer.layers["cells rough"]
    assert seg.data.shape == (1, *img.shape[:2]) and rough.data.shape == (1, S, S)
    assert seg.translate[0] == pytest.approx(3.0) and rough.translate[0] == pytest.approx(3.0)
    np.testing.assert_array_equal(seg.data[0] > 0, Engine(fitted_model, "cpu").segment(img).mask)
    viewer.dims.transpose()  # another plane on screen: refused with a notice, layers untouched
    widget.run()
    assert not widget.busy and seg.data.shape == (1, *img.shape[:2])


def test_bad_model_file_notifies_and_keeps_layers(ran, tmp_path, capsys):
    from napari.utils.notifications import notification_manager

    viewer, _, widget, _ = ran
    names = [lyr.name for lyr in viewer.layers]
    seg_before = viewer.layers["cells segmentation"].data.copy()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model at all")
    n = len(notification_manager.records)
    assert widget.load_model_file(bad) is False
    messages = [str(r.message) for r in notification_manager.records[n:]]
    assert any("cannot load model" in m and "bad.pt" in m for m in messages)
    assert [lyr.name for lyr in viewer.layers] == names
    np.testing.assert_array_equal(viewer.layers["cells segmentation"].data, seg_before)
    assert "Traceback" not in capsys.readouterr().err


def test_engine_error_in_worker_is_a_notification(make_napari_viewer, qtbot, dsb_image, tmp_path):
    from napari.utils.notifications import notification_manager

    img, _ = dsb_image
    two_channel = save_model(make_tiny_model(size=32, channels=2), tmp_path / "two.pt")
    viewer, _, widget, _ = _open(make_napari_viewer, img, two_channel)
    n = len(notification_manager.records)
    widget.run()
    _wait(qtbot, widget)
    assert any("channels" in str(r.message) for r in notification_manager.records[n:])
    assert [lyr.name for lyr in viewer.layers] == ["cells"]


def test_cancel_discards_the_run(make_napari_viewer, qtbot, dsb_image, model_file):
    img, _ = dsb_image
    viewer, _, widget, _ = _open(make_napari_viewer, img, model_file)
    widget.run()
    assert widget.busy
    widget.cancel()
    assert not widget.busy and widget.run_button.enabled
    qtbot.wait(500)
    assert [lyr.name for lyr in viewer.layers] == ["cells"]


def test_edits_during_a_job_are_not_lost(ran, qtbot, dsb_image, fitted_model):
    viewer, _, widget, _ = ran
    boxes_layer = viewer.layers["cells boxes"]
    data = list(boxes_layer.data)
    boxes_layer.data = data[:-1]
    widget.update_boxes()  # starts a job on the current boxes now, skipping the debounce
    assert widget.busy
    boxes_layer.data = [d + np.array([2.0, 2.0]) for d in data[:-1]]  # edited while it runs
    _wait(qtbot, widget)
    img, _ = dsb_image
    latest = widget.current_boxes()
    assert latest[0, 0] == data[0][:, 0].min() + 0.5 + 2
    expected = Engine(fitted_model, "cpu").segment(img, boxes=latest).mask
    np.testing.assert_array_equal(viewer.layers["cells segmentation"].data > 0, expected)


def test_unsupported_image_notifies_and_adds_nothing(make_napari_viewer, dsb_image, model_file):
    from napari.utils.notifications import notification_manager

    img, _ = dsb_image
    bad = img[..., 0].astype(np.float32)
    bad[5, 5] = np.nan
    viewer, _, widget, calls = _open(make_napari_viewer, bad, model_file)
    n = len(notification_manager.records)
    widget.run()
    assert not widget.busy and calls == []
    assert any("unsupported image" in str(r.message) and "NaN" in str(r.message)
               for r in notification_manager.records[n:])
    assert [lyr.name for lyr in viewer.layers] == ["cells"]


def test_removing_the_image_ends_the_session(ran):
    viewer, layer, widget, _ = ran
    viewer.layers.remove(layer)
    assert widget._session is None and not widget.busy
    viewer.layers["cells boxes"].data = []  # no longer tied to anything: nothing happens
    assert not widget.busy


def test_saved_boxes_reload_and_continue(ran, make_napari_viewer, qtbot, dsb_image, model_file, tmp_path):
    viewer, _, widget, _ = ran
    seg_before = viewer.layers["cells segmentation"].data > 0
    viewer.layers.selection = {viewer.layers["cells boxes"]}
    [path] = viewer.layers.save(str(tmp_path / "cells.boxes.csv"), selected=True)
    img, _ = dsb_image
    viewer2, _, widget2, calls = _open(make_napari_viewer, img, model_file, scale=(0.5, 2.0),
                                       translate=(10.0, -4.0))
    [boxes] = viewer2.open(path, plugin="napari-segthenseg")
    widget2.boxes.reset_choices()
    widget2.boxes.value = boxes  # picking the layer segments its boxes
    _wait(qtbot, widget2)
    np.testing.assert_allclose(boxes.scale, viewer2.layers["cells"].scale)
    np.testing.assert_array_equal(widget2.current_boxes(), widget.current_boxes())
    np.testing.assert_array_equal(viewer2.layers["cells segmentation"].data > 0, seg_before)
    assert _refined(calls) == {tuple(b) for b in widget.current_boxes().tolist()}


def test_default_model_is_selected_when_installed(make_napari_viewer, monkeypatch, model_file, dsb_image):
    import napari_segthenseg.plugin.widget as widget_module
    from napari_segthenseg.engine import modelfile

    monkeypatch.setattr(modelfile, "bundled_model_path", lambda: model_file)
    monkeypatch.setattr(widget_module, "bundled_model_path", lambda: model_file)
    img, _ = dsb_image
    _, _, widget, _ = _open(make_napari_viewer, img, None)
    assert widget.model.value == "default" and widget.current_model is not None
    assert "S=64" in widget.model_info.value


def test_rotated_sheared_image_layers_line_up(make_napari_viewer, qtbot, dsb_image, model_file):
    img, _ = dsb_image
    h, w = img.shape[:2]
    viewer, layer, widget, _ = _open(make_napari_viewer, img, model_file, scale=(0.5, 2.0),
                                     translate=(10.0, -4.0), rotate=30, shear=[0.2])
    widget.run()
    _wait(qtbot, widget)
    rough, seg = viewer.layers["cells rough"], viewer.layers["cells segmentation"]
    for rough_px, image_px in [((-0.5, -0.5), (-0.5, -0.5)), ((S - 0.5, S - 0.5), (h - 0.5, w - 0.5)),
                               ((3.0, 7.0), ((3.5 * h / S) - 0.5, (7.5 * w / S) - 0.5))]:
        np.testing.assert_allclose(rough.data_to_world(rough_px), layer.data_to_world(image_px), atol=1e-6)
        np.testing.assert_allclose(seg.data_to_world(image_px), layer.data_to_world(image_px), atol=1e-6)
    boxes_layer = viewer.layers["cells boxes"]
    y0, x0, _, _ = widget.current_boxes()[0]
    corner = boxes_layer.data[0][0]
    np.testing.assert_allclose(boxes_layer.data_to_world(corner), layer.data_to_world((y0 - 0.5, x0 - 0.5)))


def test_switching_model_resegments_every_box(ran, qtbot, dsb_image, tmp_path):
    viewer, _, widget, calls = ran
    other = make_tiny_model(size=S, seed=1)
    assert widget.load_model_file(save_model(other, tmp_path / "other.pt"))
    calls.clear()
    boxes = widget.current_boxes()
    widget.update_boxes()
    _wait(qtbot, widget)
    assert _refined(calls) == {tuple(b) for b in boxes.tolist()}  # nothing reused from the old model
    img, _ = dsb_image
    expected = Engine(other, "cpu").segment(img, boxes=boxes).mask
    np.testing.assert_array_equal(viewer.layers["cells segmentation"].data > 0, expected)


def test_the_plugin_and_predict_count_the_same_objects(ran, dsb_image, model_file, tmp_path):
    """One id per 8-connected object in both (the plugin once labelled with 4-connectivity and showed
    25 nuclei where segthenseg-predict --labels wrote 24)."""
    import imageio.v3 as iio
    import tifffile

    from napari_segthenseg.cli.predict import main

    viewer = ran[0]
    img, _ = dsb_image
    iio.imwrite(tmp_path / "cells.png", img)
    out = tmp_path / "out"
    args = ["--model", str(model_file), "--device", "cpu", str(tmp_path / "cells.png"), "--out", str(out)]
    assert main([*args, "--labels"]) == 0
    written = tifffile.imread(out / "cells_labels.tif")
    shown = np.asarray(viewer.layers["cells segmentation"].data)
    assert written.max() >= 3
    np.testing.assert_array_equal(shown, written)
