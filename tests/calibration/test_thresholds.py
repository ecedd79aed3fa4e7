"""Score thresholds for the LLM-free mode: calibrated on normal images, stored atomically in the
manifest, used by inspect --no-llm as a threshold verdict (never reported as the LLM's)."""
import json
import shutil

import numpy as np
import pytest

from anomalygpt_edge.calibration.thresholds import calibrate_threshold, mode_key, store_threshold, threshold_entry
from anomalygpt_edge.runtime.answers import parse_verdict
from anomalygpt_edge.runtime.bundle import Bundle
from anomalygpt_edge.runtime.pipeline import Pipeline

CATEGORY = 'brushed_metal'


@pytest.fixture(scope='module')
def mvtec(tmp_path_factory):
    from anomalygpt_edge.models.synthetic_dataset import write_mvtec_layout
    root = tmp_path_factory.mktemp('thr') / 'mvtec'
    write_mvtec_layout(root, categories=[CATEGORY], n_train_good=10, n_test_good=6, n_test_defect=4, seed=2,
                       defect_kinds=('hole',))
    return root / CATEGORY


@pytest.fixture
def bundle_dir(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / 'b')


def test_entry_is_the_percentile_of_normal_scores():
    s = np.array([0.1, 0.4, 0.2, 0.3])
    assert threshold_entry(s)['score'] == pytest.approx(0.4)
    e = threshold_entry(s, percentile=50, margin=0.01)
    assert e['score'] == pytest.approx(0.25 + 0.01) and e['n_images'] == 4
    assert e['normal_scores']['max'] == pytest.approx(0.4)
    assert mode_key(0) == 'zero-shot' and mode_key(4) == '4-shot'


@pytest.mark.parametrize('margin', [-1.0, 5.0, float('nan'), float('inf')])
def test_a_threshold_outside_the_maps_range_is_refused(margin):
    # at or below 0 every image would be anomalous, above 1 none ever; NaN would not even be JSON
    from anomalygpt_edge.calibration.data_reader import CalibrationError
    with pytest.raises(CalibrationError, match=r"outside \(0, 1\]"):
        threshold_entry([0.1, 0.4], margin=margin)
    assert threshold_entry([0.1, 0.4], margin=0.6)['score'] == pytest.approx(1.0)


def test_cli_threshold_then_no_llm_verdicts(bundle_dir, mvtec, capsys):
    """Few-shot (the random-weight tiny model's zero-shot map carries no signal): normals under, clear
    defects (holes) over."""
    from anomalygpt_edge.cli import main
    ref = mvtec / 'train' / 'good' / '000.png'
    # an engine built on a device must survive the manifest rewrite, unlisted
    eng = bundle_dir / 'engines' / 'orin-sm87-trt10.3.0-fp16'
    eng.mkdir(parents=True)
    (eng / 'encoder.engine').write_bytes(b'plan')
    rc = main(['calibrate', 'threshold', '--bundle', str(bundle_dir), '--images', str(mvtec / 'train' / 'good'),
               '--class', 'metal_nut', '--reference', str(ref)])
    assert rc == 0, capsys.readouterr().err
    b = Bundle.open(bundle_dir, verify_hashes=True)
    entry = b.manifest['thresholds']['metal nut']['1-shot']
    assert entry['n_images'] == 9 and entry['k_shot'] == 1          # the reference itself is left out
    assert entry['score'] == pytest.approx(entry['normal_scores']['max'])
    assert (eng / 'encoder.engine').read_bytes() == b'plan'
    assert not any(k.startswith('engines/') for k in b.manifest['files'])

    with Pipeline(b, llm=False) as p:
        memory = p.memory([ref])
        goods = [p.inspect(x, class_name='metal_nut', memory=memory, llm=False) for x in sorted((mvtec / 'test' / 'good').glob('*.png'))]
        holes = [p.inspect(x, class_name='metal_nut', memory=memory, llm=False) for x in sorted((mvtec / 'test' / 'hole').glob('*.png'))]
        assert [r.verdict for r in goods] == ['no'] * len(goods), [r.score for r in goods]
        assert [r.verdict for r in holes] == ['yes'] * len(holes), [r.score for r in holes]
        assert all(r.verdict_source == 'threshold' and r.threshold == pytest.approx(entry['score']) for r in goods + holes)
        assert all(r.answer is None for r in goods + holes)
        d = holes[0].to_dict()
        assert d['verdict_source'] == 'threshold' and d['threshold'] == pytest.approx(entry['score'], abs=1e-6)
        # another mode or class has no threshold: no verdict is made up
        zs = p.inspect(goods[0].image, class_name='metal_nut', llm=False)
        other = p.inspect(goods[0].image, class_name='bottle', memory=memory, llm=False)
        two = p.inspect(goods[0].image, class_name='metal_nut', memory=p.memory([ref, ref]), llm=False)
        for r in (zs, other, two):
            assert r.verdict is None and r.verdict_source is None and 'verdict_source' not in r.to_dict()


def test_zero_shot_threshold_and_the_llm_verdict_is_never_relabelled(bundle_dir, mvtec):
    with Pipeline.from_bundle(bundle_dir, llm=False) as p:
        cls, mode, entry = calibrate_threshold(p, mvtec / 'train' / 'good', 'bottle', percentile=90)
    assert (cls, mode) == ('bottle', 'zero-shot')
    assert entry['normal_scores']['median'] <= entry['score'] <= entry['normal_scores']['max']
    store_threshold(bundle_dir, cls, mode, entry)
    with Pipeline.from_bundle(bundle_dir, verify_hashes=True, max_new_tokens=4, threads=1) as p:
        img = mvtec / 'test' / 'good' / '000.png'
        r = p.inspect(img, class_name='bottle', llm=False)
        assert r.verdict_source == 'threshold' and r.verdict == ('yes' if r.score > entry['score'] else 'no')
        map_call = 'yes' if r.score > entry['score'] else 'no'
        r = p.inspect(img, class_name='bottle')            # with the LLM: its verdict, labelled as such
        assert r.verdict_source == 'llm' and r.answer is not None
        assert r.verdict == parse_verdict(r.answer)
        # the two-speed verdict: the map's call rides beside the LLM's, known before the LLM ran
        assert r.map_verdict == map_call and r.threshold == pytest.approx(entry['score'])
        assert r.timings_ms['map_verdict'] < r.timings_ms['total'] - r.timings_ms['llm_prefill']
        assert r.to_dict()['map_verdict'] == map_call


def test_unknown_class_is_refused_without_touching_the_bundle(bundle_dir):
    from anomalygpt_edge.calibration.data_reader import CalibrationError
    before = (bundle_dir / 'manifest.json').read_bytes()
    with pytest.raises(CalibrationError, match='no class'):
        store_threshold(bundle_dir, 'spaceship', 'zero-shot', threshold_entry([0.1]))
    assert (bundle_dir / 'manifest.json').read_bytes() == before
    assert json.loads(before)['format'] == 'anomalygpt-edge-bundle'
