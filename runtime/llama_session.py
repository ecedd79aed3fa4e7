"""The device-side LLM: one llama.cpp sequence fed token segments and embedding segments in order.

Built on llama-cpp-python's low-level ctypes API, because only ``llama_batch_init(n, n_embd, 1)``
carries input embeddings (the image token and the 18 prompt-learner vectors). Positions are
contiguous across segments; the KV cache is kept between calls, so a follow-up turn or a cached
constant prefix (``truncate``) costs no re-prefill.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import llama_cpp_api

GGUF_MAGIC = b'GGUF'
# KV cache element types (ggml_type): f16 is llama.cpp's default; q8_0 halves the cache (the V side
# needs flash attention); f32 is what ``exact`` uses
KV_TYPES = {'f32': 0, 'f16': 1, 'q8_0': 8, 'q4_0': 2}


class LlamaError(RuntimeError):
    """A GGUF file that cannot be loaded, or a llama.cpp call that failed; the message says which."""
    exit_code = 2  # bad input (cli.exit_code)


class ContextFullError(LlamaError):
    """What was to be evaluated does not fit the context; nothing of it was evaluated."""


class LlamaSession:
    def __init__(self, gguf_path, n_ctx: int = 2048, n_threads: int | None = None,
                 n_threads_batch: int | None = None, n_batch: int = 512, n_ubatch: int | None = None,
                 exact: bool = False, repack: bool = False, flash_attn: bool | None = None,
                 kv_type: str = 'f16', verbose: bool = False):
        """``exact``: F32 KV cache and flash attention off (parity with PyTorch to ~1e-5);
        ``repack``: llama.cpp's CPU weight repacking (faster decode, slower prefill, ~2x peak RSS);
        ``flash_attn``: None leaves llama.cpp's choice (auto); ``n_ubatch``: physical batch (default n_batch);
        ``kv_type``: the KV cache's element type (``KV_TYPES``; a quantized V cache turns flash attention
        on, which it requires)."""
        self.path = Path(gguf_path)
        self._model = self._ctx = None
        self._batches = []
        if kv_type not in KV_TYPES:
            raise LlamaError(f"unknown KV cache type {kv_type!r}; choose one of {sorted(KV_TYPES)}")
        if exact and kv_type not in ('f16', 'f32'):
            raise LlamaError(f"exact=True keeps an F32 KV cache; kv_type {kv_type!r} contradicts it")
        quantized_kv = kv_type not in ('f16', 'f32')
        if quantized_kv and flash_attn is False:
            raise LlamaError(f"a {kv_type} KV cache needs flash attention (llama.cpp quantizes the V cache only "
                             "with it); use flash_attn=None/True or kv_type='f16'")
        if not self.path.is_file():
            raise LlamaError(f"{self.path}: no such GGUF file")
        with open(self.path, 'rb') as f:
            if f.read(4) != GGUF_MAGIC:
                raise LlamaError(f"{self.path}: not a GGUF file (bad magic)")
        llama_cpp_api.set_verbose(verbose)
        L = self._L = llama_cpp_api.lib()

        mparams = L.llama_model_default_params()
        mparams.use_extra_bufts = bool(repack)
        llama_cpp_api.clear_errors()
        self._model = L.llama_model_load_from_file(os.fsencode(self.path), mparams)
        if not self._model:
            raise LlamaError(f"{self.path}: llama.cpp could not load the model (truncated, corrupt or "
                             f"unsupported GGUF): {llama_cpp_api.first_error() or 'llama.cpp logged no reason'}")
        threads = n_threads or max(1, os.cpu_count() or 1)
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_ubatch or n_batch, n_batch)
        cparams.n_threads = threads
        cparams.n_threads_batch = n_threads_batch or threads
        cparams.no_perf = True
        if flash_attn is not None:
            cparams.flash_attn_type = 1 if flash_attn else 0
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type]
        if quantized_kv:
            cparams.flash_attn_type = 1
        self.kv_type = 'f32' if exact else kv_type
        if exact:
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
            cparams.flash_attn_type = 0          # disabled
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            hint = (f"; a {kv_type} KV cache needs a head size divisible by 32 (its block), "
                    "kv_type='f16' always works") if quantized_kv else ''
            raise LlamaError(f"{self.path}: llama.cpp could not create a context (n_ctx={n_ctx}, n_batch={n_batch}, "
                             f"kv_type={self.kv_type}){hint}")
        self._vocab = L.llama_model_get_vocab(self._model)
        self._mem = L.llama_get_memory(self._ctx)
        self.n_ctx = L.llama_n_ctx(self._ctx)
        self.n_batch = L.llama_n_batch(self._ctx)  # llama.cpp lowers it to n_ctx; a larger decode aborts the process
        self._n_embd = L.llama_model_n_embd(self._model)
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._tok_batch = self._new_batch(0)
        self._emb_batch = self._new_batch(self._n_embd)
        self.n_past = 0
        self.history: list[int | None] = []
        self._has_logits = False
        self._pending: int | None = None  # the last generated token, chosen but not yet evaluated
        self._embd_table = None
        self._embd_rows: dict[int, np.ndarray] = {}
        self._one_batch_ok = True

    # -- facts of the model -----------------------------------------------------------------
    @property
    def n_embd(self) -> int:
        return self._n_embd

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def bos_id(self) -> int:
        return self._L.llama_vocab_bos(self._vocab)

    @property
    def eos_id(self) -> int:
        return self._L.llama_vocab_eos(self._vocab)

    # -- text ---------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS and without parsing special-token text; the SentencePiece
        space prefix is applied as llama.cpp applies it (to the start of the text)."""
        data = text.encode('utf-8')
        cap = len(data) + 8
        for _ in range(2):
            buf = (self._L.llama_token * cap)()
            n = self._L.llama_tokenize(self._vocab, data, len(data), buf, cap, False, False)
            if n >= 0:
                return list(buf[:n])
            cap = -n
        raise LlamaError(f"llama_tokenize failed on a {len(data)}-byte text")

    def detokenize(self, ids: Sequence[int]) -> str:
        if not ids:
            return ''
        arr = (self._L.llama_token * len(ids))(*ids)
        cap = 16 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = self._L.llama_detokenize(self._vocab, arr, len(ids), buf, cap, False, False)
            if n >= 0:
                return buf.raw[:n].decode('utf-8', 'replace')
            cap = -n
        raise LlamaError("llama_detokenize failed")

    # -- evaluation ---------------------------------------------------------------------------
    def _new_batch(self, embd: int):
        b = self._L.llama_batch_init(self.n_batch, embd, 1)
        self._batches.append(b)
        return b

    def _decode(self, batch, n: int) -> None:
        b = batch
        for i in range(n):
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.logits[n - 1] = 1
        b.n_tokens = n
        self._has_logits = False
        rc = self._L.llama_decode(self._ctx, b)
        if rc != 0:
            self._L.llama_memory_seq_rm(self._mem, 0, self.n_past, -1)  # leave nothing half-written
            if rc == 1:
                raise ContextFullError(f"context full: no KV cache slot for {n} positions at n_past {self.n_past} "
                                       f"(n_ctx {self.n_ctx})")
            raise LlamaError(f"llama_decode failed with code {rc} at n_past {self.n_past}")
        self.n_past += n
        self._has_logits = True

    def _check_room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise ContextFullError(f"context full: {self.n_past} positions used + {n} new > n_ctx {self.n_ctx} "
                                   f"(a larger context: n_ctx= when opening the session or pipeline, --n-ctx on the "
                                   f"command line)")

    def _flush(self) -> None:
        if self._pending is not None:
            token, self._pending = self._pending, None
            self.eval_tokens([token])

    def eval_tokens(self, ids: Sequence[int]) -> None:
        """Append token ids at ``n_past`` (split into ``n_batch``-sized batches); ``ContextFullError``, with none
        of them evaluated, when they do not fit ``n_ctx``."""
        self._flush()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._n_vocab]
        if bad:
            raise LlamaError(f"token ids out of range [0, {self._n_vocab}): {bad[:8]}")
        self._check_room(len(ids))
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            for i, t in enumerate(chunk):
                self._tok_batch.token[i] = t
            self._decode(self._tok_batch, len(chunk))
            self.history.extend(chunk)

    def eval_embeddings(self, embeds) -> None:
        """Append input embeddings ``[n, n_embd]`` (float32) at ``n_past``; ``ContextFullError`` as ``eval_tokens``."""
        self._flush()
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        if embeds.ndim == 1:
            embeds = embeds[None]
        if embeds.ndim != 2 or embeds.shape[1] != self._n_embd:
            raise LlamaError(f"embeddings must be [n, {self._n_embd}], got {list(embeds.shape)}")
        self._check_room(len(embeds))
        for start in range(0, len(embeds), self.n_batch):
            chunk = embeds[start:start + self.n_batch]
            ctypes.memmove(self._emb_batch.embd, chunk.ctypes.data, chunk.nbytes)
            self._decode(self._emb_batch, len(chunk))
            self.history.extend([None] * len(chunk))

    def eval_segments(self, segments, one_batch: bool = True) -> None:
        """Append a mixed prompt: ``('tokens', ids)`` and ``('embeds', array [n, n_embd])`` segments in order.

        ``one_batch`` sends it all as embeddings (token positions as rows of the model's own
        token-embedding table), so llama.cpp reads the weights once per ``n_batch`` positions instead of
        once per segment; the KV cache and logits are the same as token-by-segment evaluation (LLaMA
        looks tokens up in that table and scales nothing)."""
        segments = [(kind, list(v) if kind == 'tokens' else np.asarray(v, dtype=np.float32).reshape(-1, self._n_embd))
                    for kind, v in segments if len(v)]
        parts, history = [], []
        if one_batch and len(segments) > 1 and self._one_batch_ok:
            try:
                for kind, v in segments:
                    if kind == 'tokens':
                        parts.append(self.token_embeddings(v))
                        history.extend(int(i) for i in v)
                    else:
                        parts.append(v)
                        history.extend([None] * len(v))
            except LlamaError as e:  # a table this reader cannot dequantize: feed segment by segment instead
                import warnings
                warnings.warn(f"{e}; the prompt goes to llama.cpp segment by segment", RuntimeWarning, stacklevel=2)
                self._one_batch_ok, parts = False, []
        if not parts:
            for kind, v in segments:
                self.eval_tokens(v) if kind == 'tokens' else self.eval_embeddings(v)
            return
        self.eval_embeddings(np.concatenate(parts))
        self.history[len(self.history) - len(history):] = history

    def logits(self) -> np.ndarray:
        """``[n_vocab]`` float32 copy of the logits of the last position (after the last generated token)."""
        self._flush()
        if not self._has_logits:
            raise LlamaError("no logits: nothing has been evaluated since the session was opened, reset or truncated")
        ptr = self._L.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise LlamaError("llama.cpp returned no logits for the last position")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    def truncate(self, n: int) -> None:
        """Drop KV positions >= n (keep a cached prefix of n positions)."""
        if not 0 <= n <= self.n_past:
            raise LlamaError(f"cannot truncate to {n}: {self.n_past} positions are in the cache")
        self._pending = None
        if n == self.n_past:
            return
        if not self._L.llama_memory_seq_rm(self._mem, 0, n, -1):
            raise LlamaError(f"llama.cpp could not remove positions >= {n} from the KV cache")
        self.n_past = n
        del self.history[n:]
        self._has_logits = False

    def reset(self) -> None:
        self._L.llama_memory_clear(self._mem, True)
        self._pending = None
        self.n_past = 0
        self.history = []
        self._has_logits = False

    # -- generation ---------------------------------------------------------------------------
    def generate(self, max_new_tokens: int = 128, stop: Sequence[str] = ('##',),
                 on_token: Callable[[int, str], bool | None] | None = None) -> tuple[list[int], str]:
        """Greedy continuation of what is in the cache. Stops once the generated text contains a
        ``stop`` string, when ``on_token(id, text_so_far)`` returns True, at EOS (neither evaluated nor
        returned), after ``max_new_tokens``, or when the context is full: the next token would need the
        last one evaluated and there is no position left for it, so the answer is cut there and returned
        (no ``ContextFullError``). The last token returned is evaluated only when something
        asks for what follows it (``logits``, ``eval_*``, another ``generate``); until then ``n_past``
        and ``history`` do not count it, and ``truncate``/``reset`` drop it. So a verdict known from
        the token after "Yes" costs one decode step, not two. Returns (ids, raw generated text)."""
        ids: list[int] = []
        text = ''
        eos = self.eos_id
        for _ in range(max_new_tokens):
            if self._pending is not None and self.n_past + 1 > self.n_ctx:
                break
            nxt = int(np.argmax(self.logits()))  # evaluates the previous token first
            if nxt == eos:
                break
            ids.append(nxt)
            self._pending = nxt
            text = self.detokenize(ids)
            if any(s in text for s in stop):
                break
            if on_token is not None and on_token(nxt, text):
                break
        return ids, text

    # -- token-embedding rows (send a whole prompt as one embedding batch) ----------------------
    def token_embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """Rows of the model's token-embedding table, ``[len(ids), n_embd]`` float32, read (memory-mapped)
        from the same GGUF file and dequantized as llama.cpp's row lookup does; rows are cached, since
        a line camera asks the same prompt text every frame."""
        missing = sorted({int(i) for i in ids} - self._embd_rows.keys())
        if missing:
            bad = [i for i in missing if not 0 <= i < self._n_vocab]
            if bad:
                raise LlamaError(f"token ids out of range [0, {self._n_vocab}): {bad[:8]}")
            if self._embd_table is None:
                self._embd_table = self._open_embd_table()
            data, qtype = self._embd_table
            rows = np.asarray(data[np.asarray(missing, dtype=np.int64)])
            if rows.dtype not in (np.float32, np.float16):
                import gguf
                try:
                    rows = gguf.quants.dequantize(rows, qtype)
                except (NotImplementedError, ValueError, KeyError) as e:
                    raise LlamaError(f"{self.path}: cannot read token_embd.weight of type {getattr(qtype, 'name', qtype)} "
                                     f"({type(e).__name__}: {e})") from None
            rows = rows.astype(np.float32).reshape(len(missing), self._n_embd)
            self._embd_rows.update(zip(missing, rows))
        if not len(ids):
            return np.zeros((0, self._n_embd), np.float32)
        return np.stack([self._embd_rows[int(i)] for i in ids])

    def _open_embd_table(self):
        import gguf
        try:
            reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError) as e:
            raise LlamaError(f"{self.path}: cannot read the token-embedding table ({e})") from None
        t = next((t for t in reader.tensors if t.name == 'token_embd.weight'), None)
        if t is None:
            raise LlamaError(f"{self.path}: no token_embd.weight tensor")
        return t.data, t.tensor_type

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        L = getattr(self, '_L', None)
        if L is None:
            return
        for b in self._batches:
            L.llama_batch_free(b)
        self._batches = []
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
