"""The reference's pixel losses (spec 7.5): focal (gamma 2) + binary dice, summed over the 4 layer maps."""
from __future__ import annotations

import torch


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """probs [B,2,H,W] (softmax output), target [B,H,W] in {0,1}; mean over pixels."""
    p_t = probs.gather(1, target.long().unsqueeze(1)).squeeze(1).clamp(smooth, 1.0 - smooth)
    return (-(1 - p_t) ** gamma * p_t.log()).mean()


def focal_loss_from_logits(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """:func:`focal_loss` of ``softmax(logits)`` without the ``smooth`` clamp, from log-softmax: the same value
    where p_t >= 1e-5, and a pixel predicted wrong beyond that (a logit gap over ~11.5, which the decoder's
    100x scale reaches easily) keeps its gradient instead of getting none."""
    log_pt = torch.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    return (-(1 - log_pt.exp()) ** gamma * log_pt).mean()


def dice_loss(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """p, g [B,H,W]: 1 - mean_b (2 sum(p g) + 1) / (sum p + sum g + 1)."""
    p, g = p.flatten(1), g.flatten(1).float()
    return 1 - ((2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)).mean()


def pixel_loss(layer_logits, mask: torch.Tensor, clamped_focal: bool = True) -> torch.Tensor:
    """layer_logits: 4 x [B,2,H,W]; mask [B,1,H,W] or [B,H,W], binarised at 0.3 as the reference does.
    ``clamped_focal=False``: :func:`focal_loss_from_logits` in place of the reference's clamped focal loss."""
    gt = (mask.reshape(mask.shape[0], *mask.shape[-2:]) > 0.3).float()
    total = 0.0
    for logits in layer_logits:
        probs = torch.softmax(logits, dim=1)
        focal = focal_loss(probs, gt) if clamped_focal else focal_loss_from_logits(logits, gt)
        total = total + focal + dice_loss(probs[:, 1], gt)
    return total
