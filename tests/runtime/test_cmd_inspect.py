"""How `inspect` prints scores and thresholds."""
from anomalygpt_edge.runtime.cmd_inspect import number


def test_small_scores_and_thresholds_keep_their_digits():
    # a trained model's normal maps and its calibrated thresholds sit near 1e-5: '0.000' would hide both
    assert number(3.2e-5) == '3.20e-05' and number(4e-4) != '0.000'
    assert number(0.752) == '0.752' and number(1.0) == '1.000' and number(0.0) == '0.000'
