"""Fusion (SPEC section 2, step 4): paste per-box results back at full resolution, OR-ed."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .boxes import crop_windows


def resize_prob(prob: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Resize (N, h, w) probabilities bilinearly (antialiased when shrinking)."""
    shrink = out_hw[0] < prob.shape[-2] or out_hw[1] < prob.shape[-1]
    return F.interpolate(prob[:, None].float(), size=out_hw, mode="bilinear", align_corners=False,
                         antialias=shrink)[:, 0]


def fuse(probs: np.ndarray | torch.Tensor, boxes: np.ndarray, hw: tuple[int, int],
         threshold: float = 0.5) -> np.ndarray:
    """Full-resolution bool mask from per-box ``S x S`` probabilities.

    Each probability map covers its box's square crop window; it is resized to the window,
    thresholded, and only the part inside the box (and the image) is pasted. Overlaps are OR-ed;
    pixels outside every box are background.
    """
    out = torch.zeros(hw, dtype=torch.bool)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if len(boxes) == 0:
        return out.numpy()
    probs = torch.as_tensor(probs).detach().to("cpu")
    windows = crop_windows(boxes, hw)
    for prob, box, (wy, wx, side) in zip(probs, boxes, windows, strict=True):
        n = max(1, int(round(side)))
        oy, ox = int(round(wy)), int(round(wx))
        y0, x0, y1, x1 = (int(v) for v in box)
        full = resize_prob(prob[None], (n, n))[0]
        part = full[y0 - oy:y1 - oy, x0 - ox:x1 - ox] >= threshold
        out[y0:y0 + part.shape[0], x0:x0 + part.shape[1]] |= part
    return out.numpy()


def upsample_mask(prob: np.ndarray | torch.Tensor, hw: tuple[int, int],
                  threshold: float = 0.5) -> np.ndarray:
    """The baseline: a low-resolution probability map resized to ``hw`` and thresholded."""
    p = torch.as_tensor(prob).detach().to("cpu")
    return (resize_prob(p[None], hw)[0] >= threshold).numpy()
