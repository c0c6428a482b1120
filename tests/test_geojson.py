"""QuPath in and out: detections as GeoJSON (images and slides, rasterised back onto the mask), boxes
from QuPath rectangle annotations and boxes CSVs, bad GeoJSON named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from conftest import make_tiny_model
from napari_segthenseg.cli.predict import main
from napari_segthenseg.engine import Engine, omezarr, save_model
from napari_segthenseg.engine.boxes import label_objects
from napari_segthenseg.engine.geojson import (
    GeoJSONError,
    box_feature,
    label_features,
    rasterize,
    read_features,
    read_geojson_boxes,
    slide_features,
    write_features,
)
from napari_segthenseg.engine.progress import drive


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_model(make_tiny_model(32), tmp_path_factory.mktemp("m") / "tiny.pt")


def awkward_labels() -> np.ndarray:
    """Objects with a hole, pixels touching only at corners, one-pixel objects and image edges."""
    rng = np.random.default_rng(3)
    mask = rng.random((120, 150)) > 0.7
    mask[20:50, 30:70] = True
    mask[30:40, 40:50] = False  # a hole
    mask[0:5, 0:5] = True  # on the image edge
    return label_objects(mask)


def test_objects_round_trip_through_geojson(tmp_path):
    labels = awkward_labels()
    n = int(labels.max())
    path = tmp_path / "o.geojson"
    assert write_features(path, label_features(labels, pixel_size=0.25)) == n > 100
    feats = read_features(path)
    assert len(feats) == n and all(f["objectType"] == "detection" for f in feats)
    m = feats[0]["properties"]["measurements"]
    assert m["Object ID"] == 1 and m["Area px^2"] == int((labels == 1).sum())
    assert m["Area µm^2"] == pytest.approx(m["Area px^2"] / 16)
    assert np.array_equal(rasterize(feats, labels.shape), labels)  # every pixel back, ids in order
    geoms = [f["geometry"] for f in json.loads(path.read_text())["features"]]
    assert {g["type"] for g in geoms} == {"Polygon", "MultiPolygon"}  # pixels touching at corners: one object
    ring = next(g for g in geoms if g["type"] == "Polygon")["coordinates"][0]
    assert ring[0] == ring[-1]  # closed outlines, [x, y] in pixel-corner coordinates


def test_slide_objects_across_chunks_are_whole(tmp_path):
    import zarr

    mask = awkward_labels() > 0
    mask[60:100, 20:140] = True  # one large object across many 32 px chunks
    labels = label_objects(mask).astype(np.uint32)  # ids of 8-connected objects, as relabel_chunked gives
    array = zarr.open_array(str(tmp_path / "l.zarr"), mode="w", shape=labels.shape, chunks=(32, 32),
                            dtype=np.uint32)
    array[:] = labels
    feats: list[dict] = []
    n = drive(slide_features(array, 32, feats))
    ids = [f["properties"]["measurements"]["Object ID"] for f in feats]
    assert n == len(feats) == len(set(ids)) == len(np.unique(labels)) - 1  # each object once
    from shapely.geometry import shape

    order = np.argsort(ids)
    back = rasterize([shape(feats[i]["geometry"]) for i in order], labels.shape)
    assert np.array_equal(back, labels)


def test_predict_writes_geojson_for_images_and_slides(model_file, tmp_path):
    rng = np.random.default_rng(0)
    img = np.zeros((300, 500), np.uint8)
    yy, xx = np.mgrid[:300, :500]
    for cy, cx, r in rng.integers((20, 20, 5), (280, 480, 25), (25, 3)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(120, 255)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, img)
    out = tmp_path / "out"
    assert main(["--model", str(model_file), str(path), "--out", str(out), "--geojson"]) == 0
    mask = tifffile.imread(out / "img_mask.tif") > 0
    feats = read_features(out / "img.geojson")
    assert np.array_equal(rasterize(feats, mask.shape), label_objects(mask)) and len(feats) >= 1
    manifest = json.loads((out / "segthenseg-predict.json").read_text())
    assert "img.geojson" in manifest["images"]["img"]["outputs"]
    # the same image as a slide, 64 px chunks: the same objects, streamed chunk by chunk
    assert main(["--model", str(model_file), str(path), "--out", str(out), "--geojson",
                 "--format", "ome-zarr", "--chunk", "64"]) == 0
    seg = np.asarray(omezarr.open_label_image(out / "img_mask.ome.zarr").levels[0][:]) > 0
    assert np.array_equal(seg, mask)
    slide_feats = read_features(out / "img.geojson")
    slide_feats.sort(key=lambda f: f["properties"]["measurements"]["Object ID"])
    back = rasterize(slide_feats, mask.shape)
    assert np.array_equal(back, label_objects(mask)) and not list(out.glob(".*"))


QUPATH_RECTANGLES = [  # as QuPath 0.5 exports rectangle annotations (File > Export objects as GeoJSON)
    {"type": "Feature", "id": "9b2c7c1e-0d55-4b8c-9d0e-2b1f8f9a6f10",
     "geometry": {"type": "Polygon", "coordinates": [[[40, 30], [90, 30], [90, 72], [40, 72], [40, 30]]]},
     "properties": {"objectType": "annotation", "classification": {"name": "Nucleus", "color": [200, 0, 0]}}},
    {"type": "Feature", "id": "0a9d1d7e-5f44-4a3b-8e6c-7c2d9f1b3e21",
     "geometry": {"type": "Polygon", "coordinates": [[[200.5, 100], [260, 100], [260, 150.25],
                                                      [200.5, 150.25], [200.5, 100]]]},
     "properties": {"objectType": "annotation", "isLocked": False}},
    {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]},
     "properties": {"objectType": "annotation"}},  # a point: no box
]


def test_qupath_rectangles_are_boxes(model_file, tmp_path):
    gj = tmp_path / "boxes.geojson"
    gj.write_text(json.dumps(QUPATH_RECTANGLES))
    boxes = read_geojson_boxes(gj)
    assert boxes.tolist() == [[30, 40, 72, 90], [100, 200.5, 150.25, 260]]
    img = (np.random.default_rng(1).random((256, 320)) * 255).astype(np.uint8)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, img)
    fine_only = save_model(make_tiny_model(32, rough=False), tmp_path / "fine.pt")  # no rough net needed
    out = tmp_path / "out"
    assert main(["--model", str(fine_only), str(path), "--out", str(out), "--boxes", str(gj)]) == 0
    written = np.loadtxt(out / "img.boxes.csv", delimiter=",", skiprows=1, dtype=np.int64).reshape(-1, 4)
    assert written.tolist() == [[30, 40, 72, 90], [100, 200, 151, 260]]  # rounded outwards
    expected = Engine(make_tiny_model(32, rough=False), "cpu").segment(img, boxes).mask
    assert np.array_equal(tifffile.imread(out / "img_mask.tif") > 0, expected)
    # a boxes CSV works alike, and boxes written back as rectangles are read as the same boxes
    again = tmp_path / "again.geojson"
    write_features(again, [box_feature(b) for b in written])
    assert read_geojson_boxes(again).tolist() == written.tolist()
    csv = out / "img.boxes.csv"
    o2 = tmp_path / "o2"
    assert main(["--model", str(fine_only), str(path), "--out", str(o2), "--boxes", str(csv)]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "o2" / "img_mask.tif") > 0, expected)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not a GeoJSON file (invalid JSON at line 1"),
    ('{"type": "Topology"}', "not a GeoJSON FeatureCollection, Feature or list of features"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", '
     '"coordinates": [[[0, 0], [1]]]}}]}', "feature 1: bad geometry"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", '
     '"coordinates": [[[0, 0], ["a", 1], [1, 1], [0, 0]]]}}]}', "feature 1: bad geometry"),
    ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}]',
     "no rectangles or polygons"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}', "feature 1: not a GeoJSON Feature"),
])
def test_bad_geojson_is_named(model_file, tmp_path, capsys, text, message):
    gj = tmp_path / "bad.geojson"
    gj.write_text(text)
    with pytest.raises(GeoJSONError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_geojson_boxes(gj)
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, np.zeros((64, 64), np.uint8))
    out = tmp_path / "out"
    assert main(["--model", str(model_file), str(img), "--out", str(out), "--boxes", str(gj)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("segthenseg-predict: error: --boxes: ") and message in err[-1]
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_boxes_take_one_image(model_file, tmp_path, capsys):
    gj = tmp_path / "b.geojson"
    gj.write_text(json.dumps(QUPATH_RECTANGLES[:1]))
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"i{k}.tif")
        tifffile.imwrite(paths[-1], np.zeros((64, 64), np.uint8))
    assert main(["--model", str(model_file), *map(str, paths), "--out", str(tmp_path / "o"), "--boxes",
                 str(gj)]) == 2
    assert "--boxes holds the boxes of one image, but 2 images were given" in capsys.readouterr().err
