"""The paper's augmentation on whole batches in torch: 50 % affine, 30 % horizontal flip.

Image and mask get the same ``affine_grid``; the image is resampled bilinearly, the mask too
and then thresholded at 0.5, so the two stay aligned. Borders are reflected (no black wedges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSettings:
    """Probabilities and ranges from the paper (Benčević et al., Sensors 2023, section 3.1.1)."""

    p_affine: float = 0.5
    shift: float = 0.0625  # fraction of the side
    scale: float = 0.10  # +- relative zoom
    rotate_deg: float = 14.0
    p_flip: float = 0.3


def random_affines(n: int, cfg: AugmentSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, 2, 3)`` matrices for ``affine_grid`` (output -> input coordinates, in [-1, 1])."""
    def uniform(lo: float, hi: float, mask: torch.Tensor) -> torch.Tensor:
        u = torch.rand(n, generator=generator) * (hi - lo) + lo
        return torch.where(mask, u, torch.zeros_like(u))

    affine = torch.rand(n, generator=generator) < cfg.p_affine
    flip = torch.rand(n, generator=generator) < cfg.p_flip
    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg, affine) * (math.pi / 180.0)
    zoom = 1.0 + uniform(-cfg.scale, cfg.scale, affine)
    # Shifts are in normalised units: the side spans 2, so a fraction f of it is 2f.
    tx = uniform(-2 * cfg.shift, 2 * cfg.shift, affine)
    ty = uniform(-2 * cfg.shift, 2 * cfg.shift, affine)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    sx = torch.where(flip, -torch.ones(n), torch.ones(n))
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * sx, -sin, tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * sx, cos, ty
    return theta


def apply_affines(image: torch.Tensor, mask: torch.Tensor, theta: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp ``(N, C, S, S)`` images and ``(N, 1, S, S)`` masks; identity items are left untouched."""
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    moved = (theta != eye).flatten(1).any(1)
    if not bool(moved.any()):
        return image, mask
    idx = torch.nonzero(moved).flatten()
    th = theta[idx].to(image.device, image.dtype)
    grid = F.affine_grid(th, [len(idx), 1, *image.shape[-2:]], align_corners=False)
    image, mask = image.clone(), mask.clone()
    image[idx] = F.grid_sample(image[idx], grid, mode="bilinear", padding_mode="reflection",
                               align_corners=False)
    warped = F.grid_sample(mask[idx].float(), grid, mode="bilinear", padding_mode="reflection",
                           align_corners=False)
    mask[idx] = (warped >= 0.5).to(mask.dtype)
    return image, mask


def augment_batch(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentSettings | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random paper augmentation of a batch, the same geometry for each image and its mask."""
    theta = random_affines(image.shape[0], cfg or AugmentSettings(), generator)
    return apply_affines(image, mask, theta)
