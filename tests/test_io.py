"""Boxes CSV reader/writer, alone and through napari's own open/save with the plugin's contributions."""

from __future__ import annotations

import numpy as np
import pytest

from napari_segthenseg._io import read_boxes_csv, write_boxes_csv
from napari_segthenseg._layers import Plane, boxes_to_rectangles, rectangles_to_boxes

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
    import napari_segthenseg._layers as layers

    mask = np.zeros((20, 30), bool)
    mask[2:5, 2:5] = mask[10:15, 20:25] = True
    mask[5, 5] = True  # touches the first object only diagonally: its own object (4-connectivity)
    lab = layers.labels_from_mask(mask)
    assert lab.dtype == np.uint16 and lab.max() == 3 and np.array_equal(lab > 0, mask)
    monkeypatch.setattr(layers, "LABEL_OBJECTS_MAX_PIXELS", 100)
    binary = layers.labels_from_mask(mask)
    assert binary.dtype == np.uint8 and binary.max() == 1 and np.array_equal(binary > 0, mask)
