"""Input images: validation, channels, intensity normalisation and lazy reads.

An image is a 2D array ``(H, W)`` or ``(H, W, C)`` with ``C`` in 1..4 (alpha is dropped), or a
multiscale pyramid (list of such arrays, largest first). NumPy arrays are used in memory;
anything else with ``shape``/``dtype``/slicing (dask, zarr, tifffile's zarr store) is read
lazily: the rough pass reads a strided copy, the fine pass reads only the crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MIN_SIDE = 5  # smaller images cannot hold an object under the 5 px box rule
NORMALISATIONS = ("minmax", "dtype", "none")


@dataclass(frozen=True)
class NormStats:
    """Intensity window mapped to [0, 1]: ``(x - lo) / (hi - lo)``."""

    lo: float
    hi: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.lo) / max(self.hi - self.lo, 1e-8)


def _is_array_like(a: object) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "__getitem__")


class ImageSource:
    """A validated image: knows its size and channels, reads downsampled copies and crops."""

    def __init__(self, image: object):
        levels = list(image) if isinstance(image, Sequence) and not _is_array_like(image) else [image]
        if not levels:
            raise ValueError("empty image pyramid")
        for lv in levels:
            if not _is_array_like(lv):
                raise ValueError(f"expected an array, got {type(lv).__name__}")
        self.levels = levels
        base = levels[0]
        self.dtype = np.dtype(base.dtype)
        if self.dtype.kind not in "biuf":
            raise ValueError(f"image dtype {self.dtype} is not numeric (need bool, int, uint or float)")
        shape = tuple(int(s) for s in base.shape)
        if len(shape) == 2:
            self.channels = 1
        elif len(shape) == 3 and 1 <= shape[2] <= 4:
            self.channels = 3 if shape[2] == 4 else shape[2]  # RGBA: drop alpha
        else:
            raise ValueError(
                f"image shape {shape} is not 2D: need (H, W) or (H, W, C) with C<=4; "
                "for a 3D or time stack pass one slice"
            )
        self.height, self.width = shape[:2]
        if self.height < MIN_SIDE or self.width < MIN_SIDE:
            raise ValueError(f"image is {self.height}x{self.width}; need at least {MIN_SIDE}x{MIN_SIDE}")
        self.ndim_raw = len(shape)
        self.lazy = not isinstance(base, np.ndarray)
        if not self.lazy and self.dtype.kind == "f" and not np.isfinite(base).all():
            raise ValueError("image contains NaN or infinite values")

    @property
    def hw(self) -> tuple[int, int]:
        return self.height, self.width

    def _to_tensor(self, block: object, device: torch.device) -> torch.Tensor:
        """(h, w[, c]) block -> float tensor (C, h, w) with alpha dropped."""
        arr = np.asarray(block)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        if self.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError("image contains NaN or infinite values")
        if arr.ndim == 2:
            arr = arr[..., None]
        arr = arr[..., : self.channels]
        t = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
        return t.permute(2, 0, 1).float()

    def read_downsampled(self, size: int, device: torch.device) -> torch.Tensor:
        """The whole image at ``size x size`` (antialiased), as float tensor (C, size, size).

        Reads a pyramid level near ``size`` and then a strided view at most ~8x larger than
        ``size``, so a huge or lazy image is never loaded whole.
        """
        level = self.levels[0]
        for lv in self.levels[1:]:  # smallest level still at least `size` on both sides
            if min(int(lv.shape[0]), int(lv.shape[1])) >= size:
                level = lv
        h, w = int(level.shape[0]), int(level.shape[1])
        sy, sx = max(1, h // (8 * size)), max(1, w // (8 * size))
        # Start each stride at its block's centre so the copy is not shifted up-left.
        t = self._to_tensor(level[sy // 2::sy, sx // 2::sx], device)
        return F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)[0]

    def read_region(self, y0: int, x0: int, y1: int, x1: int, device: torch.device) -> torch.Tensor:
        """Full-resolution pixels ``[y0:y1, x0:x1]`` (clipped to the image) as (C, h, w)."""
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(self.height, y1), min(self.width, x1)
        return self._to_tensor(self.levels[0][y0:y1, x0:x1], device)

    def full_tensor(self, device: torch.device) -> torch.Tensor:
        """The whole full-resolution image as (C, H, W) float tensor (in-memory images only)."""
        return self._to_tensor(self.levels[0], device)


def compute_stats(small: torch.Tensor, mode: str, dtype: np.dtype) -> NormStats:
    """Normalisation window from the downsampled image (cheap, and the same for every crop)."""
    if mode == "minmax":
        lo, hi = float(small.min()), float(small.max())
        return NormStats(lo, hi if hi > lo else lo + 1.0)
    if mode == "dtype":
        if dtype.kind in "ui":
            info = np.iinfo(dtype)
            return NormStats(0.0 if dtype.kind == "u" else float(info.min), float(info.max))
        return NormStats(0.0, 1.0)
    if mode == "none":
        return NormStats(0.0, 1.0)
    raise ValueError(f"unknown normalisation {mode!r}; choose one of {NORMALISATIONS}")


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Adapt (..., C, h, w) to the network's channels: gray->RGB by repeat, RGB->gray by mean."""
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 1:
        return x.expand(*x.shape[:-3], channels, *x.shape[-2:])
    if channels == 1:
        return x[..., :3, :, :].mean(dim=-3, keepdim=True)
    raise ValueError(f"image has {c} channels but the model expects {channels}")
