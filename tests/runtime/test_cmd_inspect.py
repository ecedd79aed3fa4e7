"""How `inspect` prints scores and thresholds, and how it reports what it cannot do (on the demo bundle)."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anomalygpt_edge.cli import main
from anomalygpt_edge.runtime.cmd_inspect import number


def test_small_scores_and_thresholds_keep_their_digits():
    # a trained model's normal maps and its calibrated thresholds sit near 1e-5: '0.000' would hide both
    assert number(3.2e-5) == '3.20e-05' and number(4e-4) != '0.000'
    assert number(0.752) == '0.752' and number(1.0) == '1.000' and number(0.0) == '0.000'


def test_the_verdict_names_who_gave_it_and_whether_the_map_threshold_agrees():
    from types import SimpleNamespace as R

    from anomalygpt_edge.runtime.cmd_inspect import verdict_text
    assert verdict_text(R(verdict='no', verdict_source='llm', map_verdict='yes', threshold=1.2e-3)) == \
        'NO by the LLM (the calibrated map threshold 0.001 says YES)'
    assert verdict_text(R(verdict='yes', verdict_source='llm', map_verdict='yes', threshold=0.5)) == \
        'YES by the LLM (the calibrated map threshold 0.500 agrees)'
    assert verdict_text(R(verdict='yes', verdict_source='llm', map_verdict=None, threshold=None)) == 'YES'
    assert verdict_text(R(verdict='yes', verdict_source='threshold', map_verdict='yes', threshold=2e-5)) == \
        'YES (threshold 2.00e-05, no LLM)'


# -- the command on the shipped demo bundle ----------------------------------------------------

DEMO = Path(__file__).resolve().parents[2] / 'runtime' / 'demo'
GOOD, STAIN = DEMO / 'samples' / 'washer-good.png', DEMO / 'samples' / 'washer-stain.png'


def inspect(*args) -> int:
    return main(['inspect', '--bundle', str(DEMO / 'bundle'), *map(str, args)])


def test_a_prompt_longer_than_the_context_is_reported_per_image():
    # a process of its own: llama.cpp aborts the process on a batch over n_batch
    r = subprocess.run([sys.executable, '-m', 'anomalygpt_edge', 'inspect', '--bundle', str(DEMO / 'bundle'), str(GOOD),
                        str(STAIN), '--class', 'washer', '--n-ctx', '256', '--question', 'Is it scratched? ' * 100],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    *errors, count = r.stderr.splitlines()
    assert len(errors) == 2 and all('context full' in e and '--n-ctx' in e for e in errors)
    assert 'washer-good.png' in errors[0] and 'washer-stain.png' in errors[1]
    assert count.endswith('2 images: 2 failed')


def test_a_map_that_cannot_be_written_is_named_after_the_result(tmp_path, capsys):
    (tmp_path / 'maps').write_text('a file, not a folder')
    assert inspect(GOOD, '--class', 'washer', '--no-llm', '--save-maps', tmp_path / 'maps') == 2
    out, err = capsys.readouterr()
    assert out.startswith(f'{GOOD}: NO') and 'washer-good-map.png: map not written' in err


def test_images_of_the_same_name_get_their_own_maps(tmp_path, capsys):
    for d, src in (('d1', GOOD), ('d2', STAIN)):
        (tmp_path / d).mkdir()
        shutil.copy(src, tmp_path / d / 'x.png')
    assert inspect(tmp_path / 'd1' / 'x.png', tmp_path / 'd2' / 'x.png', '--class', 'washer', '--no-llm',
                   '--save-maps', tmp_path / 'maps') == 0
    assert sorted(p.name for p in (tmp_path / 'maps').iterdir()) == ['x-2-map.png', 'x-map.png']


@pytest.fixture
def washer_memory(tmp_path):
    memory = tmp_path / 'washer.npz'
    assert inspect(STAIN, '--class', 'washer', '--no-llm', '--reference', GOOD, '--save-memory', memory) == 0
    return memory


def test_save_memory_creates_its_folder(tmp_path):
    memory = tmp_path / 'new' / 'washer.npz'
    assert inspect(STAIN, '--class', 'washer', '--no-llm', '--reference', GOOD, '--save-memory', memory) == 0
    assert memory.is_file()


def test_a_memory_of_another_class_is_warned_about(washer_memory, capsys):
    capsys.readouterr()
    assert inspect(STAIN, '--class', 'wood_grain', '--no-llm', '--memory', washer_memory) == 0
    assert f"warning: {washer_memory} is a memory of class 'washer'; the images are inspected as class 'wood grain'" \
        in capsys.readouterr().err


def test_save_memory_needs_reference(tmp_path, capsys):
    assert inspect(STAIN, '--class', 'washer', '--no-llm', '--save-memory', tmp_path / 'm.npz') == 2
    assert '--save-memory needs --reference' in capsys.readouterr().err


def test_a_file_that_is_not_a_memory_is_called_so(tmp_path, capsys):
    (tmp_path / 'notes.txt').write_text('not a memory')
    assert inspect(STAIN, '--no-llm', '--memory', tmp_path / 'notes.txt') == 2
    err = capsys.readouterr().err
    assert 'notes.txt: not a saved few-shot memory (the .npz that --save-memory writes)' in err and 'pickle' not in err


def test_memory_and_reference_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        inspect(STAIN, '--memory', tmp_path / 'm.npz', '--reference', GOOD)
    assert e.value.code == 2 and 'not allowed with argument' in capsys.readouterr().err


@pytest.mark.parametrize('option', [('--threads', '0'), ('--n-ctx', '-1'), ('--threshold', '0'),
                                    ('--threshold', '1.5')])
def test_out_of_range_options_are_refused_at_parse_time(option, capsys):
    with pytest.raises(SystemExit) as e:
        inspect(GOOD, *option)
    assert e.value.code == 2 and f'argument {option[0]}' in capsys.readouterr().err


def test_tensorrt_backend_without_tensorrt_is_a_missing_dependency(capsys):
    if importlib.util.find_spec('tensorrt') is not None and importlib.util.find_spec('pycuda') is not None:
        pytest.skip('tensorrt and pycuda are installed here')
    assert inspect(GOOD, '--no-llm', '--backend', 'tensorrt') == 3
    assert 'docs/tensorrt.md' in capsys.readouterr().err


def test_several_images_end_with_a_count_on_stderr(tmp_path, capsys):
    broken = tmp_path / 'broken.png'
    broken.write_text('not an image')
    assert inspect(GOOD, STAIN, broken, '--class', 'washer', '--json') == 2
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2   # stdout: one JSON object per image inspected, nothing else
    assert err.splitlines()[-1] == 'anomalygpt-edge inspect: 3 images: 1 yes, 1 no, 1 failed'
