"""Cutting crops out of the full-resolution image and resizing them, batched in torch.

This is a RoIAlign written with ``grid_sample`` (torchvision is not a dependency): every
output pixel averages ``r x r`` bilinear samples, so large crops are downscaled without
aliasing. All crops of an image come from one ``grid_sample`` call.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MAX_SAMPLING = 4  # samples per output pixel and axis; enough to antialias typical crops


def sampling_ratios(sides: np.ndarray, size: int) -> np.ndarray:
    """Samples per output pixel and axis for each window: about one per source pixel."""
    return np.clip(np.ceil(np.asarray(sides, dtype=np.float64) / size), 1, MAX_SAMPLING).astype(int)


def crop_grid(windows: np.ndarray, hw: tuple[int, int], size: int, ratio: int,
              device: torch.device) -> torch.Tensor:
    """Sampling grid (N, size*ratio, size*ratio, 2) in grid_sample's normalised coords."""
    n = size * ratio
    w = torch.as_tensor(windows, dtype=torch.float32, device=device)
    steps = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n  # in (0, 1)
    ys = w[:, 0:1] + steps[None] * w[:, 2:3]  # pixel-edge coordinates
    xs = w[:, 1:2] + steps[None] * w[:, 2:3]
    gy = ys * (2.0 / hw[0]) - 1.0  # align_corners=False: edge 0 -> -1, edge H -> +1
    gx = xs * (2.0 / hw[1]) - 1.0
    return torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)


def cut_crops(image: torch.Tensor, windows: np.ndarray, size: int) -> torch.Tensor:
    """Crops of a (C, H, W) tensor at square ``windows`` (y0, x0, side) -> (N, C, size, size).

    Outside the image the border pixels are repeated, so crops at the image edge and oversized
    (clamped) windows are padded without an artificial dark rim. Windows are grouped by their
    sampling ratio (at most ``MAX_SAMPLING`` groups), each group one ``grid_sample`` call.
    """
    c, h, w = image.shape
    windows = np.asarray(windows, dtype=np.float64).reshape(-1, 3)
    out = image.new_empty((len(windows), c, size, size))
    ratios = sampling_ratios(windows[:, 2], size)
    for ratio in np.unique(ratios):
        idx = np.flatnonzero(ratios == ratio)
        grid = crop_grid(windows[idx], (h, w), size, int(ratio), image.device)
        n, gh, gw, _ = grid.shape
        # Stack the group's grids vertically against the single image: one call, no copies.
        part = F.grid_sample(image[None], grid.reshape(1, n * gh, gw, 2), mode="bilinear",
                             padding_mode="border", align_corners=False)
        part = part.reshape(c, n, gh, gw).permute(1, 0, 2, 3)
        out[torch.as_tensor(idx, device=image.device)] = (
            F.avg_pool2d(part, int(ratio)) if ratio > 1 else part)
    return out


def resample_window(image: torch.Tensor, window: tuple[float, float, float, float],
                    out_hw: tuple[int, int]) -> torch.Tensor:
    """The window ``(y0, x0, y1, x1)`` (pixel-edge coordinates, may be fractional) of a (C, H, W)
    tensor resampled to ``out_hw``: each output pixel averages about one bilinear sample per
    source pixel it covers (a box filter, so any downscaling is antialiased). Outside the
    tensor the border pixels repeat.
    """
    c, h, w = image.shape
    y0, x0, y1, x1 = (float(v) for v in window)
    oh, ow = int(out_hw[0]), int(out_hw[1])
    ry, rx = max(1, math.ceil((y1 - y0) / oh)), max(1, math.ceil((x1 - x0) / ow))
    dev = image.device
    ys = y0 + (torch.arange(oh * ry, device=dev, dtype=torch.float32) + 0.5) * ((y1 - y0) / (oh * ry))
    xs = x0 + (torch.arange(ow * rx, device=dev, dtype=torch.float32) + 0.5) * ((x1 - x0) / (ow * rx))
    gy, gx = ys * (2.0 / h) - 1.0, xs * (2.0 / w) - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
    out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (F.avg_pool2d(out, (ry, rx)) if ry * rx > 1 else out)[0]


def cut_crops_lazy(read_region, windows: np.ndarray, hw: tuple[int, int], size: int
                   ) -> torch.Tensor:
    """Like :func:`cut_crops` but reads only each window's pixels (for lazy or huge images).

    ``read_region(y0, x0, y1, x1)`` returns the (C, h, w) tensor of the part inside the image;
    it is edge-padded to the window plus a 1 px margin, so the result equals :func:`cut_crops`.
    """
    out = []
    for y0f, x0f, side in np.asarray(windows, dtype=np.float64).reshape(-1, 3):
        y0, x0 = math.floor(y0f) - 1, math.floor(x0f) - 1
        y1, x1 = math.ceil(y0f + side) + 1, math.ceil(x0f + side) + 1
        ry0, rx0 = min(max(y0, 0), hw[0] - 1), min(max(x0, 0), hw[1] - 1)
        ry1, rx1 = max(min(y1, hw[0]), ry0 + 1), max(min(x1, hw[1]), rx0 + 1)
        region = read_region(ry0, rx0, ry1, rx1)
        pads = (rx0 - x0, x1 - rx1, ry0 - y0, y1 - ry1)
        if any(pads):
            region = F.pad(region[None], pads, mode="replicate")[0]
        local = np.array([[y0f - y0, x0f - x0, side]])
        out.append(cut_crops(region, local, size))
    if not out:
        raise ValueError("no windows to crop")
    return torch.cat(out)
