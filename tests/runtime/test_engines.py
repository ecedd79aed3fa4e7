"""TensorRT engine cache: keys, paths, profiles from the manifest, build plans per TensorRT version,
and mismatch detection on fake engine directories (no TensorRT or GPU needed)."""
import json

import pytest

from anomalygpt_edge.runtime import engines as E
from anomalygpt_edge.runtime.bundle import Bundle, sha256_file

ORIN = E.DeviceInfo('Orin', (8, 7), '10.3.0.30')


def _io(name, shape):
    return {'name': name, 'shape': shape, 'dtype': 'float32'}


COMPONENTS = {
    'encoder': [_io('image', ['batch', 3, 224, 224])], 'decoder': [_io('taps', ['batch', 4, 256, 64]), _io('text_features', [2, 32])],
    'fewshot': [_io('taps', ['batch', 4, 256, 64]), _io('memory', [4, 'M', 64])],
    'prompt_learner': [_io('anomaly_map', ['batch', 1, 224, 224])]}


def make_bundle(root, precisions=('fp32', 'fp16')):
    """A hand-written bundle: manifest + small placeholder graph files (enough for the engine logic)."""
    root.mkdir(parents=True, exist_ok=True)
    files, comps = {}, {}
    for name, inputs in COMPONENTS.items():
        comps[name] = {}
        for p in precisions:
            fname = f'{name}.onnx' if p == 'fp32' else f'{name}-{p}.onnx'
            (root / fname).write_bytes(f'{name} {p}'.encode())
            files[fname] = {'size': (root / fname).stat().st_size, 'sha256': sha256_file(root / fname)}
            outputs = [_io('image_token', ['batch', 1, 64]), _io('taps', ['batch', 4, 256, 64])] if name == 'encoder' else []
            comps[name][p] = {'file': fname, 'inputs': inputs, 'outputs': outputs}
    manifest = {'format': 'anomalygpt-edge-bundle', 'format_version': 1, 'components': comps, 'files': files}
    (root / 'manifest.json').write_text(json.dumps(manifest))
    return Bundle.open(root)


def fake_engines(bundle, device, precision, meta_override=None):
    plan = E.build_plan(bundle.manifest, precision, device.trt_version)
    for item in plan:
        path = E.engine_path(bundle.root, device, precision, item.component)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b'plan')
        meta = E.engine_meta(bundle, item, device, precision, {}, None, None)
        meta.update(meta_override or {})
        E.write_json_atomic(E.meta_path(path), meta)
    return plan


def test_cache_key_and_paths(tmp_path):
    assert E.slug('NVIDIA GeForce RTX 4090') == 'nvidia-geforce-rtx-4090'
    assert E.engine_set_name(ORIN, 'fp16') == 'orin-sm87-trt10.3.0.30-fp16'
    assert E.engine_path(tmp_path, ORIN, 'int8', 'encoder') == \
        tmp_path / 'engines' / 'orin-sm87-trt10.3.0.30-int8' / 'encoder.engine'
    assert E.meta_path(E.engine_path(tmp_path, ORIN, 'fp16', 'decoder')).name == 'decoder.json'
    assert E.timing_cache_path(tmp_path, ORIN).name == 'timing-orin-sm87-trt10.3.0.30.cache'
    with pytest.raises(E.EngineMismatch, match='unknown engine precision'):
        E.engine_set_name(ORIN, 'int4')


def test_profiles_from_the_manifest_dynamic_axes(tmp_path):
    b = make_bundle(tmp_path / 'b')
    comps = b.manifest['components']
    enc = E.profile_shapes(comps['encoder']['fp32'], max_batch=8, opt_batch=2)
    assert enc == {'image': ((1, 3, 224, 224), (2, 3, 224, 224), (8, 3, 224, 224))}
    few = E.profile_shapes(comps['fewshot']['fp32'], max_batch=4, n_patches=256, shots=(1, 4, 8))
    assert few['memory'] == ((4, 256, 64), (4, 1024, 64), (4, 2048, 64))
    assert few['taps'] == ((1, 4, 256, 64), (1, 4, 256, 64), (4, 4, 256, 64))
    dec = E.profile_shapes(comps['decoder']['fp32'])
    assert dec['text_features'] == ((2, 32),) * 3
    with pytest.raises(ValueError):
        E.profile_shapes(comps['encoder']['fp32'], max_batch=2, opt_batch=3)
    with pytest.raises(E.EngineMismatch, match="dynamic axis 'N'"):
        E.profile_shapes({'inputs': [_io('x', ['N', 3])]})


def test_build_plan_per_tensorrt_version(tmp_path):
    b = make_bundle(tmp_path / 'b', precisions=('fp32', 'fp16'))
    m = b.manifest
    # 10.x: strongly typed from the FP16 graphs (FP32 islands live in the graph), no flags
    p10 = {i.component: i for i in E.build_plan(m, 'fp16', '10.3.0')}
    assert p10['encoder'] == E.BuildItem('encoder', 'encoder-fp16.onnx', True, (), False)
    # 8.6: the FP32 graph, FP16 flag, sensitive layers pinned
    p86 = {i.component: i for i in E.build_plan(m, 'fp16', '8.6.2.3')}
    assert p86['decoder'] == E.BuildItem('decoder', 'decoder.onnx', False, ('fp16',), True)
    # without an FP16 graph: flags on 10.x, an error that says what to export on 11
    b32 = make_bundle(tmp_path / 'b32', precisions=('fp32',))
    assert E.build_plan(b32.manifest, 'fp16', '10.3.0')[0].flags == ('fp16',)
    with pytest.raises(E.EngineMismatch, match='strongly typed'):
        E.build_plan(b32.manifest, 'fp16', '11.0.0')
    # INT8 needs a calibrated encoder
    with pytest.raises(E.EngineMismatch, match='calibrate int8'):
        E.build_plan(m, 'int8', '10.3.0')
    m['components']['encoder']['int8'] = {'file': 'encoder-int8.onnx', 'inputs': COMPONENTS['encoder']}
    p = {i.component: i for i in E.build_plan(m, 'int8', '8.6.1')}
    assert p['encoder'] == E.BuildItem('encoder', 'encoder-int8.onnx', False, ('int8',), False)
    assert p['prompt_learner'].flags == ('fp16',)          # never INT8 without Q/DQ (no calibrator)
    assert {i.component: i.flags for i in E.build_plan(m, 'best', '8.6.1')}['encoder'] == ('int8', 'fp16')
    p11 = {i.component: i for i in E.build_plan(m, 'int8', '11.0.0')}
    assert all(i.strongly_typed and not i.flags for i in p11.values())
    assert p11['encoder'].onnx == 'encoder-int8.onnx' and p11['decoder'].onnx == 'decoder-fp16.onnx'
    # an INT8 graph made for ONNX Runtime (here the prompt learner's dynamic one) is not built: its FP16 graph is
    m['components']['prompt_learner']['int8'] = {
        'file': 'prompt_learner-int8.onnx', 'inputs': COMPONENTS['prompt_learner'],
        'quantization': {'calibration': {'method': 'dynamic', 'target': 'onnxruntime'}}}
    assert {i.component: i.onnx for i in E.build_plan(m, 'int8', '10.3.0')}['prompt_learner'] == \
        'prompt_learner-fp16.onnx'


def test_matching_engines_are_found(tmp_path):
    b = make_bundle(tmp_path / 'b')
    fake_engines(b, ORIN, 'fp16')
    for name in COMPONENTS:
        assert E.check_engine(b, name, 'fp16', ORIN) == E.engine_path(b.root, ORIN, 'fp16', name)
    assert E.list_engine_sets(b.root) == ['orin-sm87-trt10.3.0.30-fp16']


def test_other_tensorrt_or_gpu_is_detected_with_a_rebuild_hint(tmp_path):
    b = make_bundle(tmp_path / 'b')
    fake_engines(b, ORIN, 'fp16')
    newer = E.DeviceInfo('Orin', (8, 7), '10.7.0')
    with pytest.raises(E.EngineMismatch) as e:
        E.check_engine(b, 'encoder', 'fp16', newer)
    msg = str(e.value)
    assert 'orin-sm87-trt10.3.0.30-fp16' in msg and 'TensorRT 10.7.0' in msg
    assert f'anomalygpt-edge build-engines --bundle {b.root} --precision fp16' in msg
    with pytest.raises(E.EngineMismatch, match='built elsewhere'):
        E.check_engine(b, 'encoder', 'fp16', E.DeviceInfo('NVIDIA GeForce RTX 4090', (8, 9), '10.3.0.30'))
    with pytest.raises(E.EngineMismatch, match='no fp16 engine for Orin'):
        E.check_engine(make_bundle(tmp_path / 'fresh'), 'encoder', 'fp16', ORIN)


def test_a_copied_engine_dir_with_a_foreign_record_is_refused(tmp_path):
    b = make_bundle(tmp_path / 'b')
    # engines copied from another machine into this device's directory name
    fake_engines(b, ORIN, 'fp16', {'gpu': 'NVIDIA A100', 'compute_capability': [8, 0], 'trt_version': '8.6.1'})
    with pytest.raises(E.EngineMismatch) as e:
        E.check_engine(b, 'decoder', 'fp16', ORIN)
    assert 'built with TensorRT 8.6.1' in str(e.value) and 'NVIDIA A100' in str(e.value)
    assert 'rebuild' in str(e.value)


def test_changed_onnx_is_detected(tmp_path):
    b = make_bundle(tmp_path / 'b')
    fake_engines(b, ORIN, 'fp16')
    b.manifest['files']['encoder-fp16.onnx']['sha256'] = '0' * 64   # as after a re-export
    with pytest.raises(E.EngineMismatch, match='built from a different encoder-fp16.onnx'):
        E.check_engine(b, 'encoder', 'fp16', ORIN)
    E.check_engine(b, 'decoder', 'fp16', ORIN)                  # the others still match
    E.meta_path(E.engine_path(b.root, ORIN, 'fp16', 'decoder')).write_text('{')
    with pytest.raises(E.EngineMismatch, match='unreadable build record'):
        E.check_engine(b, 'decoder', 'fp16', ORIN)


def test_tensorrt_not_usable_here_means_onnxruntime(tmp_path):
    b = make_bundle(tmp_path / 'b')
    try:
        import tensorrt  # noqa: F401
        pytest.skip('tensorrt is installed: this checks the fallback without it')
    except ImportError:
        pass
    assert E.tensorrt_usable(b, 'fp16') is False


def test_onnxruntime_gpu_providers(tmp_path):
    b = make_bundle(tmp_path / 'b')
    assert E.ort_gpu_providers(b, 'encoder', 'fp32', ['CPUExecutionProvider']) == ['CPUExecutionProvider']
    got = E.ort_gpu_providers(b, 'fewshot', 'fp16', ['TensorrtExecutionProvider', 'CUDAExecutionProvider',
                                                     'CPUExecutionProvider'], max_batch=2)
    names = [p[0] if isinstance(p, tuple) else p for p in got]
    assert names == ['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider']
    trt = got[0][1]
    assert trt['trt_fp16_enable'] is True and trt['trt_int8_enable'] is False
    assert trt['trt_engine_cache_path'] == str(b.root / 'engines' / 'ort-trt-fp16')
    assert trt['trt_profile_max_shapes'] == 'taps:2x4x256x64,memory:4x2048x64'
    assert trt['trt_profile_min_shapes'] == 'taps:1x4x256x64,memory:4x256x64'
    # INT8 only where the graph carries Q/DQ (elsewhere TensorRT would want a calibration table)
    b.manifest['components']['encoder']['int8'] = {'file': 'encoder-int8.onnx', 'inputs': COMPONENTS['encoder']}
    avail = ['TensorrtExecutionProvider', 'CPUExecutionProvider']
    assert E.ort_gpu_providers(b, 'encoder', 'int8', avail)[0][1]['trt_int8_enable'] is True
    dec = E.ort_gpu_providers(b, 'decoder', 'int8', avail)[0][1]
    assert dec['trt_int8_enable'] is False and dec['trt_fp16_enable'] is True
