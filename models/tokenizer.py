"""LLaMA-style SentencePiece tokenizers for the small models (tiny tests, the demo model),
written in the same directory layout as a Vicuna v0 checkpoint (``tokenizer.model`` + one added
``[PAD]`` token), and loaded with HF's SentencePiece ``LlamaTokenizer`` like the reference."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

from . import spec

PAD_TOKEN = '[PAD]'


def reference_corpus() -> list[str]:
    """Sentences of the AnomalyGPT conversation format, to train a small tokenizer on."""
    from itertools import product
    lines = [spec.PROMPT_START, spec.IMAGE_END, spec.ASSISTANT, spec.QUESTION, spec.ANSWER_NORMAL]
    words = [w for row in spec.POSITION_WORDS for w in row]
    lines += [spec.ANSWER_ONE.format(w) for w in words]
    lines += [spec.ANSWER_TWO.format(a, b) for a, b in product(words, words) if a != b][:40]
    lines += list(spec.DESCRIPTIONS.values())
    lines += [f"{q}\n### Assistant: {a}\n### Human: {spec.QUESTION}" for q, a in
              zip(spec.DESCRIPTIONS.values(), [spec.ANSWER_NORMAL, spec.ANSWER_ONE.format('top')] * 20)]
    return lines


def train_sentencepiece(out_dir, corpus: list[str], vocab_size: int = 400) -> Path:
    """Train a LLaMA-style BPE SentencePiece model (byte fallback, split digits, unk/bos/eos = 0/1/2)
    and write a tokenizer directory with one added ``[PAD]`` token, as Vicuna v0 has."""
    import sentencepiece as spm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size, model_type='bpe',
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name='identity', unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        allow_whitespace_only_pieces=True, hard_vocab_limit=False, character_coverage=1.0,
        max_sentence_length=4096, num_threads=1, minloglevel=2)
    tmp = out_dir / 'tokenizer.model.tmp'
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_dir / 'tokenizer.model')
    n = spm.SentencePieceProcessor(model_file=str(out_dir / 'tokenizer.model')).get_piece_size()
    (out_dir / 'added_tokens.json').write_text(json.dumps({PAD_TOKEN: n}))
    (out_dir / 'special_tokens_map.json').write_text(json.dumps(
        {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': PAD_TOKEN}))
    (out_dir / 'tokenizer_config.json').write_text(json.dumps(
        {'tokenizer_class': 'LlamaTokenizer', 'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>',
         'add_bos_token': True, 'add_eos_token': False, 'legacy': True, 'model_max_length': 2048}))
    return out_dir


def vocab_size(tokenizer_dir) -> int:
    """Pieces + added tokens: the LLM's vocab_size for this tokenizer."""
    import sentencepiece as spm
    d = Path(tokenizer_dir)
    n = spm.SentencePieceProcessor(model_file=str(d / 'tokenizer.model')).get_piece_size()
    added = json.loads((d / 'added_tokens.json').read_text()) if (d / 'added_tokens.json').is_file() else {}
    return n + len(added)


def load_tokenizer(tokenizer_dir):
    """HF's slow SentencePiece LlamaTokenizer, as the reference uses (``use_fast=False``)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir), use_fast=False, legacy=True)
