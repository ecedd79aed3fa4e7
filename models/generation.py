"""Conversation text (spec 6.2) and the reference greedy generation with HF transformers."""
from __future__ import annotations

import torch

from . import spec


def prompt_text(question: str, history=()) -> str:
    """The user part of the prompt with the reference's multi-turn history format."""
    parts = []
    for i, (q, a) in enumerate(history):
        parts.append(f"{'' if i == 0 else ' Human: '}{q}\n### Assistant: {a}\n###")
    parts.append(f" Human: {question}" if history else question)
    return ''.join(parts)


def finish_answer(text: str, stop: str = spec.STOP_STRING) -> str:
    """The answer the reference returns: the text before the stop string, without trailing newlines."""
    cut = text.find(stop)
    return (text if cut < 0 else text[:cut]).rstrip('\n').strip()


@torch.no_grad()
def greedy_generate(lm, inputs_embeds: torch.Tensor, tokenizer, eos_id: int, max_new_tokens: int = 128,
                    stop: str = spec.STOP_STRING):
    """Greedy decoding from ``inputs_embeds`` [1,N,D] with the KV cache; stops at EOS or once the
    decoded text contains ``stop``. Returns (new token ids, answer text)."""
    out = lm(inputs_embeds=inputs_embeds, use_cache=True)
    ids: list[int] = []
    text = ''
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt == eos_id:
            break
        ids.append(nxt)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if stop in text:
            break
        out = lm(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return ids, finish_answer(text, stop)
