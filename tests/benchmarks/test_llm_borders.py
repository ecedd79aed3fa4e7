"""The LLM-border probe finds where a reader of the map changes the cell it names."""
import numpy as np
import pytest

from anomalygpt_edge.benchmarks import llm_borders
from anomalygpt_edge.models import spec
from anomalygpt_edge.runtime.answers import position_word
from anomalygpt_edge.runtime.map_geometry import map_to_image


def _reader(shift: float):
    """Names the cell of the hot spot's centre, read where it lies in the image and then moved ``shift`` px
    towards the bottom right: a reader whose borders sit ``shift`` px up and left of the true ones."""
    def answer(i, amap):
        ys, xs = np.nonzero(amap >= 0.5)
        if not len(xs):
            return None
        x, y = (map_to_image(v.mean(), 224, 16) + shift for v in (xs, ys))
        return position_word(y / 224, x / 224, spec.POSITION_WORDS)
    return answer


@pytest.mark.parametrize('shift', [0.0, 3.0, -2.0])
def test_a_readers_borders_are_found_where_it_changes_the_cell(shift):
    bases = [np.zeros((224, 224), np.float32)] * 2
    r = llm_borders.measure(_reader(shift), bases, grid=16)
    assert r['answered'] == 1.0
    for name, b in r['borders'].items():
        assert b['offset'] == pytest.approx(-shift, abs=0.75), name
    assert r['mean_abs_offset'] == pytest.approx(abs(shift), abs=0.75)


def test_a_reader_that_names_no_place_has_no_border():
    r = llm_borders.measure(lambda i, amap: None, [np.zeros((224, 224), np.float32)], grid=16)
    assert r['answered'] == 0.0 and r['mean_abs_offset'] is None
    assert all(b['found'] is None for b in r['borders'].values())
    assert '|  |  |  |  |  | 0.00 |' in llm_borders.markdown({'none': r})


def test_a_run_without_a_trained_model_is_refused(tmp_path, capsys):
    assert llm_borders.main(['--json', str(tmp_path / 'o.json'), f'a={tmp_path}']) == 2
    assert 'final.pt' in capsys.readouterr().err


def test_the_reference_reader_runs_on_a_trained_model(tmp_path):
    import json

    from anomalygpt_edge.models.train import main as train
    work = tmp_path / 'work'
    assert train(['--work', str(work), '--config', 'tiny', '--vision-steps', '1', '--lm-steps', '1', '--samples', '4',
                  '--batch', '2', '--threads', '1', '--threshold-images', '0']) == 0
    out = tmp_path / 'borders.json'
    assert llm_borders.main(['--json', str(out), '--config', 'tiny', '--per-class', '1', f'a={work}']) == 0
    r = json.loads(out.read_text())['runs']['a']
    assert set(r['borders']) == {'left', 'right', 'top', 'bottom'} and 0.0 <= r['answered'] <= 1.0


def test_the_border_is_read_among_the_answers_that_name_a_place():
    answers_some = _reader(2.0)

    def answer(i, amap):   # only image 0 of 4 is given a position, as an LLM that answers most spots "No"
        return answers_some(i, amap) if i == 0 else None
    r = llm_borders.measure(answer, [np.zeros((224, 224), np.float32)] * 4, grid=16)
    assert r['answered'] == pytest.approx(0.25)
    assert all(b['offset'] == pytest.approx(-2.0, abs=0.75) for b in r['borders'].values())
