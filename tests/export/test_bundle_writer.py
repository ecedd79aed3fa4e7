"""Bundle writes are atomic: a failed export leaves neither debris nor a damaged previous bundle."""
import pytest

from anomalygpt_edge.export.bundle_writer import BundleWriter
from anomalygpt_edge.runtime.bundle import Bundle


def test_failure_midway_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / 'b') as w:
            w.path('encoder.onnx').write_bytes(b'x')
            raise RuntimeError('export failed')
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_whole_and_failure_keeps_the_old(tmp_path):
    with BundleWriter(tmp_path / 'b') as w:
        w.path('a.bin').write_bytes(b'old')
        w.commit({})
    with pytest.raises(FileExistsError, match='already exists'):
        with BundleWriter(tmp_path / 'b') as w:
            pass
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / 'b', overwrite=True) as w:
            w.path('a.bin').write_bytes(b'new')
            raise RuntimeError
    assert (tmp_path / 'b' / 'a.bin').read_bytes() == b'old'
    with BundleWriter(tmp_path / 'b', overwrite=True) as w:
        w.path('sub/c.bin').write_bytes(b'new')
        w.commit({})
    assert sorted(p.name for p in (tmp_path / 'b').rglob('*')) == ['c.bin', 'manifest.json', 'sub']
    assert set(Bundle.open(tmp_path / 'b', verify_hashes=True).manifest['files']) == {'sub/c.bin'}
    assert [p.name for p in tmp_path.iterdir()] == ['b']
