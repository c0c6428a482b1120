"""``segthenseg-train`` on synthetic data made here: the recorded scale and split, damaged checkpoints,
changed data, a full disk, bad training data and the command line. Needs no real data."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import flip_middle
from napari_segthenseg.engine import atomic as atomic_mod
from napari_segthenseg.engine import load_model
from napari_segthenseg.engine.scale import TrainedScale
from trainer import loop as loop_mod
from trainer.checkpoint import CHECKPOINT_NAME, DAMAGED_NAME, PREVIOUS_NAME, read_checkpoint
from trainer.config import DEFAULT_SEED, TrainConfig
from trainer.train import build_parser, main

TINY = ["--size", "32", "--width", "4", "--depth", "2", "--batch-size", "4", "--threads", "1"]
SIZES = [(48, 64), (64, 48), (56, 56), (40, 72)]


def make_data(root: Path, n: int = 10, splits: dict | None = None, fill: str = "discs") -> Path:
    """``n`` gray png images (sizes vary) with bright discs and their masks; ``fill`` = "empty"/"full"
    gives all-background/all-foreground masks."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[:h, :w]
        mask = np.zeros((h, w), bool)
        for _ in range(3):
            cy, cx, r = rng.integers(8, h - 8), rng.integers(8, w - 8), rng.integers(3, 7)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        mask = {"empty": np.zeros_like(mask), "full": np.ones_like(mask)}.get(fill, mask)
        image = (mask * 150 + 40 + rng.integers(0, 40, (h, w))).astype(np.uint8)
        iio.imwrite(root / "images" / f"im{i:02d}.png", image)
        iio.imwrite(root / "masks" / f"im{i:02d}.png", mask.astype(np.uint8) * 255)
    if splits is not None:
        (root / "splits.json").write_text(json.dumps(splits))
    return root


def stems(a: int, b: int) -> list[str]:
    return [f"im{i:02d}" for i in range(a, b)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """10 train, 2 val, 2 test images."""
    return make_data(tmp_path_factory.mktemp("synthetic") / "d", 14,
                     {"train": stems(0, 10), "val": stems(10, 12), "test": stems(12, 14)})


def read_metrics(out: Path) -> list[tuple[str, int]]:
    with open(out / "metrics.csv", newline="") as fh:
        return [(r["stage"], int(r["epoch"])) for r in csv.DictReader(fh)]


def rough(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [str(data), "--out", str(out), "--stage", "rough", "--epochs", str(epochs), *TINY, *extra]


# -- A: the trained scale; D: the split saved with the run ---------------------------------------

def test_model_records_trained_scale_and_the_run_splits(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([str(data), "--out", str(out), "--epochs", "1", "--fine-epochs", "1", *TINY]) == 0
    saved = json.loads((out / "splits.json").read_text())
    assert set(saved) == {"train", "holdout", "val", "test"}
    assert sorted(saved["train"] + saved["holdout"]) == stems(0, 10) and len(saved["holdout"]) == 1
    assert saved["val"] == stems(10, 12) and saved["test"] == stems(12, 14)
    trained = [iio.imread(data / "images" / f"{s}.png").shape for s in saved["train"]]
    model = load_model(out / "model.pt")
    assert model.settings.trained_scale == TrainedScale.from_sizes(trained, 32)
    assert model.settings.trained_scale.aspect == pytest.approx(72 / 40)
    err = capsys.readouterr().err
    assert "decoded and checked 9 train, 1 holdout, 2 val, 2 test" in err


def test_fine_stage_from_init_keeps_the_init_models_scale(data, tmp_path):
    first = tmp_path / "rough"
    assert main(rough(data, first, 1)) == 0
    fine = tmp_path / "fine"
    assert main([str(data), "--out", str(fine), "--stage", "fine", "--epochs", "1",
                 "--init", str(first / "model.pt"), *TINY]) == 0
    assert (load_model(fine / "model.pt").settings.trained_scale
            == load_model(first / "model.pt").settings.trained_scale)


# -- B: checkpoints --------------------------------------------------------------------------------

def test_damaged_checkpoint_resumes_from_the_previous_one(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(rough(data, out, 2)) == 0
    assert read_checkpoint(out / PREVIOUS_NAME)["epoch"] == 1
    flip_middle(out / CHECKPOINT_NAME)
    left = [".checkpoint.pt.a1.tmp", ".model.pt.b2.tmp", ".metrics.csv.c3.tmp", ".checkpoint.prev.pt.9.tmp"]
    for name in left:
        (out / name).write_bytes(b"half-written")
    capsys.readouterr()
    assert main(rough(data, out, 3, "--resume")) == 0
    err = capsys.readouterr().err
    assert "is damaged" in err and "resuming from the previous checkpoint checkpoint.prev.pt" in err
    assert "removed 4 temporary file(s)" in err and "Traceback" not in err
    assert not any((out / name).exists() for name in left)
    assert (out / DAMAGED_NAME).is_file()  # kept for inspection, never becomes the fallback
    assert read_metrics(out) == [("rough", 1), ("rough", 2), ("rough", 3)]  # epoch 2 done again
    assert read_checkpoint(out / CHECKPOINT_NAME)["epoch"] == 3


def test_no_usable_checkpoint_says_how_to_start_over(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(rough(data, out, 2)) == 0
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        flip_middle(out / name)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(rough(data, out, 3, "--resume")) == 2
    err = capsys.readouterr().err
    assert "cannot be used either" in err and "To start over, move the folder" in err
    assert "weights_only" not in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.log"} == {
        k: v for k, v in before.items() if k != "train.log"}  # nothing lost


def test_changed_data_refuses_resume(tmp_path, capsys):
    d = make_data(tmp_path / "d", 12)
    out = tmp_path / "run"
    assert main(rough(d, out, 1)) == 0
    train = json.loads((out / "splits.json").read_text())["train"]
    before = (out / CHECKPOINT_NAME).read_bytes()
    for s in train[:3]:
        (d / "images" / f"{s}.png").unlink()
        (d / "masks" / f"{s}.png").unlink()
    capsys.readouterr()
    assert main(rough(d, out, 2, "--resume")) == 2
    err = capsys.readouterr().err
    assert "changed since the checkpoint" in err and "gone" in err and train[0] in err
    assert (out / CHECKPOINT_NAME).read_bytes() == before
    assert json.loads((out / "splits.json").read_text())["train"] == train  # the run's split kept


def test_changed_pixels_refuse_resume(data, tmp_path, capsys):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(data, d)
    out = tmp_path / "run"
    assert main(rough(d, out, 1)) == 0
    victim = d / "images" / "im03.png"
    img = iio.imread(victim)
    img[0, 0] ^= 1
    iio.imwrite(victim, img)
    capsys.readouterr()
    assert main(rough(d, out, 2, "--resume")) == 2
    assert "1 changed (e.g. im03)" in capsys.readouterr().err


def test_full_disk_stops_with_a_message_and_keeps_the_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(rough(data, out, 1)) == 0
    before = (out / CHECKPOINT_NAME).read_bytes()

    @contextlib.contextmanager
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
        yield

    monkeypatch.setattr(atomic_mod, "atomic_write", full)
    capsys.readouterr()
    assert main(rough(data, out, 3, "--resume")) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "after rough epoch 1) is intact" in err and "--resume" in err
    assert "Traceback" not in err
    assert (out / CHECKPOINT_NAME).read_bytes() == before
    monkeypatch.undo()
    assert main(rough(data, out, 3, "--resume")) == 0
    assert read_metrics(out) == [("rough", 1), ("rough", 2), ("rough", 3)]


def test_full_disk_while_the_model_file_is_written_keeps_the_old_one(data, tmp_path, capsys, monkeypatch):
    """torch.save into a file turns ENOSPC into a RuntimeError; the model file is serialised in memory
    first, so a full disk is one clear message and the previous model.pt stays as it was."""
    out = tmp_path / "run"
    assert main(rough(data, out, 1)) == 0
    before = (out / "model.pt").read_bytes()
    real = atomic_mod.atomic_write

    class FullDisk:
        """A file whose writes fail as on a full disk."""

        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

    @contextlib.contextmanager
    def full_for_models(path, *args, **kwargs):
        with real(path, *args, **kwargs) as fh:
            yield FullDisk(fh) if Path(path).name == "model.pt" else fh

    monkeypatch.setattr(atomic_mod, "atomic_write", full_for_models)
    capsys.readouterr()
    assert main(rough(data, out, 2, "--resume")) == 1
    err = capsys.readouterr().err
    assert "model.pt" in err and "the disk is full" in err and "Traceback" not in err
    assert (out / "model.pt").read_bytes() == before
    assert load_model(out / "model.pt") is not None
    assert not list(out.glob(".*.tmp"))


def test_version_1_checkpoint_resumes_with_a_warning(data, tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    assert main(rough(data, out, 1)) == 0
    state = read_checkpoint(out / CHECKPOINT_NAME)
    old = {k: v for k, v in state.items() if k not in ("sha256", "data_fingerprint")}
    torch.save({**old, "version": 1}, out / CHECKPOINT_NAME)
    capsys.readouterr()
    assert main(rough(data, out, 2, "--resume")) == 0
    assert "version 1" in capsys.readouterr().err
    assert read_metrics(out) == [("rough", 1), ("rough", 2)]


# -- C: training data ------------------------------------------------------------------------------

@pytest.mark.parametrize("fill, message", [("empty", "are empty"), ("full", "completely foreground")])
def test_training_masks_without_foreground_or_background_are_refused(tmp_path, capsys, fill, message):
    d = make_data(tmp_path / "d", 6, fill=fill)
    out = tmp_path / "run"
    assert main(rough(d, out, 1)) == 2
    assert message in capsys.readouterr().err
    assert not (out / CHECKPOINT_NAME).exists() and not (out / "metrics.csv").exists()


def test_images_shared_between_splits_are_warned_about(tmp_path, capsys):
    d = make_data(tmp_path / "d", 10, {"train": stems(0, 8), "val": ["im01", "im08"], "test": ["im09"]})
    for sub in ("images", "masks"):  # im09 is the same picture as im02
        (d / sub / "im09.png").write_bytes((d / sub / "im02.png").read_bytes())
    out = tmp_path / "run"
    assert main(rough(d, out, 1)) == 0
    err = capsys.readouterr().err
    assert "'val' are also in 'train' (same stem), e.g. im01" in err
    assert "'test' have the same pixels as one in 'train', e.g. im09 = im02" in err
    assert "finished with 2 warning(s)" in err.splitlines()[-1]


def test_bad_image_outside_the_train_split_stops_training_before_it_starts(data, tmp_path, capsys):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(data, d)
    (d / "images" / "im13.png").write_bytes(b"not a png")  # a test image
    out = tmp_path / "run"
    assert main(rough(d, out, 1)) == 2
    assert "im13.png: cannot read image" in capsys.readouterr().err
    assert not (out / "metrics.csv").exists()


def test_validation_dice_stuck_at_zero_is_a_loud_warning(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop_mod.Run, "validate", lambda self, net, x, y: (1.0, 0.0))
    out = tmp_path / "run"
    assert main([str(data), "--out", str(out), "--epochs", "2", "--fine-epochs", "1", *TINY]) == 0
    err = capsys.readouterr().err
    assert "WARNING validation Dice stayed 0 through all 2 epoch(s) of the rough stage" in err
    assert "WARNING validation Dice stayed 0 through all 1 epoch(s) of the fine stage" in err
    last = err.strip().splitlines()[-1]
    assert "WARNING" in last and "wrote" in last and "finished with 2 warning(s)" in last


# -- D: command line -------------------------------------------------------------------------------

def test_command_line_defaults_come_from_the_config():
    args = vars(build_parser().parse_args(["D", "--out", "O"]))
    cfg = TrainConfig(**args)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("data", "out", "command"):
            assert args[f.name] == f.default == getattr(cfg, f.name), f.name
    assert cfg.seed == DEFAULT_SEED
    assert vars(build_parser().parse_args(["D", "--out", "O", "--no-augment"]))["augment"] is False


def test_help_prints_each_default_once(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: True)" not in text and "(default: False)" not in text
    assert text.count("(default: 64)") == 1 and "(default: same as --epochs)" in text
    assert "(default: --epochs)" not in text and "default: S/8" in text
    for flag, words in (("--seed N", "(default: 2022)"), ("--device NAME", "cuda:N"),
                        ("--normalisation {minmax,dtype,none}", "intensity normalisation")):
        after = text.split(flag)[-1][:200]
        assert words in after, flag


def test_device_with_an_index_is_accepted_and_checked(capsys):
    import torch

    args = vars(build_parser().parse_args(["D", "--out", "O", "--device", "cuda:1"]))
    assert args["device"] == "cuda:1"  # not an argparse choice error
    if torch.cuda.is_available():
        assert TrainConfig(**{**args, "device": "cuda:0"}).device == "cuda:0"
    else:
        with pytest.raises(ValueError, match="--device: device 'cuda:1' is not available"):
            TrainConfig(**args)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        TrainConfig(**{**args, "device": "tpu"})


def test_documented_defaults_match_the_config():
    """docs/TRAINING.md's option table quotes the defaults TrainConfig defines."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "TRAINING.md").read_text()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    checked = 0
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`--"):
            continue
        names = [w.strip("`").split()[0][2:].replace("-", "_") for w in cells[0].split(",")]
        values = [v.strip() for v in cells[1].split(",")]
        for name, value in zip(names, values if len(values) == len(names) else [], strict=False):
            if name in defaults and value and value[0].isalnum() and " " not in value and "/" not in value:
                default = defaults[name]
                same = float(value) == default if isinstance(default, (int, float)) else value == default
                assert same, f"--{name}: docs say {value}, TrainConfig {default}"
                checked += 1
    assert checked >= 12


def test_out_that_is_a_file_is_a_one_line_error(data, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "run"):
        assert main(rough(data, out, 1)) == 2
        err = capsys.readouterr().err
        assert f"segthenseg-train: error: --out {out}:" in err and "is a file, not a folder" in err
        assert "Traceback" not in err and "FileExistsError" not in err
    assert a_file.read_text() == "x"


# -- small data sets -------------------------------------------------------------------------------

def test_a_small_data_set_caps_the_batch_and_warns_when_epochs_are_one_step(tmp_path, capsys):
    """4 training images at --batch-size 16: the batch is 4 (said), an epoch is one step, and 2 epochs
    of one step each are warned about; 100 such epochs are not."""
    d = make_data(tmp_path / "d", 6, {"train": stems(0, 5), "val": stems(5, 6)})  # 1 of 5 held out
    out = tmp_path / "run"
    small = ["--size", "32", "--width", "4", "--depth", "2", "--threads", "1", "--batch-size", "16"]
    assert main([str(d), "--out", str(out), "--stage", "rough", "--epochs", "2", *small]) == 0
    err = capsys.readouterr().err
    assert "batch 4 x 1 process(es)" in err
    assert "rough stage: batch 4: --batch-size 16 capped at the 4 training item(s) per process" in err
    warning = ("an epoch of the rough stage is one optimizer step (4 training item(s), batch 4), so its 2 "
               "epoch(s) are only 2 step(s)")
    assert f"WARNING {warning}" in err and warning in err.strip().splitlines()[-1]
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["train_items"] for r in rows] == ["4", "4"]


def test_one_step_epochs_are_fine_when_there_are_enough_of_them(tmp_path):
    d = make_data(tmp_path / "d", 6, {"train": stems(0, 5), "val": stems(5, 6)})
    cfg = TrainConfig(d, tmp_path / "run", size=32, width=4, depth=2, epochs=100, fine_epochs=10)
    run = loop_mod.Run(cfg, loop_mod.ddp.DistInfo(0, 1, 0, torch.device("cpu")))
    run.check_steps("rough", 4, 1)  # 100 steps: enough
    run.check_steps("fine", 40, 3)  # several steps an epoch
    assert run.warnings == []
    run.check_steps("fine", 4, 1)  # 10 one-step epochs
    assert len(run.warnings) == 1 and "(--fine-epochs;" in run.warnings[0]
