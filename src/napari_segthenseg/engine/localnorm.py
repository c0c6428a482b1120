"""Intensity windows that follow a slide: min-max over about one training image around each point.

Training normalises every image by its own min and max, computed on the downscaled copy the
rough net sees (docs/WHOLE_SLIDES.md). On a slide one window for everything is wrong (a dim
field next to a bright one stays dim), so the slide is cut into cells of half the training
window; each cell's min and max are taken at the rough scale, and the window at a cell is the
min and max over it and its 8 neighbours (about 1.5 training images across). Rough-net tiles
interpolate that window per pixel, crops take it at their box centre, so both stages normalise
a place alike. The cell grid is small (one entry per ~128 x 128 px), is computed once by
:func:`survey` in bounded memory, and is shared by every tile and chunk.

Cells with no contrast at all are marked flat: a rough tile made only of flat cells holds
nothing to find and is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .image import ImageSource, NormStats
from .progress import Progress

SURVEY_BLOCK = 1024  # rough px per side read at once by the survey
FLAT_FRACTION = 0.01  # a cell whose range is below this share of the slide's range is flat
# Empty places hold only noise; min-max would stretch it to full contrast, which the net never
# saw in training (every training image holds objects). Windows are at least this share of the
# slide's range wide.
MIN_CONTRAST = 0.15
# A crop's window is at least this share of the widest cell range within CROP_FLOOR_REACH x
# CROP_FLOOR_REACH cells around it (not of the slide's: a dim field beside bright ones would be
# flattened; docs/BENCHMARKS.md, Real slides). Bright-field slides keep BRIGHT_CROP_MIN_CONTRAST of
# the slide's range (reach 0), which their glass rules were measured with.
CROP_MIN_CONTRAST = 0.3
CROP_FLOOR_REACH = 9
BRIGHT_CROP_MIN_CONTRAST = 0.5
GLASS_FILL_QUANTILE = 0.9  # of a crop's tissue pixels: its bright background, given to its glass
GLASS_MARGIN = 0.03  # pixels within this share of the range below the glass level count as glass
CELLS_PER_WINDOW = 2  # cells across one training window
NEIGHBOURHOOD = 3  # cells across the rough net's window at a cell (3: the cell and its 8 neighbours)
CROP_NEIGHBOURHOOD = 1  # cells across a crop's window (1: its own cell)


@dataclass
class LocalWindows:
    """Per-cell intensity windows of an image seen at ``scale`` image px per rough px.

    ``cmin``/``cmax`` are each cell's own range. The rough net sees a pixel through the window of
    its cell's 3 x 3 neighbourhood (about a training image); a crop through its own cell's window
    (docs/WHOLE_SLIDES.md: measured, smaller windows for crops are closer to what the fine net saw
    of each object in training). The rough net's windows are at least ``floors[0]`` of the slide's
    range wide; a crop's at least ``floors[1]`` of the widest range of the cells within
    ``crop_reach`` cells (0: of the slide's range; docs/WHOLE_SLIDES.md).
    ``bright``: the background is bright (bright-field), so a window made wider by its floor
    grows downwards, keeping the background at the top as training saw it (fluorescence: upwards).
    ``glass``: on a bright-field slide, the level at and above which a pixel (its darkest channel)
    is empty glass; None without glass.
    """

    scale: float
    cell: int  # cell side in rough px
    cmin: np.ndarray  # (gy, gx) darkest value of each cell
    cmax: np.ndarray  # (gy, gx) brightest value of each cell
    flat: np.ndarray  # (gy, gx) bool: the cell has no contrast
    neighbourhoods: tuple[int, int] = (NEIGHBOURHOOD, CROP_NEIGHBOURHOOD)  # rough, crops (cells)
    floors: tuple[float, float] = (MIN_CONTRAST, CROP_MIN_CONTRAST)  # rough, crops
    glass: float | None = None
    bright: bool = False
    crop_reach: int = CROP_FLOOR_REACH  # cells whose ranges a crop's floor follows (0: the slide's)

    def __post_init__(self) -> None:
        span = max(float(self.cmax.max() - self.cmin.min()) if self.cmax.size else 0.0, 1e-8)
        (nr, nc), (fr, fc) = self.neighbourhoods, self.floors
        crop_floor = fc * (self._local_span(span) if self.crop_reach else span)
        self._rough, self._crops = self._window(nr, fr * span), self._window(nc, crop_floor)

    def _local_span(self, span: float) -> np.ndarray:
        """(gy, gx) the widest range of a non-flat cell within ``crop_reach`` cells, and at
        least ``MIN_CONTRAST`` of the slide's (a place with nothing around keeps a wide window)."""
        if not self.cmax.size:
            return np.full(self.cmax.shape, MIN_CONTRAST * span)
        ranges = np.where(self.flat, 0.0, self.cmax - self.cmin)
        local = ndimage.maximum_filter(ranges, size=self.crop_reach, mode="nearest")
        return np.maximum(local, MIN_CONTRAST * span)

    def _window(self, cells: int, floor: float) -> torch.Tensor:
        """(1, 2, gy, gx) lo and hi over ``cells x cells`` cells, at least ``floor`` apart. On
        bright-field slides glass cells take the range of the nearest tissue cell first: glass
        holds nothing, and its level must not reach the windows of the tissue beside it (nor,
        through the interpolation between cell centres, a crop near a tissue edge)."""
        cmin, cmax = self.cmin, self.cmax
        if self.glass is not None and self.flat.any() and not self.flat.all():
            _, (iy, ix) = ndimage.distance_transform_edt(self.flat, return_indices=True)
            cmin, cmax = cmin[iy, ix], cmax[iy, ix]
        lo = ndimage.minimum_filter(cmin, size=cells, mode="nearest")
        hi = ndimage.maximum_filter(cmax, size=cells, mode="nearest")
        if self.bright:
            return self._fields(np.minimum(lo, hi - floor), hi)
        return self._fields(lo, np.maximum(hi, lo + floor))

    @staticmethod
    def _fields(lo: np.ndarray, hi: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([lo, hi]).astype(np.float32))[None]

    def _sample(self, fields: torch.Tensor, ry: torch.Tensor, rx: torch.Tensor) -> torch.Tensor:
        """Bilinear (lo, hi) between cell centres at rough-pixel coordinates (pixel-edge units);
        ``ry`` and ``rx`` broadcast to a 2D grid of points, the result is (2, *grid)."""
        gy, gx = fields.shape[-2:]
        grid = torch.stack(torch.broadcast_tensors(rx / (self.cell * gx) * 2 - 1,
                                                   ry / (self.cell * gy) * 2 - 1), dim=-1)
        return F.grid_sample(fields, grid[None], mode="bilinear", padding_mode="border",
                             align_corners=False)[0]

    def window_at(self, ry: np.ndarray, rx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The crops' window (lo, hi) at rough-pixel coordinates."""
        out = self._sample(self._crops, torch.as_tensor(np.asarray(ry, dtype=np.float32))[None],
                           torch.as_tensor(np.asarray(rx, dtype=np.float32))[None])[:, 0]
        return out[0].numpy(), out[1].numpy()

    def apply_to_region(self, x: torch.Tensor, ry0: int, rx0: int) -> torch.Tensor:
        """Normalise a rough-scale block (C, h, w) whose top-left rough pixel is (ry0, rx0)."""
        h, w = x.shape[-2:]
        ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5 + ry0
        xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5 + rx0
        lo, hi = self._sample(self._rough, ys, xs).to(x.device)
        return (x - lo) / (hi - lo).clamp_min(1e-8)

    def apply_to_crops(self, x: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
        """Normalise crops (N, C, S, S) with the window at each box's centre (glass filled first)."""
        if self.glass is not None:
            x = fill_glass(x, self.glass)
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        lo, hi = self.window_at((b[:, 0] + b[:, 2]) / 2 / self.scale, (b[:, 1] + b[:, 3]) / 2 / self.scale)
        lo_t = torch.as_tensor(lo, device=x.device)[:, None, None, None]
        hi_t = torch.as_tensor(hi, device=x.device)[:, None, None, None]
        return (x - lo_t) / (hi_t - lo_t).clamp_min(1e-8)

    def busy_part(self, ry0: int, rx0: int, ry1: int, rx1: int, step: int = 1
                  ) -> tuple[int, int, int, int] | None:
        """The part of a rough-pixel region that its non-flat cells cover (their bounding box, its
        corners on multiples of ``step`` and inside the region), or None when every cell is flat:
        the rough net need not see flat background, which holds nothing to find."""
        c = self.cell
        cy0, cx0 = ry0 // c, rx0 // c
        busy = ~self.flat[cy0:math.ceil(ry1 / c), cx0:math.ceil(rx1 / c)]
        if not busy.any():
            return None
        rows, cols = np.flatnonzero(busy.any(1)), np.flatnonzero(busy.any(0))
        y0 = max(ry0, (cy0 + int(rows[0])) * c // step * step)
        x0 = max(rx0, (cx0 + int(cols[0])) * c // step * step)
        y1 = min(ry1, -(-(cy0 + int(rows[-1]) + 1) * c // step) * step)
        x1 = min(rx1, -(-(cx0 + int(cols[-1]) + 1) * c // step) * step)
        return y0, x0, y1, x1


# The intensity windows a pass uses: one per image (the paper), or local ones (slides).
Windows = NormStats | LocalWindows


def windows_to_arrays(windows: Windows) -> dict[str, np.ndarray]:
    """The windows as plain arrays (``np.savez``), to keep them with a saved segmentation: continuing
    a slide then needs no new survey of the image."""
    if isinstance(windows, NormStats):
        return {"kind": np.array("image"), "lo_hi": np.array([windows.lo, windows.hi])}
    return {"kind": np.array("local"), "scale_cell": np.array([windows.scale, windows.cell]),
            "cmin": windows.cmin, "cmax": windows.cmax, "flat": windows.flat,
            "neighbourhoods": np.array(windows.neighbourhoods), "floors": np.array(windows.floors),
            "glass": np.array(np.nan if windows.glass is None else windows.glass),
            "bright": np.array(windows.bright), "crop_reach": np.array(windows.crop_reach)}


def windows_fit(windows: Windows, tiled: bool, scale: float | None, window: int | None,
                normalisation: str) -> bool:
    """Whether saved ``windows`` are the ones a pass planned so (tiled at ``scale`` with ``window``,
    or whole) with this normalisation would take: otherwise they are surveyed anew."""
    if isinstance(windows, LocalWindows):
        return (tiled and normalisation == "minmax" and scale is not None and window is not None
                and abs(windows.scale - scale) < 1e-9 and windows.cell == cell_side(window, scale))
    return not (tiled and normalisation == "minmax")


def windows_from_arrays(data: dict[str, np.ndarray]) -> Windows:
    """The windows :func:`windows_to_arrays` wrote; ``ValueError`` for anything else."""
    try:
        if str(data["kind"]) == "image":
            lo, hi = (float(v) for v in data["lo_hi"])
            return NormStats(lo, hi)
        scale, cell = (float(v) for v in data["scale_cell"])
        return LocalWindows(scale, int(cell), np.asarray(data["cmin"], np.float32),
                            np.asarray(data["cmax"], np.float32), np.asarray(data["flat"], bool),
                            tuple(int(v) for v in data["neighbourhoods"]),
                            tuple(float(v) for v in data["floors"]), _glass(data),
                            bool(data["bright"]) if "bright" in data else False,
                            int(data["crop_reach"]) if "crop_reach" in data else 0)  # older: the slide's
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not intensity windows: {exc}") from exc


def fill_glass(x: torch.Tensor, glass: float, q: float = GLASS_FILL_QUANTILE) -> torch.Tensor:
    """Crops (N, C, h, w) with their bright-field glass pixels (darkest channel at or above
    ``glass``) set to their tissue's background: the ``q`` quantile of each crop's other pixels, per
    channel. The fine net never saw glass; next to it, pale tissue looks like a dark object on a
    bright ground and the whole crop comes out foreground (docs/WHOLE_SLIDES.md)."""
    is_glass = x.amin(1, keepdim=True) >= glass
    if not bool(is_glass.any()):
        return x
    fill = torch.nanquantile(x.masked_fill(is_glass, math.nan).flatten(2), q, dim=2)  # (N, C)
    fill = torch.nan_to_num(fill, nan=glass)[:, :, None, None]  # all glass: leave it as it is
    return torch.where(is_glass, fill, x)


def _glass(data: dict[str, np.ndarray]) -> float | None:
    """The glass level kept with windows (absent in windows saved before it was kept: None)."""
    value = float(data["glass"]) if "glass" in data else math.nan
    return None if math.isnan(value) else value


def cell_side(window: int, scale: float) -> int:
    """Cells are a fraction of a training window wide, in rough px (at least 4)."""
    return max(4, int(round(window / scale / CELLS_PER_WINDOW)))


def survey(src: ImageSource, scale: float, window: int, rough_hw: tuple[int, int],
           device: torch.device) -> Generator[Progress, None, LocalWindows]:
    """Read the image once at ``scale`` in blocks and build its :class:`LocalWindows`.

    A bright flat background (bright-field glass) is then left out of the windows: its pixels are
    brighter than any stained tissue, and training images (fields inside tissue) never held glass,
    so a window stretched up to it would show every field near glass darker than it was trained
    on. A second read takes each cell's brightest pixel that is not glass (docs/WHOLE_SLIDES.md).
    """
    cell = cell_side(window, scale)
    cmin, cmax = yield from _cell_ranges(src, scale, cell, rough_hw, device)
    span = float(cmax.max() - cmin.min()) if cmax.size else 0.0
    flat = (cmax - cmin) <= FLAT_FRACTION * span
    glass = None
    busy = ~flat if (~flat).any() else np.ones_like(flat)
    # Bright-field: the cells' brightest values (background) sit nearer the top of the range than
    # their darkest sit to its bottom; fluorescence the other way round.
    bright = bool(cmax.max() - np.median(cmax[busy]) < np.median(cmin[busy]) - cmin.min())
    if flat.any() and span > 0:
        level = float(np.median(cmin[flat]))  # the flat cells' level: the slide's empty background
        if bright and level > float(cmin.min()) + 0.5 * span:  # bright-field glass
            glass = level - GLASS_MARGIN * span
            _, below = yield from _cell_ranges(src, scale, cell, rough_hw, device, below=glass)
            tissue = ~flat & np.isfinite(below) & (below > cmin)
            cmax = np.where(tissue, below, cmax).astype(np.float32)
    if bright:
        return LocalWindows(float(scale), cell, cmin, cmax, flat, glass=glass, bright=True,
                            floors=(MIN_CONTRAST, BRIGHT_CROP_MIN_CONTRAST), crop_reach=0)
    return LocalWindows(float(scale), cell, cmin, cmax, flat, glass=glass)


def _cell_ranges(src: ImageSource, scale: float, cell: int, rough_hw: tuple[int, int],
                 device: torch.device, below: float | None = None
                 ) -> Generator[Progress, None, tuple[np.ndarray, np.ndarray]]:
    """Each cell's darkest and brightest value at ``scale``, in blocks; with ``below``, the brightest
    of the pixels whose darkest channel is below it (-inf where none is)."""
    block = max(cell, SURVEY_BLOCK // cell * cell)  # whole cells per block
    rh, rw = rough_hw
    gy, gx = math.ceil(rh / cell), math.ceil(rw / cell)
    cmin = np.zeros((gy, gx), np.float32)
    cmax = np.zeros((gy, gx), np.float32)
    starts = [(y, x) for y in range(0, rh, block) for x in range(0, rw, block)]
    what = "survey: intensity windows" if below is None else "survey: windows without the glass"
    for i, (y, x) in enumerate(starts):
        yield Progress(what, i, len(starts))
        by1, bx1 = min(y + block, rh), min(x + block, rw)
        # Rough pixels past the image edge are not read: the last block stops at the image.
        h_img, w_img = min(by1 * scale, src.height), min(bx1 * scale, src.width)
        out_hw = (max(1, round((h_img - y * scale) / scale)), max(1, round((w_img - x * scale) / scale)))
        t = src.read_scaled(y * scale, x * scale, h_img, w_img, scale, out_hw, device)
        top = t.amax(0)
        if below is not None:
            top = torch.where(t.amin(0) < below, top, torch.full_like(top, -math.inf))
        hi = F.max_pool2d(top[None, None], cell, ceil_mode=True)[0, 0].cpu().numpy()
        lo = -F.max_pool2d(-t.amin(0)[None, None], cell, ceil_mode=True)[0, 0].cpu().numpy()
        cy, cx = y // cell, x // cell
        cmax[cy:cy + hi.shape[0], cx:cx + hi.shape[1]] = hi
        cmin[cy:cy + lo.shape[0], cx:cx + lo.shape[1]] = lo
    yield Progress(what, len(starts), len(starts))
    return cmin, cmax
