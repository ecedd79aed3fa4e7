"""eval's runtime-vs-PyTorch-reference comparison on the tiny bundle: agreement with its own weights,
disagreement with other weights, clear errors for unusable checkpoints, torch imported only on demand."""
import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from anomalygpt_edge.benchmarks.evaluate import evaluate, markdown
from anomalygpt_edge.benchmarks.reference_compare import ReferenceSetupError, reference_for
from anomalygpt_edge.cli import main
from anomalygpt_edge.models.anomalygpt import AnomalyGPT
from anomalygpt_edge.models.config import ModelConfig
from anomalygpt_edge.models.synthetic_dataset import write_mvtec_layout
from anomalygpt_edge.runtime.pipeline import Pipeline

MAP_ATOL = 1e-4
TOKENS = 16


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('mvtec-ref')
    write_mvtec_layout(root, categories=['woven_fabric', 'brushed_metal'], n_train_good=2, n_test_good=2,
                       n_test_defect=1, seed=5, defect_kinds=('scratch',))
    return root


@pytest.fixture(scope='module')
def pipe(tiny_bundle):
    with Pipeline.from_bundle(tiny_bundle, exact_llm=True, max_new_tokens=TOKENS, threads=1) as p:
        yield p


CLASS_MAP = {'woven_fabric': 'carpet', 'brushed_metal': 'metal nut'}


def eval_cli(bundle, data, tmp_path, *extra):
    out = tmp_path / 'report.json'
    rc = main(['eval', '--bundle', str(bundle), '--data', str(data), '--threads', '1', '--max-new-tokens', str(TOKENS),
               '--class-map', *(f'{k}={v}' for k, v in CLASS_MAP.items()), '--json', str(out), *extra])
    return rc, (json.loads(out.read_text()) if rc == 0 else None)


def test_runtime_agrees_with_the_reference_rebuilt_from_the_manifest_seed(pipe, dataset):
    ref = reference_for(pipe)  # random bundle: seed from the manifest, tokenizer by export tiny's recipe
    report = evaluate(pipe, dataset, class_map=CLASS_MAP, progress=False, reference=ref)
    sec = report['reference']
    o = sec['overall']
    assert o['images'] == o['answers_compared'] == 6
    assert o['identical_answers'] == o['identical_verdicts'] == 6 and o['answer_agreement'] == 1.0
    assert sec['differing'] == []
    assert 0.0 <= o['mean_map_abs_error'] <= o['max_map_abs_error'] <= MAP_ATOL
    assert set(sec['classes']) == {'woven_fabric', 'brushed_metal'}
    assert all(c['images'] == 3 and c['identical_answers'] == 3 for c in sec['classes'].values())
    assert o['max_map_abs_error'] == max(c['max_map_abs_error'] for c in sec['classes'].values())
    # the runtime really produced answers (an empty comparison would also be "identical")
    assert all(a['answer'] for answers in report['answers'].values() for a in answers)
    assert 'Runtime vs PyTorch reference on 6 images: identical greedy answers 6/6' in markdown(report)


def test_few_shot_maps_agree_without_the_llm(pipe, dataset):
    report = evaluate(pipe, dataset, k_shot=1, class_map=CLASS_MAP, llm=False, progress=False,
                      reference=reference_for(pipe))
    o = report['reference']['overall']
    assert o['images'] == 6 and o['answers_compared'] == 0 and o['identical_answers'] is None
    assert o['max_map_abs_error'] <= MAP_ATOL
    assert 'answers not compared' in markdown(report)


def test_cli_reports_a_reference_of_other_weights_as_disagreeing(tiny_bundle, pipe, dataset, tmp_path):
    rc, same = eval_cli(tiny_bundle, dataset, tmp_path, '--reference')
    assert rc == 0 and same['reference']['overall']['identical_answers'] == 6
    assert same['reference']['overall']['max_map_abs_error'] <= MAP_ATOL

    cfg = ModelConfig.from_dict(pipe.bundle.manifest['model']['config'])
    other = tmp_path / 'seed1.pt'
    torch.save({'model': AnomalyGPT.random(cfg, seed=1).state_dict()}, other)  # models/train.py's layout
    rc, report = eval_cli(tiny_bundle, dataset, tmp_path, '--reference-checkpoint', str(other))
    assert rc == 0
    o = report['reference']['overall']
    assert o['images'] == 6
    assert o['identical_answers'] < 6 and len(report['reference']['differing']) >= 6 - o['identical_answers']
    assert o['max_map_abs_error'] > 100 * MAP_ATOL
    # the runtime's own figures do not depend on the reference
    assert report['mean'] == pytest.approx(same['mean'])


def test_unusable_checkpoints_exit_2_naming_the_file(tiny_bundle, pipe, dataset, tmp_path, capsys):
    cfg = ModelConfig.from_dict(pipe.bundle.manifest['model']['config'])
    state = AnomalyGPT.random(cfg, seed=0).state_dict()
    dropped = next(iter(state))
    partial = tmp_path / 'partial.pt'
    torch.save({k: v for k, v in state.items() if k != dropped}, partial)
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint at all')
    pickled = tmp_path / 'pickled.pt'
    torch.save({'model': {'x': torch.zeros(1)}, 'extra': SimpleNamespace(a=1)}, pickled)  # refused by weights_only
    for path, words in [(tmp_path / 'missing.pt', 'no such checkpoint'), (garbage, 'not a readable checkpoint'),
                        (pickled, 'not a readable checkpoint'), (partial, dropped)]:
        rc, _ = eval_cli(tiny_bundle, dataset, tmp_path, '--reference-checkpoint', str(path))
        err = capsys.readouterr().err
        assert rc == 2, path
        assert str(path) in err and words in err


@pytest.mark.parametrize('extra, size, words', [
    (['a zebra plays the quantum xylophone gently'] * 50, 400, 'not the tokenizer of'),  # same size, other pieces
    ([], 450, 'but the model only')])
def test_wrong_tokenizer_is_refused(pipe, tmp_path, extra, size, words):
    from anomalygpt_edge.models.tokenizer import reference_corpus, train_sentencepiece
    other = train_sentencepiece(tmp_path / 'tok', reference_corpus() + extra, vocab_size=size)
    with pytest.raises(ReferenceSetupError, match=words) as e:
        reference_for(pipe, tokenizer=other)
    assert str(other) in str(e.value)


@pytest.mark.parametrize('source, words', [({'kind': 'trained', 'seed': 0}, '--reference-checkpoint'),
                                           ({'kind': 'released'}, "model source 'released'")])
def test_bundles_that_need_more_than_a_seed(pipe, source, words):
    manifest = copy.deepcopy(pipe.bundle.manifest)
    manifest['model']['source'] = source
    fake = SimpleNamespace(bundle=SimpleNamespace(manifest=manifest, root=pipe.bundle.root, path=pipe.bundle.path),
                           text_features=pipe.text_features, classes=pipe.classes, max_new_tokens=TOKENS)
    with pytest.raises(ReferenceSetupError, match=words) as e:
        reference_for(fake)
    assert str(Path(pipe.bundle.root) / 'manifest.json') in str(e.value)


def test_trained_bundle_reference_from_a_work_directory(pipe, dataset, tmp_path, tiny_tokenizer_dir):
    """demo_report's path: source 'trained', checkpoint WORK/final.pt ({'model', 'text', ...}), tokenizer beside it."""
    import shutil
    cfg = ModelConfig.from_dict(pipe.bundle.manifest['model']['config'])
    work = tmp_path / 'work'
    shutil.copytree(tiny_tokenizer_dir, work / 'tokenizer')
    torch.save({'model': AnomalyGPT.random(cfg, seed=0).state_dict(), 'text': {}, 'step': 7}, work / 'final.pt')
    manifest = copy.deepcopy(pipe.bundle.manifest)
    manifest['model']['source'] = {'kind': 'trained', 'recipe': 'models/train.py', 'seed': 5}  # weights: final.pt
    fake = SimpleNamespace(bundle=SimpleNamespace(manifest=manifest, root=pipe.bundle.root, path=pipe.bundle.path),
                           text_features=pipe.text_features, classes=pipe.classes, max_new_tokens=TOKENS)
    ref = reference_for(fake, work)
    report = evaluate(pipe, dataset, classes=['woven_fabric'], class_map=CLASS_MAP, progress=False, reference=ref)
    o = report['reference']['overall']
    assert o['images'] == 3 and o['identical_answers'] == 3 and o['max_map_abs_error'] <= MAP_ATOL


def test_eval_and_the_report_code_do_not_import_torch():
    code = ('import sys; import anomalygpt_edge.benchmarks.cmd_eval, anomalygpt_edge.benchmarks.evaluate, '
            'anomalygpt_edge.benchmarks.reference_compare, anomalygpt_edge.benchmarks.demo_report; '
            'from anomalygpt_edge.benchmarks.reference_compare import Agreement, markdown_line; '
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == 'False'


def test_model_card_reads_the_reference_section():
    from anomalygpt_edge.benchmarks.demo_report import model_card
    root = Path(__file__).resolve().parents[2] / 'runtime' / 'demo'
    results = json.loads((root / 'results.json').read_text())
    manifest = json.loads((root / 'bundle' / 'manifest.json').read_text())
    results['runtime_vs_reference'] = {'overall': {'images': 9, 'identical_answers': 7, 'identical_verdicts': 8,
                                                   'max_map_abs_error': 3e-5, 'mean_map_abs_error': 1e-6},
                                       'classes': {}, 'differing': []}
    card = model_card(results, manifest)
    assert ('On all 9 held-out images (zero-shot): identical greedy answers on 7, identical Yes/No verdicts on 8, '
            'anomaly map max abs error 3.00e-05 (mean 1.00e-06).') in card


def test_model_card_carries_the_ablation_table_and_the_history():
    from anomalygpt_edge.benchmarks.demo_report import model_card
    root = Path(__file__).resolve().parents[2] / 'runtime' / 'demo'
    results = json.loads((root / 'results.json').read_text())
    manifest = json.loads((root / 'bundle' / 'manifest.json').read_text())
    results.pop('ablation', None), results.pop('history', None)
    assert '## Recipe ablations' not in model_card(results, manifest)
    results['ablation'] = [{'maps_only': True, 'table': '| recipe | x |\n|---|---|\n| v | 0.7 |', 'runs': {}},
                           {'maps_only': False, 'table': '| recipe | x |\n|---|---|\n| a | 0.5 |', 'runs': {}}]
    results['history'] = 'resumed once.'
    card = model_card(results, manifest)
    assert '## Recipe ablations' in card
    heading = card.index('Vision stages alone')
    assert card.index('## Recipe ablations') < heading < card.index('| v | 0.7 |') < card.index('| a | 0.5 |')
    assert card.count('Vision stages alone') == 1      # only the maps-only table is introduced as one
    assert 'validation set' not in card
    results['ablation'][1]['held_out'] = {'seed': 2000}
    card = model_card(results, manifest)
    assert card.count('validation set (`--seed 2000`') == 1
    assert card.index('Vision stages alone') < card.index('validation set') < card.index('| a | 0.5 |')
    # a set of other counts says so, with the flags that make it
    results['ablation'][1]['held_out'] = {'seed': 3000, 'defects_per_kind_and_class': 18, 'good_per_class': 12}
    card = model_card(results, manifest)
    assert 'larger validation set (`--seed 3000 --per-kind 18 --good 12`: the same kinds, 18 defect images' in card
    assert 'the same kinds and counts' not in card
    assert '\n## History\n\nThis model was resumed once.\n' in card


def test_demo_report_names_a_missing_ablation_file(tmp_path, capsys):
    from anomalygpt_edge.benchmarks.demo_report import main
    missing = tmp_path / 'nope.json'
    assert main(['--bundle', str(tmp_path), '--out', str(tmp_path / 'out'), '--ablation', str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err and not (tmp_path / 'out').exists()


def test_model_card_names_the_share_of_foreign_content_anomalies():
    import copy

    from anomalygpt_edge.benchmarks.demo_report import model_card
    root = Path(__file__).resolve().parents[2] / 'runtime' / 'demo'
    results = json.loads((root / 'results.json').read_text())
    results.pop('ablation', None), results.pop('history', None)   # free text that may name the simulator too
    manifest = json.loads((root / 'bundle' / 'manifest.json').read_text())
    cards = {}
    for share in (0.0, 0.3):
        m = copy.deepcopy(manifest)
        m['model']['source'].setdefault('settings', {})['foreign_fraction'] = share
        cards[share] = model_card(results, m)
    assert 'foreign-content' not in cards[0.0]
    assert '30% of the simulated images get a foreign-content blob' in cards[0.3]


def test_model_card_puts_yes_where_the_map_reaches_half_beside_the_llm_verdict():
    from anomalygpt_edge.benchmarks.demo_report import model_card
    root = Path(__file__).resolve().parents[2] / 'runtime' / 'demo'
    results = json.loads((root / 'results.json').read_text())
    manifest = json.loads((root / 'bundle' / 'manifest.json').read_text())
    results.pop('map_half', None)
    assert '| zero-shot, Yes where the map reaches 0.5' not in model_card(results, manifest)
    results['map_half'] = {'mean': {'yes_no_accuracy': 0.6789}}
    assert '| zero-shot, Yes where the map reaches 0.5 (no LLM) | | | 0.679 | |' in model_card(results, manifest)
