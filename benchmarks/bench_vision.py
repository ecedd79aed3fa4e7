"""Vision half of the latency benchmark: preprocess -> encoder -> decoder -> prompt learner (and the
few-shot graph on its own), the exported ONNX graphs in ONNX Runtime beside the PyTorch reference
code (eager FP32 and bf16) on the same weights and the same camera frame."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bench_stats import PeakRSS, block_schedule, summarize

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
        def graph(c, p):  # INT8 is calibrated for the encoder only; the rest run FP32, as in Pipeline
            variants = bundle.manifest['components'].get(c, {})
            return bundle.path(bundle.component(c, p if p in variants or p != 'int8' else 'fp32')['file'])
        onnx = {p: {c: graph(c, p) for c in GRAPHS} for p in precisions}
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


class OrtChain:
    """The device path: OpenCV preprocessing and OrtRunner, as ``runtime.Pipeline`` runs them; one timed
    run per ``once(frame)`` (stage -> ms; the few-shot graph timed on its own, one normal reference)."""

    def __init__(self, setup: VisionSetup, precision: str, threads: int, **runner_options):
        from ..runtime.runners import OrtRunner
        self.feats = setup.text_features
        with PeakRSS() as self.load:
            self.r = {c: OrtRunner(p, providers=['CPUExecutionProvider'], intra_op_threads=threads, **runner_options)
                      for c, p in setup.onnx[precision].items()}
        extra = ''.join(f', {k}={v}' for k, v in runner_options.items())
        providers = next(iter(self.r.values())).providers
        self.backend = f"onnxruntime {precision} ({', '.join(providers)}, {threads} intra-op threads{extra})"

    def outputs(self, x: np.ndarray) -> dict:
        enc = self.r['encoder'].infer({'image': x})
        amap = self.r['decoder'].infer({'taps': enc['taps'], 'text_features': self.feats})['anomaly_map']
        prompts = self.r['prompt_learner'].infer({'anomaly_map': amap})['prompts']
        return {'anomaly_map': amap, 'prompts': prompts, 'image_token': enc['image_token'], 'input': x, 'taps': enc['taps']}

    def once(self, frame: np.ndarray) -> dict:
        from ..models import spec
        from ..runtime.preprocess import preprocess
        t = [time.perf_counter()]
        x = preprocess(frame, spec.CLIP_MEAN, spec.CLIP_STD, spec.IMAGE_SIZE, 'squash')
        t.append(time.perf_counter())
        enc = self.r['encoder'].infer({'image': x})
        t.append(time.perf_counter())
        amap = self.r['decoder'].infer({'taps': enc['taps'], 'text_features': self.feats})['anomaly_map']
        t.append(time.perf_counter())
        self.r['prompt_learner'].infer({'anomaly_map': amap})
        t.append(time.perf_counter())
        memory = np.ascontiguousarray(enc['taps'][0])  # one normal reference: [4, 256, C]
        t0 = time.perf_counter()
        self.r['fewshot'].infer({'taps': enc['taps'], 'memory': memory})
        out = {s: (t[k + 1] - t[k]) * 1e3 for k, s in enumerate(STAGES)}
        out['fewshot'] = (time.perf_counter() - t0) * 1e3
        return out

    def close(self) -> None:
        self.r = {}


class TorchChain:
    """The reference code path (``ReferencePipeline.vision``): Pillow preprocessing, the model's own
    modules in eager mode, in ``dtype`` ('fp32' or 'bf16')."""

    def __init__(self, setup: VisionSetup, dtype: str, threads: int):
        import torch
        self.torch, self.threads = torch, threads
        torch.set_num_threads(threads)
        self.tdtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[dtype]
        with PeakRSS() as self.load:
            self.model = setup.model if dtype == 'fp32' else copy.deepcopy(setup.model).to(self.tdtype)
            self.feats = torch.from_numpy(setup.text_features).to(self.tdtype)
        self.backend = f'torch {dtype} eager ({threads} threads)'

    def _x(self, frame):
        from PIL import Image

        from ..models.preprocess import pil_preprocess
        return pil_preprocess(Image.fromarray(frame), 'squash').to(self.tdtype)

    def outputs(self, frame: np.ndarray) -> dict:
        torch, model = self.torch, self.model
        with torch.inference_mode():
            x = self._x(frame)
            emb, taps = model.encode_image(x)
            amap = model.anomaly_map(taps, self.feats)
            prompts = model.prompt_learner(amap)
            token = model.image_token(emb)
        return {'anomaly_map': amap.float().numpy(), 'prompts': prompts.float().numpy(),
                'image_token': token.float().numpy(), 'input': x.float().numpy()}

    def once(self, frame: np.ndarray) -> dict:
        from ..models.decoder import few_shot_map
        torch, model = self.torch, self.model
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            t = [time.perf_counter()]
            x = self._x(frame)
            t.append(time.perf_counter())
            emb, taps = model.encode_image(x)
            model.image_token(emb)
            t.append(time.perf_counter())
            amap = model.anomaly_map(taps, self.feats)
            t.append(time.perf_counter())
            model.prompt_learner(amap)
            t.append(time.perf_counter())
            t0 = time.perf_counter()
            few_shot_map(taps, [tp[0] for tp in taps])
            out = {s: (t[k + 1] - t[k]) * 1e3 for k, s in enumerate(STAGES)}
            out['fewshot'] = (time.perf_counter() - t0) * 1e3
        return out

    def close(self) -> None:
        self.model = None


def measure(chains: dict, frame: np.ndarray, runs: int, warmup: int, progress=None, rounds: int = 1) -> dict:
    """Time every chain on the same frame in blocks over ``rounds`` rounds (``bench_stats.block_schedule``)
    -> {name: figures}. A chain's ``once`` may time only 'chain' (a compiled whole) instead of the stages."""
    per = {name: [] for name in chains}
    with PeakRSS() as run:
        for name, measured in block_schedule(list(chains), runs, warmup, rounds):
            t = chains[name].once(frame)
            if measured:
                per[name].append(t)
            if progress is not None:
                progress.update(1)
    out = {}
    for name, c in chains.items():
        runs_ = per[name]
        stages = {s: summarize([r[s] for r in runs_]) for s in runs_[0] if s != 'chain'}
        stages['chain'] = summarize([r['chain'] if 'chain' in r else sum(r[s] for s in STAGES) for r in runs_])
        out[name] = {'backend': c.backend, 'stages_ms': stages,
                     'rss_mb': {'load': c.load.to_dict(), 'run_all': run.to_dict()}, **getattr(c, 'extra', {})}
    return out


def _single(chain, frame, runs, warmup, progress) -> dict:
    res = measure({'c': chain}, frame, runs, warmup, progress)['c']
    res['rss_mb']['run'] = res['rss_mb'].pop('run_all')
    return res


def bench_onnxruntime(setup: VisionSetup, precision: str, frame: np.ndarray, threads: int, runs: int,
                      warmup: int, progress=None, check_input: np.ndarray | None = None,
                      **runner_options) -> tuple[dict, dict]:
    """``OrtChain`` timed on its own. Returns (figures, outputs); the outputs are those of ``check_input``
    when given (the baseline's preprocessed frame: OpenCV and Pillow resize differently, so only the
    same tensor compares), else of the frame as preprocessed here."""
    from ..models import spec
    from ..runtime.preprocess import preprocess
    chain = OrtChain(setup, precision, threads, **runner_options)
    res = _single(chain, frame, runs, warmup, progress)
    x = check_input if check_input is not None else preprocess(frame, spec.CLIP_MEAN, spec.CLIP_STD,
                                                               spec.IMAGE_SIZE, 'squash')
    last = chain.outputs(x)
    chain.close()
    return res, last


def bench_torch(setup: VisionSetup, dtype: str, frame: np.ndarray, threads: int, runs: int, warmup: int,
                progress=None) -> tuple[dict, dict]:
    """``TorchChain`` timed on its own; returns (figures, outputs on the frame)."""
    chain = TorchChain(setup, dtype, threads)
    res = _single(chain, frame, runs, warmup, progress)
    last = chain.outputs(frame)
    chain.close()
    return res, last


def agreement(ours: dict, reference: dict) -> dict:
    """Max abs error / cosine of our graphs' outputs against PyTorch FP32 on the same preprocessed
    frame (a sanity check that both sides computed the same thing, not a parity test)."""
    from ..runtime.compare import compare_arrays
    out = {}
    for name in ('anomaly_map', 'prompts', 'image_token'):
        c = compare_arrays(ours[name], reference[name], atol=0.0, name=name).to_dict()
        out[name] = {k: c[k] for k in ('max_abs', 'cosine') if k in c}
    return out
