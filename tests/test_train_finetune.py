"""``segthenseg-train --from-model``: a fine-tune keeps its parent's settings and records it; ``--minutes``;
1-3 images; data a fine-tune cannot use. Synthetic data and tiny networks, no real data needed."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from napari_segthenseg.cli import evaluate
from napari_segthenseg.engine import ModelSettings, StSModel, UNet, load_model, save_model
from napari_segthenseg.engine.integrity import file_sha256
from napari_segthenseg.engine.scale import TrainedScale
from trainer.augment import AugmentSettings, augment_batch, colour_augment
from trainer.config import FINE_TUNE_DEFAULTS, REGIMES, TrainConfig
from trainer.finetune import fine_tune_values
from trainer.loop import resolve_select_on
from trainer.train import main

FAST = ["--batch-size", "4", "--threads", "1"]
TINY = ["--size", "32", "--width", "4", "--depth", "2", *FAST]


def tune(data: Path, out: Path, parent: Path, *extra: str) -> int:
    return main([str(data), "--out", str(out), "--from-model", str(parent), *extra, *FAST])


def make_data(root: Path, n: int, hw: tuple[int, int] = (48, 56), splits: dict | None = None) -> Path:
    """``n`` RGB images with bright discs (foreground) on a dark ground, and their masks."""
    rng = np.random.default_rng(n)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:hw[0], :hw[1]]
    for i in range(n):
        mask = np.zeros(hw, bool)
        for _ in range(3):
            cy, cx, r = rng.integers(8, hw[0] - 8), rng.integers(8, hw[1] - 8), rng.integers(3, 7)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image = (mask[..., None] * [150, 90, 160] + 30 + rng.integers(0, 30, (*hw, 3))).astype(np.uint8)
        iio.imwrite(root / "images" / f"im{i:02d}.png", image)
        iio.imwrite(root / "masks" / f"im{i:02d}.png", mask.astype(np.uint8) * 255)
    if splits is not None:
        (root / "splits.json").write_text(json.dumps(splits))
    return root


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A tiny parent model with settings unlike the trainer's defaults (S=32, pad 5, dtype, 3 ch)."""
    torch.manual_seed(1)
    settings = ModelSettings(size=32, in_channels=3, pad=5, min_box=4, normalisation="dtype", threshold=0.4,
                             trained_on="synthetic parent",
                             trained_scale=TrainedScale(1.5, 1.5, 1.75, 1.17, 52))
    model = StSModel(settings, UNet(3, width=4, depth=2).eval(), UNet(3, width=4, depth=2).eval())
    return save_model(model, tmp_path_factory.mktemp("parent") / "parent.pt")


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_from_model_keeps_the_parents_settings_and_records_it(parent, tmp_path, capsys):
    data = make_data(tmp_path / "d", 4, hw=(64, 48))
    out = tmp_path / "run"
    assert tune(data, out, parent, "--epochs", "2", "--fine-epochs", "2") == 0
    err = capsys.readouterr().err
    assert "fine-tuning rough, fine" in err and "Traceback" not in err
    model, before = load_model(out), load_model(parent)
    s, p = model.settings, before.settings
    assert (s.size, s.pad, s.min_box, s.normalisation, s.in_channels) == (32, 5, 4, "dtype", 3)
    assert s.threshold == 0.4
    assert (model.rough.width, model.rough.depth, model.fine.width, model.fine.depth) == (4, 2, 4, 2)
    # the parent's trained scale, widened to the tuned images (64 x 48 at S=32: 1.5 to 2 px per px)
    assert s.trained_scale == TrainedScale(p.trained_scale.median, 1.5, 2.0, 1.3333, 52)
    notes = s.notes
    assert notes["parent"]["name"] == str(parent) and notes["parent"]["sha256"] == file_sha256(parent)
    assert notes["images"] == 4 and notes["train_images"] == 4  # 4 < 20 images: all train, the last kept
    assert notes["select_on"] == "last"
    # a random parent does not fit the discs: the adapting regime (its learning rate and jitter)
    assert notes["regime"]["tune"] == "adapt" and notes["regime"]["parent_dice"] < 0.5
    assert notes["lr"] == REGIMES["adapt"]["lr"] and notes["regime"]["colour_jitter"] == 0.8
    assert len(notes["data_fingerprint"]) == 64 and notes["tuned"] == ["rough", "fine"]
    assert "fine-tuned on 4 image(s) of d" in s.trained_on and s.trained_on.startswith("synthetic parent")
    lineage = model.lineage()
    assert lineage.startswith(f"fine-tuned from {parent} (SHA-256 {file_sha256(parent)[:12]}) on 4 image(s)")
    changed = [k for k, v in model.rough.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before.rough.state_dict()[k])]
    assert changed  # it trained, from the parent's weights (an epoch is one full batch: images repeat)
    assert [r["train_items"] for r in metrics(out)] == ["40"] * 4  # 10 batches of 4 an epoch
    # segthenseg-eval says where the model comes from
    assert evaluate.main(["--run", str(out), str(out / "model.pt"), str(data), "--split", "train"]) == 0
    assert f"fine-tuned from {parent}" in capsys.readouterr().out


def test_one_stage_from_a_model_ships_the_other_as_it_was(parent, tmp_path):
    data = make_data(tmp_path / "d", 3)
    out = tmp_path / "run"
    assert tune(data, out, parent, "--stage", "fine", "--fine-epochs", "1") == 0
    model, before = load_model(out), load_model(parent)
    for k, v in model.rough.state_dict().items():
        assert torch.equal(v, before.rough.state_dict()[k]), k
    assert model.settings.trained_scale == before.settings.trained_scale  # rough net (and scale) unchanged
    assert model.settings.notes["tuned"] == ["fine"]


def test_a_setting_other_than_the_parents_is_a_clear_error(parent, tmp_path, capsys):
    data = make_data(tmp_path / "d", 2)
    assert main([str(data), "--out", str(tmp_path / "r"), "--from-model", str(parent), "--size", "64"]) == 2
    err = capsys.readouterr().err
    assert "--size 64: the model to fine-tune" in err and "has 32" in err and "Traceback" not in err
    assert main([str(data), "--out", str(tmp_path / "r"), "--from-model", str(tmp_path / "nope.pt")]) == 2
    assert "--from-model" in capsys.readouterr().err
    assert tune(data, tmp_path / "r", parent, "--init", str(parent)) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_fine_tune_defaults_apply_only_to_options_not_given(parent, tmp_path):
    base = {"data": tmp_path, "out": tmp_path / "o", "from_model": str(parent), "epochs": 100, "lr": 5e-4,
            "select_on": "holdout", "size": 64}
    tuned = fine_tune_values(base, {"data", "out", "from_model"})
    assert (tuned["epochs"], tuned["select_on"], tuned["size"], tuned["width"]) == (
        FINE_TUNE_DEFAULTS["epochs"], "auto", 32, 4)
    assert tuned["lr"] is None and tuned["colour_jitter"] is None  # set by the regime, once the data are read
    mine = fine_tune_values(base, {"data", "out", "from_model", "lr", "epochs"})
    assert (mine["epochs"], mine["lr"]) == (100, 5e-4)
    assert fine_tune_values({**base, "from_model": None}, set()) == {**base, "from_model": None}
    assert [resolve_select_on("auto", n) for n in (1, 19, 20)] == ["last", "last", "holdout"]


def test_the_bundled_model_is_a_parent_by_name(default_model, tmp_path):
    cfg = TrainConfig(**fine_tune_values({"data": tmp_path, "out": tmp_path / "o", "from_model": "default"},
                                         {"data", "out", "from_model"}))
    s = default_model.settings
    assert (cfg.size, cfg.pad, cfg.normalisation, cfg.width) == (s.size, s.pad, s.normalisation,
                                                                 default_model.rough.width)


def test_minutes_stops_in_time_with_the_best_model_so_far(tmp_path, capsys):
    data = make_data(tmp_path / "d", 3)
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert main([str(data), "--out", str(out), "--size", "32", "--width", "4", "--depth", "2", "--epochs",
                 "100000", "--minutes", "0.05", "--select-on", "last", *FAST]) == 0
    wall = time.perf_counter() - t0
    rows = metrics(out)
    reached = {s: max(int(r["epoch"]) for r in rows if r["stage"] == s) for s in ("rough", "fine")}
    assert 1 <= reached["rough"] < 100000 and 1 <= reached["fine"] < 100000
    notes = load_model(out).settings.notes
    assert notes["stopped"] == reached and notes["minutes"] == 0.05
    # 3 s of budget; the slack is for the last step, validation, files and a busy machine
    assert wall < 3 + 30, wall
    assert "its time of --minutes 0.05 was up" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1, 2, 3])
def test_one_two_and_three_images_work(parent, tmp_path, n, capsys):
    data = make_data(tmp_path / "d", n)  # no splits.json: a fine-tune trains on every image
    out = tmp_path / "run"
    assert tune(data, out, parent, "--epochs", "2", "--fine-epochs", "1") == 0
    model = load_model(out)
    assert model.settings.notes["images"] == n and model.settings.notes["select_on"] == "last"
    assert json.loads((out / "splits.json").read_text())["train"] == [f"im{i:02d}" for i in range(n)]
    scratch = tmp_path / "scratch"  # from scratch too, keeping the last epoch
    assert main([str(data), "--out", str(scratch), "--size", "32", "--width", "4", "--depth", "2", "--epochs",
                 "1", "--select-on", "last", *FAST]) == 0
    assert load_model(scratch).settings.notes["train_images"] == (n if n < 3 else 2)  # 80/10/10 split
    assert "Traceback" not in capsys.readouterr().err


def test_images_without_masks_or_masks_of_another_size_are_clear_errors(parent, tmp_path, capsys):
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(2):
        iio.imwrite(loose / f"a{i}.png", np.zeros((20, 20, 3), np.uint8))
    assert main([str(loose), "--out", str(tmp_path / "r1"), "--from-model", str(parent)]) == 2
    err = capsys.readouterr().err
    assert "holds 2 image file(s) but no images/ and masks/ folders" in err and "Traceback" not in err
    data = make_data(tmp_path / "d", 2)
    (data / "masks" / "im01.png").unlink()
    assert main([str(data), "--out", str(tmp_path / "r2"), "--from-model", str(parent)]) == 2
    assert "no mask named im01.*" in capsys.readouterr().err
    iio.imwrite(data / "masks" / "im01.png", np.zeros((10, 12), np.uint8))
    assert main([str(data), "--out", str(tmp_path / "r3"), "--from-model", str(parent)]) == 2
    err = capsys.readouterr().err
    assert "mask is 10x12 but image im01.png is 48x56" in err and "Traceback" not in err
    assert not (tmp_path / "r3" / "model.pt").exists()


def test_colour_augmentations_are_recorded_and_change_only_colour(tmp_path):
    x = torch.rand(6, 3, 16, 16) * 0.8 + 0.1
    mask = (torch.rand(6, 1, 16, 16) > 0.5).float()
    cfg = AugmentSettings(p_affine=0.0, p_flip=0.0, p_stain=1.0, p_colour=1.0, p_invert=1.0)
    torch.manual_seed(0)
    y, m = augment_batch(x, mask, cfg)
    assert torch.equal(m, mask) and not torch.allclose(y, x) and 0 <= float(y.min()) <= float(y.max()) <= 1
    torch.manual_seed(0)
    assert torch.equal(colour_augment(x, AugmentSettings()), x)  # off: untouched
    gray = torch.rand(2, 1, 8, 8)
    assert torch.allclose(colour_augment(gray, AugmentSettings(p_stain=1, p_colour=1, p_invert=1)), 1 - gray)
    data = make_data(tmp_path / "d", 3)
    out = tmp_path / "run"
    assert main([str(data), "--out", str(out), "--epochs", "1", "--select-on", "last",
                 "--stain-jitter", "0.5", "--colour-jitter", "0.4", "--invert", "0.2", *TINY]) == 0
    assert load_model(out).settings.notes["colour_augment"] == {"stain_jitter": 0.5, "colour_jitter": 0.4,
                                                               "invert": 0.2}


def test_a_tiny_parent_from_conftest_fine_tunes(tmp_path):
    """The plugin's tests fine-tune such a model: both nets, default settings."""
    parent = save_model(make_tiny_model(size=32), tmp_path / "tiny.pt")
    data = make_data(tmp_path / "d", 2)
    assert main([str(data), "--out", str(tmp_path / "run"), "--from-model", str(parent), "--epochs", "1",
                 "--fine-epochs", "1", *FAST]) == 0
    assert load_model(tmp_path / "run").settings.notes["parent"]["sha256"] == file_sha256(parent)


def test_a_fine_tune_resumes_and_checks_its_parent(parent, tmp_path, capsys):
    data = make_data(tmp_path / "d", 2)
    out = tmp_path / "run"
    assert tune(data, out, parent, "--epochs", "1", "--fine-epochs", "1") == 0
    assert tune(data, out, parent, "--epochs", "1", "--fine-epochs", "2", "--resume") == 0
    assert [(r["stage"], r["epoch"]) for r in metrics(out)] == [("rough", "1"), ("fine", "1"), ("fine", "2")]
    other = save_model(make_tiny_model(size=32), tmp_path / "other.pt")
    assert tune(data, out, other, "--epochs", "1", "--fine-epochs", "3", "--resume") == 2
    assert "from_model: checkpoint" in capsys.readouterr().err


def test_a_refining_fine_tune_keeps_the_parents_batchnorm_statistics(parent, tmp_path, capsys):
    data = make_data(tmp_path / "d", 3)
    before = load_model(parent)
    stats = lambda m: {k: v for k, v in m.rough.state_dict().items() if "running" in k}  # noqa: E731
    one = ("--epochs", "1", "--fine-epochs", "1")
    assert tune(data, tmp_path / "refine", parent, "--tune", "refine", *one) == 0
    assert "fine-tune regime refine (--tune refine): --lr 3e-05" in capsys.readouterr().err
    refined = load_model(tmp_path / "refine")
    assert all(torch.equal(v, stats(before)[k]) for k, v in stats(refined).items())
    assert refined.settings.notes["lr"] == REGIMES["refine"]["lr"]
    assert tune(data, tmp_path / "adapt", parent, *one) == 0
    err = capsys.readouterr().err
    assert "fine-tune regime adapt (its Dice on the 3 training image(s) is" in err
    assert "BatchNorm statistics of the kept weights (epoch 1) recomputed" in err
    adapted = load_model(tmp_path / "adapt")
    assert not all(torch.equal(v, stats(before)[k]) for k, v in stats(adapted).items())
