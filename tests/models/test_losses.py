import math

import pytest
import torch

from anomalygpt_edge.models.losses import dice_loss, focal_loss, pixel_loss


def test_focal_loss_values():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).reshape(2, 2, 1, 1)  # B=2, pixel each
    target = torch.tensor([0, 1]).reshape(2, 1, 1)
    expected = (-(0.1 ** 2) * math.log(0.9) - (0.2 ** 2) * math.log(0.8)) / 2
    assert focal_loss(probs, target).item() == pytest.approx(expected)


def test_dice_perfect_and_disjoint():
    g = torch.zeros(1, 4, 4)
    g[0, :2] = 1
    assert dice_loss(g, g).item() == pytest.approx(0.0)
    assert dice_loss(1 - g, g).item() == pytest.approx(1 - 1 / 17)  # (0+1)/(8+8+1)


def test_pixel_loss_rewards_the_right_map():
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 2:5] = 0.9
    good = torch.stack([-10 * (mask[:, 0] > 0.3).float() + 5, 10 * (mask[:, 0] > 0.3).float() - 5], 1)
    assert pixel_loss([good] * 4, mask) < pixel_loss([-good] * 4, mask) / 10
