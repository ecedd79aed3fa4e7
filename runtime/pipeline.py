"""The device-side pipeline: image -> encoder -> decoder or few-shot -> prompt learner -> LLM -> Result.

Torch-free. Everything the device needs (shapes, prompt strings, class descriptions, location
words) comes from the bundle's manifest.
"""
from __future__ import annotations

import os
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .answers import parse_verdict, region_words, regions, verdict_known
from .bundle import Bundle, BundleError
from .preprocess import decode_image, load_image, preprocess, to_rgb8
from .runners import RunnerError


@dataclass
class Result:
    image: str
    class_name: str
    score: float                          # max of the anomaly map (the image-level score)
    anomaly_map: np.ndarray = field(repr=False)   # [224,224] float32
    locations: list[str]                  # 3x3 words of the map's hot regions, largest first
    verdict: str | None                   # 'yes' | 'no' | 'unclear'; None without the LLM
    answer: str | None
    answer_ids: list[int] = field(default_factory=list, repr=False)
    timings_ms: dict[str, float] = field(default_factory=dict)
    original_size: tuple[int, int] | None = None   # (height, width) of the input image
    few_shot: bool = False
    verdict_source: str | None = None     # 'llm', or 'threshold' (LLM-free: score vs a calibrated threshold)
    threshold: float | None = None        # the class's calibrated score threshold, when it has one
    map_verdict: str | None = None        # 'yes'/'no' from score vs threshold, known before the LLM runs
                                          # (the two-speed verdict; never the LLM's)
    token_grid: int | None = None         # the patch grid the map was upsampled from (runtime.map_geometry)
    regions: list[dict] = field(default_factory=list)   # the hot regions behind ``locations``: word, centroid,
                                          # box, area (fractions of the image), peak (answers.regions)

    def map_at_original(self) -> np.ndarray:
        """The map resized to the input image's size (squash mode inverts exactly this way), each pixel read
        where the map shows that place of the image (``map_geometry``)."""
        from .map_geometry import map_at_size
        if self.original_size is None:
            return self.anomaly_map
        h, w = self.original_size
        return map_at_size(self.anomaly_map, h, w, self.token_grid)

    def to_dict(self, include_map: bool = False) -> dict:
        d = {'image': self.image, 'class': self.class_name, 'verdict': self.verdict, 'answer': self.answer,
             'score': round(self.score, 6), 'locations': self.locations, 'few_shot': self.few_shot,
             'timings_ms': {k: round(v, 3) for k, v in self.timings_ms.items()}}
        if self.verdict_source is not None:
            d['verdict_source'] = self.verdict_source
        if self.threshold is not None:
            d['threshold'] = round(self.threshold, 6)
        if self.map_verdict is not None:
            d['map_verdict'] = self.map_verdict
        d['regions'] = [{k: [round(b, 4) for b in v] if k == 'box' else round(v, 4) if isinstance(v, float) else v
                         for k, v in r.items()} for r in self.regions]
        if include_map:
            d['anomaly_map'] = self.anomaly_map.tolist()
        return d


PREFILL_MODES = ('one-batch', 'segments')
# the AnomalyGPT prompt (~100 positions with Vicuna's tokenizer) and a 128-token answer fit in 256, the
# smallest context llama.cpp opens; a longer prompt raises LlamaError 'context full ... n_ctx' naming the
# size, a longer answer is cut where the context ends (the KV cache is written whole: 512 positions cost
# 128 MiB more at Vicuna-7B). chat asks for more
DEFAULT_N_CTX = 256


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + (time.perf_counter() - self.t0) * 1e3


class Pipeline:
    """``Pipeline.from_bundle(path).inspect(image, class_name=...)``.

    One pipeline may serve several threads: the vision graphs run side by side, the LLM (one llama.cpp context
    and its KV cache) one call at a time. After ``close()`` (or the ``with`` block) it refuses to run."""

    def __init__(self, bundle: Bundle, precision: str = 'auto', backend: str = 'onnxruntime',
                 llm: bool = True, quant: str | None = None, threads: int | None = None, n_ctx: int = DEFAULT_N_CTX,
                 exact_llm: bool = False, resize_mode: str | None = None, max_new_tokens: int = 128,
                 prefill: str = 'one-batch', repack: bool = False, kv_type: str = 'f16'):
        """``precision``: 'auto' takes the fastest the bundle offers for the backend (see ``resolve_precision``);
        ``prefill``: 'one-batch' sends each prompt to llama.cpp as one embedding batch (token rows from
        the GGUF's own table), 'segments' as one call per token/embedding segment (benchmarks/README:
        one batch is faster, same answers); ``repack``: llama.cpp's CPU weight repacking; ``kv_type``: the KV
        cache's type ('q8_0' halves it; ``LlamaSession``)."""
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {PREFILL_MODES}, not {prefill!r}")
        for name, value in (('threads', threads), ('n_ctx', n_ctx), ('max_new_tokens', max_new_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        self.closed = False
        self._llm_lock = threading.Lock()
        self.one_batch_prefill = prefill == 'one-batch'
        self.bundle = bundle
        m = bundle.manifest
        self.pre = m['preprocess']
        self.resize_mode = resize_mode or self.pre['resize']
        self.prompt = m['prompt']
        vision = m['model']['config']['vision']
        self.token_grid = vision['image_size'] // vision['patch']   # the patch grid the anomaly map is upsampled from
        self.classes = m.get('classes', {})
        self.default_class = m.get('default_class', 'object')
        self.text_features = np.load(bundle.path(m['text_features']['file']))
        self.max_new_tokens = max_new_tokens
        self.backend = backend
        self.precision = precision = self.resolve_precision(precision, backend)
        self.thresholds = m.get('thresholds', {})
        self.runners = {name: self._runner(name, precision, backend, threads)
                        for name in ('encoder', 'decoder', 'fewshot', 'prompt_learner') if name in m['components']}
        self.session = None
        self._kv_keys: list = []  # what occupies each KV position: token id, or (kind, image key, i)
        if llm:
            self.session = self._llm_session(quant, threads, n_ctx, exact_llm, repack, kv_type)

    @classmethod
    def from_bundle(cls, path, verify_hashes: bool = False, **kwargs) -> "Pipeline":
        """The pipeline of the bundle directory ``path`` (``verify_hashes``: every file's sha256 checked first, else
        only sizes); ``kwargs`` as ``Pipeline(...)``."""
        return cls(Bundle.open(path, verify_hashes=verify_hashes), **kwargs)

    # -- construction -------------------------------------------------------------------------
    def resolve_precision(self, precision: str, backend: str) -> str:
        """'auto' -> on TensorRT, the first of int8/fp16/fp32 whose engines match this GPU; on ONNX
        Runtime, 'int8' when the bundle has an INT8 graph (``calibrate int8`` adds an encoder or prompt
        learner one only after it passed the accuracy gate; the encoder 3.4x its FP32 speed on the VNNI
        CPU of benchmarks/README.md, the prompt learner a quarter of its memory): each graph then runs
        INT8 when it has it, FP32 otherwise. Else 'fp32'. Any other value is returned as given (an explicit
        'int8' on ONNX Runtime needs an INT8 graph of at least one component: ``_runner`` refuses it otherwise)."""
        if precision != 'auto':
            return precision
        if backend in ('tensorrt', 'auto'):
            from .engines import tensorrt_usable
            usable = next((p for p in ('int8', 'fp16', 'fp32') if tensorrt_usable(self.bundle, p)), None)
            if usable or backend == 'tensorrt':
                return usable or 'fp16'  # none built: the TensorRT runner then says which engines to build
        return 'int8' if any('int8' in v for v in self.bundle.manifest['components'].values()) else 'fp32'

    def _runner(self, name, precision, backend, threads):
        if backend == 'auto':
            from .engines import tensorrt_usable
            backend = 'tensorrt' if tensorrt_usable(self.bundle, precision) else 'onnxruntime'
        if backend == 'tensorrt':
            from .engines import device_info, engine_for
            from .tensorrt_runner import TrtRunner
            try:
                device = device_info()
            except ModuleNotFoundError as e:  # the CLI's exit code 3 (a missing optional dependency) needs e.name
                raise ModuleNotFoundError(f"backend 'tensorrt' needs the {e.name} package (TensorRT's Python bindings "
                                          "and pycuda; see docs/tensorrt.md), or use backend 'onnxruntime'",
                                          name=e.name) from None
            return TrtRunner(engine_for(self.bundle, name, precision, device), name=f'tensorrt:{name}')
        if backend != 'onnxruntime':
            raise BundleError(f"unknown backend {backend!r} (choose onnxruntime, tensorrt or auto)")
        components = self.bundle.manifest['components']
        variants = components.get(name, {})
        if precision == 'int8' and 'int8' not in variants:
            if not any('int8' in v for v in components.values()):
                raise BundleError(f"{self.bundle.root}: precision 'int8', but no component of the bundle has an INT8 "
                                  "graph (`anomalygpt-edge calibrate int8` makes one); use fp32 or auto")
            precision = 'fp32'  # INT8 is calibrated for the heavy graphs only; the rest run FP32
        entry = self.bundle.component(name, precision)
        path = self.bundle.path(entry['file'])
        from .engines import ort_gpu_providers
        from .runners import OrtRunner, available_providers
        providers = ort_gpu_providers(self.bundle, name, precision, available_providers())
        return OrtRunner(path, providers=providers, intra_op_threads=threads)

    def _llm_session(self, quant, threads, n_ctx, exact, repack, kv_type='f16'):
        llm = self.bundle.llm
        if not llm:
            raise BundleError(f"{self.bundle.root}: the bundle has no LLM (run with llm=False / --no-llm)")
        quant = quant or llm['default']
        if quant not in llm['files']:
            raise BundleError(f"{self.bundle.root}: no {quant!r} GGUF in the bundle (it has {sorted(llm['files'])})")
        from .llama_session import LlamaSession
        return LlamaSession(self.bundle.path(llm['files'][quant]), n_ctx=n_ctx, n_threads=threads,
                            n_threads_batch=threads, exact=exact, repack=repack, kv_type=kv_type)

    def close(self):
        """Frees the LLM; the pipeline refuses to run afterwards."""
        self.closed = True
        if self.session is not None:
            with self._llm_lock:
                self.session.close()
                self.session = None

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the pipeline is closed (used after close() or its with block)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- inputs -------------------------------------------------------------------------------
    def load(self, image, mode: str | None = None) -> tuple[np.ndarray, str, tuple[int, int]]:
        """Path, encoded bytes, or an array (RGB [H,W,3], grey [H,W] or [H,W,1], RGBA; 8- or 16-bit: ``to_rgb8``)
        -> ([1,3,224,224], name, (h, w))."""
        if isinstance(image, (str, os.PathLike)):
            rgb, name = load_image(image), os.fspath(image)
        elif isinstance(image, (bytes, bytearray)):
            rgb, name = decode_image(bytes(image)), '<bytes>'
        else:
            rgb, name = to_rgb8(image), '<array>'
        x = preprocess(rgb, self.pre['mean'], self.pre['std'], self.pre['size'], mode or self.resize_mode)
        return x, name, rgb.shape[:2]

    def resolve_class(self, class_name: str | None, describe: str | None) -> str:
        """An explicit class, else the reference's first-substring match over the bundle's classes (in the
        manifest's order, the reference's classes first: a description of 'wood grain' names 'wood'; give the
        class to be sure). KeyError for an unknown class."""
        if class_name is not None:
            key = class_name.replace('_', ' ')
            if key not in self.classes:
                raise KeyError(f"unknown class {class_name!r}; the bundle has: {', '.join(self.classes)}")
            return key
        text = describe or ''
        return next((name for name in self.classes if name in text), self.default_class)

    def question(self, class_name: str, describe: str | None, question: str | None) -> str:
        if question is not None:
            return question
        desc = describe if describe is not None else (self.classes.get(class_name) or {}).get('description')
        return f"{desc} {self.prompt['question']}" if desc else self.prompt['question']

    # -- vision -------------------------------------------------------------------------------
    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.runners['encoder'].infer({'image': x})
        return out['image_token'], out['taps']

    def memory(self, references, mode: str = 'center_crop') -> np.ndarray:
        """Normal memory [4, k*256, C] from reference images (the reference encodes them centre-cropped)."""
        if isinstance(references, (str, bytes, os.PathLike)):
            references = [references]   # one image, not a sequence of characters
        refs = [r if isinstance(r, np.ndarray) and r.ndim == 4 else self.load(r, mode)[0] for r in references]
        if not refs:
            raise ValueError("few-shot needs at least one normal reference image")
        taps = np.concatenate([self.encode(x)[1] for x in refs])       # [k,4,256,C]
        return np.ascontiguousarray(taps.transpose(1, 0, 2, 3).reshape(taps.shape[1], -1, taps.shape[3]))

    @staticmethod
    def save_memory(path, memory: np.ndarray, class_name: str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + '.partial.npz')
        np.savez(tmp, memory=memory, class_name=class_name)
        os.replace(tmp, path)

    @staticmethod
    def load_memory(path) -> tuple[np.ndarray, str]:
        """-> (memory, its class) from a file ``save_memory`` wrote."""
        not_memory = BundleError(f"{path}: not a saved few-shot memory (the .npz that --save-memory writes)")
        try:
            z = np.load(path)
        except OSError as e:
            raise BundleError(f"{path}: cannot be read ({e.strerror or e})") from None
        except (ValueError, EOFError, zipfile.BadZipFile):
            raise not_memory from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise not_memory
        with z:
            try:
                return z['memory'], str(z['class_name'])
            except (KeyError, ValueError, OSError, zipfile.BadZipFile):
                raise not_memory from None

    @staticmethod
    def check_memory(memory) -> np.ndarray:
        """A few-shot memory as ``memory()`` or ``load_memory`` gives it, [4, M, C] float32 with M > 0 and every
        value finite (an empty or NaN memory makes a NaN map, and NaN prompts would spoil the LLM's cache);
        ValueError naming the problem."""
        memory = np.asarray(memory, dtype=np.float32)
        if memory.ndim != 3 or memory.shape[1] == 0:
            raise ValueError(f"a few-shot memory is [4, M, C] with M > 0 rows, got {list(memory.shape)}")
        if not np.isfinite(memory).all():
            raise ValueError("the few-shot memory has non-finite values (NaN or inf)")
        return memory

    def vision(self, x: np.ndarray, class_name: str, memory: np.ndarray | None = None, timings=None):
        """-> (image_token [B,1,D], anomaly map [B,1,224,224], prompts [B,18,D])."""
        self._check_open()
        timings = {} if timings is None else timings
        if memory is not None:
            memory = self.check_memory(memory)
        with _Timer(timings, 'encoder'):
            token, taps = self.encode(x)
        with _Timer(timings, 'decoder'):
            if memory is not None:
                amap = self.runners['fewshot'].infer({'taps': taps, 'memory': memory})['anomaly_map']
            else:
                feats = self.text_features[self.classes[class_name]['row']]
                amap = self.runners['decoder'].infer({'taps': taps, 'text_features': feats})['anomaly_map']
        with _Timer(timings, 'prompt_learner'):
            prompts = self.runners['prompt_learner'].infer({'anomaly_map': amap})['prompts']
        return token, amap, prompts

    # -- LLM ----------------------------------------------------------------------------------
    def prompt_text(self, question: str, history=()) -> str:
        p = self.prompt
        parts = [(p['history_first'] if i == 0 else p['history_next']).format(q=q, a=a) for i, (q, a) in enumerate(history)]
        parts.append(p['turn_next'].format(q=question) if history else question)
        return ''.join(parts)

    def _feed(self, segments) -> None:
        """Bring the KV cache to the given segments, reusing the longest matching prefix already there.

        segments: list of ('tokens', [ids]) or ('embeds', array [n,D], key). Embedding positions match
        only when their key (the image's identity) is the same."""
        s = self.session
        wanted: list = []
        for seg in segments:
            if seg[0] == 'tokens':
                wanted += list(seg[1])
            else:
                wanted += [('embed', seg[2], i) for i in range(len(seg[1]))]
        have = self._kv_keys
        common = 0
        for a, b in zip(have, wanted):
            if a != b:
                break
            common += 1
        if common == len(wanted) and common > 0:
            common -= 1  # re-evaluate the last position so its logits are current
        s.truncate(common)
        self._kv_keys = have[:common]
        pos, todo = 0, []
        for seg in segments:
            n = len(seg[1])
            lo = max(common - pos, 0)
            if lo < n:
                todo.append((seg[0], seg[1][lo:]))
            pos += n
        try:
            s.eval_segments(todo, one_batch=self.one_batch_prefill)
        except Exception:
            s.reset()  # the cache no longer matches any known prompt: start clean next time
            self._kv_keys = []
            raise
        self._kv_keys = wanted

    def llm_segments(self, token: np.ndarray, prompts: np.ndarray, prompt_text: str, key) -> list:
        self._check_open()
        s, p = self.session, self.prompt
        return [('tokens', [s.bos_id] + s.tokenize(p['start'])),
                ('embeds', token.reshape(-1, token.shape[-1]), ('img', key)),
                ('tokens', s.tokenize(p['image_end'])),
                ('embeds', prompts.reshape(-1, prompts.shape[-1]), ('pl', key)),
                ('tokens', s.tokenize(prompt_text + p['assistant']))]

    def answer(self, segments, verdict_first: bool = False, timings=None):
        """(answer ids, answer text) for ``llm_segments``; one call at a time per pipeline."""
        if any(seg[0] == 'embeds' and not np.isfinite(seg[1]).all() for seg in segments):
            raise RunnerError("the vision graphs gave non-finite embeddings (NaN or inf); nothing was given to the LLM")
        with self._llm_lock:
            self._check_open()
            if self.session is None:
                raise BundleError("this needs the LLM; the pipeline was built without it (llm=False)")
            return self._answer(segments, verdict_first, timings)

    def _answer(self, segments, verdict_first: bool, timings):
        timings = {} if timings is None else timings
        with _Timer(timings, 'llm_prefill'):
            self._feed(segments)
        t0 = time.perf_counter()
        first = {}

        def on_token(_id, text):
            if 'verdict' not in first and verdict_known(text):
                first['verdict'] = (time.perf_counter() - t0) * 1e3
                return verdict_first
            return False
        ids, raw = self.session.generate(self.max_new_tokens, stop=tuple(self.prompt['stop']), on_token=on_token)
        timings['llm_generate'] = (time.perf_counter() - t0) * 1e3
        if 'verdict' in first:
            timings['time_to_verdict'] = timings['llm_prefill'] + first['verdict']
        self._kv_keys = (self._kv_keys + list(ids))[:self.session.n_past]
        cut = min((raw.find(st) for st in self.prompt['stop'] if st in raw), default=-1)
        text = (raw if cut < 0 else raw[:cut]).rstrip('\n').strip()
        return ids, text

    def threshold_for(self, class_name: str, memory: np.ndarray | None = None) -> float | None:
        """The calibrated score threshold (``calibrate threshold``) of this class and mode, if any."""
        if memory is None:
            mode = 'zero-shot'
        else:
            taps = next(o for o in self.bundle.component('encoder', 'fp32')['outputs'] if o['name'] == 'taps')
            mode = f"{np.shape(memory)[1] // taps['shape'][2]}-shot"
        entry = (self.thresholds.get(class_name) or {}).get(mode)
        return None if entry is None else float(entry['score'])

    # -- the main job -------------------------------------------------------------------------
    def inspect(self, image, class_name: str | None = None, describe: str | None = None, question: str | None = None,
                references=None, memory: np.ndarray | None = None, llm: bool = True, verdict_first: bool = False,
                threshold: float = 0.5, label: str | None = None) -> Result:
        """The main job: ``image`` (a path, encoded bytes or an array, as ``load`` takes them) -> Result.

        ``class_name`` (else the class named in ``describe``/``question``, see ``resolve_class``) picks the text
        features of the zero-shot map; ``references`` (normal images) or ``memory`` (``memory()``/``load_memory``)
        make it few-shot. ``llm=False``: the map, score and regions only (a verdict only from a calibrated
        threshold); ``verdict_first``: generation stops once Yes/No is known (the answer is then cut there).
        ``threshold``: the map level in (0, 1] above which regions are reported (not the verdict's threshold).
        ``label``: what the result calls the image (e.g. a frame id; default: the path, '<bytes>' or '<array>').
        ImageError for a bad image, KeyError for an unknown class, ValueError for a threshold out of range."""
        self._check_open()
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold is a map level in (0, 1], not {threshold}")
        timings: dict[str, float] = {}
        t_all = time.perf_counter()
        with _Timer(timings, 'preprocess'):
            x, name, size = self.load(image)
        cls = self.resolve_class(class_name, ' '.join(t for t in (describe, question) if t))
        if references is not None and memory is None:
            with _Timer(timings, 'memory'):
                memory = self.memory(references)
        token, amap, prompts = self.vision(x, cls, memory, timings)   # checks the memory
        m = amap[0, 0]
        verdict = answer = source = map_verdict = None
        score_threshold = self.threshold_for(cls, memory)
        if score_threshold is not None:
            map_verdict = 'yes' if float(m.max()) > score_threshold else 'no'
            timings['map_verdict'] = (time.perf_counter() - t_all) * 1e3
        ids: list[int] = []
        if llm and self.session is not None:
            q = self.question(cls, describe, question)
            ids, answer = self.answer(self.llm_segments(token, prompts, self.prompt_text(q), object()),
                                      verdict_first, timings)
            verdict, source = parse_verdict(answer), 'llm'
        elif map_verdict is not None:
            verdict, source = map_verdict, 'threshold'
        timings['total'] = (time.perf_counter() - t_all) * 1e3
        found = regions(m, self.prompt['location_words'], threshold, grid=self.token_grid)
        return Result(image=name if label is None else label, class_name=cls, score=float(m.max()), anomaly_map=m,
                      regions=found, locations=region_words(found), verdict=verdict, answer=answer, answer_ids=ids,
                      timings_ms=timings, original_size=tuple(size),
                      few_shot=memory is not None, verdict_source=source, threshold=score_threshold,
                      map_verdict=map_verdict, token_grid=self.token_grid)

    def chat(self, image, **kwargs) -> "Chat":
        """A multi-turn ``Chat`` about ``image`` (``class_name``, ``describe``, ``references``, ``memory`` as for
        ``inspect``); the whole conversation must fit ``n_ctx``."""
        return Chat(self, image, **kwargs)


class Chat:
    """Multi-turn chat about one image. Each turn keeps the KV cache: only the new text is prefilled
    (the prompt is the reference's full history format, so answers equal a full re-prefill)."""

    def __init__(self, pipeline: Pipeline, image, class_name=None, describe=None, references=None, memory=None):
        pipeline._check_open()
        if pipeline.session is None:
            raise BundleError("chat needs the LLM; the pipeline was built without it")
        self.p = pipeline
        x, self.name, _ = pipeline.load(image)
        self.class_name = pipeline.resolve_class(class_name, describe)
        if references is not None and memory is None:
            memory = pipeline.memory(references)
        self.token, self.amap, self.prompts = pipeline.vision(x, self.class_name, memory)
        self.key = object()
        self.history: list[tuple[str, str]] = []
        self.describe = describe

    @property
    def score(self) -> float:
        return float(self.amap.max())

    def ask(self, question: str | None = None) -> str:
        """The answer to ``question`` (None: the default anomaly question) after the turns so far."""
        if question is None:
            question = self.p.question(self.class_name, self.describe, None)
        text = self.p.prompt_text(question, self.history)
        _, answer = self.p.answer(self.p.llm_segments(self.token, self.prompts, text, self.key))
        self.history.append((question, answer))
        return answer
