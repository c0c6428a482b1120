"""Input images: validation, channels, intensity normalisation and lazy reads.

An image is a 2D array ``(H, W)`` or ``(H, W, C)`` with ``C`` in 1..4, or a multiscale pyramid
(list of such arrays, largest first). Alpha is dropped: 2 channels are gray + alpha (as PNG's
LA mode), 4 are RGBA. NumPy arrays are used in memory; anything else with
``shape``/``dtype``/slicing (dask, zarr, tifffile's zarr store) is read lazily: the rough pass
reads a downsampled copy from the nearest pyramid level, the fine pass reads only the crops.
Files are opened by :mod:`.reader`, which turns every format into such a pyramid. A volume
(:class:`VolumeSource`, docs/VOLUMES.md) is read one slice at a time as such an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .crops import resample_window

MIN_SIDE = 5  # smaller images cannot hold an object under the 5 px box rule
NORMALISATIONS = ("minmax", "dtype", "none")
MAX_STRIDE_OVERSAMPLING = 8  # a strided read keeps at least this many samples per output pixel
FLAT_RELATIVE = 1e-5  # a min-max window narrower than this share of its values is float rounding


class ImageReadError(ValueError):
    """Pixels that could not be read (e.g. a damaged tile); the message names the image."""


@dataclass(frozen=True)
class NormStats:
    """One intensity window for a whole image, mapped to [0, 1]: ``(x - lo) / (hi - lo)``."""

    lo: float
    hi: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.lo) / max(self.hi - self.lo, 1e-8)

    def apply_to_crops(self, x: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
        """The same window for every crop (the paper's per-image normalisation)."""
        return self.apply(x)


def _is_array_like(a: object) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "__getitem__")


def _materialise(block: object) -> np.ndarray:
    """A slice of any array-like as NumPy; dask graphs run in this thread (callers parallelise)."""
    if hasattr(block, "compute"):
        block = block.compute(scheduler="synchronous")
    return np.asarray(block)


class ImageSource:
    """A validated image: knows its size and channels, reads downsampled copies and crops."""

    def __init__(self, image: object, name: str = "image", pixel_size: float | None = None):
        levels = list(image) if isinstance(image, Sequence) and not _is_array_like(image) else [image]
        if not levels:
            raise ValueError("empty image pyramid")
        for lv in levels:
            if not _is_array_like(lv):
                raise ValueError(f"expected an array, got {type(lv).__name__}")
        self.levels = levels
        self.name = name
        self.pixel_size = pixel_size  # µm per pixel of level 0 (from the file), None when unknown
        base = levels[0]
        self.dtype = np.dtype(base.dtype)
        if self.dtype.kind not in "biuf":
            raise ValueError(f"image dtype {self.dtype} is not numeric (need bool, int, uint or float)")
        shape = tuple(int(s) for s in base.shape)
        if len(shape) == 2:
            self.channels = 1
        elif len(shape) == 3 and 1 <= shape[2] <= 4:
            self.channels = {1: 1, 2: 1, 3: 3, 4: 3}[shape[2]]  # gray+alpha, RGBA: drop alpha
        else:
            raise ValueError(
                f"image shape {shape} is not 2D: need (H, W) or (H, W, C) with C<=4; "
                "for a 3D or time stack pass one slice"
            )
        self.height, self.width = shape[:2]
        if self.height < MIN_SIDE or self.width < MIN_SIDE:
            raise ValueError(f"image is {self.height}x{self.width}; need at least {MIN_SIDE}x{MIN_SIDE}")
        self.lazy = not isinstance(base, np.ndarray)
        if not self.lazy and self.dtype.kind == "f" and not np.isfinite(base).all():
            raise ValueError("image contains NaN or infinite values")
        # Downsampling of each level against the base (y, x), from the shapes.
        self.factors = [(self.height / int(lv.shape[0]), self.width / int(lv.shape[1])) for lv in levels]

    @property
    def hw(self) -> tuple[int, int]:
        return self.height, self.width

    def _read(self, level: int, index: tuple) -> np.ndarray:
        try:
            return _materialise(self.levels[level][index])
        except Exception as exc:  # decoders raise many types; all mean "these pixels are unreadable"
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            where = ", ".join(f"{s.start}:{s.stop}" if isinstance(s, slice) else str(s) for s in index)
            raise ImageReadError(f"{self.name}: cannot read pixels [{where}] of level {level} "
                                 f"({type(exc).__name__}: {first})") from exc

    def _to_tensor(self, arr: np.ndarray, device: torch.device) -> torch.Tensor:
        """(h, w[, c]) block -> float tensor (C, h, w) with alpha dropped."""
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        if self.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"{self.name} contains NaN or infinite values")
        if arr.ndim == 2:
            arr = arr[..., None]
        arr = arr[..., : self.channels]
        t = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
        return t.permute(2, 0, 1).float()

    def level_for(self, scale: float) -> int:
        """The coarsest pyramid level that is still at least as fine as ``scale`` px per px."""
        fine_enough = [k for k, f in enumerate(self.factors) if max(f) <= scale * (1 + 1e-6)]
        return max(fine_enough, key=lambda k: max(self.factors[k]), default=0)

    def read_downsampled(self, size: int, device: torch.device) -> torch.Tensor:
        """The whole image at ``size x size`` (antialiased), as float tensor (C, size, size).

        Reads a pyramid level near ``size`` and then a strided view at most ~8x larger than
        ``size``, so a huge or lazy image is never loaded whole.
        """
        level = self.levels[0]
        for lv in self.levels[1:]:  # smallest level still at least `size` on both sides
            if min(int(lv.shape[0]), int(lv.shape[1])) >= size:
                level = lv
        k = next(i for i, lv in enumerate(self.levels) if lv is level)
        h, w = int(level.shape[0]), int(level.shape[1])
        sy = max(1, h // (MAX_STRIDE_OVERSAMPLING * size))
        sx = max(1, w // (MAX_STRIDE_OVERSAMPLING * size))
        # Start each stride at its block's centre so the copy is not shifted up-left.
        t = self._to_tensor(self._read(k, (slice(sy // 2, None, sy), slice(sx // 2, None, sx))), device)
        return F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)[0]

    def read_scaled(self, y0: float, x0: float, y1: float, x1: float, scale: float,
                    out_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Base-level region ``[y0:y1, x0:x1]`` at ``out_hw`` pixels (about ``scale`` px per px).

        Read from the coarsest pyramid level that is still finer than ``scale`` and resized with
        antialiasing, so a slide is never decoded at full resolution to be shown small. The
        region may reach outside the image; outside pixels repeat the border.
        """
        k = self.level_for(scale)
        fy, fx = self.factors[k]
        lh, lw = int(self.levels[k].shape[0]), int(self.levels[k].shape[1])
        # The region in level-k pixels (floating), then the whole pixels that cover it.
        ly0, lx0, ly1, lx1 = y0 / fy, x0 / fx, y1 / fy, x1 / fx
        ry0, rx0 = min(max(int(np.floor(ly0)), 0), lh - 1), min(max(int(np.floor(lx0)), 0), lw - 1)
        ry1, rx1 = max(min(int(np.ceil(ly1)), lh), ry0 + 1), max(min(int(np.ceil(lx1)), lw), rx0 + 1)
        t = self._to_tensor(self._read(k, (slice(ry0, ry1), slice(rx0, rx1))), device)
        # Sample the requested window out of the read block (border pixels repeat outside it).
        return resample_window(t, (ly0 - ry0, lx0 - rx0, ly1 - ry0, lx1 - rx0), out_hw)

    def read_region(self, y0: int, x0: int, y1: int, x1: int, device: torch.device) -> torch.Tensor:
        """Full-resolution pixels ``[y0:y1, x0:x1]`` (clipped to the image) as (C, h, w)."""
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(self.height, y1), min(self.width, x1)
        return self._to_tensor(self._read(0, (slice(y0, y1), slice(x0, x1))), device)

    def full_tensor(self, device: torch.device) -> torch.Tensor:
        """The whole full-resolution image as (C, H, W) float tensor (in-memory images only)."""
        return self._to_tensor(np.asarray(self.levels[0]), device)


class VolumeSource:
    """A validated volume ``(Z, H, W)`` or ``(Z, H, W, C)`` (NumPy, dask, zarr; or a pyramid
    whose levels keep every slice), read one slice at a time as an :class:`ImageSource`."""

    def __init__(self, volume: object, name: str = "volume"):
        levels = list(volume) if isinstance(volume, Sequence) and not _is_array_like(volume) else [volume]
        if not levels or not all(_is_array_like(lv) for lv in levels):
            raise ValueError("expected a volume array (or a list of its pyramid levels)")
        shape = tuple(int(s) for s in levels[0].shape)
        if len(shape) not in (3, 4) or (len(shape) == 4 and not 1 <= shape[3] <= 4):
            raise ValueError(f"volume shape {shape} is not (Z, H, W) or (Z, H, W, C) with C<=4")
        if shape[0] < 1:
            raise ValueError("the volume has no slices")
        self.depth = shape[0]
        # Levels that downsample z cannot give a slice; the rough pass reads y/x pyramids only.
        self.levels = [lv for lv in levels if len(lv.shape) == len(shape) and int(lv.shape[0]) == self.depth]
        self.name = name
        first = self.plane(0)  # validates dtype, slice size and channels
        self.hw, self.channels, self.dtype, self.lazy = first.hw, first.channels, first.dtype, first.lazy

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.depth, *self.hw)

    def plane(self, z: int) -> ImageSource:
        """Slice ``z`` as a 2D image (its pyramid too), read lazily where the volume is lazy."""
        return ImageSource([lv[z] for lv in self.levels], name=f"{self.name}, slice {z}")


def compute_stats(small: torch.Tensor, mode: str, dtype: np.dtype) -> NormStats:
    """Normalisation window from the downsampled image (cheap, and the same for every crop)."""
    if mode == "minmax":
        lo, hi = float(small.min()), float(small.max())
        # A flat image (e.g. an empty slice of a volume) differs from itself only by the rounding
        # of its antialiased resize: no contrast to stretch, or its background would be "bright".
        flat = hi - lo <= FLAT_RELATIVE * max(abs(lo), abs(hi))
        return NormStats(lo, lo + 1.0 if flat or not hi > lo else hi)
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
