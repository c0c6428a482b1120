"""The scale the rough net was trained at, and how the rough pass uses it (docs/WHOLE_SLIDES.md).

The rough net learns objects at a scale: every training image is squashed to S x S, so one
rough pixel covers ``h/S x w/S`` image pixels (for dsb2018 at S=64 mostly 4 x 4). An image of
about that size gets the paper's whole-image rough pass. A much larger or more elongated image
(a slide, a long strip) would shrink its objects below anything the net has seen, so it is
instead downscaled to the trained scale and covered by rough-net tiles.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Images up to this much beyond the trained extremes still get the whole-image pass.
TOLERANCE = 1.1


@dataclass(frozen=True)
class TrainedScale:
    """Image pixels per rough pixel over the training images, and their shapes.

    ``median`` is the typical scale (per image the geometric mean of ``h/S`` and ``w/S``),
    ``low``/``high`` the smallest and largest per-axis scale seen, ``aspect`` the most elongated
    image (long side / short side) and ``window`` the median image side in pixels: the extent
    over which training normalised intensities (one image).
    """

    median: float
    low: float
    high: float
    aspect: float
    window: int

    def __post_init__(self) -> None:
        if not (0 < self.low <= self.median <= self.high) or self.aspect < 1 or self.window < 1:
            raise ValueError(f"inconsistent trained scale {self}")

    @classmethod
    def from_sizes(cls, sizes: Iterable[tuple[int, int]], size: int) -> TrainedScale:
        """From the ``(h, w)`` of the training images at network input ``size``."""
        hw = np.asarray(list(sizes), dtype=np.float64).reshape(-1, 2)
        if len(hw) == 0:
            raise ValueError("no training images to measure the scale from")
        per_axis = hw / float(size)
        return cls(median=round(float(np.median(np.sqrt(per_axis.prod(1)))), 4),
                   low=round(float(per_axis.min()), 4), high=round(float(per_axis.max()), 4),
                   aspect=round(float((hw.max(1) / hw.min(1)).max()), 4),
                   window=int(round(float(np.median(np.sqrt(hw.prod(1)))))))

    @classmethod
    def from_dict(cls, data: dict) -> TrainedScale:
        return cls(float(data["median"]), float(data["low"]), float(data["high"]), float(data["aspect"]),
                   int(data["window"]))

    def covering(self, other: TrainedScale) -> TrainedScale:
        """This scale with its range widened to ``other``'s (its typical scale and window kept): a
        rough net fine-tuned on ``other``'s images has seen both."""
        return TrainedScale(self.median, min(self.low, other.low), max(self.high, other.high),
                            max(self.aspect, other.aspect), self.window)

    def covers(self, hw: tuple[int, int], size: int) -> bool:
        """Whether an image of ``hw`` is within the trained range (whole-image pass)."""
        h, w = hw
        longest = max(h, w) / float(size)
        aspect = max(h, w) / max(1, min(h, w))
        return longest <= self.high * TOLERANCE and aspect <= self.aspect * TOLERANCE


@dataclass(frozen=True)
class RoughPlan:
    """How the rough pass sees an image: whole at S x S, or tiled at ``scale`` px per rough px."""

    tiled: bool
    scale: float | None = None  # image pixels per rough pixel (tiled only)
    window: int | None = None  # local normalisation window in image pixels (tiled, minmax only)
    physical: float | None = None  # µm per rough pixel, when the scale followed the pixel sizes

    def rough_hw(self, hw: tuple[int, int], size: int) -> tuple[int, int]:
        """Size of the rough mask: S x S, or the image at ``scale`` (at least 1 px a side)."""
        if not self.tiled:
            return size, size
        return (max(1, math.ceil(hw[0] / self.scale)), max(1, math.ceil(hw[1] / self.scale)))

    def describe(self) -> str:
        if not self.tiled:
            return "whole image at S x S (the paper's rough pass)"
        text = f"tiled at {self.scale:g} image px per rough px"
        return text + (f" ({self.physical:.3g} µm per rough px, as in training)" if self.physical else "")


def check_rough_scale(value: float | None) -> float | None:
    """A user's rough scale (image px per rough px) as a float, or None for the model's own;
    ``ValueError`` when it cannot be one."""
    if value is None:
        return None
    value = float(value)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"rough scale must be positive, got {value:g}")
    return value


def plan_rough(hw: tuple[int, int], size: int, trained: TrainedScale | None,
               rough_scale: float | None = None, window: int | None = None,
               pixel_size: float | None = None, trained_pixel_size: float | None = None) -> RoughPlan:
    """Choose the rough pass for an image of ``hw``.

    ``rough_scale`` (the user's override) always tiles at that scale. Otherwise an image the
    trained range covers, or any image when the model records no scale (format 1 files), gets
    the whole-image pass; larger or more elongated images are tiled at the median trained scale.
    When the image's and the training images' pixel sizes (µm) are both known, that scale and the
    intensity window follow the physical size: a rough pixel covers as many µm as in training (a
    40x scan of a model trained at 20x is read at twice the scale, from a coarser pyramid level).
    """
    rough_scale = check_rough_scale(rough_scale)
    if rough_scale is not None:
        # Without a recorded window, one S x S rough input's extent: what the net saw at once.
        win = window or (trained.window if trained else round(size * rough_scale))
        return RoughPlan(True, rough_scale, win)
    if trained is None or trained.covers(hw, size):
        return RoughPlan(False)
    win = window or trained.window
    if pixel_size and trained_pixel_size:
        f = trained_pixel_size / pixel_size
        return RoughPlan(True, round(trained.median * f, 4), max(1, round(win * f)),
                         physical=trained.median * trained_pixel_size)
    return RoughPlan(True, trained.median, win)
