"""Box rules (the paper's step 2): property tests and hand-checked cases."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from napari_segthenseg.engine import (
    boxes_from_mask,
    clip_boxes,
    component_boxes,
    crop_windows,
    default_pad,
    finalize_boxes,
    scale_boxes,
    square_pad_shift,
)


def test_default_pad_is_s_over_8():
    assert default_pad(64) == 8 and default_pad(32) == 4 and default_pad(128) == 16


def test_component_boxes_use_8_connectivity():
    m = np.zeros((10, 10), bool)
    m[2, 2] = m[3, 3] = True  # diagonal neighbours: one component
    m[7:9, 7:9] = True
    assert component_boxes(m).tolist() == [[2, 2, 4, 4], [7, 7, 9, 9]]


def test_small_components_are_dropped_and_kept_ones_squared_padded():
    b = finalize_boxes(np.array([[10, 10, 14, 40], [50, 50, 60, 70]]), (200, 200), pad=4)
    # first is 4 px high: noise; second is 10x20 -> square 20, padded to 28 around its centre (55, 60)
    assert b.tolist() == [[41, 46, 69, 74]]


def test_shift_keeps_size_inside_image():
    b = square_pad_shift(np.array([0, 0, 10, 10]), (100, 100), pad=8)
    assert b.tolist() == [0, 0, 26, 26]
    b = square_pad_shift(np.array([90, 95, 100, 100]), (100, 100), pad=8)
    assert b.tolist() == [74, 74, 100, 100]


def test_oversized_box_is_clamped_not_dropped():
    b = finalize_boxes(np.array([[0, 10, 30, 40]]), (30, 300), pad=8)
    assert b.tolist() == [[0, 2, 30, 48]]  # 46 px square clamped to the 30 px height
    w = crop_windows(b, (30, 300))
    assert w[0, 2] == 46 and w[0, 0] == (30 - 46) / 2  # window centred on the image: crop is padded


def test_clip_boxes_orders_corners_and_clips():
    b = clip_boxes(np.array([[50, -5, 10, 30.2], [200, 200, 300, 300]]), (100, 100))
    assert b.tolist() == [[10, 0, 50, 31]]


def test_crop_window_of_rectangle_is_square_and_contains_it():
    w = crop_windows(np.array([[40, 10, 50, 60]]), (100, 100))
    y0, x0, side = w[0]
    assert side == 50 and y0 <= 40 and y0 + side >= 50 and x0 <= 10 and x0 + side >= 60


masks = st.integers(8, 32).flatmap(
    lambda s: st.lists(st.booleans(), min_size=s * s, max_size=s * s).map(
        lambda v, s=s: np.array(v, bool).reshape(s, s)))


@settings(max_examples=60, deadline=None)
@given(mask=masks, h=st.integers(20, 700), w=st.integers(20, 700), pad=st.integers(0, 16))
def test_box_properties(mask, h, w, pad):
    hw = (h, w)
    boxes = boxes_from_mask(mask, hw, pad)
    # inside the image
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= h).all() and (boxes[:, 3] <= w).all()
    sides_h, sides_w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    raw = scale_boxes(component_boxes(mask), mask.shape, hw)
    big = raw[((raw[:, 2] - raw[:, 0]) >= 5) & ((raw[:, 3] - raw[:, 1]) >= 5)]
    assert len(boxes) == len(big)  # no component lost (besides the < 5 px noise rule)
    for b, r in zip(boxes, big, strict=True):
        side = max(r[2] - r[0], r[3] - r[1]) + 2 * pad
        # square where the image allows, else clamped to the image side
        assert b[2] - b[0] == min(side, h) and b[3] - b[1] == min(side, w)
        # contains its component, plus the padding where the image has room
        assert b[0] <= r[0] and b[1] <= r[1] and b[2] >= r[2] and b[3] >= r[3]
        assert b[0] <= max(0, min(r[0] - pad, h - (b[2] - b[0])))
        assert b[2] >= min(h, max(r[2] + pad, b[2] - b[0]))
    assert (sides_h > 0).all() and (sides_w > 0).all()


@settings(max_examples=40, deadline=None)
@given(mask=masks)
def test_every_component_pixel_is_covered(mask):
    hw = (mask.shape[0] * 7, mask.shape[1] * 5)
    boxes = boxes_from_mask(mask, hw, pad=3)
    big = np.kron(mask, np.ones((7, 5), bool))
    labels, n = ndimage.label(big, structure=np.ones((3, 3)))
    for sl in ndimage.find_objects(labels):
        if sl[0].stop - sl[0].start < 5 or sl[1].stop - sl[1].start < 5:
            continue
        covered = any(b[0] <= sl[0].start and b[2] >= sl[0].stop and b[1] <= sl[1].start
                      and b[3] >= sl[1].stop for b in boxes)
        assert covered
