"""The LoRA merge equals PEFT's own merge_and_unload and refuses adapters that do not fit."""
import copy

import pytest
import torch

from anomalygpt_edge.export.lora_merge import (LoraError, check_lora, iter_merged, iter_merged_peft, merged_shapes,
                                               merged_state_dict, split_lora_state)

Q0 = 'model.layers.0.self_attn.q_proj.weight'


@pytest.fixture(scope='module')
def peft_merged(tiny_llm):
    """PEFT's merge on a copy (merge_and_unload modifies the model it is called on)."""
    return copy.deepcopy(tiny_llm).merge_and_unload().state_dict()


def test_merge_equals_peft_merge_and_unload(tiny_llm, peft_merged):
    before = {k: v.clone() for k, v in tiny_llm.state_dict().items()}
    ours = merged_state_dict(tiny_llm)
    assert list(ours) == list(peft_merged)
    for k in peft_merged:
        torch.testing.assert_close(ours[k], peft_merged[k], rtol=0, atol=1e-6, msg=k)
    base_q = before['base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight']
    assert (ours[Q0] - base_q).abs().max() > 1e-3  # the adapter really changes q (not a vacuous comparison)
    after = tiny_llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the PEFT model itself is untouched
    assert merged_shapes(tiny_llm) == {k: tuple(v.shape) for k, v in ours.items()}


def _released_lora(tiny_llm, old_spelling: bool):
    """The PandaGPT release layout of the same adapter."""
    sd = {}
    for k, v in tiny_llm.state_dict().items():
        if '.lora_' in k:
            key = f'llama_model.{k}'
            sd[key.replace('.default', '') if old_spelling else key] = v
    return sd


@pytest.mark.parametrize('old_spelling', [False, True])
def test_merge_from_released_state_dicts(tiny_llm, tiny_config, peft_merged, old_spelling):
    lora = split_lora_state(_released_lora(tiny_llm, old_spelling))
    assert len(lora) == 4 * tiny_config.llm.layers and Q0 in lora
    base = [(k.replace('.base_layer.', '.'), v) for k, v in tiny_llm.get_base_model().state_dict().items()
            if '.lora_' not in k]
    scale = tiny_config.llm.lora_alpha / tiny_config.llm.lora_r
    assert scale == 2.0  # alpha != r in the tiny config, so a wrong scale would show
    merged = dict(iter_merged(base, lora, scale))
    for k in peft_merged:
        torch.testing.assert_close(merged[k], peft_merged[k], rtol=0, atol=1e-6, msg=k)


def test_wrong_rank_and_missing_targets_are_named(tiny_llm, tiny_config):
    shapes = merged_shapes(tiny_llm)
    lora = split_lora_state(_released_lora(tiny_llm, False))
    check_lora(lora, shapes, rank=tiny_config.llm.lora_r, targets=('q_proj', 'k_proj', 'v_proj', 'o_proj'))
    with pytest.raises(LoraError, match=r'layers\.0\.self_attn\.q_proj\.weight: LoRA rank 4.*expected rank 32'):
        check_lora(lora, shapes, rank=32)
    bad = dict(lora)
    bad[Q0] = (torch.zeros(4, 7), lora[Q0][1])
    with pytest.raises(LoraError, match=r'q_proj\.weight: lora_A \[4, 7\]'):
        check_lora(bad, shapes)
    del bad[Q0]
    with pytest.raises(LoraError, match=r'1 target weight\(s\) have no LoRA factors: model\.layers\.0\.self_attn\.q_proj'):
        check_lora(bad, shapes, targets=('q_proj', 'k_proj', 'v_proj', 'o_proj'))
    half = {k: v for k, v in _released_lora(tiny_llm, False).items() if 'lora_B' not in k or 'layers.1.' not in k}
    with pytest.raises(LoraError, match='without their pair'):
        split_lora_state(half)


def test_merge_streams_one_tensor_at_a_time(tiny_llm):
    it = iter_merged_peft(tiny_llm)
    name, first = next(it)
    assert name == 'model.embed_tokens.weight'
    assert first.data_ptr() == tiny_llm.get_base_model().model.embed_tokens.weight.data_ptr()  # passed through, no copy
