"""segthenseg-predict for a user who runs it twice, from a cluster job or with a typo: reruns skip only
what the same model and options made, progress shows without a terminal, bad paths are refused
before any work, a run folder is a model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import make_tiny_model, record_calls
from napari_segthenseg.cli import common as common_mod
from napari_segthenseg.cli import predict as predict_mod
from napari_segthenseg.cli.manifest import MANIFEST_NAME
from napari_segthenseg.cli.predict import build_parser, main
from napari_segthenseg.engine import save_model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """Two different tiny models; the second is a training run's folder (its model.pt)."""
    root = tmp_path_factory.mktemp("models")
    a = save_model(make_tiny_model(32, seed=0), root / "a.pt")
    run = root / "run"
    run.mkdir()
    save_model(make_tiny_model(32, seed=1), run / "model.pt")
    return a, run


@pytest.fixture
def folder(dsb_dir: Path, tmp_path: Path) -> Path:
    """Two real images in a folder."""
    ids = json.loads((dsb_dir / "splits.json").read_text())["val"][:2]
    d = tmp_path / "in"
    d.mkdir()
    for i in ids:
        shutil.copy(dsb_dir / "images" / f"{i}.png", d / f"{i}.png")
    return d


def test_a_run_folder_is_its_model_pt(models, folder, tmp_path, capsys):
    _, run = models
    out = tmp_path / "o"
    assert main(["--model", str(run), str(folder), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"model: {run / 'model.pt'}" in err
    assert len(list(out.glob("*_mask.tif"))) == 2
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main(["--model", str(empty), str(folder), "--out", str(tmp_path / "o2")]) == 2
    assert f"{empty} is a folder without a model.pt" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_a_rerun_skips_only_what_the_same_model_and_options_made(models, folder, tmp_path, capsys,
                                                                  monkeypatch):
    a, run = models
    out = tmp_path / "o"
    base = [str(folder), "--out", str(out)]
    assert main(["--model", str(a), *base]) == 0
    capsys.readouterr()
    record = json.loads((out / MANIFEST_NAME).read_text())["images"]
    assert len(record) == 2
    sha_a = hashlib.sha256(a.read_bytes()).hexdigest()
    assert {e["model_sha256"] for e in record.values()} == {sha_a}
    assert all(e["labels"] is False and e["rough_scale"] is None for e in record.values())
    first = {p.name: p.read_bytes() for p in out.glob("*_mask.tif")}

    calls = record_calls(monkeypatch)
    assert main(["--model", str(a), *base]) == 0  # same model, same options: nothing to do
    err = capsys.readouterr().err
    assert calls == [] and "2 image(s) already done" in err and "same model and options" in err

    assert main(["--model", str(run), *base]) == 0  # another model: made again, and said why
    err = capsys.readouterr().err
    assert len(calls) == 2 and "made again: made with another model" in err and sha_a[:12] in err
    assert {p.name: p.read_bytes() for p in out.glob("*_mask.tif")} != first
    record = json.loads((out / MANIFEST_NAME).read_text())["images"]
    sha_run = hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()
    assert {e["model_sha256"] for e in record.values()} == {sha_run}

    calls.clear()
    assert main(["--model", str(run), *base, "--rough-scale", "3"]) == 0  # another option
    err = capsys.readouterr().err
    assert len(calls) == 2 and "made with other options (--rough-scale None -> 3.0)" in err

    calls.clear()
    assert main(["--model", str(run), *base, "--rough-scale", "3"]) == 0
    assert calls == [] and "already done" in capsys.readouterr().err

    changed = sorted(folder.iterdir())[0]  # a new version of one input
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert main(["--model", str(run), *base, "--rough-scale", "3"]) == 0
    assert calls == [changed] and "its input file changed since" in capsys.readouterr().err

    calls.clear()
    assert main(["--model", str(run), *base, "--rough-scale", "3", "--overwrite"]) == 0
    assert len(calls) == 2 and "made again: --overwrite" in capsys.readouterr().err


def test_outputs_without_a_record_are_made_again(models, folder, tmp_path, capsys, monkeypatch):
    a, _ = models
    out = tmp_path / "o"
    assert main(["--model", str(a), str(folder), "--out", str(out)]) == 0
    (out / MANIFEST_NAME).unlink()  # e.g. written by an older version
    calls = record_calls(monkeypatch)
    assert main(["--model", str(a), str(folder), "--out", str(out)]) == 0
    assert len(calls) == 2 and "no record of the model and options" in capsys.readouterr().err
    (out / MANIFEST_NAME).write_text("{broken")
    calls.clear()
    assert main(["--model", str(a), str(folder), "--out", str(out)]) == 0
    assert len(calls) == 2 and f"{out / MANIFEST_NAME} is unreadable" in capsys.readouterr().err


def test_a_redone_image_counts_as_unfinished_until_its_new_boxes_are_written(models, folder, tmp_path,
                                                                              monkeypatch):
    """A kill while an image is made again never leaves old boxes beside a new mask."""
    a, run = models
    out = tmp_path / "o"
    assert main(["--model", str(a), str(folder), "--out", str(out)]) == 0

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_mod, "write_boxes_csv", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["--model", str(run), str(folder), "--out", str(out)])
    first = sorted(folder.iterdir())[0]
    assert not (out / f"{first.stem}.boxes.csv").exists()
    assert not predict_mod.is_done(out, first, False)


def test_progress_lines_without_a_terminal(models, folder, tmp_path, capsys, monkeypatch):
    """Output to a file (capsys is not a terminal): plain progress lines, no tqdm bars."""
    a, _ = models
    monkeypatch.setattr(common_mod, "PLAIN_EVERY_S", 0.0)  # every step, for the test
    assert main(["--model", str(a), str(folder), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    names = sorted(p.name for p in folder.iterdir())
    assert f"segmenting 1/2 images, {names[0]}" in err and f"segmenting 2/2 images, {names[1]}" in err
    assert f"segmenting 2/2 images, {names[1]}: fine pass:" in err and " s\n" in err
    assert "\r" not in err and "it/s" not in err and "image/s" not in err


def test_progress_lines_are_spaced_in_time(capsys, monkeypatch):
    ticks = iter([0.0, 0.0, 1.0, 11.0, 11.0, 12.0, 13.0, 25.0, 25.0])
    progress = common_mod.CommandProgress(["a.png", "b.png"], "segmenting", terminal=False, every=10.0)
    progress.t0 = 0.0
    monkeypatch.setattr(common_mod.time, "monotonic", lambda: next(ticks))
    for _ in progress:
        progress.on_step(common_mod.Progress("rough pass", 0, 1))
        progress.on_step(common_mod.Progress("fine pass: 3/9 boxes", 3, 9))
    monkeypatch.undo()
    assert capsys.readouterr().err.splitlines() == [
        "segmenting 1/2 images, a.png, 0 s",
        "segmenting 1/2 images, a.png: fine pass: 3/9 boxes, 11 s",
        "segmenting 2/2 images, b.png: fine pass: 3/9 boxes, 25 s"]


def test_bad_output_paths_are_refused_before_any_work(models, folder, tmp_path, capsys, monkeypatch):
    a, _ = models
    calls = record_calls(monkeypatch)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["--model", str(a), str(folder), "--out", str(a_file)]) == 2
    assert f"--out {a_file}: {a_file} is a file, not a folder" in capsys.readouterr().err
    assert main(["--model", str(a), str(folder), "--out", str(a_file / "sub")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    out = tmp_path / "o"
    assert main(["--model", str(a), str(folder), "--out", str(out), "--report", str(a_file / "r.jsonl")]) == 2
    assert f"--report {a_file / 'r.jsonl'}" in capsys.readouterr().err
    assert calls == [] and not out.exists() and a_file.read_text() == "x"


def test_an_empty_folder_is_named(models, tmp_path, capsys):
    a, _ = models
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main(["--model", str(a), str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: a folder without image files" in err and "no image files" in err
    assert f"in {empty}" in err and not (tmp_path / "o").exists()


def test_help_shows_every_default_once():
    text = " ".join(build_parser().format_help().split()).split("options:", 1)[1]
    for option, default in (("--chunk PX", "1024"), ("--threads N", "2"), ("--device", "auto"),
                            ("--format", "auto")):
        assert f"(default: {default})" in text.split(option, 1)[1].split(" --", 1)[0], option
    model_help = text.split("--model MODEL", 1)[1].split(" --", 1)[0]
    assert ") (" not in model_help and "run's folder (its model.pt)" in model_help


def test_labels_tif_is_skipped_when_asked_again(models, folder, tmp_path, capsys):
    """--labels writes another file kind: its own rerun is skipped too."""
    a, _ = models
    out = tmp_path / "o"
    assert main(["--model", str(a), str(folder), "--out", str(out), "--labels"]) == 0
    capsys.readouterr()
    assert main(["--model", str(a), str(folder), "--out", str(out), "--labels"]) == 0
    assert "2 image(s) already done" in capsys.readouterr().err
    labels = tifffile.imread(sorted(out.glob("*_labels.tif"))[0])
    assert labels.dtype == np.uint16
