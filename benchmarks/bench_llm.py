"""LLM half of the latency benchmark: prefill of the AnomalyGPT prompt (tokens, 1 image embedding,
tokens, 18 prompt embeddings, question tokens) and greedy decode, for

- ours: ``LlamaSession`` fed segment by segment exactly as ``runtime.Pipeline`` feeds it;
- raw llama.cpp: a minimal loop on the low-level API with the same model and context settings
  (the whole prompt as one embedding batch, then one ``llama_decode`` per token);
- the baseline: HF transformers ``LlamaForCausalLM`` (FP32 and bf16, SDPA attention) fed
  ``inputs_embeds`` and decoding with its KV cache, as the reference's ``greedy_generate`` does.

At the Vicuna-7B width the LLM is built with a few layers and every figure is fitted as
t = a + b * layers, then extrapolated (and labelled so) to the real depth.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from .bench_stats import PeakRSS, block_schedule, summarize

EMBED_SCALE = 0.02  # the HF initializer range: random embeddings of the size token rows have
VERDICT_STEPS = 1   # the verdict is known once "Yes" is evaluated and the token after it chosen (not evaluated)


@dataclasses.dataclass
class Layout:
    """The prompt as segments: ('tokens', [ids]) or ('embeds', n)."""
    segments: list

    @property
    def n_positions(self) -> int:
        return sum(len(s[1]) if s[0] == 'tokens' else s[1] for s in self.segments)


def prompt_layout(tokenize, bos_id: int, question: str, positions: int | None = None) -> Layout:
    """The reference prompt (spec 6.1) tokenized by ``tokenize``. ``positions``: stretch or cut the
    question tokens so the whole prompt has exactly that many positions (used when the benchmark's
    tokenizer is not Vicuna's, whose counts the real prompt would have)."""
    from ..models import spec
    head = [bos_id] + tokenize(spec.PROMPT_START)
    mid = tokenize(spec.IMAGE_END)
    tail = tokenize(question + spec.ASSISTANT)
    fixed = len(head) + 1 + len(mid) + spec.N_PROMPTS
    if positions is not None:
        need = positions - fixed
        if need < 1:
            raise ValueError(f"--prompt-positions {positions} is shorter than the fixed part of the prompt ({fixed + 1})")
        tail = (tail * (need // len(tail) + 1))[:need]
    return Layout([('tokens', head), ('embeds', 1), ('tokens', mid), ('embeds', spec.N_PROMPTS), ('tokens', tail)])


def random_embeds(layout: Layout, n_embd: int, seed: int = 0) -> dict[int, np.ndarray]:
    """One seeded [n, n_embd] array per embedding segment (by segment index)."""
    rng = np.random.default_rng(seed)
    return {i: (rng.standard_normal((s[1], n_embd)) * EMBED_SCALE).astype(np.float32)
            for i, s in enumerate(layout.segments) if s[0] == 'embeds'}


# -- building the models -------------------------------------------------------------------------
def build_hf(llm_cfg, layers: int, seed: int = 0):
    """A seeded random ``LlamaForCausalLM`` of ``llm_cfg``'s width with ``layers`` layers, SDPA attention
    (PyTorch's fastest here; the reference's eager attention is only slower)."""
    from ..models.llm import build_llama
    model = build_llama(dataclasses.replace(llm_cfg, layers=layers), seed=seed)
    model.set_attn_implementation('sdpa')
    return model


def export_gguf(hf_model, tokenizer_dir, out_dir: Path, quants) -> dict[str, Path]:
    from ..export.llm_export import export_llm
    from ..export.quiet_logs import quiet_logs
    out_dir.mkdir(parents=True, exist_ok=True)
    # the GGUF writer warns once per padding token (31k of them for a small tokenizer at vocab 32001)
    with quiet_logs('anomalygpt_edge.export.gguf_writer', 'anomalygpt_edge.export.llm_export',
                'anomalygpt_edge.export.quantize'):
        section = export_llm(hf_model, tokenizer_dir, out_dir, quants=tuple(quants), name='bench-random-llama')
    return {q: out_dir / f for q, f in section['files'].items()}


def gguf_bytes(path) -> dict:
    """Bytes of all tensors in a GGUF file (what one decode step reads, token_embd included as the
    ceiling definition asks) and of the token-embedding table alone (of which a step reads one row)."""
    import gguf
    reader = gguf.GGUFReader(path)
    total = sum(int(t.n_bytes) for t in reader.tensors)
    embd = sum(int(t.n_bytes) for t in reader.tensors if t.name == 'token_embd.weight')
    return {'tensors': total, 'token_embd': embd, 'file': os.path.getsize(path)}


# -- ours: LlamaSession, as the Pipeline drives it ------------------------------------------------
def _decode_stats(prefill: list, steps: list[list[float]], answer_tokens: int) -> dict:
    per_token = [float(np.mean(s)) for s in steps]
    return {'prefill_ms': summarize(prefill),
            'decode_ms_per_token': summarize(per_token),
            'decode_tok_s': 1e3 / summarize(per_token)['median'],
            'verdict_ms': summarize([p + sum(s[:VERDICT_STEPS]) for p, s in zip(prefill, steps)]),
            'answer_ms': summarize([p + sum(s[:answer_tokens]) for p, s in zip(prefill, steps)]),
            'tokens_per_run': min(len(s) for s in steps)}


class SessionRun:
    """``LlamaSession`` as the Pipeline drives it, one timed run per ``once()`` (so several runners can
    be timed in turns, ``measure``).

    ``one_batch``: the prompt as one embedding batch (``LlamaSession.eval_segments``), else one call
    per segment; ``cached_prefix``: the first (constant) token segment is evaluated once and kept in the
    KV cache, as ``Pipeline`` keeps it across frames, so each run prefills the rest only;
    ``session_kwargs`` go to ``LlamaSession`` (repack, flash_attn, n_ubatch ...)."""

    def __init__(self, path, layout: Layout, threads: int, n_ctx: int = 2048, seed: int = 0, one_batch: bool = False,
                 cached_prefix: bool = False, **session_kwargs):
        from ..runtime.llama_session import LlamaSession
        self.path, self.one_batch = path, one_batch
        with PeakRSS() as self.load:
            self.s = LlamaSession(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, **session_kwargs)
        embeds = random_embeds(layout, self.s.n_embd, seed)
        self.segments = [seg if seg[0] == 'tokens' else ('embeds', embeds[k]) for k, seg in enumerate(layout.segments)]
        if one_batch:  # the runtime caches the rows of its constant prompt text
            self.s.token_embeddings(sorted({t for seg in layout.segments if seg[0] == 'tokens' for t in seg[1]}))
        self.keep = 0
        if cached_prefix:
            self.s.eval_segments(self.segments[:1])
            self.keep, self.segments = self.s.n_past, self.segments[1:]
        self.extra = {'prefill_batches': 1 if one_batch else len(layout.segments),
                      'settings': {'one_batch': one_batch, 'cached_prefix': self.keep, **session_kwargs}}

    def once(self, n_decode: int) -> tuple[float, list[float]]:
        s = self.s
        s.truncate(self.keep)
        t0 = time.perf_counter()
        s.eval_segments(self.segments, one_batch=self.one_batch)
        t1 = time.perf_counter()
        stamps = [t1]
        # no stop strings: random weights would stop anywhere; a fixed length is what is timed
        # (the first token comes from the prefill's logits; each later one costs one decode)
        s.generate(n_decode + 1, stop=(), on_token=lambda _i, _t: stamps.append(time.perf_counter()) and False)
        if len(stamps) < n_decode + 2:
            raise RuntimeError(f"{self.path}: generation ended after {len(stamps) - 1} tokens (EOS from random "
                               f"weights); rerun with another --seed")
        return (t1 - t0) * 1e3, list(np.diff(stamps[1:]) * 1e3)

    def close(self) -> None:
        self.s.close()


class RawRun:
    """Raw llama.cpp: the same model and context parameters as ``LlamaSession`` (no weight repacking,
    F16 KV, flash attention at llama.cpp's default), the prompt as ONE embedding batch, a bare decode
    loop on the low-level API."""

    def __init__(self, path, n_positions: int, threads: int, n_ctx: int = 2048, n_batch: int = 512, seed: int = 0,
                 max_decode: int = 64):
        from ..runtime import llama_cpp_api
        self.path, self.n_positions, self.max_decode = path, n_positions, max_decode
        L = self.L = llama_cpp_api.lib()
        with PeakRSS() as self.load:
            mp = L.llama_model_default_params()
            mp.use_extra_bufts = False
            self.model = L.llama_model_load_from_file(os.fsencode(str(path)), mp)
            if not self.model:
                raise RuntimeError(f"{path}: llama.cpp could not load the model")
            cp = L.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
            cp.n_threads = cp.n_threads_batch = threads
            cp.no_perf = True
            self.ctx = L.llama_init_from_model(self.model, cp)
        n_embd = L.llama_model_n_embd(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.mem = L.llama_get_memory(self.ctx)
        emb = self.emb = L.llama_batch_init(n_positions, n_embd, 1)
        tok = self.tok = L.llama_batch_init(1, 0, 1)
        x = (np.random.default_rng(seed).standard_normal((n_positions, n_embd)) * EMBED_SCALE).astype(np.float32)
        ctypes.memmove(emb.embd, x.ctypes.data, x.nbytes)
        for i in range(n_positions):
            emb.pos[i], emb.n_seq_id[i], emb.logits[i] = i, 1, 0
            emb.seq_id[i][0] = 0
        emb.logits[n_positions - 1] = 1
        emb.n_tokens = n_positions
        tok.n_seq_id[0], tok.logits[0], tok.n_tokens = 1, 1, 1
        tok.seq_id[0][0] = 0
        self.extra = {'prefill_batches': 1}

    def once(self, n_decode: int) -> tuple[float, list[float]]:
        L, tok = self.L, self.tok
        L.llama_memory_clear(self.mem, True)
        t0 = time.perf_counter()
        if L.llama_decode(self.ctx, self.emb) != 0:
            raise RuntimeError(f"{self.path}: llama_decode failed on the prompt")
        t1 = time.perf_counter()
        stamps = [t1]
        for k in range(n_decode):
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            tok.token[0] = int(np.argmax(logits))
            tok.pos[0] = self.n_positions + k
            if L.llama_decode(self.ctx, tok) != 0:
                raise RuntimeError(f"{self.path}: llama_decode failed at step {k}")
            stamps.append(time.perf_counter())
        return (t1 - t0) * 1e3, list(np.diff(stamps) * 1e3)

    def close(self) -> None:
        if self.ctx is None:
            return
        L = self.L
        L.llama_batch_free(self.emb)
        L.llama_batch_free(self.tok)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
        self.ctx = None


class HFRun:
    """The baseline: HF ``LlamaForCausalLM`` fed ``inputs_embeds``, decoding with its KV cache. ``model``
    is cast in place to ``dtype``. Prefill is one forward with all logits, as the reference calls it,
    or (``last_logits_only``, PyTorch at its best) with the last position's only; no detokenization
    per step (which the reference also pays)."""

    def __init__(self, model, dtype: str, layout: Layout, threads: int, seed: int = 0, last_logits_only: bool = False):
        self.keep = {'logits_to_keep': 1} if last_logits_only else {}
        import torch
        self.torch, self.threads = torch, threads
        torch.set_num_threads(threads)
        tdtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[dtype]
        with PeakRSS() as self.load:
            self.model = model.to(tdtype)
            extra = random_embeds(layout, model.config.hidden_size, seed)
            with torch.inference_mode():
                table = model.get_input_embeddings()
                parts = [table(torch.tensor([seg[1]])) if seg[0] == 'tokens' else torch.from_numpy(extra[k])[None].to(tdtype)
                         for k, seg in enumerate(layout.segments)]
                self.embeds = torch.cat(parts, dim=1)
        self.extra = {'prefill_batches': 1}

    def once(self, n_decode: int) -> tuple[float, list[float]]:
        torch, model = self.torch, self.model
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(inputs_embeds=self.embeds, use_cache=True, **self.keep)
            t1 = time.perf_counter()
            stamps = [t1]
            for _ in range(n_decode):
                nxt = out.logits[0, -1].argmax()
                out = model(input_ids=nxt.reshape(1, 1), past_key_values=out.past_key_values, use_cache=True)
                stamps.append(time.perf_counter())
        return (t1 - t0) * 1e3, list(np.diff(stamps) * 1e3)

    def close(self) -> None:
        self.model = self.embeds = None


def measure(runners: dict, runs: int, warmup: int, n_decode: int, answer_tokens: int, progress=None,
            rounds: int = 1) -> dict:
    """Time every runner in blocks over ``rounds`` rounds (``bench_stats.block_schedule``) -> {name: figures}."""
    times = {name: ([], []) for name in runners}
    with PeakRSS() as run:
        for name, measured in block_schedule(list(runners), runs, warmup, rounds):
            prefill, steps = runners[name].once(n_decode)
            if measured:
                times[name][0].append(prefill)
                times[name][1].append(steps)
            if progress is not None:
                progress.update(1)
    out = {}
    for name, r in runners.items():
        out[name] = _decode_stats(*times[name], answer_tokens)
        out[name]['rss_mb'] = {'load': r.load.to_dict(), 'run_all': run.to_dict()}
        out[name].update(r.extra)
    return out


def _single(runner, runs, warmup, n_decode, answer_tokens, progress) -> dict:
    try:
        res = measure({'r': runner}, runs, warmup, n_decode, answer_tokens, progress)['r']
    finally:
        runner.close()
    res['rss_mb']['run'] = res['rss_mb'].pop('run_all')
    return res


def bench_session(path, layout: Layout, threads: int, runs: int, warmup: int, n_decode: int,
                  answer_tokens: int, n_ctx: int = 2048, seed: int = 0, progress=None, **kwargs) -> dict:
    """``SessionRun`` timed on its own (see there for ``one_batch``, ``cached_prefix`` and the session options)."""
    return _single(SessionRun(path, layout, threads, n_ctx, seed, **kwargs), runs, warmup, n_decode, answer_tokens,
                   progress)


def bench_raw(path, n_positions: int, threads: int, runs: int, warmup: int, n_decode: int, answer_tokens: int,
              n_ctx: int = 2048, n_batch: int = 512, seed: int = 0, progress=None) -> dict:
    return _single(RawRun(path, n_positions, threads, n_ctx, n_batch, seed), runs, warmup, n_decode, answer_tokens,
                   progress)


def bench_hf(model, dtype: str, layout: Layout, threads: int, runs: int, warmup: int, n_decode: int,
             answer_tokens: int, seed: int = 0, progress=None) -> dict:
    return _single(HFRun(model, dtype, layout, threads, seed), runs, warmup, n_decode, answer_tokens, progress)
