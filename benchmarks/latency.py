"""The latency benchmark: every stage of the chain, the exported runtime beside the PyTorch baseline
in one run, on the same weights and inputs; decode against the memory-bandwidth ceiling.

``run_bench(BenchOptions(...)) -> report dict`` (the JSON written by ``anomalygpt-edge bench``).
Speed-ups are always baseline / ours for times and ours / baseline for tokens/s (> 1: ours faster).
"""
from __future__ import annotations

import dataclasses
import gc
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import bench_llm, bench_vision
from .bench_stats import extrapolate, speedup
from .machine import machine_info, memory_bandwidth

SCHEMA = 'anomalygpt-edge-bench/1'
HUGE_PROMPT_POSITIONS = 100  # BOS + "### Human: <Img>" + 1 + "</Img> " + 18 + question, Vicuna-tokenized: ~90-110

# (name, what, threshold): the targets
TARGETS = (
    ('vision_ort_fp32_vs_torch_eager', 'ONNX Runtime FP32 vision chain >= 1.5x PyTorch eager (each dtype)', 1.5),
    ('decode_q4_k_m_vs_hf', 'llama.cpp Q4_K_M decode >= 5x HF transformers', 5.0),
    ('decode_fraction_of_ceiling', 'decode >= 70% of the memory-bandwidth ceiling', 0.70),
    ('session_vs_raw_llama_cpp', 'LlamaSession decode >= 95% of raw llama.cpp', 0.95),
    ('time_to_verdict_vs_pytorch', 'time to verdict >= 4x faster than the PyTorch pipeline', 4.0),
)


@dataclass
class BenchOptions:
    config: str = 'tiny'
    bundle: str | None = None
    llm_layers: tuple = (2, 4)
    precisions: tuple = ('fp32',)
    quants: tuple = ('f16', 'q8_0', 'q4_k_m')
    baselines: tuple = ('fp32', 'bf16')
    threads: int = 2
    runs: int = 5
    warmup: int = 1
    llm_runs: int | None = None
    decode_tokens: int = 32
    answer_tokens: int = 24
    prompt_positions: int | None = None
    image_size: int = 1024
    seed: int = 0
    work_dir: str | None = None
    vision: bool = True
    llm: bool = True
    progress: bool = True
    command: str = ''
    notes: list = field(default_factory=list)
    on_phase: object = None  # called with the partial report after each phase (the CLI saves it)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, leave=False)


def _tokenizer_dir(work: Path) -> Path:
    from ..models.tokenizer import reference_corpus, train_sentencepiece
    return train_sentencepiece(work / 'tokenizer', reference_corpus(), vocab_size=400)


def _resolve_config(opts: BenchOptions, work: Path):
    """(ModelConfig, Bundle | None, tokenizer dir | None)."""
    from ..models.config import ModelConfig, get_config
    if opts.bundle:
        from ..runtime.bundle import Bundle
        bundle = Bundle.open(opts.bundle)
        cfg = ModelConfig.from_dict(bundle.manifest['model']['config'])
        if cfg.name != opts.config:
            raise ValueError(f"{opts.bundle}: the bundle holds the {cfg.name!r} config, not {opts.config!r}")
        return cfg, bundle, None
    tok = _tokenizer_dir(work)
    if opts.config == 'huge':
        return get_config('huge'), None, tok  # vocab 32001; the small tokenizer is padded to it in the GGUF
    from ..models.tokenizer import vocab_size
    return get_config(opts.config, vocab=vocab_size(tok)), None, tok


# -- vision ---------------------------------------------------------------------------------------
def run_vision(opts: BenchOptions, cfg, bundle, work: Path) -> dict:
    setup = bench_vision.prepare_vision(cfg, work, opts.precisions, bundle, opts.seed, log=_log)
    frame = bench_vision.camera_frame(opts.image_size, opts.seed)
    per = opts.warmup + opts.runs
    out = {'frame': list(frame.shape), 'weights': setup.weights, 'export_s': setup.export_s,
           'ours': {}, 'baseline': {}, 'agreement_vs_torch_fp32': {}}
    ref_outputs = None
    for dtype in opts.baselines:
        with progress_bar(per, f'vision torch {dtype}', opts.progress) as bar:
            out['baseline'][f'torch_{dtype}'], last = bench_vision.bench_torch(
                setup, dtype, frame, opts.threads, opts.runs, opts.warmup, bar)
        if dtype == 'fp32':
            ref_outputs = last
        gc.collect()
    for precision in opts.precisions:
        with progress_bar(per, f'vision onnxruntime {precision}', opts.progress) as bar:
            out['ours'][f'ort_{precision}'], last = bench_vision.bench_onnxruntime(
                setup, precision, frame, opts.threads, opts.runs, opts.warmup, bar,
                check_input=None if ref_outputs is None else ref_outputs['input'])
        if ref_outputs is not None:
            out['agreement_vs_torch_fp32'][f'ort_{precision}'] = bench_vision.agreement(last, ref_outputs)
        gc.collect()
    return out


# -- LLM ------------------------------------------------------------------------------------------
METRICS = ('prefill_ms', 'decode_ms_per_token', 'verdict_ms', 'answer_ms')


def _at_target(by_layers: dict, target: int) -> dict:
    xs = sorted(by_layers)
    res = {}
    for m in METRICS:
        res[m] = extrapolate(xs, [by_layers[x][m]['median'] for x in xs], target)
    res['extrapolated'] = res['prefill_ms']['extrapolated']
    bad = [m for m in METRICS if not res[m]['value'] > 0 or res[m].get('fit', {}).get('b', 1) < 0]
    if bad:
        # a deeper model measured faster than a shallower one: the runs were disturbed (another
        # process on the cores); a figure from such a fit would be fiction, so none is given
        res['invalid'] = f"fit not increasing with layers for {bad}: measurements disturbed; rerun on a quiet machine"
        res['decode_tok_s'] = None
    else:
        res['decode_tok_s'] = 1e3 / res['decode_ms_per_token']['value']
    return res


def run_llm(opts: BenchOptions, cfg, bundle, tok_dir, work: Path, save=lambda _res: None) -> dict:
    import torch

    from ..runtime.llama_session import LlamaSession
    runs = opts.llm_runs or opts.runs
    per = opts.warmup + runs
    target = cfg.llm.layers
    if bundle is not None:
        llm = bundle.llm or {}
        missing = [q for q in opts.quants if q not in llm.get('files', {})]
        if missing:
            raise ValueError(f"{opts.bundle}: no GGUF for {missing} (the bundle has {sorted(llm.get('files', {}))})")
        layer_counts = [llm['n_layer']]
    else:
        layer_counts = sorted(set(int(n) for n in opts.llm_layers))
    positions = opts.prompt_positions or (HUGE_PROMPT_POSITIONS if cfg.name == 'huge' and bundle is None else None)
    from ..models import spec
    question = spec.question_for('bottle')
    res = {'target_layers': target, 'layers_measured': layer_counts, 'decode_tokens': opts.decode_tokens,
           'answer_tokens': opts.answer_tokens, 'verdict_steps': bench_llm.VERDICT_STEPS,
           'ours': {}, 'raw_llama_cpp': {}, 'baseline': {}, 'gguf_bytes': {}}
    layout = None
    for n in layer_counts:
        hf = bench_llm.build_hf(cfg.llm, n, opts.seed)
        if bundle is not None:
            paths = {q: bundle.path(bundle.llm['files'][q]) for q in opts.quants}
        else:
            _log(f"LLM {n} layers: writing GGUF {', '.join(opts.quants)}")
            t0 = time.perf_counter()
            paths = bench_llm.export_gguf(hf, tok_dir, work / f'llm-{n}', opts.quants)
            res.setdefault('export_s', {})[str(n)] = round(time.perf_counter() - t0, 1)
        if layout is None:
            with LlamaSession(next(iter(paths.values())), n_ctx=256) as s:
                layout = bench_llm.prompt_layout(s.tokenize, s.bos_id, question, positions)
            res['prompt'] = {'positions': layout.n_positions, 'segments': [
                [seg[0], len(seg[1]) if seg[0] == 'tokens' else seg[1]] for seg in layout.segments],
                'question': question, 'stretched_to': positions}
        kw = dict(runs=runs, warmup=opts.warmup, n_decode=opts.decode_tokens, answer_tokens=opts.answer_tokens)
        for dtype in opts.baselines:
            with progress_bar(per, f'LLM {n}L HF {dtype}', opts.progress) as bar:
                res['baseline'].setdefault(f'hf_{dtype}', {'by_layers': {}})['by_layers'][n] = bench_llm.bench_hf(
                    hf, dtype, layout, opts.threads, seed=opts.seed, progress=bar, **kw)
        del hf
        gc.collect()
        for q, path in paths.items():
            res['gguf_bytes'].setdefault(q, {})[n] = bench_llm.gguf_bytes(path)
            with progress_bar(per, f'LLM {n}L session {q}', opts.progress) as bar:
                res['ours'].setdefault(q, {'by_layers': {}})['by_layers'][n] = bench_llm.bench_session(
                    path, layout, opts.threads, seed=opts.seed, progress=bar, **kw)
            with progress_bar(per, f'LLM {n}L raw llama.cpp {q}', opts.progress) as bar:
                res['raw_llama_cpp'].setdefault(q, {'by_layers': {}})['by_layers'][n] = bench_llm.bench_raw(
                    path, layout.n_positions, opts.threads, seed=opts.seed, progress=bar, **kw)
        if bundle is None:
            shutil.rmtree(work / f'llm-{n}', ignore_errors=True)
        save(res)
        torch.set_num_threads(opts.threads)
    for group in ('ours', 'raw_llama_cpp', 'baseline'):
        for variant in res[group].values():
            if len(variant['by_layers']) >= 2 or target in variant['by_layers']:
                variant['at_target'] = _at_target(variant['by_layers'], target)
    for q, by in res['gguf_bytes'].items():
        xs = sorted(by)
        if len(xs) >= 2 or target in by:
            by['at_target'] = {k: extrapolate(xs, [by[x][k] for x in xs], target)['value'] for k in ('tensors', 'token_embd')}
    return res


def ceiling(llm: dict, bandwidth_gb_s: float) -> dict:
    """Decode tokens/s ceiling = bandwidth / bytes of all weights; ours as a fraction of it."""
    out = {'bandwidth_gb_s': bandwidth_gb_s, 'bytes_definition': 'all GGUF tensor bytes (token_embd included)'}
    for q, by in llm['gguf_bytes'].items():
        entry = {}
        for n, b in by.items():
            if n == 'at_target':
                continue
            tok_s = llm['ours'][q]['by_layers'][n]['decode_tok_s']
            cap = bandwidth_gb_s * 1e9 / b['tensors']
            entry[str(n)] = {'bytes': b['tensors'], 'ceiling_tok_s': cap, 'decode_tok_s': tok_s, 'fraction': tok_s / cap}
        if 'at_target' in by and llm['ours'][q].get('at_target', {}).get('decode_tok_s'):
            b = by['at_target']['tensors']
            tok_s = llm['ours'][q]['at_target']['decode_tok_s']
            cap = bandwidth_gb_s * 1e9 / b
            entry['at_target'] = {'bytes': b, 'ceiling_tok_s': cap, 'decode_tok_s': tok_s, 'fraction': tok_s / cap,
                                  'extrapolated': llm['ours'][q]['at_target']['extrapolated']}
        out[q] = entry
    return out


# -- the whole chain and the ratios -----------------------------------------------------------------
def chain(vision: dict | None, llm: dict | None) -> dict:
    """Time to verdict and whole answer per (vision runner, LLM runner) pair, composed from stage
    medians (vision chain measured end to end; LLM at the target depth, extrapolated if so labelled)."""
    out = {}
    if not vision or not llm:
        return out
    pairs = [(f'ours:{v}+{q}', vision['ours'][v], llm['ours'][q]) for v in vision['ours'] for q in llm['ours']]
    pairs += [(f'baseline:{v}+hf_{v.split("_", 1)[1]}', vision['baseline'][v], llm['baseline'][f'hf_{v.split("_", 1)[1]}'])
              for v in vision['baseline'] if f'hf_{v.split("_", 1)[1]}' in llm['baseline']]
    for name, vis, lm in pairs:
        if not _valid(lm):
            continue
        t = lm['at_target']
        v = vis['stages_ms']
        stages = {s: v[s]['median'] for s in bench_vision.STAGES}
        stages.update({'llm_prefill': t['prefill_ms']['value'], 'decode_ms_per_token': t['decode_ms_per_token']['value']})
        out[name] = {'stages_ms': stages, 'vision_chain_ms': v['chain']['median'],
                     'time_to_verdict_ms': v['chain']['median'] + t['verdict_ms']['value'],
                     'answer_ms': v['chain']['median'] + t['answer_ms']['value'],
                     'decode_tok_s': t['decode_tok_s'], 'llm_extrapolated': t['extrapolated']}
    return out


def _valid(variant: dict) -> bool:
    return 'at_target' in variant and 'invalid' not in variant['at_target']


def _ratio(metric, ours_name, base_name, ours_v, base_v, unit) -> dict:
    s = ours_v / base_v if unit == 'tok/s' else speedup(base_v, ours_v)
    return {'metric': metric, 'ours': ours_name, 'baseline': base_name, 'ours_value': ours_v,
            'baseline_value': base_v, 'unit': unit, 'speedup': s}


def ratios(vision: dict | None, llm: dict | None, chains: dict) -> list[dict]:
    out = []
    if vision:
        for o, ov in vision['ours'].items():
            for b, bv in vision['baseline'].items():
                for s in bench_vision.STAGES + ('chain', 'fewshot'):
                    out.append(_ratio(f'vision.{s}', o, b, ov['stages_ms'][s]['median'], bv['stages_ms'][s]['median'], 'ms'))
    if llm:
        for group in ('ours', 'raw_llama_cpp'):
            for q, ov in llm[group].items():
                if not _valid(ov):
                    continue
                for b, bv in llm['baseline'].items():
                    if not _valid(bv):
                        continue
                    name = q if group == 'ours' else f'raw:{q}'
                    for m in ('prefill_ms', 'verdict_ms', 'answer_ms'):
                        out.append(_ratio(f'llm.{m}', name, b, ov['at_target'][m]['value'], bv['at_target'][m]['value'], 'ms'))
                    out.append(_ratio('llm.decode_tok_s', name, b, ov['at_target']['decode_tok_s'],
                                      bv['at_target']['decode_tok_s'], 'tok/s'))
        for q, ov in llm['ours'].items():
            raw = llm['raw_llama_cpp'].get(q)
            if raw and _valid(ov) and _valid(raw):
                out.append(_ratio('llm.decode_tok_s', q, f'raw:{q}', ov['at_target']['decode_tok_s'],
                                  raw['at_target']['decode_tok_s'], 'tok/s'))
                out.append(_ratio('llm.prefill_ms', q, f'raw:{q}', ov['at_target']['prefill_ms']['value'],
                                  raw['at_target']['prefill_ms']['value'], 'ms'))
    ours = {k: v for k, v in chains.items() if k.startswith('ours:')}
    bases = {k: v for k, v in chains.items() if k.startswith('baseline:')}
    for o, ov in ours.items():
        for b, bv in bases.items():
            out.append(_ratio('chain.time_to_verdict_ms', o, b, ov['time_to_verdict_ms'], bv['time_to_verdict_ms'], 'ms'))
            out.append(_ratio('chain.answer_ms', o, b, ov['answer_ms'], bv['answer_ms'], 'ms'))
    return out


def _find(rs: list[dict], metric: str, ours: str, baseline: str):
    return next((r for r in rs if r['metric'] == metric and r['ours'] == ours and r['baseline'] == baseline), None)


def targets(report: dict, precision: str = 'fp32', quant: str = 'q4_k_m') -> list[dict]:
    """Each issue target, judged on the primary runner pair; the PyTorch side both eager FP32 and bf16."""
    rs = report['ratios']
    ceil = report.get('ceiling', {}).get(quant, {}).get('at_target')
    out = []
    for name, what, thr in TARGETS:
        rows = []
        if name == 'vision_ort_fp32_vs_torch_eager':
            rows = [('torch_fp32', _find(rs, 'vision.chain', f'ort_{precision}', 'torch_fp32')),
                    ('torch_bf16', _find(rs, 'vision.chain', f'ort_{precision}', 'torch_bf16'))]
        elif name == 'decode_q4_k_m_vs_hf':
            rows = [(b, _find(rs, 'llm.decode_tok_s', quant, b)) for b in ('hf_fp32', 'hf_bf16')]
        elif name == 'decode_fraction_of_ceiling':
            rows = [('bandwidth ceiling', {'speedup': ceil['fraction']} if ceil else None)]
        elif name == 'session_vs_raw_llama_cpp':
            rows = [(f'raw:{quant}', _find(rs, 'llm.decode_tok_s', quant, f'raw:{quant}'))]
        elif name == 'time_to_verdict_vs_pytorch':
            rows = [(b, _find(rs, 'chain.time_to_verdict_ms', f'ours:ort_{precision}+{quant}', f'baseline:torch_{b}+hf_{b}'))
                    for b in ('fp32', 'bf16')]
        for against, r in rows:
            if r is None:
                continue
            out.append({'target': name, 'what': what, 'threshold': thr, 'against': against,
                        'measured': r['speedup'], 'met': r['speedup'] >= thr, 'margin': r['speedup'] / thr})
    return out


def run_bench(opts: BenchOptions) -> dict:
    own_work = opts.work_dir is None
    work = Path(tempfile.mkdtemp(prefix='agpt-bench-') if own_work else opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    try:
        report = {'schema': SCHEMA, 'command': opts.command, 'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                  'machine': machine_info(), 'options': {k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in dataclasses.asdict(opts).items()
                                                         if k not in ('progress', 'command', 'notes', 'work_dir', 'on_phase')}}
        save = opts.on_phase or (lambda _r: None)
        report['bandwidth'] = {'start': memory_bandwidth(opts.threads)}
        cfg, bundle, tok = _resolve_config(opts, work)
        report['config'] = cfg.name
        report['vision'] = run_vision(opts, cfg, bundle, work) if opts.vision else None
        save({**report, 'partial': 'vision done, LLM pending'})
        gc.collect()
        if opts.llm:
            report['bandwidth']['before_llm'] = memory_bandwidth(opts.threads)
            report['llm'] = run_llm(opts, cfg, bundle, tok, work,
                                    lambda res: save({**report, 'llm': res, 'partial': 'LLM in progress'}))
            report['bandwidth']['end'] = memory_bandwidth(opts.threads)
            # the best reading of the run: a ceiling should not be lowered by a noisy sample
            bw = max(b['read_gb_s'] for b in report['bandwidth'].values())
            report['ceiling'] = ceiling(report['llm'], bw)
        else:
            report['llm'] = None
        report['chain'] = chain(report['vision'], report['llm'])
        report['ratios'] = ratios(report['vision'], report['llm'], report['chain'])
        primary_q = 'q4_k_m' if 'q4_k_m' in opts.quants else opts.quants[0]
        report['primary'] = {'precision': opts.precisions[0], 'quant': primary_q}
        report['targets'] = targets(report, opts.precisions[0], primary_q)
        report['notes'] = list(opts.notes)
        report['wall_s'] = round(time.time() - t_start, 1)
        return report
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
