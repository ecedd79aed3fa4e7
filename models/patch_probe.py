"""Training-only deep supervision for stage 1 of a tower trained from scratch: a linear score per patch from
each tapped layer, fitted to whether the label touches the patch. It is not part of AnomalyGPT and nothing
exports it; it gives the vision tower a direct, well-conditioned signal from the first step, where the
reference's maps (unit-norm features against two text features at a 100x scale) give a random tower
almost none (``models/train.py``, ``TrainSettings.probe_weight``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import spec


class PatchProbe(nn.Module):
    def __init__(self, width: int, k: int = spec.N_TAPS):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))

    def forward(self, taps):
        """4 taps [B,L,C] -> 4 patch scores [B,L] (logits)."""
        return [fc(t).squeeze(-1) for fc, t in zip(self.fc, taps)]


def patch_targets(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """[B,1,H,W] or [B,H,W] labels (binarised at 0.3, as the pixel losses) -> [B, grid*grid] in {0,1}:
    1 where any labelled pixel falls in the patch; row-major, as the taps' patches."""
    gt = (masks.reshape(masks.shape[0], 1, *masks.shape[-2:]) > 0.3).float()
    return (F.adaptive_max_pool2d(gt, grid) > 0).float().flatten(1)


def cell_targets(positions, words=spec.POSITION_WORDS) -> torch.Tensor:
    """Each sample's position words (none for a normal one) -> [B, 9] in {0,1}: 1 on the cells its answer names,
    row-major over the 3x3 grid, as the prompt learner's derived prompts."""
    index = {w: i for i, w in enumerate(w for row in words for w in row)}
    target = torch.zeros(len(positions), len(index))
    for b, names in enumerate(positions):
        for name in names:
            target[b, index[name]] = 1.0
    return target


def probe_loss(scores, target: torch.Tensor) -> torch.Tensor:
    """Per layer, binary cross-entropy averaged over the anomalous patches and over the normal ones
    separately, then summed (a defect covers ~1 % of the patches: unweighted, the probe would learn to say
    "normal" and teach the tower nothing); summed over layers."""
    pos = target > 0.5
    total = 0.0
    for s in scores:
        bce = F.binary_cross_entropy_with_logits(s, target, reduction='none')
        total = total + bce[~pos].mean() + (bce[pos].mean() if pos.any() else 0.0)
    return total
