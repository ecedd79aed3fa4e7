"""`anomalygpt-edge bench-verdict`: how the time to verdict is composed and what the report holds
(checked on a tiny run; timings themselves are never asserted)."""
from __future__ import annotations

import json

import pytest

from anomalygpt_edge.benchmarks.verdict import LLM_VARIANTS, compose

pytest.importorskip('llama_cpp')


def _stage(ms):
    return {'stages_ms': {'chain': {'median': ms}}}


def _llm(verdict_ms):
    return {'at_target': {'verdict_ms': {'value': verdict_ms}}}


def test_compose_adds_vision_and_llm_and_picks_the_fastest_pairs():
    vision = {'ours': {'a': _stage(100.0), 'b': _stage(40.0)},
              'baseline': {'torch_fp32': _stage(300.0), 'torch_bf16_compiled': _stage(120.0)}}
    llm = {'ours': {'x': _llm(900.0), 'y': _llm(1000.0)},
           'baseline': {'hf_fp32': _llm(5000.0), 'hf_bf16': _llm(1500.0)}}
    c = compose(vision, llm)
    assert c['ours']['b + x']['time_to_verdict_ms'] == 940.0 and len(c['ours']) == 4
    # each PyTorch vision baseline is paired with the HF LLM of its own dtype
    assert set(c['baseline']) == {'torch_fp32 + hf_fp32', 'torch_bf16_compiled + hf_bf16'}
    assert c['best_ours'] == 'b + x' and c['best_baseline'] == 'torch_bf16_compiled + hf_bf16'
    assert c['speedup'] == pytest.approx(1620.0 / 940.0)


def test_variant_names_are_unique_and_the_first_is_the_old_default():
    names = [v.name for v in LLM_VARIANTS]
    assert len(set(names)) == len(names)
    first = LLM_VARIANTS[0]
    assert (first.one_batch, first.repack, first.cached_prefix) == (False, False, False)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    from anomalygpt_edge.cli import main
    out = tmp_path_factory.mktemp('verdict')
    variants = 'q4_k_m, segments, repack off (before);q4_k_m, one batch;q4_k_m, one batch, cached prefix'
    argv = ['bench-verdict', '--config', 'tiny', '--runs', '2', '--warmup', '0', '--llm-layers', '1,2',
            '--decode-tokens', '3', '--vision', 'ort_fp32,ort_int8_dynamic', '--baselines', 'torch_fp32',
            '--llm-variants', variants, '--quiet', '--json', str(out / 'v.json'), '--markdown', str(out / 'v.md')]
    assert main(argv) == 0
    return out, json.loads((out / 'v.json').read_text())


def test_report_is_complete_and_consistent(tiny_run):
    out, r = tiny_run
    assert r['schema'] == 'anomalygpt-edge-bench-verdict/1' and 'partial' not in r
    assert r['machine']['cpu'] and r['bandwidth']['start']['read_gb_s'] > 0
    assert set(r['vision']['ours']) == {'ort_fp32', 'ort_int8_dynamic'}
    # the INT8 graph computes what the FP32 one does, roughly (a sanity check, not a parity test)
    assert r['vision']['agreement_vs_torch_fp32']['ort_int8_dynamic']['anomaly_map']['cosine'] > 0.99
    llm = r['llm']
    for name, entry in llm['ours'].items():
        assert sorted(entry['by_layers'], key=int) == ['1', '2']
        one = entry['by_layers']['2']
        # the verdict costs the prefill and exactly one decode step
        assert one['verdict_ms']['median'] >= one['prefill_ms']['median']
    cached = llm['ours']['q4_k_m, one batch, cached prefix']['by_layers']['1']['settings']
    before = llm['ours']['q4_k_m, segments, repack off (before)']['by_layers']['1']
    assert cached['cached_prefix'] == llm['prompt']['constant_prefix'] > 0 and cached['one_batch']
    assert before['settings']['cached_prefix'] == 0 and before['prefill_batches'] == 5
    ceil = r['ceiling']
    for name, c in ceil['variants'].items():
        assert c['fraction'] == pytest.approx(c['decode_tok_s'] / c['ceiling_tok_s'])
        assert c['ceiling_tok_s'] == pytest.approx(ceil['bandwidth_gb_s'] * 1e9 / c['bytes'])
    assert set(llm['raw_llama_cpp']) == {'q4_k_m'}
    vs = ceil['session_vs_raw']['q4_k_m']
    raw, ours = llm['raw_llama_cpp']['q4_k_m']['at_target'], llm['ours'][vs['variant']]['at_target']
    assert vs['variant'] == 'q4_k_m, one batch' and vs['decode'] == pytest.approx(ours['decode_tok_s'] / raw['decode_tok_s'])
    best = r['chain']['ours'][r['chain']['best_ours']]
    assert best['time_to_verdict_ms'] == pytest.approx(best['vision_ms'] + best['llm_verdict_ms'])
    assert best['time_to_verdict_ms'] == min(v['time_to_verdict_ms'] for v in r['chain']['ours'].values())
    mem = r['memory']
    assert set(mem['by_layers']) == {'1', '2'}
    for m in mem['by_layers'].values():
        assert m['peak'] >= m['steady'] > m['start'] > 0
    # repacking's side figure is measured, or, where llama.cpp crashes on this CPU, says why it is not
    other = r['memory_repack_on']
    assert other['repack'] is True and ('SIGILL' in other['error'] if 'error' in other else other['at_target'])
    assert 'with repack on' in (out / 'v.md').read_text()
    assert 'Best ours' in (out / 'v.md').read_text()


def test_memory_only_run_measures_each_variant_in_its_own_process(tmp_path):
    from anomalygpt_edge.benchmarks.verdict import MEMORY_VARIANTS
    from anomalygpt_edge.cli import main
    names = [MEMORY_VARIANTS[0].name, 'INT8 prompt learner']
    argv = ['bench-verdict', '--config', 'tiny', '--memory-only', '--llm-layers', '1,2', '--memory-variants', ';'.join(names),
            '--work-dir', str(tmp_path / 'w'), '--quiet', '--json', str(tmp_path / 'm.json'), '--markdown', str(tmp_path / 'm.md')]
    assert main(argv) == 0
    r = json.loads((tmp_path / 'm.json').read_text())
    assert r['memory_only'] and list(r['memory_variants']) == names and 'partial' not in r
    for name in names:
        m = r['memory_variants'][name]
        assert sorted(m['by_layers'], key=int) == ['1', '2'] and m['at_target']['steady']['at'] == 2
        assert all(b['steady'] >= b['vision'] > b['start'] > 0 and b['peak'] >= b['steady'] for b in m['by_layers'].values())
    assert r['memory_variants']['INT8 prompt learner']['variant']['prompt_learner'] == 'int8'
    assert r['graph_bytes']['prompt_learner_int8'] < r['graph_bytes']['prompt_learner_fp32']
    assert names[1] in (tmp_path / 'm.md').read_text()
    # the graphs and GGUF files stay in --work-dir for the next run
    assert (tmp_path / 'w' / 'prompt_learner-int8-dynamic.onnx').is_file() and (tmp_path / 'w' / 'llm-2').is_dir()
    assert main(argv[:-4] + ['--memory-variants', 'no such variant', '--json', str(tmp_path / 'x.json')]) == 2


def test_a_memory_probe_killed_by_a_signal_names_the_signal_and_where(tmp_path, monkeypatch):
    import subprocess

    import numpy as np

    from anomalygpt_edge.benchmarks import verdict
    stderr = ('Fatal Python error: Illegal instruction\n\nCurrent thread 0x01 (most recent call first):\n'
              '  File "/x/runtime/llama_session.py", line 164 in _decode\n  File "<string>", line 30 in <module>\n')
    monkeypatch.setattr(verdict.subprocess, 'run',
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, -4, stdout='', stderr=stderr))
    with pytest.raises(verdict.ProbeCrashed) as e:
        verdict.resident_memory({}, np.zeros((1, 2, 4), np.float32), {1: tmp_path / 'llm-q4_k_m.gguf'}, 1, True, 4, 2,
                                tmp_path)
    msg = str(e.value)
    assert 'SIGILL' in msg and 'repack on' in msg and 'llm-q4_k_m.gguf' in msg and 'llama_session.py' in msg


def test_a_failed_memory_probe_gives_its_exit_status_file_and_last_error_line(tmp_path, monkeypatch):
    import subprocess

    import numpy as np

    from anomalygpt_edge.benchmarks import verdict
    stderr = 'Traceback (most recent call last):\n  ...\nValueError: Failed to load model from file\n'
    monkeypatch.setattr(verdict.subprocess, 'run',
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, stdout='', stderr=stderr))
    with pytest.raises(RuntimeError, match=r"exit 1, llm-q4_k_m\.gguf\): ValueError: Failed to load model from file$"):
        verdict.resident_memory({}, np.zeros((1, 2, 4), np.float32), {1: tmp_path / 'llm-q4_k_m.gguf'}, 1, False, 4, 2,
                                tmp_path)
