"""The training-only probes: stage 1's patch probe (its targets follow the label's patches, its loss weighs the
rare anomalous patches as much as the normal ones, a run checkpoints and resumes it) and stage 2's cell probe
of the map-derived prompts (its targets are the cells the answer names)."""
import math

import pytest
import torch

from anomalygpt_edge.models import spec
from anomalygpt_edge.models.patch_probe import PatchProbe, cell_targets, patch_targets, probe_loss
from anomalygpt_edge.models.train import load_checkpoint, main


def test_patch_targets_mark_exactly_the_patches_the_label_touches():
    masks = torch.zeros(2, 1, 224, 224)
    masks[0, 0, 16:26, 150:160] = 1.0     # rows 16-25 -> patch row 1; cols 150-159 -> patch cols 10 and 11
    masks[1, 0, 0:5, 0:5] = 0.2           # below the 0.3 binarisation: no anomaly
    t = patch_targets(masks, 16)
    assert t.shape == (2, 256)
    assert torch.nonzero(t[0]).flatten().tolist() == [1 * 16 + 10, 1 * 16 + 11]
    assert t[1].sum() == 0


def test_probe_loss_weighs_the_anomalous_patches_as_the_normal_ones():
    target = torch.zeros(1, 256)
    target[0, :2] = 1.0
    says_normal = [torch.full((1, 256), -8.0)] * 4
    # "normal everywhere" is right on 254 patches: unweighted its mean BCE would be ~0.06 per layer
    right_bce, wrong_bce = math.log1p(math.exp(-8.0)), 8.0 + math.log1p(math.exp(-8.0))
    assert probe_loss(says_normal, target) == pytest.approx(4 * (wrong_bce + right_bce), rel=1e-5)
    right = [torch.where(target > 0, 8.0, -8.0)] * 4
    assert probe_loss(right, target) < 0.01
    # an image without anomalies: only the normal term
    assert probe_loss(says_normal, torch.zeros(1, 256)) == pytest.approx(4 * right_bce, rel=1e-2)  # float32 near 0


def test_probe_reads_every_tapped_layer(tiny_config):
    probe = PatchProbe(tiny_config.vision.width)
    taps = [torch.randn(2, 16, tiny_config.vision.width) for _ in range(4)]
    scores = probe(taps)
    assert [s.shape for s in scores] == [(2, 16)] * 4
    assert not torch.allclose(scores[0], scores[1])


def test_training_with_the_probe_checkpoints_it_and_resumes_it(tmp_path):
    base = ['--work', str(tmp_path / 'w'), '--config', 'tiny', '--lm-steps', '0', '--samples', '6', '--batch', '2',
            '--threads', '1', '--checkpoint-every', '1', '--probe-weight', '1']
    assert main(base + ['--vision-steps', '2']) == 0
    first = load_checkpoint(tmp_path / 'w' / 'vision.pt')['probe']
    assert main(base + ['--vision-steps', '3']) == 0
    second = load_checkpoint(tmp_path / 'w' / 'vision.pt')['probe']
    assert first.keys() == second.keys() and not torch.equal(first['fc.0.weight'], second['fc.0.weight'])
    assert not any(k.startswith('probe') for k in load_checkpoint(tmp_path / 'w' / 'final.pt')['model'])


@pytest.mark.parametrize('first, then, had', [('0', '1', 'without the patch probe'), ('1', '0', 'with the patch probe')])
def test_resuming_with_another_probe_setting_names_the_checkpoint_and_keeps_it(tmp_path, first, then, had):
    base = ['--work', str(tmp_path / 'w'), '--config', 'tiny', '--lm-steps', '0', '--samples', '6', '--batch', '2',
            '--threads', '1', '--checkpoint-every', '1']
    assert main(base + ['--vision-steps', '1', '--probe-weight', first]) == 0
    before = (tmp_path / 'w' / 'vision.pt').read_bytes()
    with pytest.raises(SystemExit, match=f'vision.pt: .* trained {had}'):
        main(base + ['--vision-steps', '2', '--probe-weight', then])
    assert (tmp_path / 'w' / 'vision.pt').read_bytes() == before


def test_cell_targets_mark_the_cells_the_answer_names_row_major():
    t = cell_targets([[], ['top left'], ['center', 'bottom right'], ['right']])
    assert t.shape == (4, 9)
    assert [torch.nonzero(row).flatten().tolist() for row in t] == [[], [0], [4, 8], [5]]
    # the same grid as the words the answers are made from
    flat = [w for row in spec.POSITION_WORDS for w in row]
    assert [int(cell_targets([[w]]).argmax()) for w in flat] == list(range(9))


def _stage2(tmp_path, name, *extra):
    return ['--work', str(tmp_path / name), '--config', 'tiny', '--vision-steps', '1', '--samples', '6',
            '--batch', '4', '--threads', '1', '--checkpoint-every', '1', *extra]


def test_the_cell_probe_trains_the_prompt_learner_and_is_checkpointed_and_resumed(tmp_path):
    base = _stage2(tmp_path, 'w', '--cell-probe-weight', '1')
    assert main(base + ['--lm-steps', '2']) == 0
    first = load_checkpoint(tmp_path / 'w' / 'language.pt')
    assert main(base + ['--lm-steps', '3']) == 0
    second = load_checkpoint(tmp_path / 'w' / 'language.pt')
    assert second['step'] == 3 and not torch.equal(first['probe']['fc.0.weight'], second['probe']['fc.0.weight'])
    # the probe's loss reaches the prompt learner: the same run without it trains other prompt-learner weights
    assert main(_stage2(tmp_path, 'off', '--lm-steps', '3')) == 0
    off = load_checkpoint(tmp_path / 'off' / 'language.pt')
    assert 'probe' not in off
    key = 'prompt_learner.meta_net.0.weight'
    assert not torch.equal(off['model'][key], second['model'][key])


def test_a_stage_2_checkpoint_resumes_only_with_its_own_cell_probe_setting(tmp_path):
    assert main(_stage2(tmp_path, 'w', '--lm-steps', '1')) == 0
    with pytest.raises(SystemExit, match='without the cell probe'):
        main(_stage2(tmp_path, 'w', '--lm-steps', '2', '--cell-probe-weight', '1'))
