"""segthenseg-predict: per-image mask and boxes files; a bad file is skipped and reported."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import make_tiny_model
from napari_segthenseg.engine import Engine, save_model
from trainer import predict as predict_mod
from trainer.data import read_image
from trainer.predict import main


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
