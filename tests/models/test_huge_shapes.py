"""The ``huge`` config, built on the meta device, has the released model's names, shapes and counts."""
import pytest
import torch

from anomalygpt_edge.models.anomalygpt import AnomalyGPT
from anomalygpt_edge.models.config import HUGE
from anomalygpt_edge.models.imagebind import TextTower


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope='module')
def huge():
    with torch.device('meta'):
        return AnomalyGPT(HUGE)


def test_parameter_counts(huge):
    assert count(huge.visual_encoder) == 632_829_440
    assert count(huge.image_decoder) == 5_246_976
    assert count(huge.prompt_learner) == 107_416_504
    assert count(huge.llama_proj) == 4_198_400


def test_vision_keys_and_shapes(huge):
    sd = {k: tuple(v.shape) for k, v in huge.visual_encoder.state_dict().items()}
    expected = {
        'modality_preprocessors.vision.cls_token': (1, 1, 1280),
        'modality_preprocessors.vision.rgbt_stem.proj.1.weight': (1280, 3, 2, 14, 14),
        'modality_preprocessors.vision.pos_embedding_helper.pos_embed': (1, 257, 1280),
        'modality_trunks.vision.pre_transformer_layer.0.weight': (1280,),
        'modality_trunks.vision.blocks.31.attn.in_proj_weight': (3840, 1280),
        'modality_trunks.vision.blocks.31.attn.in_proj_bias': (3840,),
        'modality_trunks.vision.blocks.0.attn.out_proj.weight': (1280, 1280),
        'modality_trunks.vision.blocks.0.norm_1.bias': (1280,),
        'modality_trunks.vision.blocks.0.norm_2.weight': (1280,),
        'modality_trunks.vision.blocks.0.mlp.fc1.weight': (5120, 1280),
        'modality_trunks.vision.blocks.0.mlp.fc2.weight': (1280, 5120),
        'modality_heads.vision.0.weight': (1280,),
        'modality_heads.vision.2.weight': (1024, 1280),
    }
    for k, shape in expected.items():
        assert sd[k] == shape, k
    assert 'modality_trunks.vision.blocks.32.norm_1.weight' not in sd
    # 6 stem/pos/cls/pre-LN tensors + 12 per block + 3 head tensors
    assert len(sd) == 3 + 2 + 32 * 12 + 3


def test_decoder_and_prompt_learner_keys(huge):
    dec = {f'image_decoder.{k}': tuple(v.shape) for k, v in huge.image_decoder.state_dict().items()}
    pl = {f'prompt_learner.{k}': tuple(v.shape) for k, v in huge.prompt_learner.state_dict().items()}
    assert len(dec) + len(pl) == 21
    assert dec['image_decoder.fc.3.weight'] == (1024, 1280)
    assert pl['prompt_learner.base_prompts'] == (9, 4096)
    convs = {i: pl[f'prompt_learner.meta_net.{i}.weight'] for i in (0, 3, 6, 9, 12, 15)}
    assert convs == {0: (4, 1, 3, 3), 3: (16, 4, 3, 3), 6: (64, 16, 3, 3), 9: (256, 64, 3, 3),
                     12: (1024, 256, 3, 3), 15: (4096, 1024, 5, 5)}


def test_text_tower_keys():
    with torch.device('meta'):
        text = TextTower(HUGE.text)
    sd = {k: tuple(v.shape) for k, v in text.state_dict().items()}
    assert sd['modality_preprocessors.text.token_embedding.weight'] == (49408, 1024)
    assert sd['modality_preprocessors.text.pos_embed'] == (1, 77, 1024)
    assert sd['modality_preprocessors.text.mask'] == (77, 77)
    assert sd['modality_trunks.text.blocks.23.attn.in_proj_weight'] == (3072, 1024)
    assert sd['modality_trunks.text.blocks.0.mlp.fc1.weight'] == (4096, 1024)
    assert sd['modality_heads.text.proj.1.weight'] == (1024, 1024)
    assert sd['modality_postprocessors.text.1.log_logit_scale'] == ()


def test_llama_7b_with_lora_on_meta():
    from anomalygpt_edge.models.llm import add_lora, build_llama
    from anomalygpt_edge.models.loaders import pandagpt_expected
    with torch.device('meta'):
        model = AnomalyGPT(HUGE, add_lora(build_llama(HUGE.llm), HUGE.llm))
    base = {k: tuple(v.shape) for k, v in model.llama_model.get_base_model().state_dict().items()}
    assert base['model.embed_tokens.weight'] == (32001, 4096)
    assert base['lm_head.weight'] == (32001, 4096)
    assert base['model.layers.31.mlp.gate_proj.weight'] == (11008, 4096)
    assert base['model.layers.31.mlp.down_proj.weight'] == (4096, 11008)
    assert base['model.layers.0.self_attn.q_proj.base_layer.weight'] == (4096, 4096)
    expected = pandagpt_expected(model)
    assert len(expected) == 258
    assert expected['llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight'] == (32, 4096)
    assert expected['llama_model.base_model.model.model.layers.31.self_attn.o_proj.lora_B.default.weight'] == (4096, 32)
    lora_params = sum(int(torch.Size(s).numel()) for k, s in expected.items() if 'lora' in k)
    assert lora_params + 4_198_400 == 37_752_832  # the PandaGPT delta's size
