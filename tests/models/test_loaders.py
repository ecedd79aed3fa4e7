"""Loaders accept files in the released key layout and name the key when one is wrong."""
import pickle

import numpy as np
import pytest
import torch

from anomalygpt_edge.models.imagebind import TextTower, VisionTower
from anomalygpt_edge.models.loaders import (CheckpointError, check_vicuna_dir, load_anomalygpt_delta,
                                            load_imagebind, load_pandagpt_delta, read_state_dict)


@pytest.fixture
def model(tiny_config):
    """A fresh model: these tests load random weights into it, so the shared tiny_model is left alone."""
    from anomalygpt_edge.models.anomalygpt import AnomalyGPT
    return AnomalyGPT.random(tiny_config, seed=11)


def released_anomalygpt(model):
    """The AnomalyGPT release layout: 21 fp16 tensors, no prefix beyond the module names."""
    sd = {f'image_decoder.{k}': v for k, v in model.image_decoder.state_dict().items()}
    sd.update({f'prompt_learner.{k}': v for k, v in model.prompt_learner.state_dict().items()})
    return {k: torch.randn_like(v).half() for k, v in sd.items()}


def released_pandagpt(model, old_spelling=False):
    sd = {f'llama_proj.{k}': torch.randn_like(v).half() for k, v in model.llama_proj.state_dict().items()}
    for k, v in model.llama_model.state_dict().items():
        if '.lora_' in k:
            key = f'llama_model.{k}'
            sd[key.replace('.default', '') if old_spelling else key] = torch.randn_like(v).half()
    return sd


def released_imagebind(vision, text):
    sd = {k: torch.randn_like(v) for k, v in vision.state_dict().items()}
    sd.update({k: torch.randn_like(v) for k, v in text.state_dict().items()})
    sd['modality_trunks.audio.blocks.0.norm_1.weight'] = torch.ones(8)  # other modalities: ignored
    sd['modality_heads.depth.0.weight'] = torch.ones(8)
    return sd


def test_anomalygpt_delta_roundtrip(tmp_path, model):
    sd = released_anomalygpt(model)
    assert len(sd) == 21
    torch.save(sd, tmp_path / 'pytorch_model.pt')
    load_anomalygpt_delta(tmp_path / 'pytorch_model.pt', model)
    assert torch.equal(model.prompt_learner.base_prompts, sd['prompt_learner.base_prompts'].float())
    assert torch.equal(model.image_decoder.fc[2].bias, sd['image_decoder.fc.2.bias'].float())


@pytest.mark.parametrize('old_spelling', [False, True])
def test_pandagpt_delta_both_spellings(tmp_path, model, old_spelling):
    sd = released_pandagpt(model, old_spelling)
    assert len(sd) == 2 + 8 * model.cfg.llm.layers
    torch.save(sd, tmp_path / 'delta.pt')
    load_pandagpt_delta(tmp_path / 'delta.pt', model)
    key = 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight'
    src = sd['llama_model.' + (key.replace('.default', '') if old_spelling else key)]
    assert torch.equal(model.llama_model.state_dict()[key], src.float())


def test_imagebind_keeps_vision_and_text(tmp_path, tiny_config):
    vision, text = VisionTower(tiny_config.vision), TextTower(tiny_config.text)
    sd = released_imagebind(vision, text)
    torch.save(sd, tmp_path / 'imagebind_huge.pth')
    load_imagebind(tmp_path / 'imagebind_huge.pth', vision, text)
    assert torch.equal(vision.modality_heads['vision'][2].weight, sd['modality_heads.vision.2.weight'])
    assert torch.equal(text.modality_preprocessors['text'].pos_embed, sd['modality_preprocessors.text.pos_embed'])


@pytest.mark.parametrize('fault', ['renamed', 'missing', 'misshaped'])
def test_wrong_key_is_named(tmp_path, model, fault):
    sd = released_anomalygpt(model)
    key = 'prompt_learner.meta_net.3.weight'
    if fault == 'renamed':
        sd['prompt_learner.meta_net.3.weights'] = sd.pop(key)
    elif fault == 'missing':
        del sd[key]
    else:
        sd[key] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / 'bad.pt')
    with pytest.raises(CheckpointError) as e:
        load_anomalygpt_delta(tmp_path / 'bad.pt', model)
    msg = str(e.value)
    assert 'bad.pt' in msg and key in msg
    if fault == 'renamed':
        assert 'prompt_learner.meta_net.3.weights' in msg and 'unexpected' in msg
    if fault == 'misshaped':
        assert '[3, 3]' in msg


def test_wrong_lora_rank_is_named(tmp_path, model):
    sd = released_pandagpt(model)
    key = 'llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight'
    sd[key] = torch.zeros(model.cfg.llm.lora_r + 1, model.cfg.llm.hidden)
    torch.save(sd, tmp_path / 'delta.pt')
    with pytest.raises(CheckpointError, match='q_proj.lora_A'):
        load_pandagpt_delta(tmp_path / 'delta.pt', model)


class Payload:
    def __reduce__(self):
        return (print, ('code ran',))


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path, capsys):
    with open(tmp_path / 'evil.pt', 'wb') as f:
        pickle.dump({'x': Payload()}, f)
    torch.save({'x': Payload()}, tmp_path / 'evil-zip.pt')
    for name in ('evil.pt', 'evil-zip.pt'):
        with pytest.raises(CheckpointError, match=f'{name}: not a plain state dict') as e:
            read_state_dict(tmp_path / name)
        assert 'weights_only' not in str(e.value)          # no advice to load it unsafely
    assert 'code ran' not in capsys.readouterr().out


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    (tmp_path / 'imagebind_huge.pth').write_bytes(np.random.default_rng(0).bytes(4096).replace(b'\x80', b'\x00'))
    with pytest.raises(CheckpointError) as e:
        read_state_dict(tmp_path / 'imagebind_huge.pth')
    assert str(e.value) == f"{tmp_path / 'imagebind_huge.pth'}: not a PyTorch checkpoint (neither the zip nor the " \
                           "legacy pickle format)"


def test_truncated_and_empty_and_wrong_type(tmp_path):
    torch.save({'a': torch.randn(1000)}, tmp_path / 'ok.pt')
    data = (tmp_path / 'ok.pt').read_bytes()
    (tmp_path / 'trunc.pt').write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='trunc.pt.*truncated or corrupt'):
        read_state_dict(tmp_path / 'trunc.pt')
    (tmp_path / 'empty.pt').write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty.pt: the file is empty'):
        read_state_dict(tmp_path / 'empty.pt')
    torch.save([torch.randn(2)], tmp_path / 'list.pt')
    with pytest.raises(CheckpointError, match='list.pt: expected a state dict'):
        read_state_dict(tmp_path / 'list.pt')
    with pytest.raises(CheckpointError, match='nope.pt: no such file'):
        read_state_dict(tmp_path / 'nope.pt')


def test_vicuna_dir_checks(tmp_path, tiny_tokenizer_dir, tiny_config):
    import json
    import shutil
    d = tmp_path / 'vicuna'
    shutil.copytree(tiny_tokenizer_dir, d)
    vocab = tiny_config.llm.vocab
    (d / 'config.json').write_text(json.dumps({'vocab_size': vocab}))
    (d / 'pytorch_model.bin.index.json').write_text(json.dumps(
        {'weight_map': {'a': 'pytorch_model-00001-of-00002.bin', 'b': 'pytorch_model-00002-of-00002.bin'}}))
    torch.save({'a': torch.zeros(1)}, d / 'pytorch_model-00001-of-00002.bin')
    with pytest.raises(CheckpointError, match='pytorch_model-00002-of-00002.bin'):
        check_vicuna_dir(d, expected_vocab=vocab)
    (d / 'pytorch_model-00002-of-00002.bin').write_bytes(b'x')
    with pytest.raises(CheckpointError, match='pytorch_model-00002-of-00002.bin: not a PyTorch checkpoint'):
        check_vicuna_dir(d, expected_vocab=vocab)
    torch.save({'b': torch.zeros(1)}, d / 'pytorch_model-00002-of-00002.bin')
    assert check_vicuna_dir(d, expected_vocab=vocab)['vocab_size'] == vocab
    (d / 'config.json').write_text(json.dumps({'vocab_size': vocab + 5}))
    with pytest.raises(CheckpointError, match='tokenizer.model.*do not match'):
        check_vicuna_dir(d, expected_vocab=None)
    with pytest.raises(CheckpointError, match='vocab_size is'):
        check_vicuna_dir(d, expected_vocab=32001)


@pytest.mark.parametrize('content', [b'', b'\x08\x00\x00\x00\x00\x00\x00\x00{}'], ids=['empty', 'truncated'])
def test_vicuna_dir_with_an_unreadable_safetensors_file_is_refused(tmp_path, tiny_tokenizer_dir, content):
    import json
    import shutil
    d = tmp_path / 'vicuna'
    shutil.copytree(tiny_tokenizer_dir, d)
    (d / 'config.json').write_text(json.dumps({'vocab_size': None}))
    (d / 'model.safetensors').write_bytes(content)
    with pytest.raises(CheckpointError, match='model.safetensors: not a readable safetensors file'):
        check_vicuna_dir(d, expected_vocab=None)
