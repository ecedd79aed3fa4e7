"""TensorRT runner and engine builds. The GPU tests skip where tensorrt/pycuda/a GPU are missing (as on
the project's CI machines); the fallbacks are checked everywhere."""
import importlib
import shutil
import sys

import numpy as np
import pytest

from anomalygpt_edge.runtime.bundle import Bundle, BundleError
from anomalygpt_edge.runtime.pipeline import Pipeline


def _gpu():
    pytest.importorskip('tensorrt', reason='tensorrt is not installed (no NVIDIA GPU or JetPack here)')
    pytest.importorskip('pycuda.driver', reason='pycuda is not installed (needs the CUDA toolkit)')
    from anomalygpt_edge.runtime.engines import device_info
    try:
        return device_info()
    except Exception as e:  # driver present but no usable GPU
        pytest.skip(f'no usable CUDA device: {e}')


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return Bundle.open(shutil.copytree(tiny_bundle, tmp_path / 'b'))


def test_runtime_modules_import_tensorrt_lazily():
    before = {m for m in ('tensorrt', 'pycuda') if m in sys.modules}
    for name in ('tensorrt_runner', 'engines', 'cmd_build_engines'):
        importlib.reload(importlib.import_module(f'anomalygpt_edge.runtime.{name}'))
    assert {m for m in ('tensorrt', 'pycuda') if m in sys.modules} == before


def test_tensorrt_backend_without_tensorrt_is_a_clear_missing_dependency(bundle_copy):
    if importlib.util.find_spec('tensorrt') is not None:
        pytest.skip('tensorrt is installed here')
    with pytest.raises(ModuleNotFoundError, match="backend 'tensorrt' needs the .* package") as e:
        Pipeline(bundle_copy, llm=False, backend='tensorrt')
    assert e.value.name in ('tensorrt', 'pycuda')  # the CLI's exit code 3 and install hint go by it


def test_auto_backend_falls_back_to_onnxruntime(bundle_copy):
    with Pipeline(bundle_copy, llm=False, backend='auto') as p:
        if importlib.util.find_spec('tensorrt') is None:
            assert all(r.name.startswith('onnxruntime:') for r in p.runners.values())


def test_build_engines_without_tensorrt_exits_3(bundle_copy, capsys):
    if importlib.util.find_spec('tensorrt') is not None:
        pytest.skip('tensorrt is installed here')
    from anomalygpt_edge.cli import main
    assert main(['build-engines', '--bundle', str(bundle_copy.root)]) == 3
    assert 'docs/tensorrt.md' in capsys.readouterr().err


def test_build_engines_checks_the_bundle_first(tmp_path, capsys):
    from anomalygpt_edge.cli import main
    assert main(['build-engines', '--bundle', str(tmp_path / 'nonexistent')]) == 2
    assert 'nonexistent: not a bundle directory' in capsys.readouterr().err


@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_engines_match_onnxruntime(bundle_copy, precision):
    device = _gpu()
    from anomalygpt_edge.runtime.cmd_build_engines import build_engines
    from anomalygpt_edge.runtime.engines import check_engine
    from anomalygpt_edge.runtime.runners import OrtRunner
    from anomalygpt_edge.runtime.tensorrt_runner import TrtRunner
    b = bundle_copy
    if precision == 'fp16' and 'fp16' not in b.manifest['components']['encoder']:
        pytest.skip('the tiny bundle fixture has no FP16 graphs')
    build_engines(b, precision, device, workspace_mb=512, max_batch=2, log=lambda *_: None)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    entry = b.component('encoder', precision)
    trt = TrtRunner(check_engine(b, 'encoder', precision, device))
    ort = OrtRunner(b.path(b.component('encoder', 'fp32')['file']), providers=['CPUExecutionProvider'])
    got, want = trt.infer({'image': x}), ort.infer({'image': x})
    tol = entry['tolerance']
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=tol['atol'] * 2, rtol=tol['rtol'] * 2)
    # batch 1 after batch 2 reuses the context with new buffers; outside the profile is refused
    assert trt.infer({'image': x[:1]})['taps'].shape[0] == 1
    from anomalygpt_edge.runtime.runners import RunnerError
    with pytest.raises(RunnerError, match='optimisation profile'):
        trt.infer({'image': np.concatenate([x, x])})
    trt.close()


def test_pipeline_on_tensorrt_equals_onnxruntime(bundle_copy, tmp_path):
    device = _gpu()
    from anomalygpt_edge.runtime.cmd_build_engines import build_engines
    build_engines(bundle_copy, 'fp32', device, workspace_mb=512, log=lambda *_: None)
    img = (np.random.default_rng(1).integers(0, 255, (240, 320, 3))).astype(np.uint8)
    with Pipeline(bundle_copy, llm=False, backend='auto') as trt, Pipeline(bundle_copy, llm=False) as ort:
        assert all(r.name.startswith('tensorrt:') for r in trt.runners.values())
        a, b = trt.inspect(img, class_name='bottle', llm=False), ort.inspect(img, class_name='bottle', llm=False)
    assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-3
