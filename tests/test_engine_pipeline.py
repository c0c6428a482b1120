"""Input validation, lazy reads, devices, batched refine and end-to-end runs on real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from napari_segthenseg.engine import Engine, ImageSource, resolve_device, segment


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((10, 64, 64)), "not 2D"),
        (np.zeros((2, 3, 64, 64)), "not 2D"),
        (np.zeros((0, 0)), "at least"),
        (np.zeros((3, 100)), "at least"),
        (np.full((32, 32), np.nan), "NaN"),
        (np.array([["a"] * 8] * 8), "not numeric"),
        (np.zeros((8, 8), complex), "not numeric"),
        ([], "empty"),
    ],
)
def test_bad_images_raise_valueerror(bad, match):
    with pytest.raises(ValueError, match=match):
        Engine(make_tiny_model(), "cpu").segment(bad)


@pytest.mark.parametrize("shape", [(40, 50), (40, 50, 1), (40, 50, 3), (40, 50, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, bool])
def test_accepted_images(shape, dtype):
    img = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    for channels in (1, 3):
        r = Engine(make_tiny_model(channels=channels), "cpu").segment(img)
        assert r.mask.shape == shape[:2] and r.mask.dtype == bool


def test_devices():
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            resolve_device("cuda")


class RecordingArray:
    """A lazy array stand-in that records every read and refuses whole-image reads."""

    def __init__(self, data):
        self.data, self.reads = data, []
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, key):
        out = self.data[key]
        assert out.size < self.data.size, "the whole image was read"
        self.reads.append(out.shape)
        return out


def test_lazy_image_is_read_only_where_needed_and_matches(dsb_image):
    img = np.repeat(np.repeat(dsb_image[0], 4, axis=0), 4, axis=1)  # a bigger image
    lazy = RecordingArray(img)
    eng = Engine(make_tiny_model(size=32), "cpu")
    boxes = np.array([[10, 10, 60, 60], [100, 200, 180, 280]])
    ref = eng.segment(img, boxes=boxes)
    res = eng.segment(lazy, boxes=boxes)
    assert np.allclose(res.probs, ref.probs, atol=1e-4) and (res.mask == ref.mask).all()
    # One strided read for the stats, then one read under both boxes (they share an output chunk).
    assert len(lazy.reads) == 2
    h, w = lazy.reads[1][:2]
    assert h * w < img.shape[0] * img.shape[1] / 20


def test_dask_and_pyramid_inputs(dsb_image):
    da = pytest.importorskip("dask.array")
    img = dsb_image[0]
    eng = Engine(make_tiny_model(size=32), "cpu")
    ref = eng.segment(img)
    r = eng.segment(da.from_array(img, chunks=(64, 64, 3)))
    assert r.mask.shape == img.shape[:2] and len(r.boxes) == len(ref.boxes)
    pyramid = [img, img[::2, ::2], img[::4, ::4]]
    assert eng.segment(pyramid).mask.shape == img.shape[:2]


def test_batched_refine_equals_per_crop_loop(dsb_image):
    img = dsb_image[0]
    eng = Engine(make_tiny_model(size=32), "cpu", memory_mb=1)  # also forces chunking
    rough = eng.rough(img)
    boxes = np.array([[0, 0, 40, 40], [30, 50, 90, 110], [100, 100, 124, 124], [0, 0, img.shape[0], 40]])
    batched = eng.refine(img, boxes, rough.stats)
    loop = np.concatenate([eng.refine(img, b[None], rough.stats) for b in boxes])
    assert np.allclose(batched, loop, atol=1e-5)


def test_end_to_end_on_real_image_is_consistent_and_deterministic(dsb_image):
    img, gt = dsb_image
    model = make_tiny_model(size=32)
    r1 = segment(img, model, "cpu")
    r2 = segment(img, model, "cpu")
    assert (r1.mask == r2.mask).all() and np.array_equal(r1.boxes, r2.boxes)
    assert r1.mask.shape == gt.shape and r1.rough.mask.shape == (32, 32)
    assert r1.probs.shape == (len(r1.boxes), 32, 32)
    assert not r1.mask[_outside(r1.boxes, img.shape[:2])].any()  # background outside every box
    assert {"rough_net", "boxes", "crop", "fine_net", "paste"} <= set(r1.timings)
    # re-fusing cached per-box results reproduces the mask; re-refining one box is consistent
    eng = Engine(model, "cpu")
    assert (eng.fuse(r1.probs, r1.boxes, r1.hw) == r1.mask).all()
    if len(r1.boxes):
        one = eng.refine(img, r1.boxes[:1], r1.stats)
        assert np.allclose(one[0], r1.probs[0], atol=1e-5)


def _outside(boxes, hw):
    inside = np.zeros(hw, bool)
    for y0, x0, y1, x1 in boxes:
        inside[y0:y1, x0:x1] = True
    return ~inside


def test_hand_boxes_without_rough_net(dsb_image):
    img = dsb_image[0]
    eng = Engine(make_tiny_model(size=32, rough=False), "cpu")
    r = eng.segment(img, boxes=np.array([[-20, -20, 50, 60], [10, 10, 10, 30]]))  # clipped; empty dropped
    assert r.boxes.tolist() == [[0, 0, 50, 60]] and r.rough is None
    with pytest.raises(ValueError, match="no rough network"):
        eng.segment(img)


def test_rough_only_model_gives_baseline(dsb_image):
    img = dsb_image[0]
    r = Engine(make_tiny_model(size=32, fine=False), "cpu").segment(img)
    assert r.mask.shape == img.shape[:2] and len(r.probs) == 0


def test_image_source_reports_channels():
    assert ImageSource(np.zeros((20, 20, 4), np.uint8)).channels == 3
    assert ImageSource(np.zeros((20, 20), np.uint16)).channels == 1
