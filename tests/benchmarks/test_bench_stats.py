"""The benchmark's arithmetic: percentiles, speed-ups, the per-layer fit, the bandwidth ceiling."""
from __future__ import annotations

import numpy as np
import pytest

from anomalygpt_edge.benchmarks.bench_stats import extrapolate, fit_linear, speedup, summarize


def test_summarize_percentiles_on_a_known_list():
    s = summarize([10, 1, 9, 2, 8, 3, 7, 4, 6, 5])  # order must not matter
    assert s['n'] == 10
    assert s['median'] == pytest.approx(5.5)
    assert s['p90'] == pytest.approx(9.1)    # linear interpolation between 9 and 10
    assert s['p99'] == pytest.approx(9.91)
    assert (s['min'], s['max'], s['mean']) == (1.0, 10.0, 5.5)


def test_summarize_odd_length_and_single_value():
    assert summarize([3, 100, 1])['median'] == 3.0
    one = summarize([42.0])
    assert one['median'] == one['p90'] == one['p99'] == 42.0


def test_summarize_refuses_an_empty_list():
    with pytest.raises(ValueError, match='no values'):
        summarize([])


def test_speedup_is_baseline_over_ours():
    assert speedup(300.0, 100.0) == pytest.approx(3.0)
    assert speedup(50.0, 100.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        speedup(1.0, 0.0)


def test_fit_recovers_an_exact_line():
    a, b = fit_linear([2, 4], [3 + 2 * 2, 3 + 2 * 4])
    assert (a, b) == (pytest.approx(3.0), pytest.approx(2.0))


def test_fit_is_least_squares_over_more_points():
    xs = [1, 2, 3, 4]
    ys = [1.0, 3.0, 2.0, 5.0]
    b, a = np.polyfit(xs, ys, 1)
    got = fit_linear(xs, ys)
    assert got == (pytest.approx(a), pytest.approx(b))
    assert got[1] == pytest.approx(1.1)  # hand value: cov(x,y)/var(x) = 2.75/2.5


def test_fit_needs_two_distinct_layer_counts():
    with pytest.raises(ValueError, match='distinct'):
        fit_linear([4, 4], [1.0, 2.0])
    with pytest.raises(ValueError):
        fit_linear([2, 4], [1.0])


def test_extrapolate_to_32_layers_is_labelled():
    # 100 ms of fixed cost (embeddings, lm_head) + 50 ms per layer
    e = extrapolate([2, 4], [200.0, 300.0], 32)
    assert e['extrapolated'] is True
    assert e['value'] == pytest.approx(100 + 50 * 32)
    assert e['fit'] == {'a': pytest.approx(100.0), 'b': pytest.approx(50.0)}


def test_extrapolate_at_a_measured_depth_returns_the_measurement():
    e = extrapolate([2, 4], [200.0, 310.0], 4)
    assert e == {'value': 310.0, 'extrapolated': False, 'at': 4, 'from': [2, 4]}


def test_ceiling_is_bandwidth_over_bytes_per_token():
    from anomalygpt_edge.benchmarks.latency import ceiling
    llm = {'gguf_bytes': {'q4_k_m': {2: {'tensors': 2e9}, 4: {'tensors': 3e9},
                                     'at_target': {'tensors': 17e9, 'token_embd': 0.1e9}}},
           'ours': {'q4_k_m': {'by_layers': {2: {'decode_tok_s': 10.0}, 4: {'decode_tok_s': 8.0}},
                               'at_target': {'decode_tok_s': 1.7, 'extrapolated': True}}}}
    c = ceiling(llm, 34.0)
    assert c['q4_k_m']['2']['ceiling_tok_s'] == pytest.approx(17.0)
    assert c['q4_k_m']['2']['fraction'] == pytest.approx(10.0 / 17.0)
    assert c['q4_k_m']['at_target']['ceiling_tok_s'] == pytest.approx(2.0)
    assert c['q4_k_m']['at_target']['fraction'] == pytest.approx(0.85)
    assert c['q4_k_m']['at_target']['extrapolated'] is True


def test_prompt_layout_counts_and_stretches_positions():
    from anomalygpt_edge.benchmarks.bench_llm import prompt_layout

    def tokenize(text):
        return list(range(10, 10 + len(text.split())))
    natural = prompt_layout(tokenize, 1, 'Is there any anomaly?')
    kinds = [s[0] for s in natural.segments]
    assert kinds == ['tokens', 'embeds', 'tokens', 'embeds', 'tokens']
    assert [s[1] for s in natural.segments if s[0] == 'embeds'] == [1, 18]
    assert natural.segments[0][1][0] == 1  # BOS first
    stretched = prompt_layout(tokenize, 1, 'Is there any anomaly?', positions=100)
    assert stretched.n_positions == 100
    with pytest.raises(ValueError, match='shorter'):
        prompt_layout(tokenize, 1, 'q', positions=5)


def _variant(prefill_2, prefill_4):
    def run(p):
        return {m: {'median': v} for m, v in (('prefill_ms', p), ('decode_ms_per_token', 10.0 + p / 100),
                                               ('verdict_ms', p + 20.0), ('answer_ms', p + 240.0))}
    return {'by_layers': {2: run(prefill_2), 4: run(prefill_4)}}


def test_a_fit_that_falls_with_depth_is_flagged_not_reported():
    from anomalygpt_edge.benchmarks.latency import _at_target, ratios
    good = _variant(100.0, 200.0)
    good['at_target'] = _at_target(good['by_layers'], 32)
    assert 'invalid' not in good['at_target'] and good['at_target']['extrapolated']
    assert good['at_target']['prefill_ms']['value'] == pytest.approx(1600.0)
    bad = _variant(300.0, 200.0)  # the deeper model "faster": disturbed runs
    bad['at_target'] = _at_target(bad['by_layers'], 32)
    assert 'invalid' in bad['at_target'] and bad['at_target']['decode_tok_s'] is None
    llm = {'ours': {'q4_k_m': good}, 'raw_llama_cpp': {}, 'baseline': {'hf_fp32': bad}}
    assert ratios(None, llm, {}) == []  # nothing is compared with a fiction
    llm['baseline']['hf_fp32'] = good
    assert {r['metric'] for r in ratios(None, llm, {})} == {'llm.prefill_ms', 'llm.verdict_ms', 'llm.answer_ms',
                                                            'llm.decode_tok_s'}


def test_bandwidth_probe_reports_every_kernel():
    from anomalygpt_edge.benchmarks.machine import memory_bandwidth
    bw = memory_bandwidth(threads=1, mib_per_thread=8, repeats=2)
    assert set(bw['kernels']) == {'max', 'dot', 'copy'}
    # the ceiling uses reads only: decode reads weights, it writes next to nothing
    assert bw['read_gb_s'] == max(bw['kernels'][k]['best'] for k in ('max', 'dot'))
    assert bw['kernel'] in ('max', 'dot') and bw['copy_gb_s'] == bw['kernels']['copy']['best']


def test_block_schedule_gives_each_configuration_its_runs_in_warm_blocks():
    from anomalygpt_edge.benchmarks.bench_stats import block_schedule
    sched = block_schedule(['a', 'b', 'c'], runs=5, warmup=1, rounds=2)
    for name in 'abc':
        assert sum(1 for n, m in sched if n == name and m) == 5
        assert sum(1 for n, m in sched if n == name and not m) == 2        # one warm-up per block
    blocks = [sched[0][0]]
    for (prev, _), (cur, _) in zip(sched, sched[1:]):
        if cur != prev:
            blocks.append(cur)
    assert blocks == ['a', 'b', 'c', 'b', 'a']  # reversed each round (c's two blocks touch)
    # every block starts with its warm-up
    starts = [i for i in range(len(sched)) if i == 0 or sched[i][0] != sched[i - 1][0]]
    assert all(not sched[i][1] for i in starts)
    assert block_schedule(['a'], runs=2, warmup=0, rounds=5) == [('a', True), ('a', True)]
    with pytest.raises(ValueError):
        block_schedule(['a'], runs=0, warmup=1)
