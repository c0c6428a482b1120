"""Boxes CSV reader/writer, alone and through napari's own open/save with the plugin's contributions."""

from __future__ import annotations

import numpy as np
import pytest

from napari_segthenseg.plugin.fileio import read_boxes_csv, write_boxes_csv
from napari_segthenseg.plugin.layers import Plane, boxes_to_rectangles, rectangles_to_boxes

BOXES = np.array([[0, 0, 10, 12], [5, 7, 40, 33], [100, 200, 164, 264]], dtype=np.int64)


def test_csv_round_trip(tmp_path):
    path = write_boxes_csv(tmp_path / "b.boxes.csv", BOXES)
    assert path.read_text().splitlines()[0] == "y0,x0,y1,x1"
    np.testing.assert_array_equal(read_boxes_csv(path), BOXES)
    assert read_boxes_csv(write_boxes_csv(tmp_path / "empty.boxes.csv", np.zeros((0, 4)))).shape == (0, 4)


@pytest.mark.parametrize(("text", "needle"), [
    ("a,b,c,d\n1,2,3,4\n", "first line"),
    ("y0,x0,y1,x1\n1,2,three,4\n", "line 2"),
    ("y0,x0,y1,x1\n1,2,3\n", "line 2"),
    ("y0,x0,y1,x1\n1,2,3,4\n9,2,3,4\n", "line 3"),
])
def test_bad_csv_is_a_clear_error(tmp_path, text, needle):
    path = tmp_path / "bad.boxes.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        read_boxes_csv(path)


def test_rectangles_round_trip_and_clipping():
    plane = Plane(lead=(), scale=(1.0, 1.0), translate=(0.0, 0.0), affine=np.eye(3), hw=(150, 250))
    rects = boxes_to_rectangles(BOXES, plane)
    got = rectangles_to_boxes(rects, ["rectangle"] * 3, plane.hw)
    np.testing.assert_array_equal(got.boxes, [[0, 0, 10, 12], [5, 7, 40, 33], [100, 200, 150, 250]])
    assert (got.clipped, got.dropped, got.not_rectangles) == (1, 0, 0)
    outside = rectangles_to_boxes([np.array([[-9.5, -9.5], [-9.5, -2.5], [-2.5, -2.5], [-2.5, -9.5]])],
                                  ["rectangle"], plane.hw)
    assert len(outside.boxes) == 0 and outside.dropped == 1
    ellipse = rectangles_to_boxes([np.array([[4.5, 4.5], [4.5, 9.5], [9.5, 9.5], [9.5, 4.5]])],
                                  ["ellipse"], plane.hw)
    np.testing.assert_array_equal(ellipse.boxes, [[5, 5, 10, 10]])
    assert ellipse.not_rectangles == 1


def test_napari_save_and_open_use_the_plugin(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    plane = Plane(lead=(), scale=(1.0, 1.0), translate=(0.0, 0.0), affine=np.eye(3), hw=(300, 300))
    layer = viewer.add_shapes(boxes_to_rectangles(BOXES, plane), shape_type="rectangle", name="cells boxes")
    path = tmp_path / "cells.boxes.csv"
    viewer.layers.selection = {layer}
    written = viewer.layers.save(str(path), selected=True)
    assert [str(p) for p in written] == [str(path)]
    np.testing.assert_array_equal(read_boxes_csv(path), BOXES)
    [loaded] = viewer.open(str(path), plugin="napari-segthenseg")
    assert loaded.name == "cells" and set(loaded.shape_type) == {"rectangle"}
    back = rectangles_to_boxes(list(loaded.data), list(loaded.shape_type), plane.hw)
    np.testing.assert_array_equal(back.boxes, BOXES)


def test_segmentation_saves_as_tif_with_napari(make_napari_viewer, tmp_path):
    import tifffile

    viewer = make_napari_viewer()
    labels = np.zeros((40, 60), np.uint16)
    labels[5:15, 10:30] = 1
    labels[20:30, 40:50] = 2
    layer = viewer.add_labels(labels, name="cells segmentation")
    viewer.layers.selection = {layer}
    [path] = viewer.layers.save(str(tmp_path / "seg.tif"), selected=True)
    np.testing.assert_array_equal(tifffile.imread(path), labels)


def test_labels_from_mask_objects_and_large_images(monkeypatch):
    import napari_segthenseg.plugin.layers as layers

    mask = np.zeros((20, 30), bool)
    mask[2:5, 2:5] = mask[10:15, 20:25] = True
    mask[5, 5] = True  # touches the first object diagonally: part of it (8-connectivity, as predict)
    lab = layers.labels_from_mask(mask)
    assert lab.dtype == np.uint16 and lab.max() == 2 and np.array_equal(lab > 0, mask)
    assert lab[5, 5] == lab[4, 4]
    monkeypatch.setattr(layers, "LABEL_OBJECTS_MAX_PIXELS", 100)
    binary = layers.labels_from_mask(mask)
    assert binary.dtype == np.uint8 and binary.max() == 1 and np.array_equal(binary > 0, mask)


def _write_outputs(folder, labels_dtype=np.uint16):
    """What segthenseg-predict writes: a 0/1 uint8 mask, instance labels, and the boxes CSV."""
    import tifffile

    from napari_segthenseg.cli.predict import write_mask

    mask = np.zeros((40, 60), bool)
    mask[5:15, 10:30] = mask[20:30, 40:50] = True
    labels = np.zeros(mask.shape, labels_dtype)
    labels[5:15, 10:30], labels[20:30, 40:50] = 1, 2
    write_mask(mask, folder / "cells_mask.tif")
    tifffile.imwrite(folder / "cells_labels.tif", labels, compression="zlib")
    write_boxes_csv(folder / "cells.boxes.csv", BOXES)
    return mask, labels


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_label_reader_takes_predict_outputs_and_refuses_images(tmp_path, dtype):
    import tifffile

    from napari_segthenseg.plugin.fileio import napari_get_label_reader

    mask, labels = _write_outputs(tmp_path, dtype)
    [(data, meta, kind)] = napari_get_label_reader(str(tmp_path / "cells_mask.tif"))(
        str(tmp_path / "cells_mask.tif"))
    assert kind == "labels" and meta["name"] == "cells_mask" and data.dtype == np.uint8
    np.testing.assert_array_equal(data, mask)
    [(data, meta, kind)] = napari_get_label_reader(str(tmp_path / "cells_labels.tif"))(
        str(tmp_path / "cells_labels.tif"))
    assert kind == "labels" and data.dtype == dtype
    np.testing.assert_array_equal(data, labels)
    tifffile.imwrite(tmp_path / "float_mask.tif", np.zeros((8, 8), np.float32))
    tifffile.imwrite(tmp_path / "rgb_mask.tif", np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    (tmp_path / "broken_mask.tif").write_bytes(b"not a tiff")
    for name in ("float_mask.tif", "rgb_mask.tif", "broken_mask.tif", "cells.tif"):
        assert napari_get_label_reader(str(tmp_path / name)) is None, name


def test_viewer_opens_predict_outputs_as_labels_and_shapes(make_napari_viewer, tmp_path):
    """napari 0.9's plain ``viewer.open(path)`` means ``plugin="napari"`` (its built-in reader, which
    gives an Image), so the plugin has to be named, or chosen in the preferences (the GUI path)."""
    from napari.layers import Image, Labels, Shapes
    from napari.settings import get_settings

    mask, labels = _write_outputs(tmp_path)
    viewer = make_napari_viewer()
    [lab] = viewer.open(str(tmp_path / "cells_mask.tif"), plugin="napari-segthenseg")
    assert isinstance(lab, Labels) and lab.name == "cells_mask"
    np.testing.assert_array_equal(lab.data, mask)
    [lab] = viewer.open(str(tmp_path / "cells_labels.tif"), plugin="napari-segthenseg")
    assert isinstance(lab, Labels) and lab.data.max() == 2
    [boxes] = viewer.open(str(tmp_path / "cells.boxes.csv"), plugin="napari-segthenseg")
    assert isinstance(boxes, Shapes) and len(boxes.data) == len(BOXES)
    # what docs/PLUGIN.md says: without plugin=, napari's own reader is used
    [img] = viewer.open(str(tmp_path / "cells_mask.tif"))
    assert isinstance(img, Image)
    # File > Open / drag and drop (plugin=None) with the preference docs/PLUGIN.md gives: no dialog
    settings = get_settings()
    before = dict(settings.plugins.extension2reader)
    try:
        settings.plugins.extension2reader = {
            **before, **{f"*{s}": "napari-segthenseg" for s in ("_mask.tif", "_labels.tif", ".boxes.csv")}}
        [lab] = viewer.open(str(tmp_path / "cells_mask.tif"), plugin=None)
        [boxes] = viewer.open(str(tmp_path / "cells.boxes.csv"), plugin=None)
        assert isinstance(lab, Labels) and isinstance(boxes, Shapes)
        [img] = viewer.open(str(tmp_path / "cells_labels.tif"), plugin="napari")
        assert isinstance(img, Image)  # napari's reader stays available by name
    finally:
        settings.plugins.extension2reader = before


def test_napari_opens_and_saves_qupath_geojson(make_napari_viewer, tmp_path):
    """Boxes and a segmentation saved as GeoJSON with napari's own save, opened back with the plugin:
    the rectangles are the same boxes, the detections' outlines rasterise back onto the labels."""
    from napari_segthenseg.engine.geojson import rasterize, read_features

    viewer = make_napari_viewer()
    plane = Plane(lead=(), scale=(1.0, 1.0), translate=(0.0, 0.0), affine=np.eye(3), hw=(300, 300))
    boxes = viewer.add_shapes(boxes_to_rectangles(BOXES, plane), shape_type="rectangle", name="cells boxes")
    labels = np.zeros((60, 80), np.uint16)
    labels[5:15, 10:30] = 1
    labels[20:30, 40:50] = 2
    labels[24:27, 43:46] = 0  # a hole
    seg = viewer.add_labels(labels, name="cells segmentation")
    viewer.layers.selection = {boxes}
    [bpath] = viewer.layers.save(str(tmp_path / "cells_boxes.geojson"), selected=True)
    viewer.layers.selection = {seg}
    [spath] = viewer.layers.save(str(tmp_path / "cells.geojson"), selected=True)
    feats = read_features(spath)
    assert [f["objectType"] for f in feats] == ["detection", "detection"]
    np.testing.assert_array_equal(rasterize(feats, labels.shape), labels)
    [loaded] = viewer.open(str(bpath), plugin="napari-segthenseg")
    assert loaded.name == "cells_boxes" and set(loaded.shape_type) == {"rectangle"}
    back = rectangles_to_boxes(list(loaded.data), list(loaded.shape_type), plane.hw)
    np.testing.assert_array_equal(back.boxes, BOXES)
    [objects] = viewer.open(str(spath), plugin="napari-segthenseg")  # detections: polygons
    assert objects.name == "cells objects" and list(objects.shape_type) == ["polygon", "polygon"]
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": 3}')
    with pytest.raises(ValueError, match="'features' is not a list"):
        viewer.open(str(bad), plugin="napari-segthenseg")
