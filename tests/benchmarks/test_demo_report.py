"""The demo model card re-rendered from its stored figures (``--from-results``) is the committed card,
and takes a new history without measuring."""
import json
import shutil
from pathlib import Path

import pytest

from anomalygpt_edge.benchmarks import demo_report

DEMO = Path(__file__).resolve().parents[2] / 'runtime' / 'demo'


@pytest.fixture
def out(tmp_path):
    shutil.copy(DEMO / 'results.json', tmp_path / 'results.json')
    return tmp_path


def test_re_rendering_the_stored_figures_gives_the_committed_card(out):
    assert demo_report.main(['--bundle', str(DEMO / 'bundle'), '--out', str(out), '--from-results']) == 0
    assert (out / 'MODEL_CARD.md').read_text() == (DEMO / 'MODEL_CARD.md').read_text()


def test_a_new_history_reaches_the_card_and_the_results(out):
    history = out / 'history.md'
    history.write_text('retrained on a quiet day in 12.3 min\n')
    assert demo_report.main(['--bundle', str(DEMO / 'bundle'), '--out', str(out), '--from-results',
                             '--history', str(history)]) == 0
    card = (out / 'MODEL_CARD.md').read_text()
    # its own section at the end, after the figures a user looks for first
    assert 'This model was retrained on a quiet day in 12.3 min' in card
    assert card.index('## Limits') < card.index('## History') < card.index('This model was retrained')
    stored = json.loads((out / 'results.json').read_text())
    assert stored['history'] == 'retrained on a quiet day in 12.3 min'
    assert stored['0_shot'] == json.loads((DEMO / 'results.json').read_text())['0_shot']   # nothing re-measured


def test_a_retrain_keeps_the_cards_history_and_tables(out, monkeypatch):
    stored = json.loads((out / 'results.json').read_text())
    assert stored['history'] and stored['ablation']
    fresh = {k: v for k, v in stored.items() if k not in ('history', 'ablation')}
    fresh['0_shot'] = dict(fresh['0_shot'], n_images=1)   # stands for the new model's figures
    monkeypatch.setattr(demo_report, 'measure_bundle', lambda args: json.loads(json.dumps(fresh)))
    assert demo_report.main(['--bundle', str(DEMO / 'bundle'), '--out', str(out), '--keep-history']) == 0
    kept = json.loads((out / 'results.json').read_text())
    assert kept['history'] == stored['history'] and kept['ablation'] == stored['ablation']
    assert kept['0_shot']['n_images'] == 1
    assert '## History' in (out / 'MODEL_CARD.md').read_text()


def test_from_results_takes_no_checkpoint(out, capsys):
    with pytest.raises(SystemExit) as e:
        demo_report.main(['--bundle', str(DEMO / 'bundle'), '--out', str(out), '--from-results', '--work', str(out)])
    assert e.value.code == 2 and '--from-results' in capsys.readouterr().err


def test_missing_results_are_named(tmp_path, capsys):
    assert demo_report.main(['--bundle', str(DEMO / 'bundle'), '--out', str(tmp_path), '--from-results']) == 2
    assert 'results.json' in capsys.readouterr().err


def test_card_shows_intervals_and_says_whether_a_missed_target_is_within_one():
    results = json.loads((DEMO / 'results.json').read_text())
    manifest = json.loads((DEMO / 'bundle' / 'manifest.json').read_text())
    z = results['0_shot']
    z['mean'].update(image_auroc=0.965, location_accuracy=0.711)
    z['intervals'] = {'image_auroc': [0.94, 0.984], 'yes_no_accuracy': [0.86, 0.95], 'location_accuracy': [0.62, 0.79]}
    results['1_shot'].pop('intervals', None)   # as in a results.json measured before intervals existed
    card = demo_report.model_card(results, manifest)
    row = next(line for line in card.splitlines() if line.startswith('| zero-shot |'))
    assert '| 0.965 (0.94-0.98) |' in row
    assert row.endswith('0.711 (0.62-0.79) |')
    assert 'location accuracy 0.711 (target 0.80, above its 95 % interval)' in card
    assert 'image AUROC 0.965 (target 0.97, inside its 95 % interval)' in card
    assert '95 % intervals' in card
    one = next(line for line in card.splitlines() if line.startswith('| 1-shot |'))
    assert '(' not in one            # no intervals stored for it: plain figures


def test_card_says_where_the_simulation_departs_from_the_reference_nsa():
    results = json.loads((DEMO / 'results.json').read_text())
    manifest = json.loads((DEMO / 'bundle' / 'manifest.json').read_text())

    def training_data(settings):
        manifest['model']['source']['settings'] = settings
        card = demo_report.model_card(results, manifest)
        return card[card.index('## Training data'):card.index('Stage 1 trains')]
    assert 'NSA patch half-widths' not in training_data({}) and 'stripes' not in training_data({})
    text = training_data({'nsa_size_scale': 0.035, 'lm_nsa_size_scale': 0.05, 'nsa_thin_fraction': 0.3,
                          'lm_nsa_thin_fraction': 0.3})
    assert 'scale 0.035 in stage 1 and 0.05 in stage 2' in text and '30% of NSA patches drawn as thin' in text
    text = training_data({'nsa_thin_fraction': 0.3, 'lm_nsa_thin_fraction': 0.0})
    assert "30% of stage 1's NSA patches (none of stage 2's) drawn as thin" in text and 'scale' not in text


def test_targets_summary_counts_the_met_targets_and_adds_up_the_shortfalls():
    # the shipped model's validation figures of 2026-12-06: image AUROC and Yes/No met, pixel AUROC and location not
    mean = {'image_auroc': 0.973, 'pixel_auroc': 0.947, 'yes_no_accuracy': 0.940, 'location_accuracy': 0.733,
            'map_half_accuracy': 0.927}
    short = demo_report.short_of_targets(mean)
    assert short['image_auroc'] == 0 and short['yes_no_accuracy'] == 0
    assert short['pixel_auroc'] == pytest.approx(0.003) and short['location_accuracy'] == pytest.approx(0.067)
    line = demo_report.targets_summary(mean)
    assert line.startswith('targets met 2 of 4, short by 0.070 in all (')
    assert 'pixel AUROC 0.003' in line and 'location accuracy 0.067' in line and 'image AUROC' not in line
    # a maps-only run measures two figures: only those are counted
    assert demo_report.targets_summary({'image_auroc': 0.98, 'pixel_auroc': 0.96, 'yes_no_accuracy': None}) == \
        'targets met 2 of 2'
