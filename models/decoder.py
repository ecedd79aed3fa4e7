"""Anomaly maps: the zero-shot decoder (patch features vs normal/abnormal text features) and the
few-shot path (raw patch features vs a memory of normal images). Spec section 3."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import spec


class LinearLayer(nn.Module):
    """``image_decoder``: one Linear(C -> E) per tapped layer (keys ``fc.{i}.weight/bias``)."""

    def __init__(self, dim_in: int, dim_out: int, k: int = spec.N_TAPS):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(dim_in, dim_out) for _ in range(k))

    def forward(self, taps):
        return [fc(t) for fc, t in zip(self.fc, taps)]


def _to_grid(per_patch: torch.Tensor) -> torch.Tensor:
    """[B,L,K] -> [B,K,H,H], patches in row-major order."""
    b, length, k = per_patch.shape
    h = int(round(length ** 0.5))
    return per_patch.permute(0, 2, 1).reshape(b, k, h, h)


def upsample(grid: torch.Tensor, size: int = spec.IMAGE_SIZE) -> torch.Tensor:
    return F.interpolate(grid, size=size, mode='bilinear', align_corners=True)


def label_as_map(labels: torch.Tensor, grid: int) -> torch.Tensor:
    """Labels [B,1,H,W] drawn in the image -> drawn where ``upsample``'s map of a grid x grid patch grid shows the
    same places (``runtime.map_geometry``: that map is the image stretched outward from its centre)."""
    from ..runtime.map_geometry import map_to_image
    b, _, h, w = labels.shape

    def axis(size: int) -> torch.Tensor:   # each map pixel -> the image place it shows, in grid_sample's [-1, 1]
        return map_to_image(torch.arange(size, dtype=torch.float64), size, grid) * 2 / (size - 1) - 1
    gy, gx = torch.meshgrid(axis(h), axis(w), indexing='ij')
    where = torch.stack([gx, gy], -1).to(labels.dtype)[None].expand(b, -1, -1, -1)
    return F.grid_sample(labels, where, mode='bilinear', padding_mode='border', align_corners=True)


def layer_logits(decoder: LinearLayer, taps, text_features: torch.Tensor, scale: float = spec.LOGIT_SCALE):
    """Per tapped layer, the upsampled [normal, abnormal] logits [B,2,224,224].

    ``text_features`` is [2,E] (one class for the batch) or [B,2,E]. ``scale``: the reference's 100 in
    every graph; training may use less early on (``models.train.logit_scale``)."""
    out = []
    for feats in decoder(taps):
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = scale * feats @ text_features.transpose(-1, -2)
        out.append(upsample(_to_grid(logits)))
    return out


def zero_shot_map(decoder: LinearLayer, taps, text_features: torch.Tensor) -> torch.Tensor:
    """Mean over layers of softmax(upsampled logits)[abnormal]: [B,1,224,224] in [0,1]."""
    probs = [torch.softmax(lg, dim=1)[:, 1] for lg in layer_logits(decoder, taps, text_features)]
    return torch.stack(probs).mean(dim=0).unsqueeze(1)


def build_memory(taps_per_image) -> list[torch.Tensor]:
    """Normal memory from the raw taps of k reference images (list of 4 [k,256,C]) -> 4 x [k*256, C]."""
    return [t.reshape(-1, t.shape[-1]) for t in taps_per_image]


def few_shot_map(query_taps, memory) -> torch.Tensor:
    """1 - mean over layers of the max cosine between each raw query patch and the memory.

    Literal form of the reference (a [B,256,M,C] broadcast); the exporter's graph uses the
    equal normalise + matmul + max form."""
    sims = []
    for q, m in zip(query_taps, memory):
        cos = F.cosine_similarity(q.unsqueeze(2), m[None, None], dim=-1)
        sims.append(cos.max(dim=-1).values)
    sim = torch.stack(sims).mean(dim=0).unsqueeze(-1)
    return 1.0 - upsample(_to_grid(sim))


def few_shot_map_matmul(query_taps, memory) -> torch.Tensor:
    """:func:`few_shot_map` in the exporter's equal normalise + matmul + max form: the same map without the
    [B,256,M,C] broadcast, some 50x faster on a CPU (training computes a few-shot map every other batch)."""
    sims = [(F.normalize(q, dim=-1) @ F.normalize(m, dim=-1).T).amax(dim=-1) for q, m in zip(query_taps, memory)]
    sim = torch.stack(sims).mean(dim=0).unsqueeze(-1)
    return 1.0 - upsample(_to_grid(sim))
