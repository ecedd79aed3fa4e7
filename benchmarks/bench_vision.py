"""Vision half of the latency benchmark: preprocess -> encoder -> decoder -> prompt learner (and the
few-shot graph on its own), the exported ONNX graphs in ONNX Runtime beside the PyTorch reference
code (eager FP32 and bf16) on the same weights and the same camera frame."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bench_stats import PeakRSS, summarize

STAGES = ('preprocess', 'encoder', 'decoder', 'prompt_learner')
GRAPHS = ('encoder', 'decoder', 'fewshot', 'prompt_learner')


@dataclass
class VisionSetup:
    model: object                      # AnomalyGPT (torch, FP32, no LLM): the baseline's weights
    onnx: dict                         # precision -> component -> .onnx path
    text_features: np.ndarray          # [2, E] (normal, abnormal) of one class
    weights: str                       # where the weights came from, for the report
    export_s: float | None = None      # export time when the graphs were exported here
    notes: list = field(default_factory=list)


def camera_frame(size: int = 1024, seed: int = 0) -> np.ndarray:
    """A seeded RGB uint8 frame the size of an MVTec image; pixel values do not change latency."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(base, np.ones((16, 16, 1), dtype=np.uint8)))


def random_text_features(dim: int, seed: int = 0) -> np.ndarray:
    f = np.random.default_rng(seed).standard_normal((2, dim)).astype(np.float32)
    return f / np.linalg.norm(f, axis=-1, keepdims=True)


def prepare_vision(cfg, work_dir: Path, precisions, bundle=None, seed: int = 0, log=print) -> VisionSetup:
    """The graphs from ``bundle`` (a runtime ``Bundle``), or a seeded random model of ``cfg`` exported
    with ``export_vision`` into ``work_dir`` (unverified: this is a benchmark, not a parity check)."""
    from ..models.anomalygpt import AnomalyGPT
    if bundle is not None:
        source = bundle.manifest['model'].get('source', {})
        model = AnomalyGPT.random(cfg, seed=int(source.get('seed', seed)), with_llm=False)
        weights = ("the bundle's own (seeded random)" if source.get('kind') == 'random' else
                   f"ONNX: the bundle's ({source.get('kind')}); PyTorch: seeded random of the same config "
                   "(latency does not depend on the values)")
        onnx = {p: {c: bundle.path(bundle.component(c, p)['file']) for c in GRAPHS} for p in precisions}
        feats = np.load(bundle.path(bundle.manifest['text_features']['file']))[0]
        return VisionSetup(model, onnx, feats.astype(np.float32), weights)
    from ..export.onnx_export import export_vision
    model = AnomalyGPT.random(cfg, seed=seed, with_llm=False)
    out = Path(work_dir) / 'vision'
    log(f"exporting the {cfg.name} vision graphs ({', '.join(precisions)}) to {out}")
    t0 = time.perf_counter()
    section = export_vision(model, out, precisions=tuple(precisions), verify=False)
    export_s = time.perf_counter() - t0
    onnx = {p: {c: out / section[c][p]['file'] for c in GRAPHS} for p in precisions}
    return VisionSetup(model, onnx, random_text_features(cfg.vision.embed_dim, seed),
                       f'seeded random (seed {seed}), same tensors in ONNX and PyTorch', export_s)


def _collect(per_run: list[dict], fewshot: list[float], rss: dict, backend: str) -> dict:
    stages = {s: summarize([r[s] for r in per_run]) for s in STAGES}
    stages['chain'] = summarize([sum(r[s] for s in STAGES) for r in per_run])
    stages['fewshot'] = summarize(fewshot)
    return {'backend': backend, 'stages_ms': stages, 'rss_mb': rss}


def bench_onnxruntime(setup: VisionSetup, precision: str, frame: np.ndarray, threads: int, runs: int,
                      warmup: int, progress=None, check_input: np.ndarray | None = None,
                      **runner_options) -> tuple[dict, dict]:
    """The device path: OpenCV preprocessing and OrtRunner, as ``runtime.Pipeline`` runs them.
    Returns (figures, outputs); the outputs are those of ``check_input`` when given (the baseline's
    preprocessed frame: OpenCV and Pillow resize differently, so only the same tensor compares)."""
    from ..models import spec
    from ..runtime.preprocess import preprocess
    from ..runtime.runners import OrtRunner
    with PeakRSS() as load:
        r = {c: OrtRunner(p, providers=['CPUExecutionProvider'], intra_op_threads=threads, **runner_options)
             for c, p in setup.onnx[precision].items()}
    per_run, fewshot, last = [], [], {}
    with PeakRSS() as run:
        for i in range(warmup + runs):
            t = [time.perf_counter()]
            x = preprocess(frame, spec.CLIP_MEAN, spec.CLIP_STD, spec.IMAGE_SIZE, 'squash')
            t.append(time.perf_counter())
            enc = r['encoder'].infer({'image': x})
            t.append(time.perf_counter())
            amap = r['decoder'].infer({'taps': enc['taps'], 'text_features': setup.text_features})['anomaly_map']
            t.append(time.perf_counter())
            prompts = r['prompt_learner'].infer({'anomaly_map': amap})['prompts']
            t.append(time.perf_counter())
            memory = np.ascontiguousarray(enc['taps'][0])  # one normal reference: [4, 256, C]
            t0 = time.perf_counter()
            r['fewshot'].infer({'taps': enc['taps'], 'memory': memory})
            t_fs = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                per_run.append({s: (t[k + 1] - t[k]) * 1e3 for k, s in enumerate(STAGES)})
                fewshot.append(t_fs)
            if progress is not None:
                progress.update(1)
        if check_input is not None:
            x = check_input
            enc = r['encoder'].infer({'image': x})
            amap = r['decoder'].infer({'taps': enc['taps'], 'text_features': setup.text_features})['anomaly_map']
            prompts = r['prompt_learner'].infer({'anomaly_map': amap})['prompts']
        last = {'anomaly_map': amap, 'prompts': prompts, 'image_token': enc['image_token'], 'input': x}
    providers = next(iter(r.values())).providers
    del r
    extra = ''.join(f', {k}={v}' for k, v in runner_options.items())
    return _collect(per_run, fewshot, {'load': load.to_dict(), 'run': run.to_dict()},
                    f"onnxruntime {precision} ({', '.join(providers)}, {threads} intra-op threads{extra})"), last


def bench_torch(setup: VisionSetup, dtype: str, frame: np.ndarray, threads: int, runs: int, warmup: int,
                progress=None) -> tuple[dict, dict]:
    """The reference code path (``ReferencePipeline.vision``): Pillow preprocessing, the model's own
    modules in eager mode, in ``dtype`` ('fp32' or 'bf16')."""
    import torch
    from PIL import Image

    from ..models.decoder import few_shot_map
    from ..models.preprocess import pil_preprocess
    torch.set_num_threads(threads)
    tdtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[dtype]
    with PeakRSS() as load:
        model = setup.model if dtype == 'fp32' else copy.deepcopy(setup.model).to(tdtype)
        feats = torch.from_numpy(setup.text_features).to(tdtype)
    per_run, fewshot = [], []
    with PeakRSS() as run, torch.inference_mode():
        for i in range(warmup + runs):
            t = [time.perf_counter()]
            x = pil_preprocess(Image.fromarray(frame), 'squash').to(tdtype)
            t.append(time.perf_counter())
            emb, taps = model.encode_image(x)
            token = model.image_token(emb)
            t.append(time.perf_counter())
            amap = model.anomaly_map(taps, feats)
            t.append(time.perf_counter())
            prompts = model.prompt_learner(amap)
            t.append(time.perf_counter())
            t0 = time.perf_counter()
            few_shot_map(taps, [tp[0] for tp in taps])
            t_fs = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                per_run.append({s: (t[k + 1] - t[k]) * 1e3 for k, s in enumerate(STAGES)})
                fewshot.append(t_fs)
            if progress is not None:
                progress.update(1)
    last = {'anomaly_map': amap.float().numpy(), 'prompts': prompts.float().numpy(),
            'image_token': token.float().numpy(), 'input': x.float().numpy()}
    if model is not setup.model:
        del model
    return _collect(per_run, fewshot, {'load': load.to_dict(), 'run': run.to_dict()},
                    f'torch {dtype} eager ({threads} threads)'), last


def agreement(ours: dict, reference: dict) -> dict:
    """Max abs error / cosine of our graphs' outputs against PyTorch FP32 on the same preprocessed
    frame (a sanity check that both sides computed the same thing, not a parity test)."""
    from ..runtime.compare import compare_arrays
    out = {}
    for name in ('anomaly_map', 'prompts', 'image_token'):
        c = compare_arrays(ours[name], reference[name], atol=0.0, name=name).to_dict()
        out[name] = {k: c[k] for k in ('max_abs', 'cosine') if k in c}
    return out
