"""Soft Dice loss for training and a hard Dice score for choosing checkpoints.

The evaluation metrics (per image, at full resolution; docs/TRAINING.md) live in ``metrics``;
these two only need to rank epochs consistently, at the network's S x S.
"""

from __future__ import annotations

import torch

SMOOTH = 1.0  # keeps the loss defined for batches without foreground


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """``1 - soft Dice`` over the whole batch (the paper's loss), from logits."""
    prob = torch.sigmoid(logits.float()).flatten()
    t = target.float().flatten()
    inter = (prob * t).sum()
    return 1.0 - (2.0 * inter + smooth) / (prob.sum() + t.sum() + smooth)


def dice_per_item(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice of each item of a batch of bool masks ``(N, ...)``; empty vs empty scores 1."""
    p = pred.reshape(pred.shape[0], -1).bool()
    t = target.reshape(target.shape[0], -1).bool()
    inter = (p & t).sum(1).double()
    total = p.sum(1).double() + t.sum(1).double()
    return torch.where(total > 0, 2.0 * inter / total.clamp_min(1), torch.ones_like(total))
