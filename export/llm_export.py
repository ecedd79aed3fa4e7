"""The LLM half of a bundle: LoRA merged into Vicuna, written as GGUF, quantized by llama.cpp.

Two entry points return the manifest's ``llm`` section:
  ``export_llm(model, tokenizer_dir, out_dir)``                from an in-memory (PEFT-wrapped) HF model;
  ``export_llm_released(vicuna_dir, pandagpt_delta, out_dir)`` from the released files, streaming
                                                               tensor by tensor from the weight files.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..models.llm import LORA_TARGETS
from ..models.loaders import CheckpointError, check_keys, check_vicuna_dir, normalise_lora_key, read_state_dict
from .gguf_writer import LlamaHParams, load_spm_vocab, write_gguf
from .lora_merge import LoraError, check_lora, iter_merged, iter_merged_peft, merged_shapes, split_lora_state
from .quantize import ftype_of, quantize_gguf

logger = logging.getLogger(__name__)

ARCH = 'llama'


def llm_file(quant: str) -> str:
    return f'llm-{quant}.gguf'


def _write_all(shapes: dict, tensors: Callable[[], Iterator], hparams: LlamaHParams, tokenizer_dir, out_dir,
               quants: Sequence[str], default: str | None, name: str, log: Callable[[str], None]) -> dict:
    quants = [q.lower() for q in quants]
    if not quants:
        raise ValueError("export_llm: no quantization types asked for")
    for q in quants:
        ftype_of(q)  # unknown names fail before any work
    default = (default or quants[0]).lower()
    if default not in quants:
        raise ValueError(f"default LLM file {default!r} is not among the exported types {quants}")
    vocab = load_spm_vocab(tokenizer_dir, n_vocab=hparams.n_vocab)
    log(f"LLM tokenizer {tokenizer_dir}: bos {vocab.special_ids.get('bos')}, eos {vocab.special_ids.get('eos')}, "
        f"unk {vocab.special_ids.get('unk')}, pad {vocab.special_ids.get('pad')}, {vocab.n_vocab} tokens")
    out_dir = Path(out_dir)
    base = 'f32' if 'f32' in quants else 'f16'
    base_path = out_dir / (llm_file(base) if base in quants else f'.llm-{base}.base.gguf')
    files = {}
    try:
        log(f"writing {base_path.name} ({len(shapes)} tensors)")
        write_gguf(base_path, ARCH, hparams, vocab, shapes, tensors(), ftype=base, name=name)
        if base in quants:
            files[base] = base_path.name
        for q in quants:
            if q == base:
                continue
            log(f"quantizing {llm_file(q)}")
            quantize_gguf(base_path, out_dir / llm_file(q), q)
            files[q] = llm_file(q)
    finally:
        if base not in quants:
            base_path.unlink(missing_ok=True)
    return {'files': {q: files[q] for q in quants}, 'default': default, 'arch': ARCH,
            'n_embd': hparams.n_embd, 'n_vocab': hparams.n_vocab, 'n_layer': hparams.n_layer,
            'bos_id': vocab.special_ids['bos'], 'eos_id': vocab.special_ids['eos'],
            'add_space_prefix': vocab.add_space_prefix, 'context_length': hparams.context_length}


def export_llm(model, tokenizer_dir, out_dir, quants: Sequence[str] = ('f16', 'q8_0'), default: str | None = None,
               name: str = 'vicuna-v0-pandagpt-merged', log: Callable[[str], None] | None = None) -> dict:
    """A PEFT-wrapped LLaMA (``AnomalyGPT.llama_model``) or a plain ``LlamaForCausalLM`` ->
    ``out_dir/llm-<quant>.gguf`` for each of ``quants``; returns the manifest's ``llm`` section.
    ``default`` (else the first of ``quants``) is the file the runtime opens unless told otherwise."""
    log = log or logger.info
    base_model = model.get_base_model() if hasattr(model, 'get_base_model') else model
    hparams = LlamaHParams.from_hf_config(base_model.config)
    return _write_all(merged_shapes(model), lambda: iter_merged_peft(model), hparams, tokenizer_dir, out_dir,
                      quants, default, name, log)


# --------------------------------------------------------------------------------------------
# the released files
# --------------------------------------------------------------------------------------------
class _WeightFiles:
    """Tensors of an HF checkpoint directory, read one at a time (safetensors) or memory-mapped (.bin)."""

    def __init__(self, path: Path):
        self.path = path
        self.where: dict[str, Path] = {}
        for index_name in ('model.safetensors.index.json', 'pytorch_model.bin.index.json'):
            if (path / index_name).is_file():
                weight_map = json.loads((path / index_name).read_text())['weight_map']
                self.where = {k: path / v for k, v in weight_map.items()}
                break
        else:
            single = next(p for p in (path / 'model.safetensors', path / 'pytorch_model.bin') if p.is_file())
            self.where = {k: single for k in self._keys(single)}
        self._open: dict[Path, object] = {}

    @staticmethod
    def _keys(file: Path):
        if file.suffix == '.safetensors':
            from safetensors import safe_open
            with safe_open(file, 'pt') as f:
                return list(f.keys())
        return list(read_state_dict(file))

    def _handle(self, file: Path):
        if file not in self._open:
            if file.suffix == '.safetensors':
                from safetensors import safe_open
                self._open[file] = safe_open(file, 'pt')
            else:
                self._open[file] = read_state_dict(file)  # memory-mapped
        return self._open[file]

    def shape(self, key: str) -> tuple:
        h = self._handle(self.where[key])
        return tuple(h.get_slice(key).get_shape()) if hasattr(h, 'get_slice') else tuple(h[key].shape)

    def get(self, key: str) -> torch.Tensor:
        h = self._handle(self.where[key])
        return h.get_tensor(key) if hasattr(h, 'get_tensor') else h[key]


def _expected_shapes(config: dict) -> dict[str, tuple]:
    """Names and shapes of an HF LLaMA with this config.json, built on the meta device (no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device('meta'):
        m = LlamaForCausalLM(LlamaConfig(**config))
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def read_lora_delta(path, base_shapes: dict[str, tuple], rank: int, targets=LORA_TARGETS):
    """LoRA factors of a PandaGPT delta (``llama_proj.*`` is ignored here), checked against the base."""
    state = {normalise_lora_key(k): v for k, v in read_state_dict(path).items()}
    try:
        lora = split_lora_state(state)
        check_lora(lora, base_shapes, rank=rank, targets=targets, source=str(path))
    except LoraError as e:
        raise CheckpointError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    return lora


def export_llm_released(vicuna_dir, pandagpt_delta, out_dir, quants: Sequence[str] = ('f16', 'q8_0'),
                        default: str | None = None, lora_r: int = 32, lora_alpha: int = 32,
                        expected_vocab: int | None = 32001, name: str = 'vicuna-7b-v0-pandagpt-merged',
                        log: Callable[[str], None] | None = None) -> dict:
    """Vicuna v0 HF directory + PandaGPT delta -> GGUF files; each weight is read, merged and written
    in turn (the model is never loaded whole). Missing shards, a tokenizer that does not match the
    weights, missing/unexpected weights or a LoRA of the wrong rank fail before anything is written."""
    log = log or logger.info
    vicuna_dir = Path(vicuna_dir)
    config = check_vicuna_dir(vicuna_dir, expected_vocab)
    files = _WeightFiles(vicuna_dir)
    expected = _expected_shapes(config)
    present = {k: files.shape(k) for k in files.where if 'rotary_emb' not in k}
    _check_shapes(vicuna_dir, present, expected)
    weight_shapes = {k: s for k, s in expected.items() if len(s) == 2}
    lora = read_lora_delta(pandagpt_delta, weight_shapes, rank=lora_r)
    log(f"{pandagpt_delta}: {len(lora)} LoRA pairs, rank {lora_r}, scale {lora_alpha / lora_r:g}")
    hparams = LlamaHParams.from_hf_config(config)

    def tensors():
        return iter_merged(((k, files.get(k)) for k in expected), lora, lora_alpha / lora_r)

    return _write_all(expected, tensors, hparams, vicuna_dir, out_dir, quants, default, name, log)


def _check_shapes(path, present: dict[str, tuple], expected: dict[str, tuple]) -> None:
    class _Shape:  # check_keys reads .shape
        def __init__(self, s):
            self.shape = s
    check_keys(path, {k: _Shape(s) for k, s in present.items()}, expected, 'HF LLaMA (Vicuna) checkpoint')
