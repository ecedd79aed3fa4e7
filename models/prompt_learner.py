"""Prompt learner: anomaly map [B,1,224,224] -> 18 LLM embeddings [B,18,D] (spec section 4)."""
from __future__ import annotations

import torch
from torch import nn


class PromptLearner(nn.Module):
    def __init__(self, channels: tuple[int, ...], dim_out: int, n_base: int = 9):
        super().__init__()
        layers, c_in = [], 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        layers.append(nn.Conv2d(c_in, dim_out, 5, padding=0))  # 7x7 -> 3x3, no activation
        self.meta_net = nn.Sequential(*layers)
        self.base_prompts = nn.Parameter(torch.randn(n_base, dim_out))

    def forward(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        b = anomaly_map.shape[0]
        derived = self.meta_net(anomaly_map)
        derived = derived.reshape(b, derived.shape[1], -1).transpose(1, 2)  # row-major over 3x3
        return torch.cat([self.base_prompts.expand(b, -1, -1), derived], dim=1)
