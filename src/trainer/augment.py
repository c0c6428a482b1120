"""The paper's augmentation on whole batches in torch: 50 % affine, 30 % horizontal flip.

Image and mask get the same ``affine_grid``; the image is resampled bilinearly, the mask too
and then thresholded at 0.5, so the two stay aligned. Borders are reflected (no black wedges).

Optional colour augmentations (off unless asked; ``--stain-jitter``, ``--colour-jitter``,
``--invert``), for a model that meets brightfield stains it was not trained on: each image of a
batch is, with its probability, stain-jittered in haematoxylin/eosin/DAB optical density (Tellez
et al., Medical Image Analysis 58, 2019), colour-jittered (brightness, contrast, saturation,
hue) or inverted. They act on normalised intensities in [0, 1] and leave the mask alone; a run
without them draws exactly the random numbers it drew before they existed.
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
    p_stain: float = 0.0  # colour augmentations: probability per image (3-channel inputs)
    p_colour: float = 0.0
    p_invert: float = 0.0  # any number of channels
    stain_scale: float = 0.25  # +- relative amount of each stain
    stain_shift: float = 0.05  # +- optical density added to each stain
    brightness: float = 0.2  # +- relative
    contrast: float = 0.3  # +- relative
    saturation: float = 0.5  # +- relative
    hue: float = 0.1  # +- turns of the chroma (YIQ) plane


# Optical density of haematoxylin, eosin and DAB per RGB channel (rows; Ruifrok & Johnston, Analytical
# and Quantitative Cytology and Histology 23, 2001; the vectors scikit-image's rgb2hed uses).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
RGB_FROM_YIQ = torch.tensor([[1.0, 0.956, 0.619], [1.0, -0.272, -0.647], [1.0, -1.106, 1.703]])
YIQ_FROM_RGB = torch.linalg.inv(RGB_FROM_YIQ)
LUMA = torch.tensor([0.299, 0.587, 0.114])
MIN_TRANSMISSION = 1.0 / 255  # darkest intensity taken as light, so optical densities stay finite


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


def _mix(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` pixels as row vectors times per-image ``(N, 3, 3)`` matrices."""
    return torch.einsum("nchw,ncd->ndhw", image, matrix)


def _uniform(n: int, k: int, spread: float, generator: torch.Generator | None) -> torch.Tensor:
    return (torch.rand(n, k, generator=generator) * 2 - 1) * spread


def stain_jitter(image: torch.Tensor, cfg: AugmentSettings, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Scale and shift each image's haematoxylin, eosin and DAB optical densities (3 channels)."""
    n, dev = image.shape[0], image.device
    scale = (1 + _uniform(n, 3, cfg.stain_scale, generator)).to(dev, image.dtype)
    shift = _uniform(n, 3, cfg.stain_shift, generator).to(dev, image.dtype)
    density = -torch.log(image.clamp(MIN_TRANSMISSION, 1.0))
    hed = _mix(density, HED_FROM_RGB.to(dev, image.dtype).expand(n, 3, 3))
    hed = hed * scale[:, :, None, None] + shift[:, :, None, None]
    return torch.exp(-_mix(hed, RGB_FROM_HED.to(dev, image.dtype).expand(n, 3, 3))).clamp(0.0, 1.0)


def colour_jitter(image: torch.Tensor, cfg: AugmentSettings, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Brightness, contrast, saturation and hue of each image (3 channels), kept in [0, 1]."""
    n, dev, dt = image.shape[0], image.device, image.dtype
    bright, contrast, sat = (1 + _uniform(n, 3, 1.0, generator) * torch.tensor(
        [cfg.brightness, cfg.contrast, cfg.saturation])).to(dev, dt).unbind(1)
    angle = (_uniform(n, 1, cfg.hue, generator)[:, 0] * 2 * torch.pi)
    image = image * bright[:, None, None, None]
    luma = torch.einsum("nchw,c->nhw", image, LUMA.to(dev, dt))[:, None]
    mean = luma.mean(dim=(2, 3), keepdim=True)
    image = (image - mean) * contrast[:, None, None, None] + mean
    luma = (luma - mean) * contrast[:, None, None, None] + mean
    image = luma + (image - luma) * sat[:, None, None, None]
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, sin, -sin, cos
    # rgb -> yiq, rotate (i, q), back; transposed for pixels as row vectors
    matrix = (RGB_FROM_YIQ @ rot @ YIQ_FROM_RGB).transpose(1, 2)
    return _mix(image, matrix.to(dev, dt)).clamp(0.0, 1.0)


def colour_augment(image: torch.Tensor, cfg: AugmentSettings, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """The colour augmentations of ``cfg`` on a random subset of the batch each (a new tensor)."""
    n, colour = image.shape[0], image.shape[1] == 3
    for p, fn, needs_colour in ((cfg.p_stain, stain_jitter, True), (cfg.p_colour, colour_jitter, True),
                                (cfg.p_invert, None, False)):
        if p <= 0 or (needs_colour and not colour):
            continue
        idx = torch.nonzero(torch.rand(n, generator=generator) < p).flatten()
        if len(idx) == 0:
            continue
        idx = idx.to(image.device)
        image = image.clone()
        image[idx] = 1.0 - image[idx] if fn is None else fn(image[idx], cfg, generator)
    return image


def augment_batch(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentSettings | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random paper augmentation of a batch, the same geometry for each image and its mask, then the
    colour augmentations that ``cfg`` turns on."""
    cfg = cfg or AugmentSettings()
    theta = random_affines(image.shape[0], cfg, generator)
    image, mask = apply_affines(image, mask, theta)
    if cfg.p_stain or cfg.p_colour or cfg.p_invert:
        image = colour_augment(image, cfg, generator)
    return image, mask
