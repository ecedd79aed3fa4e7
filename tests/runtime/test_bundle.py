"""Bundle verification: truncated or altered files and unknown format versions are refused by name."""
import json

import pytest

from anomalygpt_edge.export.bundle_writer import BundleWriter
from anomalygpt_edge.runtime.bundle import Bundle, BundleError


@pytest.fixture
def bundle_dir(tmp_path):
    with BundleWriter(tmp_path / 'b') as w:
        w.path('encoder.onnx').write_bytes(b'\x01' * 1000)
        w.path('llm-f16.gguf').write_bytes(b'GGUF' + b'\x00' * 500)
        w.commit({'components': {'encoder': {'fp32': {'file': 'encoder.onnx'}}}, 'prompt': {}, 'llm': None})
    return tmp_path / 'b'


def test_good_bundle_verifies_with_hashes(bundle_dir):
    b = Bundle.open(bundle_dir, verify_hashes=True)
    assert b.component('encoder')['file'] == 'encoder.onnx'
    assert set(b.manifest['files']) == {'encoder.onnx', 'llm-f16.gguf'}


def test_truncated_file_is_named(bundle_dir):
    p = bundle_dir / 'llm-f16.gguf'
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(BundleError, match=r'llm-f16.gguf: 100 bytes, the manifest says 504'):
        Bundle.open(bundle_dir)


def test_altered_file_is_caught_by_hash_only(bundle_dir):
    p = bundle_dir / 'encoder.onnx'
    p.write_bytes(b'\x02' * 1000)  # same size
    Bundle.open(bundle_dir)  # size check alone cannot see it
    with pytest.raises(BundleError, match='encoder.onnx: sha256 differs'):
        Bundle.open(bundle_dir, verify_hashes=True)


def test_missing_file_and_unknown_version(bundle_dir):
    (bundle_dir / 'encoder.onnx').unlink()
    with pytest.raises(BundleError, match='encoder.onnx: missing'):
        Bundle.open(bundle_dir)
    m = json.loads((bundle_dir / 'manifest.json').read_text())
    m['format_version'] = 99
    (bundle_dir / 'manifest.json').write_text(json.dumps(m))
    with pytest.raises(BundleError, match='format version 99 is not supported'):
        Bundle.open(bundle_dir)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match='manifest.json: missing'):
        Bundle.open(tmp_path)
    (tmp_path / 'manifest.json').write_text('{not json')
    with pytest.raises(BundleError, match='not valid JSON'):
        Bundle.open(tmp_path)
    with pytest.raises(BundleError, match='no such directory'):
        Bundle.open(tmp_path / 'nope')


def test_a_file_given_as_the_bundle_is_called_a_file(tmp_path):
    (tmp_path / 'model.gguf').write_bytes(b'GGUF')
    with pytest.raises(BundleError, match=r'model.gguf: a file, not a bundle directory'):
        Bundle.open(tmp_path / 'model.gguf')
