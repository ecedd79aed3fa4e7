"""`export released` end to end on files in the released layouts (tiny shapes): the resulting bundle
answers like the PyTorch reference built from the same files."""
import copy
import shutil

import cv2
import numpy as np
import pytest
import torch

from anomalygpt_edge.cli import main
from anomalygpt_edge.models.reference import ReferencePipeline
from anomalygpt_edge.runtime.pipeline import Pipeline


def fp16_round(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


@pytest.fixture(scope='module')
def released(tmp_path_factory, tiny_model, tiny_text_tower, tiny_tokenizer_dir, tiny_config):
    from anomalygpt_edge.models.llm import build_llama
    d = tmp_path_factory.mktemp('released')
    model = copy.deepcopy(tiny_model)
    # the deltas ship in fp16: the reference uses the same rounded values
    for part in (model.image_decoder, model.prompt_learner, model.llama_proj):
        fp16_round(part)
    with torch.no_grad():
        for k, p in model.llama_model.named_parameters():
            if '.lora_' in k:
                p.copy_(p.half().float())
    ib = {**model.visual_encoder.state_dict(), **tiny_text_tower.state_dict(),
          'modality_trunks.audio.blocks.0.norm_1.weight': torch.ones(4)}
    torch.save(ib, d / 'imagebind_huge.pth')
    agpt = {f'image_decoder.{k}': v.half() for k, v in model.image_decoder.state_dict().items()}
    agpt.update({f'prompt_learner.{k}': v.half() for k, v in model.prompt_learner.state_dict().items()})
    torch.save(agpt, d / 'anomalygpt.pt')
    delta = {f'llama_model.{k}': v.half() for k, v in model.llama_model.state_dict().items() if '.lora_' in k}
    delta.update({f'llama_proj.{k}': v.half() for k, v in model.llama_proj.state_dict().items()})
    torch.save(delta, d / 'pandagpt.pt')
    base = build_llama(tiny_config.llm)
    base.load_state_dict({k.replace('.base_layer.', '.'): v for k, v in
                          model.llama_model.get_base_model().state_dict().items() if '.lora_' not in k})
    base.save_pretrained(d / 'vicuna')
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, d / 'vicuna' / f.name)
    return d, model


def test_export_released_then_inspect_matches_reference(released, tiny_tokenizer, tiny_text_tower, tmp_path):
    d, model = released
    out = tmp_path / 'bundle'
    rc = main(['export', 'released', '--config', 'tiny', '--imagebind', str(d / 'imagebind_huge.pth'),
               '--anomalygpt', str(d / 'anomalygpt.pt'), '--pandagpt', str(d / 'pandagpt.pt'),
               '--vicuna', str(d / 'vicuna'), '--out', str(out), '--precision', 'fp32', '--quant', 'f32'])
    assert rc == 0
    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.integers(40, 220, (200, 260, 3), dtype=np.uint8), (0, 0), 2)
    with Pipeline.from_bundle(out, exact_llm=True, max_new_tokens=16, threads=1) as pipe:
        got = pipe.inspect(img, class_name='cable')
        feats = {n: torch.from_numpy(pipe.text_features[c['row']]) for n, c in pipe.classes.items()}
        x = torch.from_numpy(pipe.load(img)[0])
    want = ReferencePipeline(model, tiny_tokenizer, feats, max_new_tokens=16).inspect(x, class_name='cable')
    assert np.abs(got.anomaly_map - want.anomaly_map).max() <= 1e-4
    assert got.answer_ids == want.answer_ids
    # the text features in the bundle are the released text tower's
    from anomalygpt_edge.models.text_features import class_text_features
    with torch.no_grad():
        torch.testing.assert_close(feats['cable'], class_text_features(tiny_text_tower, 'cable'))


def test_export_released_with_a_bad_checkpoint_leaves_nothing(released, tmp_path, capsys):
    d, _ = released
    sd = torch.load(d / 'anomalygpt.pt')
    del sd['image_decoder.fc.2.bias']
    torch.save(sd, tmp_path / 'broken.pt')
    rc = main(['export', 'released', '--config', 'tiny', '--imagebind', str(d / 'imagebind_huge.pth'),
               '--anomalygpt', str(tmp_path / 'broken.pt'), '--pandagpt', str(d / 'pandagpt.pt'),
               '--vicuna', str(d / 'vicuna'), '--out', str(tmp_path / 'bundle'), '--quant', 'f32'])
    assert rc == 2
    err = capsys.readouterr().err
    assert 'broken.pt' in err and 'image_decoder.fc.2.bias' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['broken.pt']


@pytest.mark.parametrize('problem', ['truncated delta', 'out is not a bundle'])
def test_export_released_checks_its_inputs_before_loading_anything(released, tmp_path, capsys, monkeypatch, problem):
    from anomalygpt_edge.export import released as R
    monkeypatch.setattr(R, 'load_released_vision', lambda *a, **k: pytest.fail('loaded before the inputs were checked'))
    d, _ = released
    pandagpt, out = d / 'pandagpt.pt', tmp_path / 'bundle'
    if problem == 'truncated delta':
        data = pandagpt.read_bytes()
        pandagpt = tmp_path / 'cut.pt'
        pandagpt.write_bytes(data[:len(data) // 2])
    else:
        out.mkdir()
        (out / 'notes.txt').write_text('not a bundle')
    rc = main(['export', 'released', '--config', 'tiny', '--imagebind', str(d / 'imagebind_huge.pth'),
               '--anomalygpt', str(d / 'anomalygpt.pt'), '--pandagpt', str(pandagpt), '--vicuna', str(d / 'vicuna'),
               '--out', str(out), '--quant', 'f32', '--overwrite'])
    assert rc == 2
    err = capsys.readouterr().err
    assert ('cut.pt: truncated or corrupt' in err) if problem == 'truncated delta' else ('not a bundle' in err)
    assert not out.exists() or (out / 'notes.txt').read_text() == 'not a bundle'
