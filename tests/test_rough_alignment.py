"""The rough stage's input and target stay aligned (no half-block shift between them)."""

from __future__ import annotations

import numpy as np
import torch

from napari_segthenseg.engine import ImageSource
from trainer.data import Sample
from trainer.gtcrops import prepare


def _centroid(a: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(a)
    return np.array([ys.mean(), xs.mean()])


def test_small_mask_is_centred_on_small_image():
    img = np.zeros((512, 512), np.uint8)
    img[200:264, 304:368] = 255  # a 64 px object: 8 x 8 blocks at S=64
    mask = img > 0
    item = prepare(Sample("x", img, mask), size=64, channels=1, normalisation="minmax")
    small_img = item.small[0].numpy() > 0.5
    small_mask = item.small_mask[0].numpy() > 0.5
    assert np.allclose(_centroid(small_img), _centroid(small_mask), atol=0.26)
    assert np.allclose(_centroid(small_mask), (np.array([231.5, 335.5]) + 0.5) / 8 - 0.5, atol=0.01)


def test_downsampled_read_of_huge_image_is_not_shifted():
    img = np.zeros((4096, 4096), np.float32)
    img[2000:2096, 1000:1096] = 1.0  # strided read (stride 8 at S=64) must stay centred
    small = ImageSource(img).read_downsampled(64, torch.device("cpu"))[0].numpy()
    expected = (np.array([2048, 1048]) + 0.5) / 64 - 0.5
    ys, xs = np.mgrid[:64, :64]
    got = np.array([(small * ys).sum(), (small * xs).sum()]) / small.sum()
    assert np.allclose(got, expected, atol=0.1)
