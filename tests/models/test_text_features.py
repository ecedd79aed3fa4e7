"""Per-class text features from the (tiny) ImageBind text tower and the CLIP BPE of open_clip_torch."""
import sys

import torch

from anomalygpt_edge.models.text_features import class_sentences, clip_tokenizer, text_feature_table


def test_prompt_ensemble_is_state_major():
    normal, abnormal = class_sentences('metal_nut')
    assert len(normal) == 14 and len(abnormal) == 10
    assert normal[:3] == ['a photo of a metal nut.', 'a photo of the metal nut.', 'a photo of a flawless metal nut.']
    assert abnormal[-1] == 'a photo of the metal nut with damage.'


def test_clip_bpe_ids_without_importing_open_clip():
    tok = clip_tokenizer()
    ids = tok(['a photo of a bottle.'])
    assert ids.shape == (1, 77)
    row = ids[0].tolist()
    assert row[0] == 49406 and 49407 in row and row[row.index(49407) + 1:] == [0] * (76 - row.index(49407))
    assert 'open_clip' not in sys.modules and 'torchvision' not in sys.modules


def test_features_are_unit_norm_and_differ_between_classes(tiny_text_tower):
    table = text_feature_table(tiny_text_tower, ['bottle', 'metal_nut'])
    assert set(table) == {'bottle', 'metal nut'}
    for feats in table.values():
        assert feats.shape == (2, 32)
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
    assert (table['bottle'] - table['metal nut']).abs().max() > 1e-3
    assert (table['bottle'][0] - table['bottle'][1]).abs().max() > 1e-3


def test_cut_ids_give_the_embeddings_of_all_77(tiny_text_tower):
    from anomalygpt_edge.models.text_features import class_token_ids
    normal, abnormal = class_token_ids('metal_nut')
    assert normal.shape[0] == 14 and abnormal.shape[0] == 10 and normal.shape[1] == abnormal.shape[1] < 77
    tok = clip_tokenizer()
    for cut, sentences in zip((normal, abnormal), class_sentences('metal_nut')):
        full = tok(sentences)
        assert (full[:, cut.shape[1]:] == 0).all() and (full[:, :cut.shape[1]] == cut).all()
        with torch.no_grad():
            # the two lengths take different matmul kernels on some CPUs (1.5e-6 apart on an AMX Xeon); a cut that
            # changed what the end-of-text token attends to would move them by orders of magnitude more
            torch.testing.assert_close(tiny_text_tower(cut), tiny_text_tower(full), atol=1e-5, rtol=1e-4)
