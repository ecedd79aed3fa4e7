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


@pytest.mark.parametrize('kind', ['folder', 'file', 'link'])
def test_overwrite_replaces_only_a_bundle_or_an_empty_folder(tmp_path, kind):
    target = tmp_path / 'out'
    if kind == 'folder':
        target.mkdir()
        (target / 'keep.txt').write_text('mine')
    elif kind == 'file':
        target.write_text('mine')
    else:
        (tmp_path / 'real').mkdir()
        target.symlink_to(tmp_path / 'real')
    before = sorted(p.name for p in tmp_path.rglob('*'))
    with pytest.raises(FileExistsError, match='out: .*not a bundle'):
        with BundleWriter(target, overwrite=True) as w:
            w.path('a.bin').write_bytes(b'new')
            w.commit({})
    assert sorted(p.name for p in tmp_path.rglob('*')) == before     # untouched, and no hidden debris
    empty = tmp_path / 'empty'
    empty.mkdir()
    with BundleWriter(empty, overwrite=True) as w:
        w.path('a.bin').write_bytes(b'new')
        w.commit({})
    assert (empty / 'a.bin').read_bytes() == b'new'


def test_debris_of_a_killed_writer_is_removed_and_a_running_ones_kept(tmp_path):
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    alive = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        for name in (f'.b.partial-{dead.pid}', f'.b.partial-{alive.pid}', f'.other.partial-{dead.pid}'):
            (tmp_path / name).mkdir()
            (tmp_path / name / 'encoder.onnx').write_bytes(b'x')
        with BundleWriter(tmp_path / 'b') as w:
            w.path('a.bin').write_bytes(b'new')
            w.commit({})
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f'.b.partial-{alive.pid}', f'.other.partial-{dead.pid}', 'b']
