"""Crops (batched RoIAlign), lazy crops and OR fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_boxes
from napari_segthenseg.engine import crop_windows, cut_crops, cut_crops_lazy, fuse, upsample_mask
from napari_segthenseg.engine.fuse import resize_prob, resize_weights

BOTH_WAYS = pytest.mark.parametrize("batched", [False, True], ids=["box-by-box", "batched"])


def _image(h=60, w=80, c=2, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((c, h, w), dtype=np.float32))


def test_crop_at_input_size_is_exact_copy():
    img = _image()
    out = cut_crops(img, np.array([[5.0, 7.0, 16.0]]), 16)
    assert torch.allclose(out[0], img[:, 5:21, 7:23], atol=1e-5)


def test_downscaled_crop_is_area_average():
    img = _image()
    out = cut_crops(img, np.array([[4.0, 8.0, 32.0]]), 16)  # exactly 2x: mean of 2x2 blocks
    ref = torch.nn.functional.avg_pool2d(img[None, :, 4:36, 8:40], 2)[0]
    assert torch.allclose(out[0], ref, atol=1e-5)


def test_batched_crops_equal_one_by_one():
    img = _image(100, 90)
    windows = np.array([[0, 0, 20], [10.5, 30, 50], [50, 40, 64], [-10, -5, 120], [80, 70, 20]], float)
    batch = cut_crops(img, windows, 16)
    single = torch.cat([cut_crops(img, w[None], 16) for w in windows])
    assert torch.allclose(batch, single, atol=1e-6)


def test_lazy_crops_equal_in_memory():
    img = _image(100, 90, c=3)
    windows = np.array([[0, 0, 20], [10.5, 30, 50], [50, 40, 64], [-10, -5, 120], [80, 70, 20]], float)
    reads = []

    def read(y0, x0, y1, x1):
        reads.append((y0, x0, y1, x1))
        return img[:, y0:y1, x0:x1]

    lazy = cut_crops_lazy(read, windows, (100, 90), 16)
    assert torch.allclose(lazy, cut_crops(img, windows, 16), atol=1e-5)
    assert len(reads) == len(windows)
    assert all((y1 - y0) * (x1 - x0) < 100 * 90 for y0, x0, y1, x1 in reads[:3])  # crops, not the image


@BOTH_WAYS
def test_fuse_pastes_in_place_and_ors_overlaps(batched):
    hw = (50, 60)
    boxes = np.array([[0, 0, 20, 20], [10, 10, 30, 30], [40, 40, 50, 50]])
    probs = np.ones((3, 8, 8), np.float32)
    probs[2] = 0.0  # third box predicts nothing
    mask = fuse(probs, boxes, hw, batched=batched)
    expected = np.zeros(hw, bool)
    expected[0:20, 0:20] = expected[10:30, 10:30] = True
    assert (mask == expected).all()


@BOTH_WAYS
def test_fuse_maps_box_content_to_right_place(batched):
    hw = (40, 40)
    boxes = np.array([[8, 16, 24, 32]])  # 16 px square
    prob = np.zeros((1, 8, 8), np.float32)
    prob[0, :4, 4:] = 1.0  # top-right quarter
    mask = fuse(prob, boxes, hw, batched=batched)
    assert mask[8:16, 24:32].all() and mask.sum() == 64


@BOTH_WAYS
def test_fuse_pastes_only_inside_a_rectangular_box(batched):
    hw = (40, 40)
    boxes = np.array([[10, 0, 20, 40]])  # 10 x 40: sampled from a 40 px square window
    assert crop_windows(boxes, hw).tolist() == [[0.0, 0.0, 40.0]]
    mask = fuse(np.ones((1, 8, 8), np.float32), boxes, hw, batched=batched)
    assert mask[10:20].all() and mask.sum() == 400


@BOTH_WAYS
def test_no_boxes_gives_background(batched):
    assert not fuse(np.zeros((0, 8, 8)), np.zeros((0, 4)), (9, 9), batched=batched).any()


@pytest.mark.parametrize("src", [8, 32, 64])
def test_resize_weights_are_torch_bilinear(src):
    """Row i of the batched fusion's matrix = what F.interpolate gives output i (both directions)."""
    sides = torch.tensor([1, 2, 5, src - 1, src, src + 1, 2 * src + 3, 517])
    wts = resize_weights(src, sides, int(sides.max()))
    for w, n in zip(wts, sides.tolist(), strict=True):
        maps = torch.eye(src)[:, :, None].repeat(1, 1, 2)  # map k = unit impulse at k (2 wide)
        ref = resize_prob(maps, (n, 2))[..., 0].T
        assert torch.allclose(w[:n], ref, atol=1e-5) and not w[n:].any()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_batched_fusion_equals_box_by_box(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(5, 300, 2))
    nb = int(rng.integers(1, 25))
    boxes = random_boxes(rng, h, w, nb)
    probs = rng.random((nb, 16, 16), dtype=np.float32)
    one_by_one = fuse(probs, boxes, (h, w), batched=False)
    for budget in (1, 2**28):  # a box per chunk, and all boxes in one
        batched = fuse(probs, boxes, (h, w), batched=True, memory_bytes=budget)
        assert (batched != one_by_one).sum() <= 2  # matmul vs interpolate rounding at the threshold


def test_upsample_mask_is_the_baseline():
    p = np.zeros((4, 4), np.float32)
    p[:2, :2] = 1
    m = upsample_mask(p, (40, 40))
    assert m[:18, :18].all() and not m[22:, :].any()
