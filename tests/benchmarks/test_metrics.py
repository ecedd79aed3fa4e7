"""The evaluation math against hand-computed values and scikit-learn's definitions."""
import numpy as np
import pytest

from anomalygpt_edge.benchmarks.metrics import (answer_positions, image_auroc, pixel_auroc,
                                                reference_correct)

WORDS = (('top left', 'top', 'top right'), ('left', 'center', 'right'), ('bottom left', 'bottom', 'bottom right'))


def test_image_auroc_hand_computed():
    # positives 0.9, 0.4; negatives 0.5, 0.1: 3 of 4 pairs ranked right -> 0.75
    assert image_auroc([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75)
    assert image_auroc([0.3, 0.3], [1, 0]) == pytest.approx(0.5)  # ties count half
    assert image_auroc([0.1, 0.2], [0, 0]) is None


def test_pixel_auroc_pools_all_pixels():
    maps = [np.array([[0.9, 0.1]]), np.array([[0.8, 0.85]])]
    masks = [np.array([[1, 0]]), np.array([[0, 1]])]
    # positives 0.9, 0.85; negatives 0.1, 0.8 -> all 4 pairs right
    assert pixel_auroc(maps, masks) == pytest.approx(1.0)
    masks = [np.array([[0, 1]]), np.array([[1, 0]])]
    assert pixel_auroc(maps, masks) == pytest.approx(0.0)  # positives 0.1, 0.8 below both negatives


def test_reference_rule():
    assert reference_correct('Yes, there is an anomaly in the image', True)
    assert not reference_correct('No, there is no anomaly in the image.', True)
    assert reference_correct('No, there is no anomaly in the image.', False)
    assert not reference_correct(None, False)


def test_answer_positions():
    assert answer_positions('Yes, there is an anomaly in the image, at the top left of the image.', WORDS) == ['top left']
    assert answer_positions('Yes, there are 2 anomalies in the image, they are at the top and bottom right of '
                            'the image.', WORDS) == ['bottom right', 'top']
    assert answer_positions('No, there is no anomaly in the image.', WORDS) == []


def test_map_half_counts_a_score_at_the_level_as_anomalous():
    from anomalygpt_edge.benchmarks.metrics import MAP_HALF_LEVEL, map_half_accuracy
    # right: the quiet normal, the defect at the level; wrong: the firing normal, the quiet defect
    assert map_half_accuracy([0.1, 0.7, MAP_HALF_LEVEL, 0.2], [0, 0, 1, 1]) == 0.5
    assert map_half_accuracy([1e-6, 1.0], [False, True]) == 1.0
