"""GGUF writing with the ``gguf`` package, tensor by tensor.

Model-agnostic in the gguf-py manner: an architecture is a row of ``ARCHS`` (its gguf arch, the
HF tensor names to drop, and the tensors whose layout changes); the format writer itself knows
nothing of AnomalyGPT. Tensors are streamed: all tensor infos are declared first, then each
tensor is converted, written and released, so peak memory is about one tensor, not one model.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

log = logging.getLogger(__name__)

FTYPES = ('f32', 'f16')


class GGUFExportError(ValueError):
    """A model or tokenizer that cannot be written as GGUF; the message names the file or tensor."""
    exit_code = 2  # bad input (cli.exit_code)


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved rope rows: in each head the two halves of
    the head dimension are interleaved (row i of the first half, then row i of the second)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


# --------------------------------------------------------------------------------------------
# architecture table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaHParams:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    rms_eps: float
    rope_base: float
    context_length: int

    @classmethod
    def from_hf_config(cls, config) -> "LlamaHParams":
        """From a transformers ``LlamaConfig`` or a ``config.json`` dict (transformers 4 or 5 spelling)."""
        c = config if isinstance(config, Mapping) else config.to_dict()
        rope = c.get('rope_parameters') or {}
        theta = rope.get('rope_theta', c.get('rope_theta', 10000.0))
        return cls(n_vocab=c['vocab_size'], n_embd=c['hidden_size'], n_ff=c['intermediate_size'],
                   n_layer=c['num_hidden_layers'], n_head=c['num_attention_heads'],
                   n_head_kv=c.get('num_key_value_heads') or c['num_attention_heads'],
                   rms_eps=c['rms_norm_eps'], rope_base=float(theta),
                   context_length=c.get('max_position_embeddings', 2048))

    def add_to(self, w) -> None:
        w.add_context_length(self.context_length)
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(self.n_ff)
        w.add_block_count(self.n_layer)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(self.rms_eps)
        w.add_rope_freq_base(self.rope_base)
        w.add_rope_dimension_count(self.n_embd // self.n_head)
        w.add_vocab_size(self.n_vocab)


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: Any                                   # gguf.MODEL_ARCH member
    skip_suffixes: tuple[str, ...] = ()              # HF tensors that are not model weights
    # HF-name suffix -> function(array, hparams) giving the GGUF layout
    transforms: Mapping[str, Callable[[np.ndarray, Any], np.ndarray]] = field(default_factory=dict)


def _arch_table() -> dict[str, ArchSpec]:
    import gguf
    return {
        'llama': ArchSpec(
            gguf_arch=gguf.MODEL_ARCH.LLAMA,
            skip_suffixes=('.rotary_emb.inv_freq',),
            transforms={'.self_attn.q_proj.weight': lambda w, hp: permute_rope(w, hp.n_head),
                        '.self_attn.k_proj.weight': lambda w, hp: permute_rope(w, hp.n_head_kv)}),
    }


# --------------------------------------------------------------------------------------------
# SentencePiece vocabulary
# --------------------------------------------------------------------------------------------
@dataclass
class SpmVocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    special_ids: dict[str, int]          # bos/eos/unk/pad
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    source: Path

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def add_to(self, w) -> None:
        w.add_tokenizer_model('llama')
        w.add_tokenizer_pre('default')
        w.add_token_list(self.tokens)
        w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        for kind, tid in self.special_ids.items():
            getattr(w, f'add_{kind}_token_id')(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        w.add_add_space_prefix(self.add_space_prefix)
        w.add_remove_extra_whitespaces(self.remove_extra_whitespaces)


def _token_text(entry) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get('content')
    return entry if isinstance(entry, str) else None


def load_spm_vocab(tokenizer_dir, n_vocab: int | None = None) -> SpmVocab:
    """``tokenizer.model`` pieces (scores, types) + ``added_tokens.json``, special ids resolved from
    the tokenizer's own files (``special_tokens_map.json``, ``tokenizer_config.json``), padded with
    ``[PAD{i}]`` up to ``n_vocab`` if the model has more rows than the tokenizer has tokens."""
    import gguf
    d = Path(tokenizer_dir)
    sp_file = d / 'tokenizer.model'
    if not sp_file.is_file():
        raise GGUFExportError(f"{sp_file}: missing (a SentencePiece tokenizer.model is required)")
    try:
        spv = gguf.SentencePieceVocab(d)
    except (ValueError, RuntimeError, OSError) as e:
        raise GGUFExportError(f"{d}: cannot read the SentencePiece vocabulary ({e})") from None
    tokens, scores, types = [], [], []
    for text, score, ttype in spv.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(ttype))
    if n_vocab is not None:
        if len(tokens) > n_vocab:
            raise GGUFExportError(f"{d}: the tokenizer has {len(tokens)} tokens but the model only {n_vocab} rows")
        for i in range(len(tokens), n_vocab):
            log.warning("%s: padding the vocabulary with [PAD%d] to the model's %d rows", d, i, n_vocab)
            tokens.append(f'[PAD{i}]'.encode())
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))

    sp = spv.sentencepiece_tokenizer
    piece_ids = {t.decode('utf-8', 'replace'): i for i, t in enumerate(tokens)}
    declared: dict[str, str] = {}
    for fname in ('tokenizer_config.json', 'special_tokens_map.json'):  # the latter wins, as in HF
        f = d / fname
        if f.is_file():
            cfg = json.loads(f.read_text(encoding='utf-8'))
            for kind in ('bos', 'eos', 'unk', 'pad'):
                text = _token_text(cfg.get(f'{kind}_token'))
                if text is not None:
                    declared[kind] = text
    defaults = {'bos': sp.bos_id(), 'eos': sp.eos_id(), 'unk': sp.unk_id(), 'pad': sp.pad_id()}
    special: dict[str, int] = {}
    for kind in ('bos', 'eos', 'unk', 'pad'):
        text = declared.get(kind)
        if text is not None:
            if text not in piece_ids:
                raise GGUFExportError(f"{d}: {kind}_token {text!r} is not in the vocabulary")
            special[kind] = piece_ids[text]
        elif defaults[kind] >= 0:
            special[kind] = defaults[kind]
    if special.get('bos') != sp.bos_id():
        log.warning("%s: bos token resolves to id %s, not the SentencePiece <s> id %d; using the tokenizer files' "
                    "choice as the reference does", d, special.get('bos'), sp.bos_id())

    flags = gguf.SpecialVocab(d, load_merges=False, n_vocab=len(tokens)).add_special_token
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_file.read_bytes())
    vocab = SpmVocab(tokens=tokens, scores=scores, types=types, special_ids=special,
                     add_bos=flags.get('bos', True), add_eos=flags.get('eos', False),
                     add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
                     remove_extra_whitespaces=proto.normalizer_spec.remove_extra_whitespaces, source=d)
    log.info("%s: %d tokens (%d added), special ids %s, add_bos %s, add_space_prefix %s", d, vocab.n_vocab,
             len(spv.added_tokens_list), special, vocab.add_bos, vocab.add_space_prefix)
    return vocab


# --------------------------------------------------------------------------------------------
# the writer
# --------------------------------------------------------------------------------------------
def _to_numpy(t) -> np.ndarray:
    if hasattr(t, 'detach'):  # a torch tensor, without importing torch here
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, dtype=np.float32)


def write_gguf(path, arch: str, hparams, vocab: SpmVocab, shapes: Mapping[str, tuple],
               tensors: Iterable[tuple[str, Any]], ftype: str = 'f16', name: str | None = None) -> Path:
    """Write ``path`` atomically.

    ``shapes`` lists every HF tensor name with its shape, in the order ``tensors`` will yield
    ``(hf_name, array)``; each array is converted, written and dropped before the next is read.
    ``ftype`` 'f16' stores matrices as F16 and 1-D tensors (norms) as F32, as llama.cpp's converter does.
    """
    import gguf
    if ftype not in FTYPES:
        raise GGUFExportError(f"unknown GGUF output type {ftype!r}; choose one of {FTYPES}")
    try:
        spec = _arch_table()[arch]
    except KeyError:
        raise GGUFExportError(f"no GGUF mapping for architecture {arch!r}") from None
    if vocab.n_vocab != hparams.n_vocab:
        raise GGUFExportError(f"{vocab.source}: {vocab.n_vocab} tokens, but the model has {hparams.n_vocab} vocabulary rows")
    path = Path(path)
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, hparams.n_layer)

    plan: list[tuple[str, str, tuple, np.dtype]] = []  # hf name, gguf name, shape, stored dtype
    for hf_name, shape in shapes.items():
        if hf_name.endswith(spec.skip_suffixes):
            continue
        gname = name_map.get_name(hf_name, try_suffixes=('.weight', '.bias'))
        if gname is None:
            raise GGUFExportError(f"tensor {hf_name!r} {list(shape)} has no GGUF name for architecture {arch!r}")
        dtype = np.dtype(np.float16 if ftype == 'f16' and len(shape) > 1 else np.float32)
        plan.append((hf_name, gname, tuple(shape), dtype))

    tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[spec.gguf_arch])
    try:
        if name:
            w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == 'f16' else gguf.LlamaFileType.ALL_F32)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        hparams.add_to(w)
        vocab.add_to(w)
        for _, gname, shape, dtype in plan:
            w.add_tensor_info(gname, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()

        wanted = iter(plan)
        for hf_name, tensor in tensors:
            if hf_name.endswith(spec.skip_suffixes):
                continue
            exp_name, gname, shape, dtype = next(wanted, (None, None, None, None))
            if hf_name != exp_name:
                raise GGUFExportError(f"tensor stream out of order: got {hf_name!r}, expected {exp_name!r}")
            arr = _to_numpy(tensor)
            if arr.shape != shape:
                raise GGUFExportError(f"tensor {hf_name!r}: shape {list(arr.shape)}, declared {list(shape)}")
            for suffix, fn in spec.transforms.items():
                if hf_name.endswith(suffix):
                    arr = fn(arr, hparams)
            w.write_tensor_data(np.ascontiguousarray(arr.astype(dtype, copy=False)))
            del arr, tensor
        left = [p[0] for p in wanted]
        if left:
            raise GGUFExportError(f"tensor stream ended early; missing {left[:8]}")
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%s, %d tensors, %.1f MB)", path, ftype, len(plan), path.stat().st_size / 1e6)
    return path
