"""Trainer building blocks: GT crops with the engine's rules, augmentation, losses, checkpoints (damage,
fallback to the previous one, temporary files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import flip_middle
from napari_segthenseg.engine import Engine, ModelSettings, StSModel, UNet, square_pad_shift
from trainer.augment import AugmentSettings, apply_affines, augment_batch, random_affines
from trainer.checkpoint import (
    CHECKPOINT_NAME,
    DAMAGED_NAME,
    FORMAT,
    PREVIOUS_NAME,
    VERSION,
    CheckpointError,
    check_compatible,
    find_resumable,
    holds_run,
    read_checkpoint,
    remove_temporary,
    save_checkpoint,
    set_aside,
)
from trainer.data import Sample
from trainer.gtcrops import (
    FineData,
    RoughData,
    cut_pair,
    fixed_crops,
    jitter_box,
    prepare,
    random_box,
)
from trainer.losses import dice_per_item, soft_dice_loss


def blob_sample(hw=(90, 120), centres=((30, 40), (60, 90)), r=8, seed=0) -> Sample:
    """A gray uint16 image with bright discs and the matching mask."""
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    mask = np.zeros(hw, bool)
    for cy, cx in centres:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    noise = np.random.default_rng(seed).integers(0, 50, hw)
    return Sample("blob", (mask * 3000 + 100 + noise).astype(np.uint16), mask)


def test_jitter_box_moves_and_resizes():
    box = np.array([10, 20, 30, 50])
    assert jitter_box(box, np.array([3, -2, 4, -5])).tolist() == [8, 23, 23, 57]
    assert jitter_box(box, np.array([0, 0, -100, -100])).tolist() == [10, 20, 11, 21]  # sides >= 1


def test_random_boxes_follow_engine_rules_and_stay_inside():
    item = prepare(blob_sample(), 32, 1, "minmax")
    assert len(item.objects) == 2
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        b = random_box(item, pad=4, generator=g)[0]
        assert b[0] >= 0 and b[1] >= 0 and b[2] <= 90 and b[3] <= 120
        side = b[2] - b[0]
        assert side == b[3] - b[1]  # square (both sides fit the image here)
        assert square_pad_shift(b, item.source.hw, 0).tolist() == b.tolist()  # already final


def test_crops_match_engine_and_masks_align():
    sample = blob_sample()
    item = prepare(sample, 32, 1, "minmax")
    boxes = np.array([[14, 24, 46, 56]])
    x, y = cut_pair(item, boxes, 32, 1)
    model = StSModel(ModelSettings(size=32, in_channels=1), fine=UNet(1, 4, 2))
    engine = Engine(model, device="cpu")
    ref = engine.crops(sample.image, boxes, engine.image_stats(sample.image))
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)  # exactly what inference feeds the net
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    fg, bg = x[0, 0][y[0, 0] > 0].mean(), x[0, 0][y[0, 0] == 0].mean()
    assert fg > 0.8 and bg < 0.2  # the disc in the crop is where the mask says


def test_image_without_objects_is_used_whole():
    s = blob_sample()
    empty = Sample("empty", s.image, np.zeros_like(s.mask))
    item = prepare(empty, 32, 1, "minmax")
    assert random_box(item, 4).tolist() == [[0, 0, 90, 120]]
    ds = FineData([item], 32, 1, 4)
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and float(y.sum()) == 0.0


def test_rough_inputs_and_fixed_validation_crops():
    items = [prepare(blob_sample(seed=i), 32, 3, "minmax") for i in range(3)]
    rough = RoughData(items)
    assert rough.x.shape == (3, 3, 32, 32) and rough.y.shape == (3, 1, 32, 32)
    assert float(rough.x.min()) >= 0.0 and float(rough.x.max()) <= 1.0
    a = fixed_crops(items, 32, 3, 4, 5, per_image=1, seed=7)
    b = fixed_crops(items, 32, 3, 4, 5, per_image=1, seed=7)
    assert a[0].shape == (3, 3, 32, 32) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_flip_is_exact_and_geometry_is_shared():
    x = torch.nn.functional.avg_pool2d(torch.rand(6, 1, 48, 48), 9, 1, 4)
    m = (x > x.mean()).float()
    xf, mf = apply_affines(x[:1], m[:1], torch.tensor([[[-1.0, 0, 0], [0, 1, 0]]]))
    assert torch.allclose(xf, x[:1].flip(-1), atol=1e-6) and torch.equal(mf, m[:1].flip(-1))
    theta = random_affines(6, AugmentSettings(p_affine=1.0, p_flip=0.5), torch.Generator().manual_seed(1))
    xa, ma = apply_affines(x, m, theta)
    agree = ((xa > x.mean()).float() == ma).float().mean()
    assert agree > 0.95  # the mask moved with the image
    assert set(torch.unique(ma).tolist()) <= {0.0, 1.0}


def test_augmentation_probabilities_and_identity():
    theta = random_affines(4000, AugmentSettings(), torch.Generator().manual_seed(0))
    eye = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    flipped = (theta[:, 0, 0] < 0).float().mean()
    untouched = (theta == eye).flatten(1).all(1).float().mean()
    assert abs(flipped - 0.3) < 0.03  # 30 % flips
    assert abs(untouched - 0.5 * 0.7) < 0.03  # neither affine (50 %) nor flip (30 %)
    x, m = torch.rand(2, 3, 16, 16), torch.ones(2, 1, 16, 16)
    xo, mo = augment_batch(x, m, AugmentSettings(p_affine=0.0, p_flip=0.0))
    assert torch.equal(xo, x) and torch.equal(mo, m)


def test_losses():
    t = torch.zeros(2, 1, 8, 8)
    t[:, :, 2:6, 2:6] = 1
    good, bad = soft_dice_loss(t * 40 - 20, t), soft_dice_loss(20 - t * 40, t)
    assert float(good) < 0.01 and float(bad) > 0.95
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    target = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[1, :2], target[1, 1:3], target[2, 0] = True, True, True
    assert dice_per_item(pred, target).tolist() == [1.0, 0.5, 0.0]  # empty vs empty scores 1


def test_checkpoint_roundtrip_and_refusals(tmp_path):
    assert not holds_run(tmp_path)
    save_checkpoint(tmp_path, {"epoch": 3, "w": torch.ones(2), "rows": "[]"})
    state = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.ones(2)) and state["version"] == VERSION
    assert "sha256" in state
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind
    with pytest.raises(CheckpointError, match="size: checkpoint 64, now 32"):
        check_compatible({"size": 64}, {"size": 32}, ("size",))


@pytest.mark.parametrize("damage, message", [
    ("flip", "is damaged: its content does not match the checksum"),
    ("garbage", "is not a training checkpoint: it is not a PyTorch zip archive"),
    ("empty", "is empty"),
    ("truncate", "is truncated"),
    ("folder", "is a folder"),
])
def test_damaged_checkpoints_are_refused_with_what_is_wrong(tmp_path, damage, message):
    save_checkpoint(tmp_path, {"epoch": 3, "w": torch.arange(20000, dtype=torch.float32)})
    path = tmp_path / CHECKPOINT_NAME
    if damage == "flip":
        flip_middle(path)
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
        path.mkdir()
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert "weights_only" not in str(info.value)  # never the advice to load it unsafely


def test_previous_checkpoint_is_kept_and_used_when_the_latest_is_damaged(tmp_path):
    save_checkpoint(tmp_path, {"epoch": 1, "w": torch.zeros(20000)})
    assert not (tmp_path / PREVIOUS_NAME).exists()
    save_checkpoint(tmp_path, {"epoch": 2, "w": torch.ones(20000)})
    assert read_checkpoint(tmp_path / PREVIOUS_NAME)["epoch"] == 1
    found = find_resumable(tmp_path)
    assert found.state["epoch"] == 2 and found.problem is None
    flip_middle(tmp_path / CHECKPOINT_NAME)
    found = find_resumable(tmp_path)
    assert found.state["epoch"] == 1 and found.path.name == PREVIOUS_NAME and "damaged" in found.problem
    assert set_aside(tmp_path).name == DAMAGED_NAME and not (tmp_path / CHECKPOINT_NAME).exists()
    save_checkpoint(tmp_path, {"epoch": 2, "w": torch.ones(20000)})  # the damaged one never becomes prev
    assert read_checkpoint(tmp_path / PREVIOUS_NAME)["epoch"] == 1
    flip_middle(tmp_path / CHECKPOINT_NAME)
    flip_middle(tmp_path / PREVIOUS_NAME)
    with pytest.raises(CheckpointError, match="cannot be used either.*To start over, move the folder"):
        find_resumable(tmp_path)
    (tmp_path / PREVIOUS_NAME).unlink()
    with pytest.raises(CheckpointError, match="no previous checkpoint.*new --out"):
        find_resumable(tmp_path)


def test_version_1_checkpoints_still_resume(tmp_path):
    torch.save({"format": FORMAT, "version": 1, "epoch": 4}, tmp_path / CHECKPOINT_NAME)
    found = find_resumable(tmp_path)
    assert found.version == 1 and found.state["epoch"] == 4
    torch.save({"format": FORMAT, "version": 99}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="version 99"):
        read_checkpoint(tmp_path / CHECKPOINT_NAME)


def test_temporary_files_of_a_killed_run_are_removed(tmp_path):
    names = [".checkpoint.pt.abc.tmp", ".model.pt.x1.tmp", ".metrics.csv.q.tmp", ".other.txt.q.tmp"]
    for n in names:
        (tmp_path / n).write_bytes(b"half")
    gone = remove_temporary(tmp_path, ("checkpoint.pt", "model.pt", "metrics.csv"))
    assert sorted(p.name for p in gone) == sorted(names[:3])
    assert [p.name for p in tmp_path.iterdir()] == [".other.txt.q.tmp"]  # only our own names
