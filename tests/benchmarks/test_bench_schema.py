"""A tiny `anomalygpt-edge bench` run end to end: the report's structure and internal consistency
(every ratio recomputed from the figures it names), never its timings."""
from __future__ import annotations

import json

import pytest

from anomalygpt_edge.cli import main

pytest.importorskip('llama_cpp')
pytest.importorskip('onnxruntime')


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    argv = ['bench', '--config', 'tiny', '--runs', '2', '--warmup', '0', '--llm-layers', '1,2', '--quants', 'f16,q8_0',
            '--decode-tokens', '4', '--answer-tokens', '3', '--image-size', '256', '--quiet',
            '--json', str(out / 'r.json'), '--markdown', str(out / 'r.md'), '--plot', str(out / 'r.png')]
    assert main(argv) == 0
    return out, json.loads((out / 'r.json').read_text())


def test_files_written(tiny_run):
    out, report = tiny_run
    assert (out / 'r.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    md = (out / 'r.md').read_text()
    assert 'AMD' in md or report['machine']['cpu'] in md
    assert '| ours:ort_fp32+q8_0 |' in md
    assert not [p for p in out.iterdir() if p.name.startswith('.')]  # no temp files left behind


def test_machine_and_options_recorded(tiny_run):
    _, r = tiny_run
    assert r['schema'] == 'anomalygpt-edge-bench/1'
    m = r['machine']
    assert m['cpu'] and m['cores_logical'] >= 1 and m['memory_gb'] > 0
    for pkg in ('torch', 'onnxruntime', 'llama-cpp-python', 'numpy'):
        assert pkg in m['versions']
    assert r['bandwidth']['start']['read_gb_s'] > 0
    assert r['options']['threads'] == 2 and r['options']['quants'] == ['f16', 'q8_0']


def test_vision_stages_present_for_every_runner(tiny_run):
    _, r = tiny_run
    v = r['vision']
    assert set(v['ours']) == {'ort_fp32'} and set(v['baseline']) == {'torch_fp32', 'torch_bf16'}
    for run in list(v['ours'].values()) + list(v['baseline'].values()):
        st = run['stages_ms']
        assert set(st) == {'preprocess', 'encoder', 'decoder', 'prompt_learner', 'chain', 'fewshot'}
        for s in st.values():
            assert s['n'] == 2 and s['min'] <= s['median'] <= s['p90'] <= s['p99'] <= s['max']
        assert {'load', 'run'} <= set(run['rss_mb'])
    # the ONNX graphs and the PyTorch modules computed the same map on the frame
    assert v['agreement_vs_torch_fp32']['ort_fp32']['anomaly_map']['max_abs'] < 1e-3


def test_llm_fit_reaches_the_config_depth(tiny_run):
    _, r = tiny_run
    llm = r['llm']
    assert llm['layers_measured'] == [1, 2] and llm['target_layers'] == 2
    p = llm['prompt']
    assert p['positions'] == sum(n for _, n in p['segments'])
    assert [n for kind, n in p['segments'] if kind == 'embeds'] == [1, 18]
    for group in ('ours', 'raw_llama_cpp', 'baseline'):
        for name, v in llm[group].items():
            assert set(v['by_layers']) == {'1', '2'}, (group, name)
            at = v['at_target']
            # the target depth was measured, so the figure is the measurement, not a fit
            assert at['extrapolated'] is False
            assert at['prefill_ms']['value'] == v['by_layers']['2']['prefill_ms']['median']
            assert at['decode_tok_s'] == pytest.approx(1e3 / v['by_layers']['2']['decode_ms_per_token']['median'])


def test_ceiling_uses_the_measured_bandwidth_and_file_bytes(tiny_run):
    _, r = tiny_run
    bw = max(b['read_gb_s'] for b in r['bandwidth'].values())
    c = r['ceiling']
    assert c['bandwidth_gb_s'] == bw
    for q in ('f16', 'q8_0'):
        nbytes = r['llm']['gguf_bytes'][q]['2']['tensors']
        assert c[q]['2']['ceiling_tok_s'] == pytest.approx(bw * 1e9 / nbytes)
        assert c[q]['2']['fraction'] == pytest.approx(r['llm']['ours'][q]['by_layers']['2']['decode_tok_s']
                                                      / c[q]['2']['ceiling_tok_s'])
    assert r['llm']['gguf_bytes']['q8_0']['2']['tensors'] < r['llm']['gguf_bytes']['f16']['2']['tensors']


def _value(r, group, name, metric):
    """The figure a ratio row names, looked up independently."""
    if metric.startswith('vision.'):
        return r['vision'][group][name]['stages_ms'][metric.split('.', 1)[1]]['median']
    if metric.startswith('chain.'):
        return r['chain'][name][metric.split('.', 1)[1]]
    key = metric.split('.', 1)[1]
    if name.startswith('hf_'):
        at = r['llm']['baseline'][name]['at_target']
    elif name.startswith('raw:'):
        at = r['llm']['raw_llama_cpp'][name[4:]]['at_target']
    else:
        at = r['llm']['ours'][name]['at_target']
    return at['decode_tok_s'] if key == 'decode_tok_s' else at[key]['value']


def test_every_ratio_is_recomputable_from_the_report(tiny_run):
    _, r = tiny_run
    assert r['ratios']
    metrics = {x['metric'] for x in r['ratios']}
    assert {'vision.encoder', 'vision.chain', 'llm.prefill_ms', 'llm.decode_tok_s', 'chain.time_to_verdict_ms'} <= metrics
    for x in r['ratios']:
        ours = _value(r, 'ours', x['ours'], x['metric'])
        base = _value(r, 'baseline', x['baseline'], x['metric']) if not x['baseline'].startswith('raw:') else \
            _value(r, None, x['baseline'], x['metric'])
        assert x['ours_value'] == pytest.approx(ours) and x['baseline_value'] == pytest.approx(base), x
        want = ours / base if x['unit'] == 'tok/s' else base / ours
        assert x['speedup'] == pytest.approx(want), x


def test_chain_is_composed_from_the_stage_figures(tiny_run):
    _, r = tiny_run
    c = r['chain']['ours:ort_fp32+q8_0']
    vis = r['vision']['ours']['ort_fp32']['stages_ms']
    at = r['llm']['ours']['q8_0']['at_target']
    assert c['time_to_verdict_ms'] == pytest.approx(vis['chain']['median'] + at['verdict_ms']['value'])
    assert c['answer_ms'] == pytest.approx(vis['chain']['median'] + at['answer_ms']['value'])
    assert c['time_to_verdict_ms'] <= c['answer_ms']
    assert set(r['chain']) == {'ours:ort_fp32+f16', 'ours:ort_fp32+q8_0', 'baseline:torch_fp32+hf_fp32',
                               'baseline:torch_bf16+hf_bf16'}


def test_targets_follow_the_ratios(tiny_run):
    _, r = tiny_run
    assert r['primary'] == {'precision': 'fp32', 'quant': 'f16'}
    names = {t['target'] for t in r['targets']}
    assert names == {'vision_ort_fp32_vs_torch_eager', 'decode_q4_k_m_vs_hf', 'decode_fraction_of_ceiling',
                     'session_vs_raw_llama_cpp', 'time_to_verdict_vs_pytorch'}
    for t in r['targets']:
        assert t['met'] == (t['measured'] >= t['threshold'])
    vis = next(t for t in r['targets'] if t['target'] == 'vision_ort_fp32_vs_torch_eager' and t['against'] == 'torch_fp32')
    ratio = next(x for x in r['ratios'] if x['metric'] == 'vision.chain' and x['baseline'] == 'torch_fp32')
    assert vis['measured'] == ratio['speedup']


@pytest.mark.parametrize('argv, message', [
    (['--answer-tokens', '9', '--decode-tokens', '4'], 'answer-tokens'),
    (['--config', 'huge', '--bundle', '/nonexistent'], 'bundle'),
    (['--llm-layers', '2,x'], 'integers'),
    (['--config', 'tiny', '--bundle', '/nonexistent/bundle'], 'not a bundle directory'),
])
def test_bad_usage_exits_2_with_a_message(tmp_path, capsys, argv, message):
    assert main(['bench', *argv, '--quiet', '--json', str(tmp_path / 'x.json')]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'x.json').exists()


@pytest.mark.parametrize('check, code', [([], 0), (['--check'], 1)])
def test_check_fails_the_run_on_a_missed_target(tmp_path, capsys, monkeypatch, check, code):
    from anomalygpt_edge.benchmarks import bench_report, latency
    report = {'targets': [
        {'what': 'decode >= 70% of the memory-bandwidth ceiling', 'against': 'bandwidth ceiling', 'measured': 0.9,
         'threshold': 0.7, 'met': True},
        {'what': 'time to verdict >= 4x faster than the PyTorch pipeline', 'against': 'bf16', 'measured': 1.9,
         'threshold': 4.0, 'met': False}]}
    monkeypatch.setattr(latency, 'run_bench', lambda opts: report)
    monkeypatch.setattr(bench_report, 'markdown', lambda r: '')
    monkeypatch.setattr(bench_report, 'save_report', lambda *a, **k: None)
    assert main(['bench', '--quiet', '--json', str(tmp_path / 'x.json'), *check]) == code
    err = capsys.readouterr().err
    assert ('time to verdict >= 4x faster than the PyTorch pipeline against bf16: 1.90x' in err) == bool(check)
    assert 'bandwidth ceiling' not in err
