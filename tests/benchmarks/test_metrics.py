"""The evaluation math against hand-computed values and scikit-learn's definitions."""
import numpy as np
import pytest

from anomalygpt_edge.benchmarks.metrics import (answer_positions, bootstrap_interval, image_auroc, pixel_auroc,
                                                reference_correct, share)

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


def test_bootstrap_interval_of_a_share_has_the_binomial_width():
    rng = np.random.default_rng(3)
    for n in (90, 900):
        right = rng.random(n) < 0.7
        lo, hi = bootstrap_interval([(right,)], share, n_boot=2000)
        p = right.mean()
        assert lo < p < hi
        # the normal approximation's 95 % width, 2 x 1.96 x sqrt(p(1-p)/n): 0.19 at n = 90, 0.06 at 900
        assert (hi - lo) == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.2)


def test_bootstrap_interval_resamples_within_each_class():
    # the mean is over classes: a class always right and one always wrong have a mean of 0.5 in every
    # draw; resampling the pooled images would move it
    assert bootstrap_interval([(np.ones(20, bool),), (np.zeros(20, bool),)], share) == (0.5, 0.5)


def test_bootstrap_interval_of_auroc_skips_draws_with_one_label():
    scores, labels = np.array([0.9, 0.2, 0.8, 0.1]), np.array([1, 0, 1, 0])
    assert bootstrap_interval([(scores, labels)], image_auroc, n_boot=200) == (1.0, 1.0)
    assert bootstrap_interval([(scores[:1], labels[:1])], image_auroc) is None        # too few to resample
    assert bootstrap_interval([(np.zeros(5), np.zeros(5))], image_auroc) is None      # never both labels
