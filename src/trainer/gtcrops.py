"""Training inputs, built once per run with the engine's own rules (docs/TRAINING.md).

* Rough stage: every image resized to S x S with ``ImageSource.read_downsampled`` (the rough
  pass's reader) and normalised with the window the engine computes; masks resized nearest.
  These are cached as tensors, so no image is decoded or resized again during training.
* Fine stage: one random crop per image per iteration around a ground-truth component, its box
  jittered by up to +-16 px, then made square, padded and shifted by ``square_pad_shift`` and cut
  with ``crop_windows`` + ``cut_crops_lazy`` from the cached full-resolution image (only the
  window's pixels are converted). The mask is cut the same way and thresholded at 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from napari_segthenseg.engine import (
    ImageSource,
    NormStats,
    component_boxes,
    compute_stats,
    crop_windows,
    cut_crops_lazy,
    finalize_boxes,
    match_channels,
    square_pad_shift,
)
from napari_segthenseg.engine.boxes import MIN_BOX, large_enough

from .data import Sample

JITTER = 16  # full-res px added to each of x, y, width and height (uniform integer)
CPU = torch.device("cpu")


@dataclass
class Prepared:
    """One training image with everything both stages need, computed once."""

    stem: str
    source: ImageSource  # validated full-resolution image (kept decoded in memory)
    mask: np.ndarray  # bool (H, W)
    stats: NormStats  # the engine's intensity window for this image
    small: torch.Tensor  # (C, S, S) normalised rough input
    small_mask: torch.Tensor  # (1, S, S) float 0/1
    objects: np.ndarray  # (K, 4) raw component boxes that survive the min-box rule


def network_channels(samples: list[Sample]) -> int:
    """3 if any image has colour, else 1 (gray images are repeated to RGB by ``match_channels``)."""
    return 3 if any(s.image.ndim == 3 for s in samples) else 1


def prepare(sample: Sample, size: int, channels: int, normalisation: str,
            min_box: int = MIN_BOX) -> Prepared:
    """Rough input/target, normalisation window and object boxes of one sample."""
    src = ImageSource(sample.image)
    small = match_channels(src.read_downsampled(size, CPU), channels)
    stats = compute_stats(small, normalisation, src.dtype)
    mask_t = torch.from_numpy(np.ascontiguousarray(sample.mask)).float()[None, None]
    # "nearest-exact" samples each block's centre; plain "nearest" takes its top-left pixel,
    # which shifts the target half a block down-right of the (area-averaged) image.
    small_mask = F.interpolate(mask_t, size=(size, size), mode="nearest-exact")[0]
    return Prepared(sample.stem, src, sample.mask, stats, stats.apply(small).contiguous(),
                    small_mask, large_enough(component_boxes(sample.mask), min_box))


def jitter_box(box: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Add ``offsets`` = (dx, dy, dw, dh) to a ``(y0, x0, y1, x1)`` box; sides stay >= 1 px."""
    y0, x0, y1, x1 = (int(v) for v in box)
    dx, dy, dw, dh = (int(v) for v in offsets)
    w, h = max(1, x1 - x0 + dw), max(1, y1 - y0 + dh)
    return np.array([y0 + dy, x0 + dx, y0 + dy + h, x0 + dx + w], dtype=np.int64)


def whole_image_box(hw: tuple[int, int]) -> np.ndarray:
    return np.array([[0, 0, hw[0], hw[1]]], dtype=np.int64)


def cut_pair(item: Prepared, boxes: np.ndarray, size: int, channels: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image crops ``(N, C, S, S)`` and 0/1 mask crops ``(N, 1, S, S)`` for ``boxes``.

    Exactly what ``Engine.crops`` feeds the fine net, plus the matching ground truth.
    """
    hw = item.source.hw
    windows = crop_windows(boxes, hw)
    img = cut_crops_lazy(lambda *r: item.source.read_region(*r, CPU), windows, hw, size)
    mask = torch.from_numpy(np.ascontiguousarray(item.mask))

    def read_mask(y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
        return mask[y0:y1, x0:x1].float()[None]

    gt = cut_crops_lazy(read_mask, windows, hw, size)
    return item.stats.apply(match_channels(img, channels)), (gt >= 0.5).float()


def random_box(item: Prepared, pad: int, generator: torch.Generator | None = None,
               jitter: int = JITTER) -> np.ndarray:
    """One training box: a random object's jittered box after square/pad/shift, or the whole image."""
    hw = item.source.hw
    if len(item.objects) == 0:
        return whole_image_box(hw)
    k = int(torch.randint(len(item.objects), (1,), generator=generator))
    offsets = torch.randint(-jitter, jitter + 1, (4,), generator=generator).numpy()
    return square_pad_shift(jitter_box(item.objects[k], offsets), hw, pad)[None]


def fixed_boxes(item: Prepared, pad: int, min_box: int, limit: int, rng: np.random.Generator
                ) -> np.ndarray:
    """Validation boxes: un-jittered StS boxes of up to ``limit`` seeded-random objects."""
    boxes = finalize_boxes(item.objects, item.source.hw, pad, min_box)
    if len(boxes) == 0:
        return whole_image_box(item.source.hw)
    if len(boxes) > limit:
        boxes = boxes[np.sort(rng.choice(len(boxes), limit, replace=False))]
    return boxes


class RoughData(Dataset):
    """Cached S x S rough inputs and targets."""

    def __init__(self, items: list[Prepared]):
        self.x = torch.stack([it.small for it in items])
        self.y = torch.stack([it.small_mask for it in items])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class FineData(Dataset):
    """One fresh random ground-truth crop of image ``i`` per access (torch's RNG, per worker)."""

    def __init__(self, items: list[Prepared], size: int, channels: int, pad: int):
        self.items, self.size, self.channels, self.pad = items, size, channels, pad

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.items[i]
        x, y = cut_pair(item, random_box(item, self.pad), self.size, self.channels)
        return x[0], y[0]


def fixed_crops(items: list[Prepared], size: int, channels: int, pad: int, min_box: int,
                per_image: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fine stage's validation set: fixed crops of up to ``per_image`` objects per image."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for item in items:
        x, y = cut_pair(item, fixed_boxes(item, pad, min_box, per_image, rng), size, channels)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)
