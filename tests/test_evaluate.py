"""segthenseg-eval on three real dsb2018 images with a tiny random model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from conftest import copy_subset, make_tiny_model
from napari_segthenseg.cli.evaluate import main
from napari_segthenseg.engine import Engine, load_model, save_model
from napari_segthenseg.engine import modelfile as modelfile_mod
from trainer.data import read_image, read_mask
from trainer.metrics import METRICS, scores


@pytest.fixture(scope="module")
def small_set(dsb_dir: Path, tmp_path_factory) -> Path:
    """Three real images (one train, two val) in their own data folder with a splits.json."""
    ids = json.loads((dsb_dir / "splits.json").read_text())["val"][:3]
    return copy_subset(dsb_dir, tmp_path_factory.mktemp("dsb3"), {"train": ids[:1], "val": ids[1:]})


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_model(make_tiny_model(32), tmp_path_factory.mktemp("m") / "tiny.pt")


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_eval_val_split_files_and_values(small_set, model_file, tmp_path, capsys):
    out_json, out_csv = tmp_path / "o" / "s.json", tmp_path / "o" / "rows.csv"
    assert main([str(model_file), str(small_set), "--json", str(out_json), "--csv", str(out_csv),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "split 'val', 2 image(s)" in printed and "±" in printed and "StS" in printed
    summary = json.loads(out_json.read_text())
    assert summary["n_images"] == 2 and summary["size"] == 32 and summary["split"] == "val"
    rows = read_rows(out_csv)
    val_ids = json.loads((small_set / "splits.json").read_text())["val"]
    assert [r["stem"] for r in rows] == val_ids
    engine = Engine(load_model(model_file), "cpu")
    for method in ("baseline", "sts"):
        s = summary[method]
        for m in METRICS:
            values = [float(r[f"{method}_{m}"]) for r in rows]
            assert s[m] == pytest.approx(np.mean(values)) and 0 <= s[m] <= 1
            assert s[f"{m}_std"] == pytest.approx(np.std(values))
        assert {"empty_pred", "both_empty"} <= set(s)
    for r in rows:  # StS metrics equal a fresh one-call segmentation scored here
        image = read_image(small_set / "images" / f"{r['stem']}.png")
        gt = read_mask(small_set / "masks" / f"{r['stem']}.png")
        result = engine.segment(image)
        expected = scores(result.mask, gt)
        assert [float(r[f"sts_{m}"]) for m in METRICS] == pytest.approx([expected[m] for m in METRICS])
        assert int(r["n_boxes"]) == len(result.boxes)
        assert (int(r["height"]), int(r["width"])) == gt.shape
        assert int(r["gt_pixels"]) == int(gt.sum())
        base = engine.baseline(result.rough, gt.shape)
        assert float(r["baseline_dsc"]) == pytest.approx(scores(base, gt)["dsc"])


def test_eval_all_images_without_splits_and_named_split(small_set, model_file, tmp_path, capsys):
    root = tmp_path / "nosplits"
    shutil.copytree(small_set, root)
    (root / "splits.json").unlink()
    out = tmp_path / "s.json"
    assert main([str(model_file), str(root), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n_images"] == 3
    assert "all images (no splits.json)" in capsys.readouterr().out
    assert main([str(model_file), str(small_set), "--split", "train", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n_images"] == 1


def test_empty_ground_truth_is_reported(tmp_path, model_file):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, fg in enumerate((False, True)):
        iio.imwrite(root / "images" / f"{i}.png", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        mask = np.zeros((40, 48), np.uint8)
        mask[10:20, 5:30] = fg
        iio.imwrite(root / "masks" / f"{i}.png", mask)
    out = tmp_path / "s.json"
    assert main([str(model_file), str(root), "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["empty_gt"] == 1
    for method in ("baseline", "sts"):
        assert 0 <= s[method]["both_empty"] <= min(1, s[method]["empty_pred"])


def test_default_model_name(small_set, model_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(modelfile_mod, "bundled_model_path", lambda: tmp_path / "absent.pt")
    assert main(["default", str(small_set)]) == 2
    assert "no bundled default model" in capsys.readouterr().err
    monkeypatch.setattr(modelfile_mod, "bundled_model_path", lambda: model_file)
    assert main(["default", str(small_set)]) == 0


def test_clear_errors_write_nothing(small_set, tmp_path, capsys):
    rough_only = save_model(make_tiny_model(32, fine=False), tmp_path / "rough.pt")
    out = tmp_path / "s.json"
    assert main([str(rough_only), str(small_set), "--json", str(out)]) == 2
    assert "no fine network" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(small_set, bad)
    victim = sorted((bad / "masks").iterdir())[1]
    iio.imwrite(victim, np.zeros((7, 7), np.uint8))
    good = save_model(make_tiny_model(32), tmp_path / "good.pt")
    assert main([str(good), str(bad), "--json", str(out)]) == 2
    assert victim.name in capsys.readouterr().err
    assert main([str(good), str(small_set), "--split", "test"]) == 2
    assert "no split 'test'" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pt"), str(small_set)]) == 2
    assert not out.exists()


def synthetic_folder(root: Path, n: int = 6) -> Path:
    """``n`` small RGB images with a rectangle each, and no splits.json."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((40, 48), np.uint8)
        mask[5 + i:20 + i, 8:30] = 1
        image = (mask[..., None] * 120 + rng.integers(0, 60, (40, 48, 3))).astype(np.uint8)
        iio.imwrite(root / "images" / f"s{i}.png", image)
        iio.imwrite(root / "masks" / f"s{i}.png", mask * 255)
    return root


def fake_run(root: Path, splits: dict, select_on: str = "holdout") -> Path:
    """A training run folder as segthenseg-train leaves it: model.pt and the run's splits.json."""
    root.mkdir(parents=True)
    model = make_tiny_model(32)
    model.settings.notes = {"select_on": select_on}
    save_model(model, root / "model.pt")
    (root / "splits.json").write_text(json.dumps(splits))
    return root


RUN_SPLITS = {"train": ["s0", "s1", "s2"], "holdout": ["s3"], "val": ["s4", "s5"]}


def test_eval_scores_the_runs_unseen_images(tmp_path, capsys):
    data = synthetic_folder(tmp_path / "d")
    run = fake_run(tmp_path / "run", RUN_SPLITS)
    out = tmp_path / "s.json"
    for model in (run / "model.pt", run):  # the model file in its run folder, or the folder itself
        assert main([str(model), str(data), "--csv", str(out.with_suffix(".csv")), "--json", str(out)]) == 0
        captured = capsys.readouterr()
        assert "split 'val', 2 image(s)" in captured.out and "WARNING" not in captured.err
        assert [r["stem"] for r in read_rows(out.with_suffix(".csv"))] == ["s4", "s5"]
        summary = json.loads(out.read_text())
        assert summary["split"] == "val" and summary["warnings"] == [] and str(run) in summary["splits_from"]
    elsewhere = save_model(make_tiny_model(32), tmp_path / "m.pt")
    assert main([str(elsewhere), str(data), "--run", str(run), "--split", "holdout", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(out.read_text())["n_images"] == 1
    assert "WARNING: split 'holdout' chose the model's checkpoints" in captured.err
    assert main([str(run), str(data), "--split", "train"]) == 0
    assert "WARNING: split 'train' holds the images the networks were trained on" in capsys.readouterr().err


def test_eval_prefers_test_when_the_run_selected_on_val(tmp_path, capsys):
    data = synthetic_folder(tmp_path / "d")
    run = fake_run(tmp_path / "run", {"train": ["s0", "s1", "s2"], "val": ["s3"], "test": ["s4", "s5"]},
                   select_on="val")
    assert main([str(run), str(data)]) == 0
    assert "split 'test', 2 image(s)" in capsys.readouterr().out
    assert main([str(run), str(data), "--split", "val"]) == 0
    assert "split 'val' chose the model's checkpoints" in capsys.readouterr().err


def test_eval_without_splits_or_run_warns_loudly(tmp_path, capsys):
    data = synthetic_folder(tmp_path / "d")
    model = save_model(make_tiny_model(32), tmp_path / "m.pt")
    out = tmp_path / "s.json"
    assert main([str(model), str(data), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "segthenseg-eval: WARNING:" in captured.err and "ALL images" in captured.err
    assert "may include the images the model was trained on" in captured.err
    assert captured.out.rstrip().splitlines()[-1].startswith("WARNING:")  # repeated under the table
    assert json.loads(out.read_text())["warnings"]
    assert main([str(model), str(data), "--split", "val"]) == 0
    assert "rebuilt from --seed 2022" in capsys.readouterr().err


def test_eval_run_problems_are_clear(tmp_path, capsys):
    data = synthetic_folder(tmp_path / "d")
    run = fake_run(tmp_path / "run", {"train": ["s0"], "val": ["x9"]})
    assert main([str(run), str(data)]) == 2
    err = capsys.readouterr().err
    assert "'x9'" in err and "is " + str(data) + " the data the run" in err
    assert main([str(run / "model.pt"), str(data), "--run", str(tmp_path)]) == 2
    assert "no splits.json there" in capsys.readouterr().err
    run2 = fake_run(tmp_path / "run2", RUN_SPLITS)
    assert main([str(run2), str(data), "--split", "test"]) == 2
    assert "no split 'test'; available: holdout, train, val" in capsys.readouterr().err


def test_bad_output_paths_are_refused_before_the_evaluation(small_set, model_file, tmp_path, capsys,
                                                             monkeypatch):
    """--json/--csv under a file: said at once, not as a traceback after the whole evaluation."""
    from napari_segthenseg.cli import evaluate as evaluate_mod

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr(evaluate_mod, "evaluate_samples", never)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for option in ("--json", "--csv"):
        target = a_file / "x.out"
        assert main([str(model_file), str(small_set), option, str(target), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"{option} {target}: {a_file} is a file, not a folder" in err and "Traceback" not in err
    assert main([str(model_file), str(small_set), "--json", str(tmp_path), "--device", "cpu"]) == 2
    assert f"{tmp_path} is a folder, not a file" in capsys.readouterr().err
    assert a_file.read_text() == "x"


def test_eval_progress_lines_without_a_terminal(small_set, model_file, capsys, monkeypatch):
    from napari_segthenseg.cli import common as common_mod

    monkeypatch.setattr(common_mod, "PLAIN_EVERY_S", 0.0)
    assert main([str(model_file), str(small_set), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    val = json.loads((small_set / "splits.json").read_text())["val"]
    assert f"evaluating 1/2 images, {val[0]}" in err and f"evaluating 2/2 images, {val[1]}" in err
    assert "\r" not in err
