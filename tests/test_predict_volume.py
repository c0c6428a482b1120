"""segthenseg-predict and the reader on volumes (docs/VOLUMES.md): ZYX in, same-shape 3D mask out."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import make_threshold_model, make_tiny_model
from napari_segthenseg.cli import predict_volume as predict_volume_mod
from napari_segthenseg.cli.predict import main, predict_file
from napari_segthenseg.engine import Engine, omezarr, save_model
from napari_segthenseg.engine.boxes import label_objects
from napari_segthenseg.engine.reader import ImageFileError, open_image
from napari_segthenseg.engine.volume import VolumeOptions, segment_volume

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_model(make_tiny_model(32, channels=1), tmp_path_factory.mktemp("m") / "tiny.pt")


def blobs(shape=(7, 80, 96)) -> tuple[np.ndarray, np.ndarray]:
    """A gray volume with two bright objects, one across five slices, and its truth."""
    zz, yy, xx = np.indices(shape)
    truth = ((yy - 30) ** 2 + (xx - 30) ** 2 <= 100) & (zz >= 1) & (zz <= 5)
    truth |= ((yy - 60) ** 2 + (xx - 70) ** 2 <= 64) & (zz == 3)
    vol = np.where(truth, 180, 30).astype(np.uint8)
    return vol, truth


def read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], np.array(rows[1:], dtype=np.int64).reshape(-1, len(rows[0]))


def write_ome_zarr(path, arrays, axes):
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscale

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    write_multiscale(arrays, group, fmt=FormatV04(), axes=axes)


def test_volumes_open_by_their_metadata_and_time_series_are_refused(tmp_path):
    vol = RNG.integers(0, 255, (5, 48, 64), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "z.ome.tif", vol, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "pages.tif", vol)  # a plain multi-page TIFF: pages are slices
    rgb = RNG.integers(0, 255, (4, 48, 64, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "zc.tif", rgb, photometric="rgb")
    write_ome_zarr(tmp_path / "z.ome.zarr", [vol[None], vol[None, :, ::2, ::2]], ["c", "z", "y", "x"])
    for name, shape in [("z.ome.tif", (5, 48, 64)), ("pages.tif", (5, 48, 64)), ("zc.tif", (4, 48, 64, 3)),
                        ("z.ome.zarr", (5, 48, 64))]:
        with open_image(tmp_path / name, volume=True) as opened:
            assert opened.volume and opened.shape == shape, name
            assert f"x {shape[0]} slices" in opened.describe()
        with pytest.raises(ImageFileError, match="a stack"):  # as one 2D image: still refused
            open_image(tmp_path / name)
    with open_image(tmp_path / "z.ome.zarr", volume=True) as opened:
        assert [lv.shape for lv in opened.levels] == [(5, 48, 64), (5, 24, 32)]
        np.testing.assert_array_equal(np.asarray(opened.levels[0]), vol)
    tifffile.imwrite(tmp_path / "t.tif", vol, imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(ImageFileError, match="t.tif: a time series \\(T=5"):
        open_image(tmp_path / "t.tif", volume=True)
    tifffile.imwrite(tmp_path / "tz.ome.tif", RNG.integers(0, 255, (2, 3, 8, 8), dtype=np.uint8),
                     metadata={"axes": "TZYX"})
    with pytest.raises(ImageFileError, match="a time series \\(T=2"):
        open_image(tmp_path / "tz.ome.tif", volume=True)
    tifffile.imwrite(tmp_path / "one.tif", vol[0])  # a 2D file stays 2D
    with open_image(tmp_path / "one.tif", volume=True) as opened:
        assert not opened.volume and opened.shape == (48, 64)


def test_predict_on_a_zyx_tiff_writes_a_same_shape_3d_mask(model_file, tmp_path, capsys):
    vol, _ = blobs()
    path = tmp_path / "ct.ome.tif"
    tifffile.imwrite(path, vol, metadata={"axes": "ZYX"})
    assert main(["--model", str(model_file), str(path), "--out", str(tmp_path / "o")]) == 0
    assert "wrote 1 image(s)" in capsys.readouterr().out
    with tifffile.TiffFile(tmp_path / "o" / "ct_mask.tif") as tif:
        assert tif.series[0].axes == "ZYX"
        mask = tif.asarray()
    assert mask.shape == vol.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    expected = segment_volume(Engine(make_tiny_model(32, channels=1), "cpu"), vol)
    np.testing.assert_array_equal(mask > 0, expected.mask)
    header, boxes = read_csv(tmp_path / "o" / "ct.boxes.csv")
    assert header == ["z0", "y0", "x0", "z1", "y1", "x1"]
    np.testing.assert_array_equal(boxes, expected.boxes)
    # a rerun skips it; --labels gives one id per 26-connected object
    assert main(["--model", str(model_file), str(path), "--out", str(tmp_path / "o")]) == 0
    assert "1 image(s) already done" in capsys.readouterr().err
    assert main(["--model", str(model_file), str(path), "--out", str(tmp_path / "l"), "--labels"]) == 0
    labels = tifffile.imread(tmp_path / "l" / "ct_labels.tif")
    np.testing.assert_array_equal(labels, label_objects(expected.mask))


def test_predict_finds_the_objects_with_3d_boxes(tmp_path):
    vol, truth = blobs()
    path = tmp_path / "blobs.tif"
    tifffile.imwrite(path, vol, metadata={"axes": "ZYX"})
    engine = Engine(make_threshold_model(32), "cpu")
    seg, boxes_path = predict_file(engine, path, tmp_path, labels=True, volume=VolumeOptions(z_pad=1))
    ids = tifffile.imread(seg)
    assert ids.shape == vol.shape and ids.max() == 2  # two objects, each one 3D id
    assert 2 * ((ids > 0) & truth).sum() / ((ids > 0).sum() + truth.sum()) > 0.9
    _, boxes = read_csv(boxes_path)
    assert sorted((b[0], b[3]) for b in boxes.tolist()) == [(0, 7), (2, 5)]  # z-ranges padded by 1


def test_large_volumes_go_to_a_3d_ome_zarr_chunk_by_chunk(model_file, tmp_path, monkeypatch):
    vol, _ = blobs((20, 80, 96))
    src = tmp_path / "big.ome.zarr"
    write_ome_zarr(src, [vol], ["z", "y", "x"])
    monkeypatch.setattr(predict_volume_mod, "LARGE_IMAGE_PX", 1000)  # "large": more voxels than this
    out = tmp_path / "o"
    assert main(["--model", str(model_file), str(src), "--out", str(out), "--chunk", "64", "--labels"]) == 0
    image = omezarr.open_label_image(out / "big_labels.ome.zarr")
    assert image.shape == vol.shape and image.levels[0].chunks[0] == omezarr.Z_CHUNK
    expected = segment_volume(Engine(make_tiny_model(32, channels=1), "cpu"), vol)
    np.testing.assert_array_equal(np.asarray(image.levels[0][:]), label_objects(expected.mask))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial or scratch left


def test_a_time_series_is_refused_and_nothing_is_written(model_file, tmp_path, capsys):
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, RNG.integers(0, 255, (4, 64, 64), dtype=np.uint8), imagej=True,
                     metadata={"axes": "TYX"})
    assert main(["--model", str(model_file), str(path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "movie.tif: a time series (T=4" in err and "Traceback" not in err
    assert list((tmp_path / "o").iterdir()) == []
    assert main(["--model", str(model_file), str(path), "--out", str(tmp_path / "o"), "--z-pad", "-1"]) == 2
    assert "z_pad" in capsys.readouterr().err


def test_a_ct_patient_stacked_into_a_volume(data_root, model_file, tmp_path):
    """Real data when it is there: 24 consecutive slices of a CT stand-in val patient as one ZYX file."""
    ct = data_root / "ct_segthor_aorta"
    if not (ct / "manifest.csv").is_file():
        pytest.skip("ct_segthor_aorta is not in the data folder")
    rows = [r for r in csv.DictReader(open(ct / "manifest.csv")) if r["split"] == "val"]
    pid = sorted({r["patient_id"] for r in rows})[0]
    mine = sorted((int(r["slice_index"]), r["id"]) for r in rows if r["patient_id"] == pid)
    ids = [i for _, i in mine][:24]
    vol = np.stack([tifffile.imread(ct / "images" / f"{i}.tif") for i in ids])
    path = tmp_path / f"{pid}.ome.tif"
    tifffile.imwrite(path, vol, metadata={"axes": "ZYX"})
    assert main(["--model", str(model_file), str(path), "--out", str(tmp_path / "o")]) == 0
    mask = tifffile.imread(tmp_path / "o" / f"{pid}_mask.tif")
    expected = segment_volume(Engine(make_tiny_model(32, channels=1), "cpu"), vol)
    assert mask.shape == vol.shape and np.array_equal(mask > 0, expected.mask)
    header, boxes = read_csv(tmp_path / "o" / f"{pid}.boxes.csv")
    assert header[0] == "z0" and ((boxes[:, 3] <= len(ids)) & (boxes[:, 0] >= 0)).all()


def test_geojson_or_boxes_by_hand_on_a_volume_say_why_and_write_nothing(model_file, tmp_path, capsys):
    vol, _ = blobs()
    path = tmp_path / "ct.ome.tif"
    tifffile.imwrite(path, vol, metadata={"axes": "ZYX"})
    assert main(["--model", str(model_file), str(path), "--out", str(tmp_path / "o"), "--geojson"]) == 1
    err = capsys.readouterr().err
    assert "ct.ome.tif" in err and "--geojson and --boxes take 2D images and slides" in err
    assert "Traceback" not in err and list((tmp_path / "o").iterdir()) == []
