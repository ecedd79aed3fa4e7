"""ONNX Runtime and PyTorch runners behind one protocol; errors that name the file; a torch-free runtime."""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from anomalygpt_edge.runtime.runners import OrtRunner, RunnerError, VisionRunner, resolve_providers

RUNTIME_DIR = Path(__file__).resolve().parents[2] / 'runtime'
W = np.arange(6, dtype=np.float32).reshape(3, 2) / 4


def _affine_model() -> onnx.ModelProto:
    """z = x @ W + y, with x [batch,3], y [batch,2]."""
    graph = helper.make_graph(
        [helper.make_node('MatMul', ['x', 'W'], ['xw'], name='mm'), helper.make_node('Add', ['xw', 'y'], ['z'], name='add')],
        'affine',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['batch', 3]),
         helper.make_tensor_value_info('y', TensorProto.FLOAT, ['batch', 2])],
        [helper.make_tensor_value_info('z', TensorProto.FLOAT, ['batch', 2])],
        [numpy_helper.from_array(W, 'W')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def affine_onnx(tmp_path):
    path = tmp_path / 'affine.onnx'
    onnx.save(_affine_model(), str(path))
    return path


def test_ort_runner_computes_the_graph_and_follows_the_protocol(affine_onnx):
    r = OrtRunner(affine_onnx, providers=['CPUExecutionProvider'], intra_op_threads=1, inter_op_threads=1, spin=False)
    assert isinstance(r, VisionRunner)
    assert r.input_names == ['x', 'y'] and r.output_names == ['z']
    assert r.inputs['x'] == (('batch', 3), np.float32)
    assert r.providers == ['CPUExecutionProvider']
    assert r.session.get_session_options().intra_op_num_threads == 1
    x = np.array([[1, 2, 3], [0, -1, 0.5], [2, 2, 2]], np.float32)
    y = np.array([[1, 1], [0, 0], [-1, 2]], np.float32)
    z = r.infer({'x': x, 'y': y})['z']
    # x @ W with W = [[0, .25], [.5, .75], [1, 1.25]]
    np.testing.assert_allclose(z, [[5, 6.5], [0, -0.125], [2, 6.5]], rtol=0, atol=1e-6)
    z64 = r.infer({'x': x.astype(np.float64), 'y': y})['z']      # float64 is cast, not refused
    assert z64.dtype == np.float32 and np.array_equal(z64, z)


def test_missing_or_unknown_inputs_name_the_file(affine_onnx):
    r = OrtRunner(affine_onnx)
    with pytest.raises(RunnerError, match=r"affine\.onnx.*missing \['y'\], unknown \['q'\]"):
        r.infer({'x': np.zeros((1, 3), np.float32), 'q': np.zeros(1)})


@pytest.mark.parametrize('x_shape,y_shape,message', [
    ((2, 4), (2, 2), r"input 'x' has shape \[2, 4\], the graph expects \['batch', 3\]"),
    ((2, 3, 1), (2, 2), r"input 'x' has shape \[2, 3, 1\]"),
    ((2, 3), (3, 2), r"dimension 'batch' is 2 in input 'x' but 3 in input 'y'"),
])
def test_misshaped_inputs_are_refused_before_running(affine_onnx, x_shape, y_shape, message):
    r = OrtRunner(affine_onnx)
    with pytest.raises(RunnerError, match=r'affine\.onnx.*' + message):
        r.infer({'x': np.zeros(x_shape, np.float32), 'y': np.zeros(y_shape, np.float32)})


def test_integer_input_for_a_float_graph_is_refused(affine_onnx):
    with pytest.raises(RunnerError, match="input 'x' is int64, the graph expects float32"):
        OrtRunner(affine_onnx).infer({'x': np.zeros((1, 3), np.int64), 'y': np.zeros((1, 2), np.float32)})


def test_missing_corrupt_and_truncated_files_name_the_file(tmp_path, affine_onnx):
    with pytest.raises(RunnerError, match=r'nothere\.onnx: no such ONNX file'):
        OrtRunner(tmp_path / 'nothere.onnx')
    garbage = tmp_path / 'garbage.onnx'
    garbage.write_bytes(b'this is not a protobuf' * 10)
    with pytest.raises(RunnerError, match=r'garbage\.onnx: ONNX Runtime cannot load'):
        OrtRunner(garbage)
    cut = tmp_path / 'cut.onnx'
    cut.write_bytes(affine_onnx.read_bytes()[:-40])
    with pytest.raises(RunnerError, match=r'cut\.onnx: ONNX Runtime cannot load'):
        OrtRunner(cut)


def test_missing_external_data_file_names_the_graph(tmp_path):
    path = tmp_path / 'ext.onnx'
    onnx.save_model(_affine_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location='ext.onnx.data', size_threshold=0)
    assert OrtRunner(path).infer({'x': np.ones((1, 3), np.float32), 'y': np.zeros((1, 2), np.float32)})['z'].shape == (1, 2)
    (tmp_path / 'ext.onnx.data').unlink()
    with pytest.raises(RunnerError, match=r'ext\.onnx: ONNX Runtime cannot load'):
        OrtRunner(path)


def test_provider_choice():
    cpu_only = ['AzureExecutionProvider', 'CPUExecutionProvider']
    gpu = ['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider']
    assert resolve_providers('auto', cpu_only) == ['CPUExecutionProvider']
    assert resolve_providers('auto', gpu[::-1]) == gpu                      # preference order, not build order
    assert resolve_providers('auto', gpu[1:]) == gpu[1:]
    with_opts = [('CUDAExecutionProvider', {'device_id': 0}), 'CPUExecutionProvider']
    assert resolve_providers(with_opts, gpu) == with_opts
    with pytest.raises(RunnerError, match=r"\['CUDAExecutionProvider'\] not available.*onnxruntime-gpu"):
        resolve_providers(['CUDAExecutionProvider'], cpu_only)


def test_torch_runner_names_inputs_and_outputs():
    torch = pytest.importorskip('torch')
    from anomalygpt_edge.runtime.torch_runner import TorchRunner

    class Affine(torch.nn.Module):
        def forward(self, x, y):
            return x @ torch.from_numpy(W) + y, x.sum(dim=1)

    r = TorchRunner(Affine(), ['x', 'y'], ['z', 's'])
    assert isinstance(r, VisionRunner)
    x = np.array([[1, 2, 3]], np.float32)
    out = r.infer({'x': x, 'y': np.ones((1, 2), np.float32)})
    np.testing.assert_allclose(out['z'], [[5, 6.5]], atol=1e-6)
    np.testing.assert_allclose(out['s'], [6.0])
    with pytest.raises(ValueError, match=r"missing inputs \['y'\]"):
        r.infer({'x': x})


def test_importing_the_runtime_never_imports_torch():
    code = ('import sys, anomalygpt_edge.runtime.runners, anomalygpt_edge.runtime.compare, '
            'anomalygpt_edge.runtime.torch_runner, anomalygpt_edge.runtime.bundle; '
            'bad = [m for m in ("torch", "anomalygpt_edge.models", "anomalygpt_edge.export") if m in sys.modules]; '
            'sys.exit(repr(bad) if bad else 0)')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize('module', ['runners.py', 'compare.py', 'torch_runner.py'])
def test_runtime_modules_never_import_the_training_side(module):
    tree = ast.parse((RUNTIME_DIR / module).read_text())
    for node in ast.walk(tree):  # anywhere, including inside functions
        if isinstance(node, ast.ImportFrom):
            target = ('.' * node.level) + (node.module or '')
            assert not any(p in target.split('.') for p in ('models', 'export', 'calibration')), target
        if isinstance(node, ast.Import) and module != 'torch_runner.py':
            assert not any(a.name.split('.')[0] == 'torch' for a in node.names)
