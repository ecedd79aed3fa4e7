"""How `inspect` prints scores and thresholds."""
from anomalygpt_edge.runtime.cmd_inspect import number


def test_small_scores_and_thresholds_keep_their_digits():
    # a trained model's normal maps and its calibrated thresholds sit near 1e-5: '0.000' would hide both
    assert number(3.2e-5) == '3.20e-05' and number(4e-4) != '0.000'
    assert number(0.752) == '0.752' and number(1.0) == '1.000' and number(0.0) == '0.000'


def test_the_verdict_names_who_gave_it_and_whether_the_map_threshold_agrees():
    from types import SimpleNamespace as R

    from anomalygpt_edge.runtime.cmd_inspect import verdict_text
    assert verdict_text(R(verdict='no', verdict_source='llm', map_verdict='yes', threshold=1.2e-3)) == \
        'NO by the LLM (the calibrated map threshold 0.001 says YES)'
    assert verdict_text(R(verdict='yes', verdict_source='llm', map_verdict='yes', threshold=0.5)) == \
        'YES by the LLM (the calibrated map threshold 0.500 agrees)'
    assert verdict_text(R(verdict='yes', verdict_source='llm', map_verdict=None, threshold=None)) == 'YES'
    assert verdict_text(R(verdict='yes', verdict_source='threshold', map_verdict='yes', threshold=2e-5)) == \
        'YES (threshold 2.00e-05, no LLM)'
