"""The demo training recipe runs, checkpoints atomically and resumes where it stopped (tiny config)."""
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
    assert set(final) >= {'model', 'text'}
