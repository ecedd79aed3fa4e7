"""Strict loaders for the released checkpoint files (spec section 5.4).

Every file is read with ``torch.load(weights_only=True, mmap=True)``: a pickle that is not a
plain state dict is refused, and a 4.8 GB file is memory-mapped rather than held twice.
Every missing, unexpected or mis-shaped key is named in one error.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

IMAGEBIND_KEEP = re.compile(r'^modality_(preprocessors|trunks|heads|postprocessors)\.(vision|text)\.')
LORA_KEY = re.compile(r'^(?P<head>.*\.lora_[AB])(?:\.default)?\.weight$')


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be used, with the file and the problem named."""
    exit_code = 2  # bad input (cli.exit_code)


def check_torch_file(path: Path) -> None:
    """A cheap look at the container of a ``torch.save`` file: a zip archive whose directory (at its end) reads,
    or a legacy pickle."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    with open(path, 'rb') as f:
        head = f.read(4)
    if head == b'PK\x03\x04':
        try:
            zipfile.ZipFile(path).close()
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({e})") from None
    elif head[:1] != b'\x80':   # the PROTO opcode that starts a pickle of protocol 2 or later
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither the zip nor the legacy pickle format)")


def check_safetensors_file(path: Path) -> None:
    """Reads the header (the key list) of a ``.safetensors`` file."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework='pt') as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _refusal(error: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, without torch's advice to load the file unsafely."""
    m = re.search(r'WeightsUnpickler error:\s*(.+)', str(error))
    return m[1].split('. ')[0].strip() if m else 'not a state dict'


def read_state_dict(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    check_torch_file(path)
    try:
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e):
                raise
            obj = torch.load(path, map_location='cpu', weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not a plain state dict of tensors (the weights-only loader refused it: "
                              f"{_refusal(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and 'module' in obj and isinstance(obj['module'], dict):
        obj = obj['module']  # DeepSpeed-style wrapper
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    return obj


def check_keys(path, state: dict, expected: dict[str, tuple], what: str) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shaped = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or shaped):
        return
    lines = [f"{path}: does not match the {what} layout"]

    def show(title, keys, fmt):
        if keys:
            lines.append(f"  {title} ({len(keys)}): " + ', '.join(fmt(k) for k in keys[:12]) + (' ...' if len(keys) > 12 else ''))
    show('missing keys', missing, str)
    show('unexpected keys', unexpected, str)
    show('wrong shapes', shaped, lambda k: f"{k} {list(state[k].shape)} (expected {list(expected[k])})")
    raise CheckpointError('\n'.join(lines))


def _shapes(module, prefix: str = '') -> dict[str, tuple]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_into(module, path, state: dict, what: str, prefix: str = '') -> None:
    check_keys(path, state, _shapes(module, prefix), what)
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)


def load_imagebind(path, vision, text=None) -> None:
    """``imagebind_huge.pth``: keep the vision (and, if given, text) modality; other modalities are ignored by name."""
    state = read_state_dict(path)
    kept = {k: v for k, v in state.items() if IMAGEBIND_KEEP.match(k)}
    vision_sd = {k: v for k, v in kept.items() if '.vision.' in k}
    load_into(vision, path, vision_sd, 'ImageBind vision tower')
    if text is not None:
        load_into(text, path, {k: v for k, v in kept.items() if '.text.' in k}, 'ImageBind text tower')
    log.info("%s: loaded %d vision%s tensors, ignored %d of other modalities", path, len(vision_sd),
             '' if text is None else ' and text', len(state) - len(kept))


def load_anomalygpt_delta(path, model) -> None:
    """AnomalyGPT release (21 tensors): ``image_decoder.*`` and ``prompt_learner.*``."""
    state = read_state_dict(path)
    expected = {**_shapes(model.image_decoder, 'image_decoder.'), **_shapes(model.prompt_learner, 'prompt_learner.')}
    check_keys(path, state, expected, 'AnomalyGPT checkpoint (image_decoder + prompt_learner)')
    model.image_decoder.load_state_dict({k[14:]: v for k, v in state.items() if k.startswith('image_decoder.')})
    model.prompt_learner.load_state_dict({k[15:]: v for k, v in state.items() if k.startswith('prompt_learner.')})


def normalise_lora_key(key: str) -> str:
    """Accept both PEFT spellings: ``lora_A.default.weight`` (PEFT >= 0.3) and ``lora_A.weight``."""
    m = LORA_KEY.match(key)
    return f"{m['head']}.default.weight" if m else key


def pandagpt_expected(model) -> dict[str, tuple]:
    """``llama_proj.*`` + the LoRA A/B of q/k/v/o in every layer, with the release's prefix."""
    lora = {f'llama_model.{k}': tuple(v.shape) for k, v in model.llama_model.state_dict().items() if '.lora_' in k}
    return {**_shapes(model.llama_proj, 'llama_proj.'), **lora}


def load_llama_proj(path, llama_proj) -> None:
    """Only ``llama_proj`` from the PandaGPT delta (the LoRA is merged into the GGUF by streaming)."""
    state = read_state_dict(path)
    proj = {k: v for k, v in state.items() if k.startswith('llama_proj.')}
    check_keys(path, proj, _shapes(llama_proj, 'llama_proj.'), 'PandaGPT delta (llama_proj)')
    llama_proj.load_state_dict({k[len('llama_proj.'):]: v for k, v in proj.items()})


def load_pandagpt_delta(path, model) -> None:
    """PandaGPT delta: ``llama_proj`` + 4 x 2 x n_layers LoRA tensors into a PEFT-wrapped LLaMA."""
    state = {normalise_lora_key(k): v for k, v in read_state_dict(path).items()}
    check_keys(path, state, pandagpt_expected(model), 'PandaGPT delta (llama_proj + LoRA)')
    model.llama_proj.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith('llama_proj.')})
    lora = {k[len('llama_model.'):]: v for k, v in state.items() if k.startswith('llama_model.')}
    result = model.llama_model.load_state_dict(lora, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def check_vicuna_dir(path, expected_vocab: int | None = 32001) -> dict:
    """Validate a Vicuna (HF LLaMA) directory before loading; returns its config.json."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Vicuna v0 HF checkpoint directory)")
    cfg_file = path / 'config.json'
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: config.json is missing")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    vocab = config.get('vocab_size')
    if expected_vocab is not None and vocab != expected_vocab:
        raise CheckpointError(f"{cfg_file}: vocab_size is {vocab}, expected {expected_vocab} (Vicuna v0 adds [PAD])")
    for index_name in ('model.safetensors.index.json', 'pytorch_model.bin.index.json'):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())['weight_map'].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{path}: shard(s) listed in {index_name} are missing: {', '.join(missing)}")
            weights = [path / s for s in shards]
            break
    else:
        # the first one present is the one the LLM export reads
        weights = [p for p in (path / 'model.safetensors', path / 'pytorch_model.bin') if p.is_file()][:1]
        if not weights:
            raise CheckpointError(f"{path}: no weights (model.safetensors, pytorch_model.bin or a sharded index)")
    for file in weights:
        if file.suffix == '.safetensors':
            check_safetensors_file(file)
        else:
            check_torch_file(file)
    sp = path / 'tokenizer.model'
    if not sp.is_file():
        raise CheckpointError(f"{path}: tokenizer.model is missing")
    import sentencepiece
    n_pieces = sentencepiece.SentencePieceProcessor(model_file=str(sp)).get_piece_size()
    added = {}
    if (path / 'added_tokens.json').is_file():
        added = json.loads((path / 'added_tokens.json').read_text())
    if vocab is not None and n_pieces + len(added) != vocab:
        raise CheckpointError(f"{sp}: {n_pieces} pieces + {len(added)} added tokens = {n_pieces + len(added)}, "
                              f"but config.json says vocab_size {vocab}: tokenizer and weights do not match")
    return config


def load_vicuna(path, expected_vocab: int | None = 32001, dtype=torch.float32):
    """A Vicuna v0 HF directory -> ``LlamaForCausalLM`` (strict: missing or unexpected weights are errors)."""
    from transformers import LlamaForCausalLM
    check_vicuna_dir(path, expected_vocab)
    model, info = LlamaForCausalLM.from_pretrained(os.fspath(path), dtype=dtype, output_loading_info=True,
                                                   attn_implementation='eager')
    missing = [k for k in info.get('missing_keys', []) if 'rotary_emb' not in k]
    unexpected = [k for k in info.get('unexpected_keys', []) if 'rotary_emb' not in k]
    if missing or unexpected or info.get('mismatched_keys'):
        raise CheckpointError(f"{path}: weights do not match the config: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}, mismatched {info.get('mismatched_keys', [])[:8]}")
    return model.eval()
