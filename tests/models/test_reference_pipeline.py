"""The tiny reference pipeline runs end to end, with the reference's prompt and stop rule."""
import numpy as np
import pytest
import torch

from anomalygpt_edge.models import spec
from anomalygpt_edge.models.generation import finish_answer, prompt_text
from anomalygpt_edge.models.reference import ReferencePipeline


@pytest.fixture(scope='module')
def pipeline(tiny_model, tiny_tokenizer):
    g = torch.Generator().manual_seed(5)
    feats = {'bottle': torch.nn.functional.normalize(torch.randn(2, 32, generator=g), dim=-1),
             'object': torch.nn.functional.normalize(torch.randn(2, 32, generator=g), dim=-1)}
    return ReferencePipeline(tiny_model, tiny_tokenizer, feats, max_new_tokens=24)


def test_end_to_end_zero_and_few_shot(pipeline):
    torch.manual_seed(0)
    image = torch.randn(1, 3, 224, 224)
    res = pipeline.inspect(image, class_name='bottle')
    assert res.anomaly_map.shape == (224, 224)
    assert 0.0 <= res.anomaly_map.min() and res.anomaly_map.max() <= 1.0
    assert res.score == pytest.approx(float(res.anomaly_map.max()))
    assert res.prompts.shape == (18, 64) and res.image_token.shape == (1, 64)
    assert 0 < len(res.answer_ids) <= 24
    assert spec.STOP_STRING not in res.answer
    few = pipeline.inspect(image, class_name='bottle', references=torch.randn(2, 3, 224, 224))
    assert not np.allclose(few.anomaly_map, res.anomaly_map)  # few-shot replaces the text map


def test_prompt_embeds_follow_the_reference_segments(pipeline, tiny_tokenizer):
    m = pipeline.model
    token = torch.randn(1, 1, 64)
    prompts = torch.randn(1, 18, 64)
    emb = m.prompt_embeds(tiny_tokenizer, token, prompts, 'Is it ok?', bos_id=1)
    n1 = len(tiny_tokenizer.encode(spec.PROMPT_START, add_special_tokens=False))
    n2 = len(tiny_tokenizer.encode(spec.IMAGE_END, add_special_tokens=False))
    n3 = len(tiny_tokenizer.encode('Is it ok?' + spec.ASSISTANT, add_special_tokens=False))
    assert emb.shape == (1, 1 + n1 + 1 + n2 + 18 + n3, 64)
    torch.testing.assert_close(emb[0, 1 + n1], token[0, 0])
    torch.testing.assert_close(emb[0, 2 + n1 + n2: 20 + n1 + n2], prompts[0])
    bos_row = m.llama_model.get_input_embeddings().weight[1]
    torch.testing.assert_close(emb[0, 0], bos_row)


class ScriptedLM:
    """Stands in for the HF model: its greedy choice at each step is the next id of a script."""

    def __init__(self, script, vocab):
        self.script, self.vocab, self.calls = list(script), vocab, 0

    def __call__(self, inputs_embeds=None, input_ids=None, past_key_values=None, use_cache=True):
        from types import SimpleNamespace
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, 0, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_greedy_generation_stops_at_the_separator(tiny_tokenizer):
    from anomalygpt_edge.models.generation import greedy_generate
    answer = 'No, there is no anomaly in the image.'
    script = tiny_tokenizer.encode(answer + '\n### Human: more text', add_special_tokens=False)
    lm = ScriptedLM(script, len(tiny_tokenizer))
    ids, text = greedy_generate(lm, torch.zeros(1, 3, 8), tiny_tokenizer, eos_id=2, max_new_tokens=100)
    assert text == answer
    decoded = tiny_tokenizer.decode(ids)
    assert '##' in decoded and 'Human' not in decoded  # stopped as soon as the separator began
    lm = ScriptedLM(tiny_tokenizer.encode('Yes', add_special_tokens=False) + [2], len(tiny_tokenizer))
    ids, text = greedy_generate(lm, torch.zeros(1, 3, 8), tiny_tokenizer, eos_id=2, max_new_tokens=100)
    assert text == 'Yes' and 2 not in ids  # EOS ends generation and is not part of the answer


def test_history_format_and_answer_strip():
    assert prompt_text('Q2', [('Q1', 'A1')]) == 'Q1\n### Assistant: A1\n### Human: Q2'
    assert prompt_text('Q3', [('Q1', 'A1'), ('Q2', 'A2')]) == \
        'Q1\n### Assistant: A1\n### Human: Q2\n### Assistant: A2\n### Human: Q3'
    assert prompt_text('Q') == 'Q'
    assert finish_answer('Yes, at the top.\n##') == 'Yes, at the top.'
    assert finish_answer('No anomaly') == 'No anomaly'


def test_class_resolution_and_position_words():
    assert spec.resolve_class('This is a photo of a pipe fryum') == 'fryum'  # first match wins
    assert spec.resolve_class('many small capsules') == 'capsule'
    assert spec.resolve_class('a widget') == 'object'
    assert spec.position_word(0.1, 0.1) == 'top left'
    assert spec.position_word(1 / 3, 1 / 3) == 'top left'  # the lower cell owns the boundary
    assert spec.position_word(0.34, 0.5) == 'center'
    assert spec.position_word(0.9, 0.67) == 'bottom right'
    assert spec.position_word(0.5, 0.9) == 'right'
