"""The recipe comparison measures each training directory on the held-out set (tiny config)."""
import json

import pytest

from anomalygpt_edge.benchmarks import demo_ablation
from anomalygpt_edge.models.synthetic import CATEGORIES
from anomalygpt_edge.models.train import main as train


def test_measures_each_run_and_refuses_a_directory_without_a_model(tmp_path, capsys):
    work = tmp_path / 'work'
    assert train(['--work', str(work), '--config', 'tiny', '--vision-steps', '1', '--lm-steps', '1', '--samples', '4',
                  '--batch', '2', '--threads', '1', '--threshold-images', '0']) == 0
    out = tmp_path / 'ablation.json'
    assert demo_ablation.main(['--json', str(out), '--config', 'tiny', '--per-kind', '1', '--good', '1',
                               f'a={work}', f'b={work}']) == 0
    report = json.loads(out.read_text())
    a, b = report['runs']['a'], report['runs']['b']
    assert set(a['classes']) == set(CATEGORIES)
    assert a['mean'] == b['mean']                       # one checkpoint, one held-out set: the same figures
    for k in demo_ablation.KEYS:
        assert 0.0 <= a['mean'][k] <= 1.0
    assert report['table'].count('\n') == 3             # header, rule, two runs
    err = capsys.readouterr().err                       # each measured run's targets, met and missed
    assert f"a: {demo_ablation.targets_summary(a['mean'])}" in err and err.count('targets met ') == 2
    assert demo_ablation.main(['--json', str(out), f'c={tmp_path}']) == 2
    assert 'final.pt' in capsys.readouterr().err

    # an earlier report's runs stay (minus the dropped), ahead of the new ones; another held-out set is refused
    more = tmp_path / 'more.json'
    common = ['--config', 'tiny', '--per-kind', '1', '--good', '1', '--keep', str(out)]
    assert demo_ablation.main(['--json', str(more), *common, '--drop', 'a', '--rename', 'b', 'b2', f'c={work}']) == 0
    merged = json.loads(more.read_text())
    assert list(merged['runs']) == ['b2', 'c'] and merged['runs']['b2'] == report['runs']['b']
    assert merged['runs']['c']['mean'] == b['mean'] and merged['table'].count('\n') == 3
    # a kept run measured anew keeps its place in the table
    again = tmp_path / 'again.json'
    assert demo_ablation.main(['--json', str(again), *common[:-2], '--keep', str(more), f'b2={work}']) == 0
    assert list(json.loads(again.read_text())['runs']) == ['b2', 'c']
    assert demo_ablation.main(['--json', str(more), *common[:-4], '--good', '2', '--keep', str(out), f'c={work}']) == 2
    assert 'another held-out set' in capsys.readouterr().err
    # a validation set of another seed is recorded as such, and cannot be merged with the held-out figures
    val = tmp_path / 'val.json'
    assert demo_ablation.main(['--json', str(val), *common[:-2], '--seed', '7', f'c={work}']) == 0
    assert json.loads(val.read_text())['held_out']['seed'] == 7
    assert demo_ablation.main(['--json', str(more), *common[:-2], '--keep', str(val), f'c={work}']) == 2
    assert demo_ablation.main(['--json', str(more), *common, '--drop', 'zz', f'c={work}']) == 2

    # with no run to measure, --keep alone relabels: the kept report's set and figures, nothing measured anew
    relabelled = tmp_path / 'relabelled.json'
    assert demo_ablation.main(['--json', str(relabelled), '--keep', str(val), '--rename', 'c', 'c (shipped)']) == 0
    kept, new = json.loads(val.read_text()), json.loads(relabelled.read_text())
    assert new['held_out'] == kept['held_out'] and list(new['runs']) == ['c (shipped)']
    assert new['runs']['c (shipped)'] == kept['runs']['c'] and '| c (shipped) |' in new['table']
    assert demo_ablation.main(['--json', str(relabelled), '--keep', str(tmp_path / 'missing.json')]) == 2
    assert 'missing.json' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_ablation.main(['--json', str(relabelled)])
    assert '--keep' in capsys.readouterr().err


def test_maps_only_measures_the_stage_1_checkpoint_as_the_full_run_measures_its_maps(tmp_path, capsys):
    work = tmp_path / 'work'
    assert train(['--work', str(work), '--config', 'tiny', '--vision-steps', '2', '--lm-steps', '1', '--samples', '4',
                  '--batch', '2', '--threads', '1', '--threshold-images', '0']) == 0
    full, maps = tmp_path / 'full.json', tmp_path / 'maps.json'
    common = ['--config', 'tiny', '--per-kind', '1', '--good', '1', f'a={work}']
    assert demo_ablation.main(['--json', str(full), *common]) == 0
    assert demo_ablation.main(['--json', str(maps), '--maps-only', *common]) == 0
    f, m = json.loads(full.read_text())['runs']['a'], json.loads(maps.read_text())['runs']['a']
    assert m['vision_step'] == 2
    # stage 2 leaves the vision tower as stage 1 wrote it: vision.pt's maps are final.pt's maps
    for k in ('image_auroc', 'pixel_auroc'):
        assert m['mean'][k] == f['mean'][k]
    assert m['mean']['yes_no_accuracy'] is None and m['mean']['location_accuracy'] is None
    assert m['mean']['map_half_accuracy'] == f['mean']['map_half_accuracy']
    assert m['mean']['map_location_accuracy'] == f['mean']['map_location_accuracy']
    # intervals only for the figures measured: no LLM, no Yes/No or location interval
    assert m['intervals'].keys() == {'image_auroc'} and m['intervals']['image_auroc'] == f['intervals']['image_auroc']
    assert {'image_auroc', 'yes_no_accuracy'} <= f['intervals'].keys()
    table = json.loads(maps.read_text())['table']
    assert table.splitlines()[0] == ("| recipe | image AUROC | pixel AUROC | map >= 0.5 (accuracy) | "
                                     "map's region location |")
    assert table.count('\n') == 2
    (work / 'vision.pt').unlink()
    assert demo_ablation.main(['--json', str(maps), '--maps-only', f'a={work}']) == 2
    assert 'vision.pt' in capsys.readouterr().err


def test_a_bundle_is_measured_through_the_runtime_as_its_checkpoint_is_through_the_reference(tmp_path):
    work, bundle = tmp_path / 'work', tmp_path / 'bundle'
    args = ['--work', str(work), '--config', 'tiny', '--vision-steps', '2', '--lm-steps', '2', '--samples', '4',
            '--batch', '2', '--threads', '1', '--threshold-images', '0']
    assert train(args) == 0
    assert train([*args[:-1], '2', '--bundle', str(bundle), '--export-only']) == 0   # with calibrated thresholds
    out = tmp_path / 'both.json'
    assert demo_ablation.main(['--json', str(out), '--config', 'tiny', '--per-kind', '1', '--good', '1',
                               f'reference={work}', f'runtime={bundle}']) == 0
    runs = json.loads(out.read_text())['runs']
    ref, rt = runs['reference'], runs['runtime']
    assert rt['bundle'] == str(bundle) and set(rt['classes']) == set(ref['classes'])
    for k in ('image_auroc', 'pixel_auroc', 'map_half_accuracy', 'map_location_accuracy'):
        assert rt['mean'][k] == pytest.approx(ref['mean'][k], abs=0.02), k
    assert rt['mean']['yes_no_accuracy'] == ref['mean']['yes_no_accuracy']
    assert rt['location_breakdown']['by_border'] == ref['location_breakdown']['by_border']
    maps = tmp_path / 'maps.json'
    assert demo_ablation.main(['--json', str(maps), '--config', 'tiny', '--per-kind', '1', '--good', '1', '--maps-only',
                               f'reference={work}', f'runtime={bundle}']) == 0
    runs = json.loads(maps.read_text())['runs']
    # the bundle's thresholds would answer Yes/No without the LLM: a maps-only table has no Yes/No
    assert runs['runtime']['mean']['yes_no_accuracy'] is None is runs['reference']['mean']['yes_no_accuracy']
    assert runs['runtime']['mean']['pixel_auroc'] == pytest.approx(runs['reference']['mean']['pixel_auroc'], abs=0.02)
