"""Time to verdict at the real shapes: every lever tried, each beside PyTorch at its best, in one run.

An image goes in; the verdict is known once the LLM has chosen the token after "Yes"/"No". So

    time to verdict = vision chain + LLM prefill of the prompt + 1 decode step

for ours and for the baseline alike. The vision chain is measured end to end (preprocess, encoder,
decoder, prompt learner); the LLM at Vicuna-7B width is measured at ``llm_layers`` depths and every
figure extrapolated to 32 layers (t = a + b * layers, labelled). The levers:

- vision: ONNX Runtime FP32, INT8 dynamic (``calibration.int8`` method 'dynamic'), INT8 static Q/DQ
  (method 'minmax', ONNX Runtime target), ONNX Runtime's thread spinning on (its default) or off (ours);
  PyTorch eager FP32, eager bf16 and
  bf16 + ``torch.compile`` with weight freezing (its best on a CPU with native bf16);
- LLM: GGUF type (Q4_K_M, Q4_0, Q8_0), the prompt as one embedding batch or one call per segment,
  llama.cpp's CPU weight repacking on/off, flash attention on/off, the constant prefix cached across
  frames; HF transformers FP32 and bf16 as the baseline;
- resident memory of the chosen configuration (INT8 vision + the LLM), measured in a fresh process.

``run_verdict(VerdictOptions(...)) -> report`` (the JSON of ``anomalygpt-edge bench-verdict``).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bench_llm, bench_vision
from .bench_stats import PeakRSS, block_schedule, extrapolate
from .latency import HUGE_PROMPT_POSITIONS, progress_bar
from .machine import machine_info, memory_bandwidth

SCHEMA = 'anomalygpt-edge-bench-verdict/1'


@dataclass(frozen=True)
class LlmVariant:
    name: str
    quant: str
    one_batch: bool = True
    repack: bool = False
    flash_attn: bool | None = None
    cached_prefix: bool = False   # BOS + "### Human: <Img>" stays in the KV cache across frames

    def session_kwargs(self) -> dict:
        return {'repack': self.repack, 'flash_attn': self.flash_attn}


# the first is the configuration before this study (the runtime's previous default)
LLM_VARIANTS = (
    LlmVariant('q4_k_m, segments, repack off (before)', 'q4_k_m', one_batch=False),
    LlmVariant('q4_k_m, one batch', 'q4_k_m'),
    LlmVariant('q4_k_m, one batch, repack on', 'q4_k_m', repack=True),
    LlmVariant('q4_k_m, one batch, flash attention off', 'q4_k_m', flash_attn=False),
    LlmVariant('q4_0, one batch', 'q4_0'),
    LlmVariant('q4_0, one batch, repack on', 'q4_0', repack=True),
    LlmVariant('q8_0, one batch', 'q8_0'),
    LlmVariant('q8_0, one batch, repack on', 'q8_0', repack=True),
    LlmVariant('bf16, one batch', 'bf16'),
    LlmVariant('q4_k_m, one batch, cached prefix', 'q4_k_m', cached_prefix=True),
    LlmVariant('q4_k_s, one batch', 'q4_k_s'),
    LlmVariant('iq4_xs, one batch', 'iq4_xs'),
    LlmVariant('q4_0, one batch, repack on, cached prefix', 'q4_0', repack=True, cached_prefix=True),
)

# name -> (graph set, OrtRunner options)
VISION_OURS = {
    'ort_fp32_spin (before)': ('fp32', {'spin': True}),
    'ort_fp32': ('fp32', {}),
    'ort_int8_static': ('int8_static', {}),
    'ort_int8_dynamic_spin': ('int8_dynamic', {'spin': True}),
    'ort_int8_dynamic': ('int8_dynamic', {}),
}
VISION_BASELINES = ('torch_fp32', 'torch_bf16', 'torch_bf16_compiled')


@dataclass
class VerdictOptions:
    config: str = 'huge'
    llm_layers: tuple = (2, 4)
    threads: int = 2
    runs: int = 6
    warmup: int = 1               # unmeasured runs at the start of every block
    rounds: int = 2
    decode_tokens: int = 16
    prompt_positions: int = HUGE_PROMPT_POSITIONS
    calibration_images: int = 8
    seed: int = 0
    vision: tuple = tuple(VISION_OURS)
    baselines: tuple = VISION_BASELINES
    llm_variants: tuple = tuple(v.name for v in LLM_VARIANTS)
    hf_baselines: tuple = ('fp32', 'bf16')
    memory: bool = True
    memory_variants: tuple = ()   # MEMORY_VARIANTS names, for run_memory (``--memory-only``)
    work_dir: str | None = None
    progress: bool = True
    command: str = ''
    on_phase: object = None


def _log(msg: str) -> None:
    print(f"[bench-verdict] {msg}", file=sys.stderr, flush=True)


# -- vision -----------------------------------------------------------------------------------------
def quantize_encoder(setup, work: Path, method: str, n_images: int, seed: int) -> Path:
    """The encoder of ``setup`` in INT8 with ``calibration.int8`` (the ``calibrate int8`` code path)."""
    from ..calibration.data_reader import ImageBatches
    from ..calibration.int8 import QuantizeOptions, quantize_onnx
    from ..models import spec
    import cv2
    out = work / f'encoder-int8-{method}.onnx'
    batches = None
    if method != 'dynamic':
        frames = work / 'calibration-frames'
        frames.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(n_images):
            p = frames / f'{i}.png'
            cv2.imwrite(str(p), bench_vision.camera_frame(256, seed + 1 + i))
            paths.append(p)
        cfg = {'mean': list(spec.CLIP_MEAN), 'std': list(spec.CLIP_STD), 'size': spec.IMAGE_SIZE, 'resize': 'squash'}
        batches = ImageBatches(paths, cfg, batch_size=1, seed=seed)
    quantize_onnx(setup.onnx['fp32']['encoder'], out, batches, 'encoder', 'image',
                  QuantizeOptions(method=method, target='onnxruntime'))
    return out


class TorchCompiledChain:
    """PyTorch bf16 with ``torch.compile`` (inductor, weights frozen into the graph): the reference
    chain (Pillow preprocessing, encoder, decoder, prompt learner) as one compiled function, timed as
    a whole. Compilation happens at construction and is reported, not counted."""

    def __init__(self, setup, frame: np.ndarray, threads: int):
        import copy

        import torch
        import torch._inductor.config as inductor_config
        self.torch, self.threads = torch, threads
        torch.set_num_threads(threads)
        inductor_config.freezing = True
        with PeakRSS() as self.load:
            model = copy.deepcopy(setup.model).to(torch.bfloat16).eval()
            feats = torch.from_numpy(setup.text_features).to(torch.bfloat16)

            def chain(x):
                emb, taps = model.encode_image(x)
                amap = model.anomaly_map(taps, feats)
                return model.image_token(emb), amap, model.prompt_learner(amap)

            self.model, self.compiled = model, torch.compile(chain)
            t0 = time.perf_counter()
            self.once(frame)
            self.extra = {'compile_s': round(time.perf_counter() - t0, 1)}
        self.backend = f'torch bf16 + torch.compile (inductor, freezing; {threads} threads)'

    def once(self, frame: np.ndarray) -> dict:
        from PIL import Image

        from ..models.preprocess import pil_preprocess
        torch = self.torch
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.compiled(pil_preprocess(Image.fromarray(frame), 'squash').to(torch.bfloat16))
        return {'chain': (time.perf_counter() - t0) * 1e3}

    def close(self) -> None:
        self.compiled = self.model = None
        self.torch._dynamo.reset()


def run_vision(opts: VerdictOptions, cfg, work: Path) -> tuple[dict, object]:
    """Every vision configuration loaded at once and timed in blocks over rounds, on one camera frame."""
    setup = bench_vision.prepare_vision(cfg, work, ('fp32',), None, opts.seed, log=_log)
    for graph_set in sorted({VISION_OURS[v][0] for v in opts.vision} - {'fp32'}):
        method = graph_set.split('_', 1)[1].replace('static', 'minmax')
        _log(f"INT8 encoder ({method})")
        t0 = time.perf_counter()
        path = quantize_encoder(setup, work, method, opts.calibration_images, opts.seed)
        setup.onnx[graph_set] = {**setup.onnx['fp32'], 'encoder': path}
        setup.notes.append(f"{graph_set}: encoder quantized in {time.perf_counter() - t0:.0f} s")
    frame = bench_vision.camera_frame(1024, opts.seed)
    chains = {}
    try:
        for name in opts.baselines:
            if name == 'torch_bf16_compiled':
                _log("compiling the PyTorch bf16 chain (torch.compile, freezing)")
                chains[('baseline', name)] = TorchCompiledChain(setup, frame, opts.threads)
            else:
                chains[('baseline', name)] = bench_vision.TorchChain(setup, name.split('_', 1)[1], opts.threads)
        for name in opts.vision:
            graph_set, runner_opts = VISION_OURS[name]
            chains[('ours', name)] = bench_vision.OrtChain(setup, graph_set, opts.threads, **runner_opts)
        with progress_bar(len(block_schedule(chains, opts.runs, opts.warmup, opts.rounds)), 'vision', opts.progress) as bar:
            figures = bench_vision.measure(chains, frame, opts.runs, opts.warmup, bar, opts.rounds)
        out = {'ours': {}, 'baseline': {}, 'agreement_vs_torch_fp32': {}, 'export_s': setup.export_s,
               'method': 'all configurations loaded together, timed in blocks (each with its own warm-up) over '
                         f'{opts.rounds} rounds, the order reversed each round, on one frame'}
        for (group, name), fig in figures.items():
            out[group][name] = fig
        ref = chains.get(('baseline', 'torch_fp32'))
        if ref is not None:
            want = ref.outputs(frame)
            for name in opts.vision:
                got = chains[('ours', name)].outputs(want['input'])
                out['agreement_vs_torch_fp32'][name] = bench_vision.agreement(got, want)
    finally:
        for c in chains.values():
            c.close()
        gc.collect()
    out['notes'] = setup.notes
    return out, setup


# -- LLM --------------------------------------------------------------------------------------------
def run_llm(opts: VerdictOptions, cfg, tok_dir: Path, work: Path, save=lambda _r: None) -> dict:
    """Per depth: every configuration (HF baselines, our session variants, raw llama.cpp) loaded at
    once and timed in blocks over rounds (``bench_llm.measure``)."""
    import copy

    from ..models import spec
    from ..runtime.llama_session import LlamaSession
    variants = [v for v in LLM_VARIANTS if v.name in opts.llm_variants]
    unknown = set(opts.llm_variants) - {v.name for v in LLM_VARIANTS}
    if unknown:
        raise ValueError(f"unknown LLM variants {sorted(unknown)}; known: {[v.name for v in LLM_VARIANTS]}")
    quants = sorted({v.quant for v in variants})
    raw_q = 'q4_k_m' if 'q4_k_m' in quants else quants[0]
    res = {'layers_measured': list(opts.llm_layers), 'target_layers': cfg.llm.layers, 'ours': {}, 'baseline': {},
           'raw_llama_cpp': {}, 'gguf_bytes': {}, 'variants': {v.name: dataclasses.asdict(v) for v in variants},
           'method': f'per depth, all configurations loaded together, timed in blocks (each with its own '
                     f'warm-up) over {opts.rounds} rounds, the order reversed each round'}
    layout = None
    for n in opts.llm_layers:
        hf = bench_llm.build_hf(cfg.llm, n, opts.seed)
        _log(f"LLM {n} layers: writing GGUF {', '.join(quants)}")
        paths = bench_llm.export_gguf(hf, tok_dir, work / f'llm-{n}', quants)
        if layout is None:
            with LlamaSession(paths[quants[0]], n_ctx=256) as s:
                layout = bench_llm.prompt_layout(s.tokenize, s.bos_id, spec.question_for('bottle'),
                                                 opts.prompt_positions)
            res['prompt'] = {'positions': layout.n_positions, 'constant_prefix': len(layout.segments[0][1]),
                             'segments': [[k, len(v) if k == 'tokens' else v] for k, v in layout.segments]}
        for q in quants:
            res['gguf_bytes'].setdefault(q, {})[n] = bench_llm.gguf_bytes(paths[q])
        runners, model = {}, None
        try:
            for dtype in opts.hf_baselines:
                model = hf if dtype == opts.hf_baselines[-1] else copy.deepcopy(hf)
                # PyTorch at its best: logits of the last prompt position only (the reference computes all)
                runners[('baseline', f'hf_{dtype}')] = bench_llm.HFRun(model, dtype, layout, opts.threads, opts.seed,
                                                                       last_logits_only=True)
            del hf, model
            for v in variants:
                runners[('ours', v.name)] = bench_llm.SessionRun(
                    paths[v.quant], layout, opts.threads, n_ctx=512, seed=opts.seed, one_batch=v.one_batch,
                    cached_prefix=v.cached_prefix, **v.session_kwargs())
            runners[('raw_llama_cpp', raw_q)] = bench_llm.RawRun(paths[raw_q], layout.n_positions, opts.threads,
                                                                 n_ctx=512, seed=opts.seed)
            res.setdefault('bandwidth', {})[n] = memory_bandwidth(opts.threads)
            with progress_bar(len(block_schedule(runners, opts.runs, opts.warmup, opts.rounds)), f'LLM {n} layers',
                      opts.progress) as bar:
                figures = bench_llm.measure(runners, opts.runs, opts.warmup, opts.decode_tokens, 1, bar, opts.rounds)
        finally:
            for r in runners.values():
                r.close()
            runners.clear()
            gc.collect()
        for (group, name), fig in figures.items():
            res[group].setdefault(name, {'by_layers': {}})['by_layers'][n] = fig
        res['gguf_paths'] = {**res.get('gguf_paths', {}), n: {q: str(p) for q, p in paths.items()}}
        save(res)
    target = cfg.llm.layers
    xs = list(opts.llm_layers)
    for group in ('ours', 'baseline', 'raw_llama_cpp'):
        for entry in res[group].values():
            by = entry['by_layers']
            entry['at_target'] = {m: extrapolate(xs, [by[x][m]['median'] for x in xs], target)
                                  for m in ('prefill_ms', 'decode_ms_per_token', 'verdict_ms')}
            entry['at_target']['decode_tok_s'] = 1e3 / entry['at_target']['decode_ms_per_token']['value']
    for q, by in res['gguf_bytes'].items():
        by['at_target'] = {k: extrapolate(xs, [by[x][k] for x in xs], target)['value'] for k in ('tensors', 'file')}
    return res


# -- resident memory --------------------------------------------------------------------------------
_MEMORY_PROBE = r"""
import json, sys, time
import numpy as np
import psutil
from anomalygpt_edge.runtime.runners import OrtRunner
from anomalygpt_edge.runtime.llama_session import LlamaSession
from anomalygpt_edge.runtime.preprocess import preprocess
a = json.loads(sys.argv[1])
rss = lambda: psutil.Process().memory_info().rss / 2**20
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent (a large benchmark process)
hwm = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024
out = {'start': rss()}
r = {c: OrtRunner(p, providers=['CPUExecutionProvider'], intra_op_threads=a['threads'], **a['ort'])
     for c, p in a['onnx'].items()}
out['vision_loaded'] = rss()
frame = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
x = preprocess(frame, a['mean'], a['std'], a['size'], 'squash')
feats = np.load(a['feats'])
for _ in range(2):
    enc = r['encoder'].infer({'image': x})
    amap = r['decoder'].infer({'taps': enc['taps'], 'text_features': feats})['anomaly_map']
    prompts = r['prompt_learner'].infer({'anomaly_map': amap})['prompts']
out['vision'] = rss()
out['vision_peak'] = hwm()
s = LlamaSession(a['gguf'], n_ctx=a['n_ctx'], n_threads=a['threads'], repack=a['repack'], kv_type=a['kv_type'])
out['n_ctx'] = s.n_ctx
rng = np.random.default_rng(0)
for _ in range(2):
    s.reset()
    s.eval_embeddings((rng.standard_normal((a['positions'], s.n_embd)) * 0.02).astype(np.float32))
    s.generate(16, stop=())
out['steady'] = rss()
out['peak'] = hwm()
print(json.dumps(out))
"""


@dataclass(frozen=True)
class MemoryVariant:
    """One resident-memory configuration: the GGUF type, the LLM context and KV cache type, the prompt
    learner's graph ('fp32', or 'int8': dynamic INT8 of its MatMul form) and ONNX Runtime's memory
    options. The vision side is always the INT8 dynamic encoder and the FP32 decoder."""
    name: str
    quant: str = 'q4_k_m'
    n_ctx: int = 512
    kv_type: str = 'f16'
    prompt_learner: str = 'fp32'
    arena: bool = True
    mem_pattern: bool = True
    repack: bool = False


# the first is the configuration measured before (benchmarks/README.md, "Time to verdict"); each next one
# changes one lever; the last ones combine the winners
MEMORY_VARIANTS = (
    MemoryVariant('before: q4_k_m, n_ctx 512, f16 KV, FP32 prompt learner'),
    MemoryVariant('INT8 prompt learner', prompt_learner='int8'),
    MemoryVariant('n_ctx 256', n_ctx=256),
    MemoryVariant('n_ctx 256, q8_0 KV', n_ctx=256, kv_type='q8_0'),
    MemoryVariant('q4_k_s', quant='q4_k_s'),
    MemoryVariant('iq4_xs', quant='iq4_xs'),
    MemoryVariant('ORT memory pattern off', mem_pattern=False),
    MemoryVariant('ORT arena off', arena=False),
    MemoryVariant('INT8 prompt learner, n_ctx 256, q8_0 KV', prompt_learner='int8', n_ctx=256, kv_type='q8_0'),
    MemoryVariant('INT8 prompt learner, n_ctx 256, q8_0 KV, q4_k_s', quant='q4_k_s', prompt_learner='int8',
                  n_ctx=256, kv_type='q8_0'),
    MemoryVariant('INT8 prompt learner, n_ctx 256, q8_0 KV, iq4_xs', quant='iq4_xs', prompt_learner='int8',
                  n_ctx=256, kv_type='q8_0'),
)


class ProbeCrashed(RuntimeError):
    """The memory probe's process died by a signal: a native library crashed on this machine."""


def resident_memory(onnx: dict, text_features: np.ndarray, gguf_paths: dict, threads: int, repack: bool,
                    positions: int, target_layers: int, work: Path, n_ctx: int = 512, kv_type: str = 'f16',
                    ort_options: dict | None = None) -> dict:
    """RSS of one fresh process (the runtime only: no torch) holding the vision graphs and the LLM after
    two frames: after the vision runs, steady after the LLM, and peak; per LLM depth, extrapolated.
    ``ort_options`` go to every ``OrtRunner`` (arena, mem_pattern)."""
    from ..models import spec
    feats = work / 'feats.npy'
    np.save(feats, text_features)
    by = {}
    for n, gguf in gguf_paths.items():
        arg = json.dumps({'onnx': {k: str(v) for k, v in onnx.items() if k != 'fewshot'}, 'feats': str(feats),
                          'gguf': str(gguf), 'threads': threads, 'repack': repack, 'positions': positions,
                          'n_ctx': n_ctx, 'kv_type': kv_type, 'ort': dict(ort_options or {}),
                          'mean': list(spec.CLIP_MEAN), 'std': list(spec.CLIP_STD), 'size': spec.IMAGE_SIZE})
        # faulthandler: a crash by a signal inside a native library names the Python line it was on
        done = subprocess.run([sys.executable, '-X', 'faulthandler', '-c', _MEMORY_PROBE, arg], capture_output=True,
                              text=True, check=False)
        if done.returncode < 0:
            where = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith('File ')][:2]
            raise ProbeCrashed(f"memory probe killed by {signal.Signals(-done.returncode).name} "
                               f"(repack {'on' if repack else 'off'}, {Path(gguf).name}) "
                               f"in {'; '.join(where) or 'native code (no Python frame reported)'}")
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:] or ['no error output']
            raise RuntimeError(f"memory probe failed (exit {done.returncode}, {Path(gguf).name}): {last[0]}")
        by[n] = json.loads(done.stdout.strip().splitlines()[-1])
    xs = sorted(by)
    at = {k: extrapolate(xs, [by[x][k] for x in xs], target_layers) for k in ('steady', 'peak')}
    # the peak measured at a few layers is the vision graphs' loading transient; a deeper LLM's own
    # resident set overtakes it, so the peak at the target depth is at least the steady figure
    if at['steady']['value'] > at['peak']['value']:
        at['peak'] = {**at['steady'], 'note': 'the fitted steady RSS: above the peak measured at the fitted depths'}
    return {'by_layers': by, 'vision_mb': float(np.median([b['vision'] for b in by.values()])),
            'at_target': at, 'n_ctx': n_ctx, 'kv_type': kv_type, 'repack': repack, 'ort': dict(ort_options or {}),
            'method': 'one fresh process: the vision graphs (encoder, decoder, prompt learner) run twice, then the '
                      'LLM prefill + 16 decode steps twice; RSS via psutil, peak = VmHWM; LLM depth fitted'}


def memory_graphs(cfg, work: Path, seed: int) -> dict:
    """The graphs the memory variants load, from ``work`` when a previous run left them there, else
    exported / quantized into it (``calibration.int8``, method 'dynamic', as ``calibrate int8`` makes
    them): {'encoder' (INT8), 'decoder', 'prompt_learner': {'fp32', 'int8'}}."""
    from ..calibration.int8 import QuantizeOptions, quantize_onnx
    vision = work / 'vision'
    if not (vision / 'encoder.onnx').is_file():
        bench_vision.prepare_vision(cfg, work, ('fp32',), None, seed, log=_log)
    int8 = {}
    # the calibrate int8 code path (the prompt learner's last conv in its MatMul form), INT8 weights
    for component, graph_input in (('encoder', 'image'), ('prompt_learner', 'anomaly_map')):
        int8[component] = work / f'{component}-int8-dynamic.onnx'
        if not int8[component].is_file():
            _log(f"INT8 {component} (dynamic)")
            quantize_onnx(vision / f'{component}.onnx', int8[component], None, component, graph_input,
                          QuantizeOptions(method='dynamic', target='onnxruntime'))
    return {'encoder': int8['encoder'], 'decoder': vision / 'decoder.onnx',
            'prompt_learner': {'fp32': vision / 'prompt_learner.onnx', 'int8': int8['prompt_learner']}}


def memory_ggufs(cfg, work: Path, layers, quants, seed: int) -> dict:
    """{layers: {quant: path}} under ``work/llm-<n>/``: kept from a previous run, requantized from a
    BF16/F16/F32 file there (llama.cpp), or written from a seeded random model."""
    from ..export.quantize import quantize_gguf
    from ..models.tokenizer import reference_corpus, train_sentencepiece
    out = {}
    for n in layers:
        d = work / f'llm-{n}'
        missing = [q for q in quants if not (d / f'llm-{q}.gguf').is_file()]
        src = next((d / f'llm-{q}.gguf' for q in ('f32', 'f16', 'bf16') if (d / f'llm-{q}.gguf').is_file()), None)
        if missing and src is None:
            tok = train_sentencepiece(work / 'tokenizer', reference_corpus(), vocab_size=400)
            _log(f"LLM {n} layers: writing GGUF {', '.join(missing)}")
            bench_llm.export_gguf(bench_llm.build_hf(cfg.llm, n, seed), tok, d, missing)
        elif missing:
            for q in missing:
                _log(f"LLM {n} layers: {src.name} -> {q}")
                quantize_gguf(src, d / f'llm-{q}.gguf', q)
        out[n] = {q: d / f'llm-{q}.gguf' for q in quants}
    return out


def run_memory(opts: VerdictOptions) -> dict:
    """Resident memory only (``bench-verdict --memory-only``): every memory variant in a fresh process of
    its own, at each LLM depth, extrapolated; no timing. Reuses the real-shape graphs and GGUF files of
    ``work_dir`` when they are there."""
    from ..models.config import get_config
    variants = [v for v in MEMORY_VARIANTS if v.name in opts.memory_variants]
    unknown = set(opts.memory_variants) - {v.name for v in MEMORY_VARIANTS}
    if unknown:
        raise ValueError(f"unknown memory variants {sorted(unknown)}; known: {[v.name for v in MEMORY_VARIANTS]}")
    cfg = get_config(opts.config) if opts.config == 'huge' else None
    own = opts.work_dir is None
    work = Path(tempfile.mkdtemp(prefix='agpt-memory-') if own else opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    try:
        if cfg is None:
            from ..models.tokenizer import reference_corpus, train_sentencepiece, vocab_size
            cfg = get_config(opts.config, vocab=vocab_size(train_sentencepiece(work / 'tokenizer', reference_corpus(),
                                                                               vocab_size=400)))
        graphs = memory_graphs(cfg, work, opts.seed)
        ggufs = memory_ggufs(cfg, work, opts.llm_layers, sorted({v.quant for v in variants}), opts.seed)
        feats = bench_vision.random_text_features(cfg.vision.embed_dim, opts.seed)
        report = {'schema': SCHEMA, 'command': opts.command, 'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                  'machine': machine_info(), 'config': cfg.name, 'llm_width': cfg.llm.hidden, 'memory_only': True,
                  'options': {'llm_layers': list(opts.llm_layers), 'threads': opts.threads,
                              'prompt_positions': opts.prompt_positions, 'seed': opts.seed},
                  'graph_bytes': {c: os.path.getsize(p) + sum(os.path.getsize(d) for d in p.parent.glob(p.name + '.data'))
                                  for c, p in (('encoder_int8', graphs['encoder']), ('decoder', graphs['decoder']),
                                               ('prompt_learner_fp32', graphs['prompt_learner']['fp32']),
                                               ('prompt_learner_int8', graphs['prompt_learner']['int8']))},
                  'gguf_bytes': {q: {n: bench_llm.gguf_bytes(ggufs[n][q]) for n in ggufs} for q in ggufs[opts.llm_layers[0]]},
                  'memory_variants': {}}
        for i, v in enumerate(variants):
            _log(f"memory {i + 1}/{len(variants)}: {v.name}")
            onnx = {'encoder': graphs['encoder'], 'decoder': graphs['decoder'],
                    'prompt_learner': graphs['prompt_learner'][v.prompt_learner]}
            res = resident_memory(onnx, feats, {n: p[v.quant] for n, p in ggufs.items()}, opts.threads, v.repack,
                                  opts.prompt_positions, cfg.llm.layers, work, n_ctx=v.n_ctx, kv_type=v.kv_type,
                                  ort_options={'arena': v.arena, 'mem_pattern': v.mem_pattern})
            report['memory_variants'][v.name] = {**res, 'variant': dataclasses.asdict(v)}
            if opts.on_phase:
                opts.on_phase({**report, 'partial': f'{i + 1} of {len(variants)} memory variants'})
        report['wall_s'] = round(time.time() - t_start, 1)
        return report
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


KV_BYTES_PER_VALUE = {'f32': 4.0, 'f16': 2.0, 'q8_0': 34 / 32, 'q4_0': 18 / 32}


def layer_estimate(report: dict, name: str) -> dict:
    """A second figure at the target depth, less exposed to RSS noise than the two-point fit: the steady
    RSS measured at the deepest depth plus, per missing layer, that layer's GGUF tensor bytes (exact,
    from the files) and its KV cache (n_ctx x K and V rows of the model width; llama.cpp writes the
    whole buffer when it clears it)."""
    r = report['memory_variants'][name]
    v = r['variant']
    by = {int(k): b for k, b in r['by_layers'].items()}
    gb = {int(k): b['tensors'] for k, b in report['gguf_bytes'][v['quant']].items() if str(k).isdigit()}
    lo, hi = min(gb), max(gb)
    width = report['llm_width'] if 'llm_width' in report else 4096  # reports before the key: Vicuna-7B
    per_layer = ((gb[hi] - gb[lo]) / (hi - lo) + v['n_ctx'] * 2 * width * KV_BYTES_PER_VALUE[v['kv_type']]) / 2**20
    target = r['at_target']['steady']['at']
    return {'value': by[hi]['steady'] + (target - hi) * per_layer, 'per_layer_mib': per_layer, 'from_layers': hi}


def memory_markdown(report: dict, limit_mib: float = 5e9 / 2**20) -> str:
    """One row per memory variant: steady and peak at each measured depth and at the target (extrapolated)."""
    rows = report['memory_variants']
    first = next(iter(rows.values()))
    depths = sorted((str(d) for d in first['by_layers']), key=int)
    target = first['at_target']['steady']['at']
    lines = [f"Resident memory, {report['config']} (MiB; fresh process per row; {target} layers extrapolated from "
             f"{', '.join(depths)}; limit {limit_mib:.0f} MiB)", '',
             '| variant | ' + ' | '.join(f'{d} L steady / peak' for d in depths) +
             f' | {target} L steady (fit) | {target} L peak | vs first | {target} L steady (per-layer bytes) | vs first |',
             '|---' * (len(depths) + 6) + '|']
    base = first['at_target']['steady']['value']
    base_est = layer_estimate(report, next(iter(rows)))['value']
    mark = lambda v: ' (met)' if v <= limit_mib else ''
    for name, r in rows.items():
        st, pk = r['at_target']['steady']['value'], r['at_target']['peak']['value']
        est = layer_estimate(report, name)
        by = {str(k): v for k, v in r['by_layers'].items()}
        cells = [f"{by[d]['steady']:.0f} / {by[d]['peak']:.0f}" for d in depths]
        lines.append(f"| {name} | " + ' | '.join(cells) + f" | {st:.0f}{mark(st)} | {pk:.0f} | {st - base:+.0f} | "
                     f"{est['value']:.0f}{mark(est['value'])} ({est['per_layer_mib']:.1f}/layer) | "
                     f"{est['value'] - base_est:+.0f} |")
    lines += ['', 'fit: t = a + b layers through the measured depths (an RSS noise of ~10 MiB per point moves it by '
                  '~150 MiB at 32 layers); per-layer bytes: the deepest measurement plus each further layer\'s GGUF '
                  'tensor bytes and KV cache.']
    return '\n'.join(lines)


# -- composition ------------------------------------------------------------------------------------
def compose(vision: dict, llm: dict) -> dict:
    """Time to verdict of every (vision, LLM) pair: vision chain median + the LLM's verdict time
    (prefill + 1 decode step) at the target depth."""
    out = {'ours': {}, 'baseline': {}}
    for vname, v in vision['ours'].items():
        for lname, lm in llm['ours'].items():
            out['ours'][f'{vname} + {lname}'] = {
                'vision_ms': v['stages_ms']['chain']['median'], 'llm_verdict_ms': lm['at_target']['verdict_ms']['value'],
                'time_to_verdict_ms': v['stages_ms']['chain']['median'] + lm['at_target']['verdict_ms']['value']}
    for vname, v in vision['baseline'].items():
        dtype = 'bf16' if 'bf16' in vname else 'fp32'
        lm = llm['baseline'].get(f'hf_{dtype}')
        if lm is None:
            continue
        out['baseline'][f'{vname} + hf_{dtype}'] = {
            'vision_ms': v['stages_ms']['chain']['median'], 'llm_verdict_ms': lm['at_target']['verdict_ms']['value'],
            'time_to_verdict_ms': v['stages_ms']['chain']['median'] + lm['at_target']['verdict_ms']['value']}
    best = lambda d: min(d.items(), key=lambda kv: kv[1]['time_to_verdict_ms']) if d else (None, None)
    out['best_ours'], out['best_baseline'] = best(out['ours'])[0], best(out['baseline'])[0]
    if out['best_ours'] and out['best_baseline']:
        out['speedup'] = (out['baseline'][out['best_baseline']]['time_to_verdict_ms'] /
                          out['ours'][out['best_ours']]['time_to_verdict_ms'])
    return out


def ceiling_bandwidth(report: dict) -> float:
    """The bandwidth of the decode ceiling: the best reading taken right before the LLM timings (this
    VM's bandwidth moves between phases, 34 to 56 GB/s in one run, so a reading from another phase
    would misjudge the ceiling), else the run's best."""
    probes = (report.get('llm') or {}).get('bandwidth') or report['bandwidth']
    return max(b['read_gb_s'] for b in probes.values())


def ceiling(llm: dict, bandwidth_gb_s: float) -> dict:
    """Decode against the memory-bandwidth ceiling (bandwidth / bytes of all GGUF tensors, per token)
    at the target depth, and our session's decode against raw llama.cpp on the same GGUF."""
    out = {'bandwidth_gb_s': bandwidth_gb_s, 'variants': {}}
    for name, entry in llm['ours'].items():
        quant = llm['variants'][name]['quant']
        nbytes = llm['gguf_bytes'][quant]['at_target']['tensors']
        cap = bandwidth_gb_s * 1e9 / nbytes
        out['variants'][name] = {'bytes': nbytes, 'ceiling_tok_s': cap, 'decode_tok_s': entry['at_target']['decode_tok_s'],
                                 'fraction': entry['at_target']['decode_tok_s'] / cap}
    for quant, raw in llm.get('raw_llama_cpp', {}).items():
        same = next((n for n, v in llm['variants'].items() if v['quant'] == quant and v['one_batch']
                     and not v['repack'] and v['flash_attn'] is None and not v['cached_prefix']), None)
        if same:
            out.setdefault('session_vs_raw', {})[quant] = {
                'variant': same, 'decode': llm['ours'][same]['at_target']['decode_tok_s'] / raw['at_target']['decode_tok_s'],
                'prefill': raw['at_target']['prefill_ms']['value'] / llm['ours'][same]['at_target']['prefill_ms']['value']}
    return out


def run_verdict(opts: VerdictOptions) -> dict:
    from ..models.config import get_config
    from ..models.tokenizer import reference_corpus, train_sentencepiece
    own = opts.work_dir is None
    work = Path(tempfile.mkdtemp(prefix='agpt-verdict-') if own else opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    save = opts.on_phase or (lambda _r: None)
    t_start = time.time()
    try:
        report = {'schema': SCHEMA, 'command': opts.command, 'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                  'machine': machine_info(), 'options': {k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in dataclasses.asdict(opts).items()
                                                         if k not in ('progress', 'command', 'work_dir', 'on_phase')}}
        report['bandwidth'] = {'start': memory_bandwidth(opts.threads)}
        cfg = get_config(opts.config) if opts.config == 'huge' else None
        if cfg is None:
            from ..models.tokenizer import vocab_size
        tok = train_sentencepiece(work / 'tokenizer', reference_corpus(), vocab_size=400)
        if cfg is None:
            cfg = get_config(opts.config, vocab=vocab_size(tok))
        report['config'] = cfg.name
        report['vision'], setup = run_vision(opts, cfg, work)
        setup.model = None  # the PyTorch vision model is not needed past this point
        gc.collect()
        save({**report, 'partial': 'vision done'})
        report['llm'] = run_llm(opts, cfg, tok, work, lambda r: save({**report, 'llm': r, 'partial': 'LLM in progress'}))
        report['bandwidth']['end'] = memory_bandwidth(opts.threads)
        report['ceiling'] = ceiling(report['llm'], ceiling_bandwidth(report))
        report['chain'] = compose(report['vision'], report['llm'])
        if opts.memory:
            graphs = setup.onnx.get('int8_dynamic') or setup.onnx['fp32']
            best_llm = report['llm']['variants'].get(report['chain']['best_ours'].split(' + ', 1)[1]) \
                if report['chain']['best_ours'] else None
            quant = best_llm['quant'] if best_llm else 'q4_k_m'
            repack = bool(best_llm and best_llm['repack'])
            ggufs = {n: p[quant] for n, p in report['llm']['gguf_paths'].items()}
            report['memory'] = resident_memory(graphs, setup.text_features, ggufs, opts.threads, repack,
                                               opts.prompt_positions, cfg.llm.layers, work)
            report['memory']['quant'] = quant
            # repacking's memory cost, the other way round, beside it. A side figure: where llama.cpp's repacked
            # kernels crash (SIGILL on some AMX virtual machines), the report says so and the run goes on
            key = 'memory_repack_' + ('off' if repack else 'on')
            try:
                report[key] = resident_memory(graphs, setup.text_features, ggufs, opts.threads, not repack,
                                              opts.prompt_positions, cfg.llm.layers, work)
            except ProbeCrashed as e:
                _log(f"not measured: {e}")
                report[key] = {'error': str(e), 'repack': not repack}
        report['wall_s'] = round(time.time() - t_start, 1)
        return report
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def markdown(report: dict) -> str:
    """Before/after tables: vision levers, LLM levers (32 layers, extrapolated), the best pairs, memory."""
    m = report['machine']
    lines = [f"Machine: {m['cpu']} ({', '.join(m.get('cpu_detail', {}).get('simd', [])[:12])}), "
             f"{m['cores_logical']} cores, {m['memory_gb']} GB; config {report['config']}; "
             f"bandwidth {report['bandwidth']['start']['read_gb_s']} GB/s (read)", '']
    v = report['vision']
    lines += ['| vision chain | median ms | p90 ms |', '|---|---|---|']
    for group in ('baseline', 'ours'):
        for name, r in v[group].items():
            c = r['stages_ms']['chain']
            lines.append(f"| {name} | {c['median']:.1f} | {c['p90']:.1f} |")
    llm = report['llm']
    lines += ['', f"| LLM ({llm['target_layers']} layers, extrapolated from {llm['layers_measured']}) | prefill ms | "
                  "decode tok/s | verdict ms (prefill + 1 step) |", '|---|---|---|---|']
    for group in ('baseline', 'ours'):
        for name, r in llm[group].items():
            t = r['at_target']
            lines.append(f"| {name} | {t['prefill_ms']['value']:.0f} | {t['decode_tok_s']:.2f} | "
                         f"{t['verdict_ms']['value']:.0f} |")
    ceil = report.get('ceiling')
    if ceil:
        lines += ['', f"Decode vs the bandwidth ceiling ({ceil['bandwidth_gb_s']} GB/s read):"]
        for name, c in ceil['variants'].items():
            lines.append(f"- {name}: {c['decode_tok_s']:.2f} of {c['ceiling_tok_s']:.2f} tok/s ({100 * c['fraction']:.0f} %)")
        for quant, c in ceil.get('session_vs_raw', {}).items():
            lines.append(f"- session vs raw llama.cpp ({quant}): decode {100 * c['decode']:.0f} %, prefill {100 * c['prefill']:.0f} %")
    ch = report['chain']
    if ch.get('best_ours'):
        o, b = ch['ours'][ch['best_ours']], ch['baseline'][ch['best_baseline']]
        lines += ['', f"Best ours: {ch['best_ours']}: {o['time_to_verdict_ms']:.0f} ms to verdict; best PyTorch: "
                      f"{ch['best_baseline']}: {b['time_to_verdict_ms']:.0f} ms; speed-up {ch['speedup']:.2f}x"]
    if report.get('memory'):
        mem = report['memory']['at_target']
        lines.append(f"Resident ({report['memory']['quant']}, {llm['target_layers']} layers, extrapolated): "
                     f"steady {mem['steady']['value'] / 1024:.2f} GiB, peak {mem['peak']['value'] / 1024:.2f} GiB "
                     f"(repack {'on' if report['memory']['repack'] else 'off'})")
        for key in ('memory_repack_on', 'memory_repack_off'):
            if report.get(key, {}).get('error'):
                lines.append(f"  with repack {key.rsplit('_', 1)[1]}: not measured ({report[key]['error']})")
            elif report.get(key):
                o = report[key]['at_target']
                lines.append(f"  with repack {key.rsplit('_', 1)[1]}: steady {o['steady']['value'] / 1024:.2f} GiB, "
                             f"peak {o['peak']['value'] / 1024:.2f} GiB")
    return '\n'.join(lines)
