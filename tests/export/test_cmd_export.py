"""``anomalygpt-edge export``: bad options are usage errors before any export work; --overwrite replaces only a
bundle."""
import pytest

pytest.importorskip('torch')

from anomalygpt_edge.cli import main  # noqa: E402


@pytest.mark.parametrize('option, message', [
    (['--quant', 'f32,bogus'], "--quant: unknown GGUF type 'bogus'; choose from f32, f16"),
    (['--precision', 'int8'], "--precision: unknown vision precision 'int8'; choose from fp32, fp16"),
    (['--opset', '5'], '--opset: opset 5 is not supported: the exporter writes 14-'),
])
def test_a_bad_option_is_a_usage_error_before_any_export(tmp_path, monkeypatch, capsys, option, message):
    from anomalygpt_edge.export import tiny

    def never(*args, **kwargs):
        raise AssertionError('exported before the options were checked')
    monkeypatch.setattr(tiny, 'export_tiny', never)
    with pytest.raises(SystemExit) as e:
        main(['export', 'tiny', '--out', str(tmp_path / 'b'), *option])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_overwrite_refuses_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    out = tmp_path / 'mine'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    assert main(['export', 'tiny', '--out', str(out), '--overwrite', '--precision', 'fp32', '--quant', 'f32']) == 2
    err = capsys.readouterr().err
    assert f'{out}: a directory that is not a bundle' in err and 'Traceback' not in err
    assert [p.name for p in tmp_path.iterdir()] == ['mine'] and (out / 'keep.txt').read_text() == 'mine'


@pytest.mark.parametrize('overwrite', [[], ['--overwrite']])
def test_a_taken_target_is_refused_before_the_model_is_built(tmp_path, monkeypatch, capsys, overwrite):
    from anomalygpt_edge.export import tiny
    monkeypatch.setattr(tiny, 'train_sentencepiece', lambda *a, **k: pytest.fail('built before the target was checked'))
    out = tmp_path / 'mine'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    assert main(['export', 'tiny', '--out', str(out), *overwrite]) == 2
    assert str(out) in capsys.readouterr().err and (out / 'keep.txt').read_text() == 'mine'
