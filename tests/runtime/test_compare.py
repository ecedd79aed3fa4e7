"""The comparator's arithmetic on hand-made arrays whose errors are known in advance."""
import json
import math

import numpy as np
import pytest

from anomalygpt_edge.runtime.compare import (ComparisonReport, Tolerance, compare_arrays, compare_outputs,
                                             compare_runners)


def test_known_errors_are_reported_exactly():
    expected = np.array([1.0, 2.0, -4.0, 0.5], np.float32)
    actual = np.array([1.25, 2.0, -4.5, 0.5], np.float32)   # diffs 0.25, 0, 0.5, 0 (exact in binary)
    r = compare_arrays(actual, expected, atol=0.5, rtol=0.0, name='x')
    assert r.max_abs == 0.5
    assert r.max_rel == 0.25                                  # 0.25/1 beats 0.5/4
    assert r.mean_abs == pytest.approx(0.75 / 4)
    dot = 1.25 * 1 + 2 * 2 + 4.5 * 4 + 0.25
    assert r.cosine == pytest.approx(dot / math.sqrt((1.5625 + 4 + 20.25 + 0.25) * (1 + 4 + 16 + 0.25)))
    assert r.passed and r.n_failed == 0 and r.size == 4


def test_allclose_semantics_at_the_boundary():
    expected = np.array([0.0, 4.0])
    actual = np.array([0.25, 5.0])
    # |diff| <= atol + rtol*|expected|: 0.25 <= 0.25 and 1.0 <= 0.25 + 0.25*4 -> both on the boundary
    assert compare_arrays(actual, expected, atol=0.25, rtol=0.25).passed
    r = compare_arrays(actual, expected, atol=0.125, rtol=0.25)    # first element now outside
    assert not r.passed and r.n_failed == 1
    r = compare_arrays(actual, expected, atol=0.25, rtol=0.125)    # second element now outside
    assert not r.passed and r.n_failed == 1
    assert compare_arrays(actual, expected, atol=0.125, rtol=0.125).n_failed == 2


@pytest.mark.parametrize('atol,rtol', [(1e-3, 0), (0, 1e-2), (1e-3, 1e-3), (1e-1, 0)])
def test_pass_fail_agrees_with_numpy_allclose(atol, rtol):
    rng = np.random.default_rng(0)
    b = rng.standard_normal(1000)
    for scale in (1e-4, 1e-3, 1e-2, 1e-1):
        a = b + rng.standard_normal(1000) * scale
        r = compare_arrays(a, b, atol, rtol)
        assert r.passed == np.allclose(a, b, atol=atol, rtol=rtol)
        assert r.n_failed == int((~np.isclose(a, b, atol=atol, rtol=rtol)).sum())


def test_relative_error_is_relative_to_the_reference():
    # numpy.allclose is asymmetric: the second argument is the reference
    r = compare_arrays(np.array([2.0]), np.array([1.0]), atol=0, rtol=0.6)
    assert r.max_rel == 1.0 and not r.passed          # 1.0 > 0.6 * 1
    r = compare_arrays(np.array([1.0]), np.array([2.0]), atol=0, rtol=0.6)
    assert r.max_rel == 0.5 and r.passed              # 1.0 <= 0.6 * 2


def test_cosine_of_scaled_opposite_and_orthogonal_vectors():
    v = np.array([3.0, -1.0, 2.0])
    assert compare_arrays(2 * v, v, 10, 10).cosine == pytest.approx(1.0)
    assert compare_arrays(-v, v, 10, 10).cosine == pytest.approx(-1.0)
    assert compare_arrays(np.array([1.0, 0]), np.array([0, 1.0]), 10, 10).cosine == pytest.approx(0.0)
    assert compare_arrays(np.zeros(3), np.zeros(3), 0, 0).cosine == 1.0


def test_nan_never_passes_and_shape_mismatch_fails():
    r = compare_arrays(np.array([np.nan, 1.0]), np.array([0.0, 1.0]), atol=1e30, rtol=0)
    assert not r.passed and 'NaN' in r.error
    r = compare_arrays(np.zeros((2, 3)), np.zeros((3, 2)), atol=1, rtol=1)
    assert not r.passed and '[2, 3]' in r.error and '[3, 2]' in r.error


def test_zero_reference_gives_infinite_relative_error_and_valid_json():
    r = compare_arrays(np.array([1e-3, 0.0]), np.array([0.0, 0.0]), atol=1e-2)
    assert r.max_rel == math.inf and r.passed
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d['max_rel'] == 'inf' and d['passed'] is True


def test_compare_outputs_per_output_tolerances_and_missing_output():
    expected = {'a': np.array([1.0, 2.0]), 'b': np.array([10.0]), 'c': np.array([0.0])}
    actual = {'a': np.array([1.0, 2.01]), 'b': np.array([10.5])}
    rep = compare_outputs(actual, expected, {'a': (0.02, 0), '*': {'atol': 0.0, 'rtol': 0.1}}, case='k')
    by = {r.name: r for r in rep.results}
    assert by['a'].passed and by['a'].atol == 0.02
    assert by['b'].passed and by['b'].rtol == 0.1       # 0.5 <= 0.1 * 10
    assert not by['c'].passed and 'no output' in by['c'].error
    assert not rep.passed
    with pytest.raises(KeyError, match="'b'"):
        compare_outputs(actual, {'b': expected['b']}, {'a': (1, 1)})


class _Fixed:
    """A runner returning ``x * gain + offset`` (a stand-in for an ONNX or PyTorch runner)."""

    def __init__(self, name, gain=1.0, offset=0.0):
        self.name, self.gain, self.offset = name, gain, offset
        self.input_names, self.output_names = ['x'], ['y']

    def infer(self, feeds):
        return {'y': feeds['x'] * self.gain + self.offset}


def test_compare_runners_over_several_cases_and_report_rendering():
    feeds = [('ones', {'x': np.ones(4)}), {'x': np.full(4, 100.0)}]
    ok = compare_runners(_Fixed('cand', offset=1e-5), _Fixed('ref'), feeds, Tolerance(1e-4, 0))
    assert ok.passed and [r.case for r in ok.results] == ['ones', '#1']
    assert ok.worst()['max_abs'] == pytest.approx(1e-5)
    bad = compare_runners(_Fixed('cand', gain=1.001), _Fixed('ref'), feeds, {'atol': 1e-4, 'rtol': 0})
    assert not bad.passed
    assert [r.passed for r in bad.results] == [False, False]        # 1e-3 and 0.1 errors
    assert bad.results[1].max_abs == pytest.approx(0.1)
    table = bad.table()
    assert 'cand vs ref: FAILED' in table and 'FAIL' in table.splitlines()[-1]
    d = json.loads(bad.to_json())
    assert d['passed'] is False and len(d['results']) == 2 and d['results'][0]['name'] == 'y'


def test_empty_report_does_not_pass():
    assert not ComparisonReport().passed


def test_range_scaled_atol_follows_the_reference_range():
    """A near-zero element of a wide-range output (a residual stream reaching 73) moved by 7.9e-4:
    outside atol 1e-4 + rtol 1e-3 alone, inside once the bound scales with the range (3e-5 x 73)."""
    ref = np.array([73.0, -40.0, 0.01, 5.0])
    got = ref + np.array([0.0, 0.0, 7.9e-4, 0.0])
    fixed = {'atol': 1e-4, 'rtol': 1e-3}
    scaled = {**fixed, 'range_atol': 3e-5}
    assert not compare_outputs({'taps': got}, {'taps': ref}, fixed).passed
    r = compare_outputs({'taps': got}, {'taps': ref}, scaled)
    assert r.passed and r.results[0].atol == pytest.approx(1e-4 + 3e-5 * 73.0)
    # the same error on an output whose range is small stays a failure
    small = np.array([0.5, -0.2, 0.01, 0.1])
    assert not compare_outputs({'taps': small + got - ref}, {'taps': small}, scaled).passed
    assert Tolerance.coerce(scaled).to_dict() == scaled and Tolerance.coerce(fixed).to_dict() == fixed
