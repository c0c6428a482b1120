"""segthenseg-predict: per-image mask and boxes files; a bad file is skipped and reported."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import make_tiny_model, record_calls
from napari_segthenseg.cli import predict as predict_mod
from napari_segthenseg.cli.predict import main
from napari_segthenseg.engine import Engine, save_model
from trainer.data import read_image


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_model(make_tiny_model(32), tmp_path_factory.mktemp("m") / "tiny.pt")


@pytest.fixture
def inputs(dsb_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A folder with two real images and a broken png, plus one gray uint16 tif given as a file."""
    ids = json.loads((dsb_dir / "splits.json").read_text())["val"][:2]
    folder = tmp_path / "in"
    folder.mkdir()
    for i in ids:
        shutil.copy(dsb_dir / "images" / f"{i}.png", folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, (np.arange(70 * 90, dtype=np.uint16).reshape(70, 90) * 9))
    return folder, gray


def read_boxes(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=np.int64).reshape(-1, 4)


def test_predict_writes_masks_and_boxes_and_skips_bad(inputs, model_file, tmp_path, capsys):
    folder, gray = inputs
    out = tmp_path / "out"
    assert main(["--model", str(model_file), str(folder), str(gray), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "wrote 3 image(s)" in captured.out and "skipped 1" in captured.out
    engine = Engine(make_tiny_model(32), "cpu")
    sources = sorted(p for p in folder.iterdir() if p.name != "broken.png") + [gray]
    for src in sources:
        image = read_image(src)
        mask = tifffile.imread(out / f"{src.stem}_mask.tif")
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 1}
        expected = engine.segment(image)
        assert np.array_equal(mask.astype(bool), expected.mask)
        header, boxes = read_boxes(out / f"{src.stem}.boxes.csv")
        assert header == ["y0", "x0", "y1", "x1"]
        assert np.array_equal(boxes, expected.boxes)
    assert not list(out.glob("broken*")) and not list(out.glob(".*part"))


def test_duplicate_stems_refused_before_writing(inputs, model_file, tmp_path, capsys):
    folder, gray = inputs
    clash = tmp_path / "clash"
    clash.mkdir()
    first = sorted(folder.glob("*.png"))[0]
    shutil.copy(first, clash / first.name)
    out = tmp_path / "out"
    assert main(["--model", str(model_file), str(folder), str(clash), "--out", str(out)]) == 2
    assert "rename one" in capsys.readouterr().err
    assert not out.exists()


def test_model_required_without_bundled_default(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(predict_mod, "bundled_model_path", lambda: tmp_path / "absent.pt")
    assert main([str(inputs[1]), "--out", str(tmp_path / "o")]) == 2
    assert "pass --model" in capsys.readouterr().err


def test_model_defaults_to_bundled(inputs, model_file, tmp_path, monkeypatch):
    from napari_segthenseg.engine import modelfile

    for mod in (predict_mod, modelfile):
        monkeypatch.setattr(mod, "bundled_model_path", lambda: model_file)
    out = tmp_path / "o"
    assert main([str(inputs[1]), "--out", str(out)]) == 0
    assert (out / "gray_mask.tif").is_file() and (out / "gray.boxes.csv").is_file()


def test_bad_inputs_and_models(inputs, model_file, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["--model", str(model_file), str(tmp_path / "nope.png"), "--out", str(out)]) == 2
    assert "nope.png: no such file" in capsys.readouterr().err
    fine_only = save_model(make_tiny_model(32, rough=False), tmp_path / "fine.pt")
    assert main(["--model", str(fine_only), str(inputs[1]), "--out", str(out)]) == 2
    assert "no rough network" in capsys.readouterr().err
    assert main(["--model", str(model_file), str(inputs[1]), "--out", str(out), "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert not out.exists()


def test_a_rerun_finishes_the_job_and_cleans_up(inputs, model_file, tmp_path, capsys, monkeypatch):
    folder, gray = inputs
    out = tmp_path / "out"
    assert main(["--model", str(model_file), str(gray), str(folder), "--out", str(out)]) == 1
    first = sorted(p.name for p in out.iterdir())
    # What a kill leaves: a temp file, a half-written OME-Zarr, and a mask without its boxes file.
    (out / ".gray_mask.tif.x1.tmp").write_bytes(b"half")
    (out / ".big_mask.ome.zarr.partial").mkdir()
    unfinished = sorted(out.glob("*.boxes.csv"))[0]
    unfinished.unlink()
    calls = record_calls(monkeypatch)
    assert main(["--model", str(model_file), str(gray), str(folder), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already done" in err and "interrupted run" in err
    redone = [predict_mod.stem_of(c) for c in calls if c.name != "broken.png"]
    assert redone == [unfinished.name[: -len(".boxes.csv")]]
    assert sorted(p.name for p in out.iterdir()) == first  # leftovers gone, the unfinished image redone


def test_a_full_disk_stops_at_once(inputs, model_file, tmp_path, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(predict_mod, "write_boxes_csv", full)
    calls = record_calls(monkeypatch)
    folder, gray = inputs
    assert main(["--model", str(model_file), str(folder), str(gray), "--out", str(tmp_path / "o")]) == 3
    assert len(calls) == 1 and "is full" in capsys.readouterr().err


def test_missing_inputs_are_skipped_and_labels_written(inputs, model_file, tmp_path, capsys):
    from scipy import ndimage

    folder, gray = inputs
    out = tmp_path / "o"
    assert main(["--model", str(model_file), str(gray), str(tmp_path / "gone.png"), "--out", str(out),
                 "--labels"]) == 1
    assert "gone.png: no such file" in capsys.readouterr().err
    labels = tifffile.imread(out / "gray_labels.tif")
    expected = Engine(make_tiny_model(32), "cpu").segment(read_image(gray)).mask
    assert labels.dtype == np.uint16 and np.array_equal(labels > 0, expected)
    assert labels.max() == ndimage.label(expected, np.ones((3, 3)))[1]


def test_slides_are_written_as_ome_zarr_napari_opens(model_file, tmp_path, capsys, make_napari_viewer):
    from scipy import ndimage

    from napari_segthenseg.engine.omezarr import open_label_image

    rng = np.random.default_rng(0)
    slide = tmp_path / "slide.ome.tif"
    base = (rng.random((600, 900)) * 255).astype(np.uint8)
    with tifffile.TiffWriter(slide, bigtiff=True, ome=True) as tw:
        tw.write(base, subifds=1, tile=(128, 128), metadata={"axes": "YX"}, photometric="minisblack")
        tw.write(base[::2, ::2], subfiletype=1, tile=(128, 128), photometric="minisblack")
    out = tmp_path / "o"
    report = tmp_path / "report.jsonl"
    assert main(["--model", str(model_file), str(slide), "--out", str(out), "--format", "ome-zarr",
                 "--chunk", "256", "--rough-scale", "4", "--report", str(report)]) == 0
    seg = out / "slide_mask.ome.zarr"
    image = open_label_image(seg)
    expected = Engine(make_tiny_model(32), "cpu", rough_scale=4).segment(base).mask
    assert np.array_equal(np.asarray(image.levels[0][:]) > 0, expected)
    line = json.loads(report.read_text())
    assert line["hw"] == [600, 900] and "tiled at 4" in line["rough"] and line["counts"]["chunks"] >= 1
    assert not list(out.glob(".*"))  # no partial or scratch folders left
    assert main(["--model", str(model_file), str(slide), "--out", str(out), "--format", "ome-zarr",
                 "--chunk", "256", "--rough-scale", "4", "--labels"]) == 0
    labels = open_label_image(out / "slide_labels.ome.zarr").levels
    ids = np.asarray(labels[0][:])
    assert ids.dtype == np.uint32 and np.array_equal(ids > 0, expected)
    assert ids.max() == ndimage.label(expected, np.ones((3, 3)))[1] and labels[1].dtype == np.uint32
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(seg), plugin="napari-ome-zarr")
    assert layer.__class__.__name__ == "Labels" and layer.multiscale and layer.data[0].shape == (600, 900)


def test_bad_slides_are_named_and_leave_nothing(model_file, tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = (rng.random((512, 768)) * 255).astype(np.uint8)
    bad = tmp_path / "levels.ome.tif"
    with tifffile.TiffWriter(bad, bigtiff=True, ome=True) as tw:
        tw.write(base, subifds=1, tile=(128, 128), metadata={"axes": "YX"}, photometric="minisblack")
        tw.write(base[::2, ::3], subfiletype=1, tile=(128, 128), photometric="minisblack")
    # A z-stack is a volume now (tests/test_predict_volume.py); a time series is still refused.
    tstack = tmp_path / "tstack.ome.tif"
    tifffile.imwrite(tstack, rng.integers(0, 255, (3, 64, 64), dtype=np.uint8), metadata={"axes": "TYX"})
    out = tmp_path / "o"
    assert main(["--model", str(model_file), str(bad), str(tstack), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "levels.ome.tif: pyramid levels disagree" in err and "tstack.ome.tif: a time series (T=3" in err
    assert list(out.iterdir()) == []
