"""The evaluation over an MVTec-layout folder: discovery, the reference's shot choice, the report."""
import pytest
from sklearn.metrics import roc_auc_score

from anomalygpt_edge.benchmarks.evaluate import discover, evaluate, markdown, reference_shots
from anomalygpt_edge.models.synthetic_dataset import write_mvtec_layout
from anomalygpt_edge.runtime.pipeline import Pipeline


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('mvtec')
    write_mvtec_layout(root, categories=['woven_fabric'], n_train_good=14, n_test_good=3, n_test_defect=2,
                       seed=3, defect_kinds=('scratch', 'stain'))
    return root


def test_discover_and_reference_shots(dataset):
    found = discover(dataset)
    samples = found['woven_fabric']
    assert len(samples) == 3 + 4
    assert sum(s.anomalous for s in samples) == 4
    assert all(s.mask is not None and s.mask.name.endswith('_mask.png') for s in samples if s.anomalous)
    assert [p.name for p in reference_shots(dataset, 'woven_fabric', 2)] == ['012.png', '013.png']
    with pytest.raises(FileNotFoundError, match='no such dataset'):
        discover(dataset / 'nope')


def test_report_matches_sklearn_on_the_collected_scores(dataset, tiny_bundle):
    with Pipeline.from_bundle(tiny_bundle, max_new_tokens=8, threads=1) as pipe:
        report = evaluate(pipe, dataset, class_map={'woven_fabric': 'carpet'}, progress=False)
        scores = [pipe.inspect(s.path, class_name='carpet', llm=False).score for s in discover(dataset)['woven_fabric']]
    r = report['classes']['woven_fabric']
    assert r['n_images'] == 7 and r['n_single_defect'] <= 4
    labels = [int(s.anomalous) for s in discover(dataset)['woven_fabric']]
    assert r['image_auroc'] == pytest.approx(roc_auc_score(labels, scores))
    assert 0.0 <= r['pixel_auroc'] <= 1.0
    assert r['yes_no_accuracy'] is not None and len(report['answers']['woven_fabric']) == 7
    assert report['mean']['image_auroc'] == r['image_auroc']
    assert '| woven_fabric | 7 |' in markdown(report)


class _MapRunner:
    """A pipeline stand-in whose zero-shot map is a given function of the ground-truth mask (no LLM)."""
    from anomalygpt_edge.models.spec import POSITION_WORDS
    prompt = {'location_words': POSITION_WORDS}

    def __init__(self, root, to_map):
        from anomalygpt_edge.benchmarks.evaluate import load_mask
        self.masks = {str(s.path): load_mask(s.mask) for v in discover(root).values() for s in v}
        self.to_map = to_map

    def inspect(self, path, class_name, memory=None, llm=True):
        from types import SimpleNamespace
        from anomalygpt_edge.runtime.answers import locations
        amap = self.to_map(self.masks[str(path)].astype('float32'))
        return SimpleNamespace(score=float(amap.max()), anomaly_map=amap, verdict=None, answer=None,
                               locations=locations(amap, self.prompt['location_words']))


def test_map_location_is_the_cell_of_the_maps_own_region(dataset):
    import numpy as np
    exact = evaluate(_MapRunner(dataset, lambda gt: gt), dataset, llm=False, progress=False)
    blank = evaluate(_MapRunner(dataset, np.zeros_like), dataset, llm=False, progress=False)
    r = exact['classes']['woven_fabric']
    assert r['n_single_defect'] >= 1 and r['location_accuracy'] is None    # no LLM, no answer to score
    assert r['map_location_accuracy'] == 1.0                # a map equal to the label names its cell
    assert blank['classes']['woven_fabric']['map_location_accuracy'] == 0.0   # a map showing nothing names none


def test_location_breakdown_sorts_each_case_by_who_was_right():
    from anomalygpt_edge.benchmarks.evaluate import location_breakdown
    # (row, map names the cell, LLM names it, map has a region at >= 0.5, centroid near a cell border)
    cases = [(0, True, True, True, False), (2, True, False, True, True), (2, False, True, True, False),
             (1, False, False, True, True), (2, False, False, False, False), (2, False, False, False, True)]
    b = location_breakdown(cases)
    assert (b['both'], b['map_only'], b['llm_only'], b['neither_map_fired'], b['neither_map_silent']) == (1, 1, 1, 1, 2)
    assert b['by_row'] == {'top': {'correct': 1, 'images': 1}, 'middle': {'correct': 0, 'images': 1},
                           'bottom': {'correct': 1, 'images': 4}}
    assert b['by_border'] == {'near_border': {'images': 3, 'llm_correct': 0, 'map_correct': 1},
                              'elsewhere': {'images': 3, 'llm_correct': 2, 'map_correct': 1}}



class _AnsweringMapRunner(_MapRunner):
    """_MapRunner with an LLM stand-in: answers with the label's own cell, or with nothing found."""
    def __init__(self, root, to_map, truthful: bool):
        super().__init__(root, to_map)
        self.truthful = truthful

    def inspect(self, path, class_name, memory=None, llm=True):
        import numpy as np
        from anomalygpt_edge.runtime.answers import position_word
        res = super().inspect(path, class_name, memory, llm)
        gt = self.masks[str(path)]
        if self.truthful and gt.any():
            ys, xs = np.nonzero(gt)
            where = position_word(ys.mean() / gt.shape[0], xs.mean() / gt.shape[1], self.prompt['location_words'])
            res.answer = f"Yes, there is an anomaly in the image, at the {where} of the image."
        else:
            res.answer = "No, there is no anomaly in the image."
        return res


def test_evaluate_reports_the_location_breakdown(dataset):
    import numpy as np
    reader_right = evaluate(_AnsweringMapRunner(dataset, np.zeros_like, True), dataset, progress=False)
    reader_wrong = evaluate(_AnsweringMapRunner(dataset, lambda gt: gt, False), dataset, progress=False)
    n = reader_right['classes']['woven_fabric']['n_single_defect']
    assert n >= 1
    a, b = reader_right['location_breakdown'], reader_wrong['location_breakdown']
    assert (a['llm_only'], a['neither_map_silent'], a['both']) == (n, 0, 0)      # blank map, right answers
    assert (b['map_only'], b['both'], b['llm_only']) == (n, 0, 0)                # exact map, no position named
    assert sum(r['images'] for r in a['by_row'].values()) == n
    assert sum(r['correct'] for r in a['by_row'].values()) == n and sum(r['correct'] for r in b['by_row'].values()) == 0
    assert sum(r['images'] for r in b['by_border'].values()) == n
    assert sum(r['map_correct'] for r in b['by_border'].values()) == n     # the exact map is right near borders too
    assert 'location_breakdown' not in evaluate(_MapRunner(dataset, np.zeros_like), dataset, llm=False, progress=False)


def test_evaluate_reports_intervals_around_the_means(dataset):
    import numpy as np
    rep = evaluate(_AnsweringMapRunner(dataset, lambda gt: gt, True), dataset, progress=False)
    iv = rep['intervals']
    assert set(iv) == {'image_auroc', 'yes_no_accuracy', 'location_accuracy'}
    assert iv['location_accuracy'] == (1.0, 1.0) and iv['image_auroc'] == (1.0, 1.0)   # every image right
    half = evaluate(_AnsweringMapRunner(dataset, np.zeros_like, False), dataset, progress=False)
    lo, hi = half['intervals']['yes_no_accuracy']   # "No" to all: right on the normal images only
    assert lo <= half['mean']['yes_no_accuracy'] <= hi and lo < hi


def test_eval_names_a_missing_class_folder_and_refuses_a_negative_k_shot(dataset, tiny_bundle, capsys):
    from anomalygpt_edge.cli import main
    assert main(['eval', '--bundle', str(tiny_bundle), '--data', str(dataset), '--no-llm',
                 '--classes', 'woven_fabric', 'cable']) == 2
    err = capsys.readouterr().err
    assert f'{dataset}: no class folder cable/test' in err and 'woven_fabric' not in err
    with pytest.raises(SystemExit) as e:
        main(['eval', '--bundle', str(tiny_bundle), '--data', str(dataset), '--no-llm', '--k-shot', '-1'])
    assert e.value.code == 2 and '--k-shot: -1 is less than 0' in capsys.readouterr().err


def test_eval_refuses_a_json_path_it_could_not_write_before_evaluating(dataset, tiny_bundle, tmp_path, capsys,
                                                                      monkeypatch):
    from anomalygpt_edge.benchmarks import evaluate
    from anomalygpt_edge.cli import main
    monkeypatch.setattr(evaluate, 'evaluate', lambda *a, **k: pytest.fail('evaluated before --json was checked'))
    assert main(['eval', '--bundle', str(tiny_bundle), '--data', str(dataset), '--no-llm',
                 '--json', str(tmp_path)]) == 2
    assert f'--json {tmp_path}: a folder, not a file to write' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
