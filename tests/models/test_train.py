"""The demo training recipe runs, checkpoints atomically and resumes where it stopped (tiny config)."""
import os

import pytest
import torch

from anomalygpt_edge.models.train import load_checkpoint, main


def args(work, vision, lm):
    return ['--work', str(work), '--config', 'tiny', '--vision-steps', str(vision), '--lm-steps', str(lm),
            '--samples', '6', '--batch', '2', '--threads', '1', '--checkpoint-every', '1']


def test_train_resume_and_export(tmp_path):
    work = tmp_path / 'work'
    assert main(args(work, 2, 1)) == 0
    first = load_checkpoint(work / 'vision.pt')
    assert first['step'] == 2 and load_checkpoint(work / 'language.pt')['step'] == 1
    assert not list(work.glob('*.partial'))
    # resuming with more steps continues from the checkpoint instead of starting over
    assert main(args(work, 3, 1)) == 0
    second = load_checkpoint(work / 'vision.pt')
    assert second['step'] == 3
    key = 'visual_encoder.modality_trunks.vision.blocks.0.mlp.fc1.weight'
    assert not torch.equal(first['model'][key], second['model'][key])
    final = load_checkpoint(work / 'final.pt')
    assert set(final) >= {'model', 'text'} and final['config'] == 'tiny'
    # a stage's training time adds up over resumed runs
    assert second['seconds'] > first['seconds'] > 0
    assert final['minutes']['vision'] == pytest.approx(second['seconds'] / 60, abs=1e-3)


def test_answer_token_weights_mark_the_verdict_and_position_words(tiny_tokenizer):
    from anomalygpt_edge.models import spec
    from anomalygpt_edge.models.train import answer_tokens
    answer = spec.ANSWER_ONE.format('top left')
    ids, weights = answer_tokens(tiny_tokenizer, answer, 5.0, 3.0)
    # the ids are the reference's tokenisation of the answer with its terminator
    assert list(ids) == tiny_tokenizer.encode(answer + '\n###', add_special_tokens=False)
    text = lambda w: ''.join(tiny_tokenizer.decode([i]).strip() for i, x in zip(ids, weights) if x == w)  # noqa: E731
    assert text(5.0) == 'Yes' and text(3.0) == 'istopleft'
    assert weights.count(1.0) == len(ids) - weights.count(5.0) - weights.count(3.0)
    ids, weights = answer_tokens(tiny_tokenizer, spec.ANSWER_NORMAL, 5.0, 3.0)
    assert text(5.0) == 'No' and weights[0] == 5.0 and text(3.0) == 'is'


def test_weighted_lm_loss_with_unit_weights_is_the_lm_loss(tiny_model, tiny_tokenizer):
    from anomalygpt_edge.models import spec
    from anomalygpt_edge.models.train import lm_batch, weighted_lm_loss
    model, d = tiny_model, tiny_model.cfg.llm.hidden
    g = torch.Generator().manual_seed(0)
    token, prompts = torch.randn(2, 1, d, generator=g) * 0.02, torch.randn(2, 18, d, generator=g) * 0.02
    answers = [spec.ANSWER_NORMAL, spec.ANSWER_ONE.format('bottom')]
    with torch.no_grad():
        x, mask, y, w = lm_batch(model, tiny_tokenizer, token, prompts, [spec.QUESTION] * 2, answers)
        assert torch.equal(w > 0, y != -100)
        out = model.llama_model(inputs_embeds=x, attention_mask=mask, labels=y)
        assert weighted_lm_loss(out.logits, y, w).item() == pytest.approx(out.loss.item(), rel=1e-5)
        x2, _, y2, w2 = lm_batch(model, tiny_tokenizer, token, prompts, [spec.QUESTION] * 2, answers, 10.0, 1.0)
        assert torch.equal(x2, x) and torch.equal(y2, y) and w2.max() == 10.0
        assert weighted_lm_loss(out.logits, y, w2).item() != pytest.approx(out.loss.item(), rel=1e-5)


def test_prompt_learner_init_passes_the_map_to_the_derived_prompts(tiny_config):
    from anomalygpt_edge.models.prompt_learner import PromptLearner
    from anomalygpt_edge.models.train import init_prompt_learner
    pl = PromptLearner(tiny_config.pl_channels, tiny_config.llm.hidden, tiny_config.n_base_prompts)
    init_prompt_learner(pl, seed=3)
    zero = torch.zeros(1, 1, 224, 224)
    spot = zero.clone()
    spot[..., 20:60, 150:200] = 1.0
    with torch.no_grad():
        quiet, hot = pl(zero)[0, 9:], pl(spot)[0, 9:]
    assert torch.count_nonzero(quiet) == 0                      # no map, no signal (zero biases)
    assert hot.norm(dim=-1).mean() > 0.3                        # a hot spot keeps its scale through six convs


def test_exported_bundle_carries_per_class_thresholds_from_fresh_normals(tmp_path):
    """--threshold-images: each class's threshold is the maximum score over that many normal images of
    the training generator, as the runtime scores them; the LLM-free verdict then uses it."""
    import json

    from anomalygpt_edge.models.synthetic import CATEGORIES
    from anomalygpt_edge.models.synthetic_dataset import write_mvtec_layout
    from anomalygpt_edge.runtime.pipeline import Pipeline
    work, bundle = tmp_path / 'work', tmp_path / 'bundle'
    assert main(args(work, 1, 1) + ['--bundle', str(bundle), '--threshold-images', '2']) == 0
    thresholds = json.loads((bundle / 'manifest.json').read_text())['thresholds']
    assert set(thresholds) == {c.replace('_', ' ') for c in CATEGORIES}
    write_mvtec_layout(tmp_path / 'normals', list(CATEGORIES), n_train_good=2, n_test_good=0, n_test_defect=0, seed=0)
    with Pipeline.from_bundle(bundle, llm=False) as pipe:
        for c in CATEGORIES:
            scores = [pipe.inspect(p, class_name=c, llm=False).score
                      for p in sorted((tmp_path / 'normals' / c / 'train' / 'good').glob('*.png'))]
            entry = thresholds[c.replace('_', ' ')]['zero-shot']
            assert entry['score'] == pytest.approx(max(scores), abs=1e-6) and entry['n_images'] == 2
            assert entry['images'] == f"write_mvtec_layout(seed=0, n_train_good=2): {c}/train/good"
        first = list(CATEGORIES)[0]
        r = pipe.inspect(sorted((tmp_path / 'normals' / first / 'train' / 'good').glob('*.png'))[0],
                         class_name=first, llm=False)
        assert r.verdict_source == 'threshold' and r.verdict == 'no'   # a calibration image is at most the max


def test_map_agreement_keeps_normals_and_the_anomalies_the_map_shows():
    from anomalygpt_edge.models.train import map_shows_label
    masks = torch.zeros(4, 1, 16, 16)
    masks[1:, :, 2:5, 2:5] = 1                          # samples 1-3 are anomalous at the top left
    amap = torch.full((4, 1, 16, 16), 0.1)
    amap[0, :, 8, 8] = 0.9                              # a normal sample's false spot: kept (its answer is No)
    amap[1, :, 3, 3] = 0.8                              # peak on the label: kept
    amap[2, :, 12, 12] = 0.8                            # peak elsewhere: dropped
    amap[3] = 0.0                                       # the map shows nothing: dropped
    assert map_shows_label(amap, masks).tolist() == [1.0, 1.0, 0.0, 0.0]
    # few-shot maps have another scale; the peak's place decides
    assert map_shows_label(amap * 0.2 + 0.3, masks).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_boolean_settings_are_flags():
    from anomalygpt_edge.models.train import build_parser
    ap = build_parser()
    assert ap.parse_args(['--work', 'w']).map_agreement is False
    assert ap.parse_args(['--work', 'w', '--map-agreement']).map_agreement is True
    args = ap.parse_args(['--work', 'w', '--no-cumulative-centres', '--lm-steps', '3'])
    assert args.cumulative_centres is False and args.lm_steps == 3


def test_help_explains_every_setting_and_names_its_default():
    import dataclasses
    from anomalygpt_edge.models.train import SETTING_HELP, TrainSettings, build_parser
    assert set(SETTING_HELP) == {f.name for f in dataclasses.fields(TrainSettings)}
    actions = {a.dest: a for a in build_parser()._actions}
    for f in dataclasses.fields(TrainSettings):
        assert actions[f.name].help.startswith(SETTING_HELP[f.name]), f.name
    text = ' '.join(build_parser().format_help().split())
    assert f'--vision-steps VISION_STEPS {SETTING_HELP["vision_steps"]} (default: {TrainSettings.vision_steps})' in text


def test_a_setting_out_of_range_is_a_usage_error_naming_its_flag(tmp_path, capsys):
    from anomalygpt_edge.models.train import TrainSettings, main
    for flags, message in ((['--faint-fraction', '2'], '--faint-fraction must be in [0, 1], got 2.0'),
                           (['--foreign-fraction', '-0.1'], '--foreign-fraction must be in [0, 1]'),
                           (['--batch', '0'], '--batch must be at least 1'),
                           (['--ema-decay', '1'], '--ema-decay must be in [0, 1), got 1.0'),
                           (['--lm-steps', '-5'], '--lm-steps must not be negative'),
                           (['--text-warmup-steps', '-1'], '--text-warmup-steps must not be negative'),
                           (['--logit-scale-ramp-steps', '-2'], '--logit-scale-ramp-steps must not be negative'),
                           (['--adamw', 'sgd'], "--adamw: invalid choice: 'sgd'"),
                           (['--nsa-size-scale', '0'], '--nsa-size-scale must be positive, got 0.0'),
                           (['--nsa-thin-fraction', '2'], '--nsa-thin-fraction must be in [0, 1], got 2.0')):
        with pytest.raises(SystemExit) as e:
            main(['--work', str(tmp_path / 'w'), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / 'w').exists()          # refused before anything is written
    with pytest.raises(ValueError, match='few_shot_fraction'):
        TrainSettings(few_shot_fraction=1.5)


def test_export_only_records_the_settings_the_model_was_trained_with(tmp_path):
    import json
    work, bundle = tmp_path / 'work', tmp_path / 'bundle'
    assert main(args(work, 1, 1) + ['--lr-vision', '3e-3', '--foreign-fraction', '0.5']) == 0
    assert main(['--work', str(work), '--config', 'tiny', '--export-only', '--bundle', str(bundle),
                 '--threshold-images', '0', '--no-verify']) == 0
    source = json.loads((bundle / 'manifest.json').read_text())['model']['source']
    recorded = source['settings']
    assert recorded['lr_vision'] == 3e-3 and recorded['foreign_fraction'] == 0.5 and recorded['vision_steps'] == 1
    # and the environment it was trained in: the weights depend on it, not on the recipe alone
    import cv2
    packages = source['environment']['packages']
    assert packages['torch'].startswith(torch.__version__.split('+')[0])
    assert packages['opencv-python-headless'].startswith(cv2.__version__)
    assert source['environment']['cpu']


def test_options_of_the_export_are_refused_before_the_training(tmp_path, capsys):
    for flags, message in ((['--samples', '0'], '--samples: 0 is less than 1'),
                           (['--threshold-images', '-1'], '--threshold-images: -1 is less than 0'),
                           (['--quant', 'f32,bogus'], "--quant: unknown GGUF type 'bogus'")):
        with pytest.raises(SystemExit) as e:
            main(args(tmp_path / 'w', 1, 0) + ['--bundle', str(tmp_path / 'b'), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def trained_work(tmp_path, tiny_tokenizer_dir):
    """A work directory with a final.pt of the tiny config (untrained weights: these tests only load it)."""
    import shutil

    from anomalygpt_edge.models.train import build_small, save_checkpoint
    work = tmp_path / 'work'
    shutil.copytree(tiny_tokenizer_dir, work / 'tokenizer')
    model, text = build_small(work / 'tokenizer', 0, 'tiny')
    save_checkpoint(work / 'final.pt', model=model.state_dict(), text=text.state_dict(), config='tiny')
    return work


def test_export_only_without_a_trained_model_says_what_to_run(tmp_path, capsys):
    work = tmp_path / 'work'
    assert main(['--work', str(work), '--config', 'tiny', '--export-only', '--bundle', str(tmp_path / 'b')]) == 2
    err = capsys.readouterr().err
    assert f'{work / "final.pt"}: no trained model' in err and 'without --export-only' in err
    assert 'Traceback' not in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('kind', ['folder', 'file'])
def test_export_only_replaces_only_a_bundle(trained_work, tmp_path, capsys, kind):
    work, out = trained_work, tmp_path / 'mine'
    if kind == 'folder':
        out.mkdir()
        (out / 'keep.txt').write_text('mine')
    else:
        out.write_text('mine')
    assert main(['--work', str(work), '--config', 'tiny', '--export-only', '--bundle', str(out),
                 '--threshold-images', '0', '--no-verify']) == 2
    err = capsys.readouterr().err
    assert f'{out}: ' in err and 'refusing to replace it' in err
    assert (out / 'keep.txt' if kind == 'folder' else out).read_text() == 'mine'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['mine', 'work']


def test_export_only_with_another_config_names_both(trained_work, capsys):
    from anomalygpt_edge.models.loaders import CheckpointError
    from anomalygpt_edge.models.train import build_small, load_trained, save_checkpoint
    work = trained_work
    assert main(['--work', str(work), '--config', 'small', '--export-only']) == 2
    err = capsys.readouterr().err
    assert f'{work / "final.pt"}: trained with --config tiny, not small' in err and 'Traceback' not in err
    # a checkpoint that does not record its config: the strict loader's error, a few lines naming the keys
    state = load_checkpoint(work / 'final.pt')
    save_checkpoint(work / 'final.pt', model=state['model'], text=state['text'])
    small, small_text = build_small(work / 'tokenizer', 0, 'small')
    with pytest.raises(CheckpointError) as e:
        load_trained(work, small, small_text)
    assert str(e.value).startswith(f"{work / 'final.pt'}: does not match the 'small' model's layout")
    assert 'wrong shapes' in str(e.value) and 'another --config' in str(e.value)
    assert len(str(e.value).splitlines()) <= 5   # at most 12 keys a kind, never torch's page of them


def test_text_warm_up_parts_the_normal_and_abnormal_features_of_every_class(tiny_config):
    from anomalygpt_edge.models.imagebind import TextTower, init_random
    from anomalygpt_edge.models.synthetic import CATEGORIES
    from anomalygpt_edge.models.text_features import class_text_features
    from anomalygpt_edge.models.train import separate_text_features

    def cosines(tower):
        with torch.no_grad():
            return [float(class_text_features(tower, c)[0] @ class_text_features(tower, c)[1]) for c in CATEGORIES]
    text = TextTower(tiny_config.text)
    init_random(text, 2)
    assert min(cosines(text)) > 0.9            # random weights: the two states embed almost alike
    left = separate_text_features(text, list(CATEGORIES), 50, 5e-4)
    assert max(cosines(text)) <= 0.0 and left == pytest.approx(sum(cosines(text)) / len(CATEGORIES))


def test_logit_scale_ramp_rises_evenly_in_log_scale_to_the_reference_scale():
    from anomalygpt_edge.models import spec
    from anomalygpt_edge.models.train import LOGIT_SCALE_START, logit_scale
    assert logit_scale(0, 1000) == LOGIT_SCALE_START < spec.LOGIT_SCALE
    assert logit_scale(500, 1000) == pytest.approx((LOGIT_SCALE_START * spec.LOGIT_SCALE) ** 0.5)  # geometric mean
    assert logit_scale(1000, 1000) == logit_scale(5000, 1000) == logit_scale(0, 0) == spec.LOGIT_SCALE
    ramp = [logit_scale(t, 1000) for t in range(0, 1001, 50)]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))


def test_vision_stage_trains_with_the_ramped_logit_scale(tmp_path, monkeypatch):
    from anomalygpt_edge.models import decoder, spec, train
    seen = []

    def spy(dec, taps, tf, scale=spec.LOGIT_SCALE):
        seen.append(scale)
        return decoder.layer_logits(dec, taps, tf, scale)
    monkeypatch.setattr(train, 'layer_logits', spy)
    assert main(args(tmp_path / 'w', 3, 0) + ['--logit-scale-ramp-steps', '2']) == 0
    assert seen == pytest.approx([train.LOGIT_SCALE_START, (train.LOGIT_SCALE_START * spec.LOGIT_SCALE) ** 0.5,
                                  spec.LOGIT_SCALE])


def _weights(state: dict) -> dict:
    """A checkpoint's model and text-tower weights in one dict."""
    return {**state['model'], **{'text.' + k: v for k, v in state['text'].items()}}


def _vision_weights_after_training_in_a_process_with_hash_seed(work, hash_seed: int) -> dict:
    import os
    import subprocess
    import sys
    cmd = [sys.executable, '-m', 'anomalygpt_edge.models.train', '--work', str(work), '--config', 'tiny',
           '--vision-steps', '2', '--lm-steps', '0', '--samples', '8', '--batch', '8', '--threads', '1']
    env = {**os.environ, 'PYTHONHASHSEED': str(hash_seed)}
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return _weights(load_checkpoint(work / 'vision.pt'))


def _trained_weights(work, *flags, steps=(3, 2)) -> dict:
    assert main(args(work, *steps) + list(flags)) == 0
    return _weights(load_checkpoint(work / 'final.pt'))


def test_adamw_foreach_trains_the_weights_of_the_per_tensor_loop_bit_for_bit(tmp_path):
    # the shipped demo model was trained with the loop and its bundle reproduced with foreach
    loop = _trained_weights(tmp_path / 'loop', '--adamw', 'loop')
    foreach = _trained_weights(tmp_path / 'foreach')
    assert loop.keys() == foreach.keys()
    assert [k for k in loop if not torch.equal(loop[k], foreach[k])] == []
    untrained = _trained_weights(tmp_path / 'none', steps=(0, 0))
    trained = [k for k in foreach if not torch.equal(untrained[k], foreach[k])]
    assert any(k.startswith('visual_encoder.') for k in trained) and any(k.startswith('llama_model.') for k in trained)


def test_a_resumed_stage_uses_the_adamw_of_its_command_line(tmp_path, monkeypatch):
    from anomalygpt_edge.models import train
    work = tmp_path / 'w'
    assert main(args(work, 1, 1) + ['--adamw', 'loop']) == 0
    seen = []
    real = train.load_optimizer

    def spy(opt, state, kind):
        real(opt, state, kind)
        seen.append([(g['foreach'], g['fused']) for g in opt.param_groups])
    monkeypatch.setattr(train, 'load_optimizer', spy)
    assert main(args(work, 2, 2) + ['--adamw', 'fused']) == 0
    assert seen == [[(None, True)], [(None, True)]]      # vision, then language


def test_the_same_seed_trains_the_same_weights_whatever_the_string_hashing(tmp_path):
    # batches of 4 pairs hold several classes: their text features were once computed in a set's order
    a = _vision_weights_after_training_in_a_process_with_hash_seed(tmp_path / 'a', 1)
    b = _vision_weights_after_training_in_a_process_with_hash_seed(tmp_path / 'b', 2)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_frozen_text_trains_the_vision_tower_and_leaves_the_text_tower_as_initialised(tmp_path, monkeypatch):
    from anomalygpt_edge.models import train
    built = {}

    def build(*a, **kw):
        model, text = train_build(*a, **kw)
        built['text'] = {k: v.clone() for k, v in text.state_dict().items()}
        built['vision'] = {k: v.clone() for k, v in model.state_dict().items() if k.startswith('visual_encoder.')}
        return model, text
    train_build = train.build_small
    monkeypatch.setattr(train, 'build_small', build)
    assert main(args(tmp_path / 'w', 2, 0) + ['--frozen-text']) == 0
    state = load_checkpoint(tmp_path / 'w' / 'vision.pt')
    assert all(torch.equal(v, built['text'][k]) for k, v in state['text'].items())
    assert any(not torch.equal(state['model'][k], v) for k, v in built['vision'].items())


def test_the_weight_average_hands_stage_2_the_moving_average_of_the_live_weights(tmp_path, monkeypatch):
    from anomalygpt_edge.models import train
    key = 'visual_encoder.modality_trunks.vision.blocks.0.mlp.fc1.weight'
    live, built = [], {}
    real, train_build = train.optimizer_step, train.build_small

    def build(*a, **kw):
        model, text = train_build(*a, **kw)
        built['model'] = model
        return model, text

    def record(loss, params, opt):
        out = real(loss, params, opt)
        if 'model' in built and params[0] is next(built['model'].visual_encoder.parameters()):
            live.append(dict(built['model'].named_parameters())[key].detach().clone())
        return out
    monkeypatch.setattr(train, 'build_small', build)
    monkeypatch.setattr(train, 'optimizer_step', record)
    decay = 0.5
    assert main(args(tmp_path / 'w', 3, 0) + ['--ema-decay', str(decay)]) == 0
    assert len(live) == 3
    expected = live[0]            # the average starts at the first step's weights
    for w in live[1:]:
        expected = decay * expected + (1 - decay) * w
    final = load_checkpoint(tmp_path / 'w' / 'final.pt')['model'][key]
    assert torch.allclose(final, expected, atol=1e-7) and not torch.allclose(final, live[-1])
    # the checkpoint keeps the live weights (to resume from) beside the average
    ckpt = load_checkpoint(tmp_path / 'w' / 'vision.pt')
    assert torch.equal(ckpt['model'][key], live[-1]) and int(ckpt['average']['n_averaged']) == 3
    # and from it, stage 1's weights as stage 2 got them (what demo_ablation --maps-only measures)
    weights, text_weights = train.stage_one_weights(ckpt)
    handed = load_checkpoint(tmp_path / 'w' / 'final.pt')
    assert weights.keys() == ckpt['model'].keys() and text_weights.keys() == handed['text'].keys()
    assert all(torch.equal(v, handed['model'][k]) for k, v in weights.items())
    assert all(torch.equal(v, handed['text'][k]) for k, v in text_weights.items())


def test_a_resumed_stage_1_goes_on_averaging_and_refuses_another_average_setting(tmp_path):
    assert main(args(tmp_path / 'w', 2, 0) + ['--ema-decay', '0.9']) == 0
    assert main(args(tmp_path / 'w', 3, 0) + ['--ema-decay', '0.9']) == 0
    assert int(load_checkpoint(tmp_path / 'w' / 'vision.pt')['average']['n_averaged']) == 3
    before = (tmp_path / 'w' / 'vision.pt').read_bytes()
    with pytest.raises(SystemExit, match='vision.pt: .* trained with the weight average'):
        main(args(tmp_path / 'w', 4, 0))
    assert (tmp_path / 'w' / 'vision.pt').read_bytes() == before


def test_vision_bf16_runs_the_tower_in_bfloat16_and_hands_the_decoder_float32(tmp_path, monkeypatch):
    from anomalygpt_edge.models import decoder, train
    seen = {'tower': set(), 'taps': set()}
    real_build = train.build_small

    def build(*a, **kw):
        model, text = real_build(*a, **kw)
        fc1 = model.visual_encoder.modality_trunks['vision'].blocks[0].mlp.fc1
        fc1.register_forward_hook(lambda m, i, out: seen['tower'].add(out.dtype) if m.training else None)
        return model, text

    def spy(dec, taps, tf, scale):
        seen['taps'].update(t.dtype for t in taps)
        return decoder.layer_logits(dec, taps, tf, scale)
    monkeypatch.setattr(train, 'build_small', build)
    monkeypatch.setattr(train, 'layer_logits', spy)
    bf16 = _trained_weights(tmp_path / 'bf16', '--vision-bf16', steps=(2, 0))
    assert seen == {'tower': {torch.bfloat16}, 'taps': {torch.float32}}
    seen = {'tower': set(), 'taps': set()}
    fp32 = _trained_weights(tmp_path / 'fp32', steps=(2, 0))
    assert seen == {'tower': {torch.float32}, 'taps': {torch.float32}}
    # the weights stay float32 and train to nearby, not identical, values
    key = 'visual_encoder.modality_trunks.vision.blocks.0.mlp.fc1.weight'
    assert bf16[key].dtype == torch.float32
    assert not torch.equal(bf16[key], fp32[key])
    assert torch.allclose(bf16[key], fp32[key], atol=5e-3)


def test_wood_soft_label_switches_wood_grain_to_the_textures_logistic():
    from anomalygpt_edge.models.anomaly_sim import SIM_PARAMS
    from anomalygpt_edge.models.train import TrainSettings, simulation_logistic
    assert simulation_logistic(TrainSettings()) == {}
    switched = simulation_logistic(TrainSettings(wood_soft_label=False))
    assert switched == {'wood_grain': SIM_PARAMS['woven_fabric'].logistic}
    assert switched['wood_grain'] != SIM_PARAMS['wood_grain'].logistic


def test_each_stage_simulates_with_its_own_nsa_settings(tmp_path, monkeypatch):
    from anomalygpt_edge.models import train
    seen = {}

    def vision(model, text, dataset, s, ckpt):
        seen['vision'] = dataset
        return 0.0

    def language(model, text, tokenizer, dataset, s, ckpt):
        seen['language'] = dataset
        return 0.0
    monkeypatch.setattr(train, 'train_vision', vision)
    monkeypatch.setattr(train, 'train_language', language)
    assert main(args(tmp_path / 'w', 1, 1) + ['--nsa-size-scale', '0.035', '--lm-nsa-size-scale', '0.05',
                                              '--nsa-thin-fraction', '0.3', '--lm-nsa-thin-fraction', '0',
                                              '--language-seed-offset', '0']) == 0
    assert seen['vision'].nsa_size_scale == 0.035 and seen['language'].nsa_size_scale == 0.05
    assert seen['vision'].nsa_thin_fraction == 0.3 and seen['language'].nsa_thin_fraction == 0.0
    assert seen['vision'].seed == seen['language'].seed
    seen.clear()
    # the same settings and no seed offset: stage 2 reads stage 1's own stream
    assert main(args(tmp_path / 'v', 1, 1) + ['--nsa-size-scale', '0.035', '--lm-nsa-size-scale', '0.035',
                                              '--nsa-thin-fraction', '0.3', '--lm-nsa-thin-fraction', '0.3',
                                              '--language-seed-offset', '0']) == 0
    assert seen['language'] is seen['vision']


def test_label_maps_hand_stage_2_its_labels_where_the_map_shows_them(tmp_path, monkeypatch):
    from anomalygpt_edge.models import decoder, train
    from anomalygpt_edge.models.prompt_learner import PromptLearner
    drawn, seen = [], []

    def spy(labels, grid):
        drawn.append((labels.clone(), decoder.label_as_map(labels, grid)))
        return drawn[-1][1]
    forward = PromptLearner.forward

    def record(self, amap):
        seen.append(amap)
        return forward(self, amap)
    monkeypatch.setattr(train, 'label_as_map', spy)
    monkeypatch.setattr(PromptLearner, 'forward', record)
    assert main(args(tmp_path / 'w', 1, 2) + ['--label-map-fraction', '1']) == 0
    assert len(drawn) == 2
    for (labels, as_map), amap in zip(drawn, seen[-2:]):
        assert amap is as_map and labels.shape == (2, 1, 224, 224)
        assert labels[0::2].sum() == 0 and labels[1::2].sum() > 0   # (normal, simulated) pairs
    drawn.clear()
    assert main(args(tmp_path / 'w0', 1, 2)) == 0
    assert drawn == []                                              # off by default: the vision stage's maps


class _Niceness(torch.utils.data.Dataset):
    """Items that carry the scheduling priority of the process that made them."""

    def __len__(self):
        return 4

    def set_epoch(self, epoch):
        pass

    def __getitem__(self, index):
        return {'images': torch.full((2, 1), float(os.nice(0))), 'masks': torch.zeros(2, 1), 'questions': ['', ''],
                'answers': ['', ''], 'category': 'c', 'positions': []}


@pytest.mark.skipif(not hasattr(os, 'nice'), reason='no process priorities on this platform')
def test_the_loader_worker_simulates_at_a_lower_priority_than_the_training_step():
    from anomalygpt_edge.models.train import _batches
    before = os.nice(0)
    batch = next(_batches(_Niceness(), 4, seed=0, workers=1))
    assert batch['images'].min().item() == 19   # made by the worker, at the lowest priority
    assert os.nice(0) == before                 # the training process keeps its own


@pytest.mark.parametrize('start', [1, 3, 4, 6])
def test_a_resume_sees_the_batches_an_uninterrupted_run_sees(start):
    import itertools
    from anomalygpt_edge.models.synthetic_dataset import SyntheticAnomalyDataset
    from anomalygpt_edge.models.train import _batches

    def run(from_step, n):   # 5 pairs of 2 a batch: 2 batches an epoch, the fifth pair dropped
        batches = _batches(SyntheticAnomalyDataset(5, seed=2, categories=['washer']), 4, seed=7, start=from_step,
                           workers=0)
        return [b['images'] for b in itertools.islice(batches, n)]
    whole = run(0, 8)
    resumed = run(start, 8 - start)
    assert len(resumed) == len(whole[start:])
    for a, b in zip(whole[start:], resumed):
        assert torch.equal(a, b)


def test_an_interrupted_run_resumed_trains_the_weights_of_one_go(tmp_path, monkeypatch):
    from anomalygpt_edge.models import train
    assert main(args(tmp_path / 'whole', 4, 1)) == 0
    save = train.save_checkpoint

    def save_then_stop(path, **state):   # killed right after the step-2 checkpoint, mid-epoch
        save(path, **state)
        if path.name == 'vision.pt' and state.get('step') == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, 'save_checkpoint', save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(args(tmp_path / 'resumed', 4, 1))
    monkeypatch.setattr(train, 'save_checkpoint', save)
    assert main(args(tmp_path / 'resumed', 4, 1)) == 0
    whole, resumed = (load_checkpoint(tmp_path / d / 'vision.pt') for d in ('whole', 'resumed'))
    assert resumed['step'] == whole['step'] == 4
    assert whole['model'].keys() == resumed['model'].keys()
    assert all(torch.equal(whole['model'][k], resumed['model'][k]) for k in whole['model'])
