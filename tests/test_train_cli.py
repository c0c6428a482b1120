"""``segthenseg-train`` end to end on a few real dsb2018 images: files, model, kill -9 + resume, errors."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_subset, first_stems
from napari_segthenseg.engine import Engine, load_model
from trainer.train import main

TINY = ["--size", "32", "--width", "4", "--depth", "2", "--batch-size", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_data(dsb_dir: Path, tmp_path_factory) -> Path:
    """5 train + 2 val images of dsb2018 (the smallest ones), with their own splits.json."""
    return copy_subset(dsb_dir, tmp_path_factory.mktemp("tiny_dsb"), first_stems(dsb_dir, 5, 2))


def read_metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *args]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_both_stages_write_model_metrics_log(tiny_data, tmp_path, dsb_image):
    out = tmp_path / "run"
    assert main([str(tiny_data), "--out", str(out), "--epochs", "2", "--fine-epochs", "3", *TINY]) == 0
    assert {p.name for p in out.iterdir()} >= {"model.pt", "metrics.csv", "train.log", "checkpoint.pt"}
    rows = read_metrics(out)
    assert [(r["stage"], int(r["epoch"])) for r in rows] == [
        ("rough", 1), ("rough", 2), ("fine", 1), ("fine", 2), ("fine", 3)]
    for r in rows:
        assert 0.0 <= float(r["val_dice"]) <= 1.0 and float(r["seconds"]) > 0
    model = load_model(out / "model.pt")
    assert model.rough is not None and model.fine is not None
    s = model.settings
    assert (s.size, s.in_channels, s.pad) == (32, 3, 4)
    assert s.notes["select_on"] == "holdout" and s.notes["train_images"] == 4  # 1 of 5 held out
    best_fine = max(float(r["val_dice"]) for r in rows if r["stage"] == "fine")
    assert s.notes["best"]["fine"]["dice"] == pytest.approx(best_fine, abs=1e-6)
    result = Engine(model, device="cpu").segment(dsb_image[0])
    assert result.mask.shape == dsb_image[0].shape[:2]
    log = (out / "train.log").read_text()
    assert "fine epoch 3/3" in log and "wrote" in log


def test_rough_stage_then_fine_stage_from_init(tiny_data, tmp_path):
    rough_out, fine_out = tmp_path / "rough", tmp_path / "fine"
    assert main([str(tiny_data), "--out", str(rough_out), "--stage", "rough", "--epochs", "1",
                 "--select-on", "val", "--pixel-size", "0.5", *TINY]) == 0
    m = load_model(rough_out / "model.pt")
    assert m.rough is not None and m.fine is None and m.settings.notes["selection_images"] == 2
    assert m.settings.pixel_size == 0.5 and "at 0.5 µm/px" in m.describe()  # the training data's µm/px
    assert main([str(tiny_data), "--out", str(fine_out), "--stage", "fine", "--epochs", "1",
                 "--init", str(rough_out / "model.pt"), "--workers", "1", *TINY]) == 0  # crops in a worker
    both = load_model(fine_out / "model.pt")
    assert both.rough is not None and both.fine is not None


def test_kill_9_then_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    args = [str(tiny_data), "--epochs", "8", "--fine-epochs", "4", *TINY]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cli(*args, "--out", str(full)), check=True, env=env(), capture_output=True)
    proc = subprocess.Popen(cli(*args, "--out", str(killed)), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.csv").exists() and len(read_metrics(killed)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_metrics(killed))
    assert 3 <= done < 12  # killed mid-run, after some finished epochs
    res = subprocess.run(cli(*args, "--out", str(killed), "--resume"), env=env(), capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert "resuming after" in res.stderr
    a, b = read_metrics(full), read_metrics(killed)
    assert [(r["stage"], r["epoch"]) for r in b] == [(r["stage"], r["epoch"]) for r in a]  # no gap, no repeat
    # Per-epoch seeds and the saved optimizer make the resumed run repeat the lost epoch exactly.
    assert [r["val_dice"] for r in b] == [r["val_dice"] for r in a]
    ma, mb = load_model(full / "model.pt"), load_model(killed / "model.pt")
    for k, v in ma.fine.state_dict().items():
        assert np.array_equal(v.numpy(), mb.fine.state_dict()[k].numpy()), k


def test_refuses_to_overwrite_and_incompatible_resume(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([str(tiny_data), "--out", str(out), "--stage", "rough", "--epochs", "1", *TINY]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert main([str(tiny_data), "--out", str(out), "--stage", "rough", "--epochs", "1", *TINY]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    rough = [str(tiny_data), "--out", str(out), "--stage", "rough", "--epochs", "2", "--resume"]
    assert main([*rough, *TINY, "--width", "8"]) == 2
    assert "width: checkpoint 4, now 8" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing lost
    # A longer --epochs continues the same run.
    assert main([*rough, *TINY]) == 0
    assert [r["epoch"] for r in read_metrics(out)] == ["1", "2"]


def test_bad_data_folder_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "nope" in capsys.readouterr().err
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--size", "30", "--depth", "2"]) == 2
    assert "divisible" in capsys.readouterr().err
