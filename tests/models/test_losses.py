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


def test_unclamped_focal_equals_the_reference_and_keeps_the_gradient_beyond_its_clamp():
    from anomalygpt_edge.models.losses import focal_loss_from_logits
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 6, 6, generator=g) * 3
    target = (torch.rand(2, 6, 6, generator=g) > 0.5).float()
    assert focal_loss_from_logits(logits, target).item() == pytest.approx(
        focal_loss(torch.softmax(logits, 1), target).item(), rel=1e-5)
    # an anomalous pixel called normal by a logit gap of 30 (p_t ~ 1e-13, below the clamp's 1e-5)
    wrong = torch.tensor([30.0, 0.0]).reshape(1, 2, 1, 1).requires_grad_()
    one = torch.ones(1, 1, 1)
    focal_loss(torch.softmax(wrong, 1), one).backward()
    assert wrong.grad.abs().max() == 0                       # the reference's loss: no gradient at all
    wrong.grad = None
    focal_loss_from_logits(wrong, one).backward()
    assert wrong.grad[0, 1].item() < -0.9                  # pushes the abnormal logit up
    assert pixel_loss([wrong.detach()] * 4, one[None], clamped_focal=False) > pixel_loss([wrong.detach()] * 4, one[None])
