"""Fusion (the paper's step 4): paste per-box results back at full resolution, OR-ed.

Two ways to run the same rule. On a CPU, box by box: resize, threshold, OR into a slice (cheap,
no padding). On a GPU that loop costs kernel launches per box, so there all boxes go at once: a
bilinear resize is separable, so resizing an ``S x S`` map to an ``n x n`` window is ``W P W^T``
with an ``n x S`` weight matrix ``W``; every box's ``W`` built with tensor ops, two batched
matmuls and one scatter do the whole fusion in a fixed number of launches.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .boxes import crop_windows

FUSE_MEMORY_BYTES = 256 * 2**20  # working memory of one fusion chunk (the window stack)
WINDOW_PIXEL_BYTES = 16  # per pixel of the window stack: float32 map + int64 target index + masks


def resize_prob(prob: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Resize (N, h, w) probabilities bilinearly (antialiased when shrinking)."""
    shrink = out_hw[0] < prob.shape[-2] or out_hw[1] < prob.shape[-1]
    return F.interpolate(prob[:, None].float(), size=out_hw, mode="bilinear", align_corners=False,
                         antialias=shrink)[:, 0]


def resize_weights(src: int, sides: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, rows, src) matrices resizing a length-``src`` signal to each of ``sides`` (rows padded).

    Row ``i`` of box ``b`` holds the weights ``F.interpolate`` gives output ``i``: plain bilinear
    (``align_corners=False``, edge-clamped) when enlarging, PyTorch's antialiased triangle filter
    when shrinking, exactly as :func:`resize_prob` resizes one map.
    """
    n = sides.to(torch.float64)[:, None, None]
    scale = src / n
    i = torch.arange(rows, dtype=torch.float64, device=sides.device)[None, :, None]
    j = torch.arange(src, dtype=torch.float64, device=sides.device)[None, None, :]
    centre = (i + 0.5) * scale
    # Enlarging: source coordinate clamped to the edge pixels, then linear weights.
    up = (1.0 - (j - (centre - 0.5).clamp(0, src - 1)).abs()).clamp_min(0)
    # Shrinking: a triangle of half-width `scale` around the centre, renormalised.
    down = (1.0 - ((j + 0.5 - centre) / scale).abs()).clamp_min(0)
    down = down / down.sum(-1, keepdim=True).clamp_min(1e-12)
    w = torch.where(n < src, down, up)
    return (w * (i < n)).float()


def fuse(probs: np.ndarray | torch.Tensor, boxes: np.ndarray, hw: tuple[int, int],
         threshold: float = 0.5, device: str | torch.device | None = None,
         batched: bool | None = None, memory_bytes: float = FUSE_MEMORY_BYTES,
         region: tuple[int, int, int, int] | None = None, windows: np.ndarray | None = None) -> np.ndarray:
    """Full-resolution bool mask from per-box ``S x S`` probabilities.

    Each probability map covers its box's square crop window; it is resized to the window,
    thresholded, and only the part inside the box (and the image) is pasted. Overlaps are OR-ed;
    pixels outside every box are background. ``device`` (default: where ``probs`` are) runs it;
    ``batched`` (default: on GPUs only) picks the all-boxes-at-once way. With ``region``
    ``(y0, x0, y1, x1)`` only that part of the image is made (one output chunk of a slide).
    ``windows`` (``y0, x0, side`` per box) are where each map lies when it is not the box's own crop
    window (a crop shared by several boxes, :mod:`.groups`).
    """
    h, w = int(hw[0]), int(hw[1])
    ry0, rx0, ry1, rx1 = region if region is not None else (0, 0, h, w)
    rh, rw = ry1 - ry0, rx1 - rx0
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros((rh, rw), dtype=bool)
    probs = torch.as_tensor(probs)
    dev = torch.device(device) if device is not None else probs.device
    probs = probs.detach().to(dev, torch.float32)
    windows = (crop_windows(boxes, (h, w)) if windows is None
               else np.asarray(windows, dtype=np.float64).reshape(-1, 3))
    sides = np.maximum(1, np.round(windows[:, 2])).astype(np.int64)
    origin = np.round(windows[:, :2]).astype(np.int64)
    if not (dev.type != "cpu" if batched is None else batched):
        mask = torch.zeros((rh, rw), dtype=torch.bool, device=dev)
        for prob, (y0, x0, y1, x1), (oy, ox), n in zip(probs, boxes.tolist(), origin.tolist(),
                                                       sides.tolist(), strict=True):
            y0, x0, y1, x1 = max(y0, ry0), max(x0, rx0), min(y1, ry1), min(x1, rx1)
            if y1 <= y0 or x1 <= x0:
                continue
            part = resize_prob(prob[None], (n, n))[0, y0 - oy:y1 - oy, x0 - ox:x1 - ox] >= threshold
            mask[y0 - ry0:y0 - ry0 + part.shape[0], x0 - rx0:x0 - rx0 + part.shape[1]] |= part
        return mask.cpu().numpy()
    # Boxes clipped to the region; then everything is in region coordinates.
    boxes = np.concatenate([np.maximum(boxes[:, :2], (ry0, rx0)), np.minimum(boxes[:, 2:], (ry1, rx1))], 1)
    boxes = boxes - (ry0, rx0, ry0, rx0)
    origin = origin - (ry0, rx0)
    h, w = rh, rw
    # One extra slot takes every write outside its box or below threshold: no masking sync.
    out = torch.zeros(h * w + 1, dtype=torch.uint8, device=dev)
    order = np.argsort(sides, kind="stable")
    start = 0
    while start < len(order):  # chunks of similar window sizes, each within the memory budget
        stop = start + 1
        # Sorted sides: the newest box is the chunk's largest, so it sets the padded window size.
        while (stop < len(order)
               and (stop + 1 - start) * int(sides[order[stop]]) ** 2 * WINDOW_PIXEL_BYTES <= memory_bytes):
            stop += 1
        _paste(out, probs, order[start:stop], boxes, sides, origin, (h, w), threshold)
        start = stop
    return out[:-1].view(h, w).bool().cpu().numpy()


def _paste(out: torch.Tensor, probs: torch.Tensor, idx: np.ndarray, boxes: np.ndarray,
           sides: np.ndarray, origin: np.ndarray, hw: tuple[int, int], threshold: float) -> None:
    dev, s = out.device, probs.shape[-1]
    rows = int(sides[idx].max())
    meta = torch.as_tensor(np.concatenate([boxes[idx], origin[idx], sides[idx, None]], 1), device=dev)
    (y0, x0, y1, x1, oy, ox, n) = (meta[:, k, None, None] for k in range(7))
    wts = resize_weights(s, meta[:, 6], rows)
    full = wts @ probs[torch.as_tensor(idx, device=dev)] @ wts.transpose(1, 2)  # (B, rows, rows)
    r = torch.arange(rows, device=dev)
    yy, xx = oy + r[None, :, None], ox + r[None, None, :]
    inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1) & (r[:, None] < n) & (r[None, :] < n)
    # Only foreground is written (every write is a 1), so overlapping writes agree: an OR.
    flat = torch.where(inside & (full >= threshold), yy * hw[1] + xx, hw[0] * hw[1])
    out.index_fill_(0, flat.reshape(-1), 1)


def upsample_mask(prob: np.ndarray | torch.Tensor, hw: tuple[int, int],
                  threshold: float = 0.5) -> np.ndarray:
    """The baseline: a low-resolution probability map resized to ``hw`` and thresholded."""
    p = torch.as_tensor(prob).detach().to("cpu")
    return (resize_prob(p[None], hw)[0] >= threshold).numpy()
