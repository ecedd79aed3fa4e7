"""Vision export: the ONNX graphs run in ONNX Runtime agree with the PyTorch model's own code.

Expected values are computed here from the model's methods (encode_image, zero_shot_map,
few_shot_map, prompt_learner), never from the export wrappers.
"""
import json
import logging
import os

import numpy as np
import onnx
import pytest

torch = pytest.importorskip('torch')

from anomalygpt_edge.export import onnx_export  # noqa: E402
from anomalygpt_edge.export.onnx_export import ExportVerificationError, export_vision  # noqa: E402
from anomalygpt_edge.export.samples import memory_from_taps, random_images, textured_images  # noqa: E402
from anomalygpt_edge.models.decoder import few_shot_map, zero_shot_map  # noqa: E402
from anomalygpt_edge.runtime.runners import OrtRunner  # noqa: E402

COMPONENTS = ('encoder', 'decoder', 'fewshot', 'prompt_learner')
MAP_BOUND = {'fp32': 1e-4, 'fp16': 5e-3}


@pytest.fixture(scope='module')
def exported(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp('vision')
    return out, export_vision(tiny_model, out, precisions=('fp32', 'fp16'))


@pytest.fixture(scope='module')
def runners(exported):
    out, section = exported
    return {(c, p): OrtRunner(out / v['file'], providers=['CPUExecutionProvider'])
            for c, variants in section.items() for p, v in variants.items()}


@pytest.fixture(scope='module')
def text_features(tiny_config):
    t = torch.randn(2, tiny_config.vision.embed_dim, generator=torch.Generator().manual_seed(7))
    return (t / t.norm(dim=-1, keepdim=True)).numpy()


def images(kind: str, batch: int, seed: int = 3) -> np.ndarray:
    return random_images(batch, seed) if kind == 'random' else textured_images(batch, seed)


@torch.inference_mode()
def reference(model, x: np.ndarray):
    emb, taps = model.encode_image(torch.from_numpy(x))
    return model.image_token(emb).numpy(), taps


def within(actual, expected, tol) -> bool:
    return np.allclose(actual, expected, atol=tol['atol'], rtol=tol['rtol'])


def test_components_section_describes_every_variant(exported, tiny_config):
    out, section = exported
    assert set(section) == set(COMPONENTS)
    c, e, d = tiny_config.vision.width, tiny_config.vision.embed_dim, tiny_config.llm.hidden
    shapes = {'encoder': ({'image': ['batch', 3, 224, 224]},
                          {'image_token': ['batch', 1, d], 'taps': ['batch', 4, 256, c]}),
              'decoder': ({'taps': ['batch', 4, 256, c], 'text_features': [2, e]},
                          {'anomaly_map': ['batch', 1, 224, 224]}),
              'fewshot': ({'taps': ['batch', 4, 256, c], 'memory': [4, 'M', c]},
                          {'anomaly_map': ['batch', 1, 224, 224]}),
              'prompt_learner': ({'anomaly_map': ['batch', 1, 224, 224]}, {'prompts': ['batch', 18, d]})}
    for comp, variants in section.items():
        assert set(variants) == {'fp32', 'fp16'}
        assert variants['fp32']['file'] == f'{comp}.onnx' and variants['fp16']['file'] == f'{comp}-fp16.onnx'
        for prec, v in variants.items():
            assert v['precision'] == prec and v['opset'] == 17 and v['external_data'] is None
            assert {t['name']: t['shape'] for t in v['inputs']} == shapes[comp][0]
            assert {t['name']: t['shape'] for t in v['outputs']} == shapes[comp][1]
            assert all(t['dtype'] == 'float32' for t in v['inputs'] + v['outputs'])
            assert {'atol', 'rtol'} <= set(v['tolerance']) <= {'atol', 'rtol', 'range_atol'}
            assert v['verified']['max_abs'] <= v['tolerance']['atol'] + 1e-2   # and it did run
            assert v['verified']['batch'] == 2 and v['verified']['cases'][:2] == ['random', 'textured']
            proto = onnx.load(str(out / v['file']))
            assert [o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')] == [17]
            onnx.checker.check_model(str(out / v['file']))
    json.dumps(section, allow_nan=False)
    # only the 8 graphs: no trace leftovers, no per-tensor external files
    assert sorted(os.listdir(out)) == sorted(v['file'] for vs in section.values() for v in vs.values())


def test_encoder_graph_has_a_conv2d_stem_and_no_5d_tensor(exported):
    out, _ = exported
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(out / 'encoder.onnx')))
    ops = {n.op_type for n in proto.graph.node}
    assert 'Tile' not in ops
    convs = [n for n in proto.graph.node if n.op_type == 'Conv']
    inits = {t.name: t for t in proto.graph.initializer}
    assert len(convs) == 1 and len(inits[convs[0].input[1]].dims) == 4
    ranks = [len(v.type.tensor_type.shape.dim) for v in proto.graph.value_info]
    assert ranks and max(ranks) <= 4


def test_fewshot_graph_uses_matmul_and_max_not_a_broadcast(exported):
    out, _ = exported
    ops = [n.op_type for n in onnx.load(str(out / 'fewshot.onnx')).graph.node]
    assert ops.count('MatMul') == 1 and ops.count('ReduceMax') == 1 and 'ReduceSum' not in ops


def test_fp16_variants_keep_float32_io_and_sensitive_ops_in_float32(exported):
    out, _ = exported
    for comp in COMPONENTS:
        p32, p16 = out / f'{comp}.onnx', out / f'{comp}-fp16.onnx'
        proto = onnx.load(str(p16))
        assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
                   for v in list(proto.graph.input) + list(proto.graph.output))
        if comp != 'fewshot':  # few-shot has no weights
            assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
            weights = lambda m: sum(len(t.raw_data) for t in m.graph.initializer)  # noqa: E731
            assert weights(proto) < 0.75 * weights(onnx.load(str(p32)))
    enc = onnx.shape_inference.infer_shapes(onnx.load(str(out / 'encoder-fp16.onnx')))
    types = {v.name: v.type.tensor_type.elem_type for v in enc.graph.value_info}
    for node in enc.graph.node:
        if node.op_type in ('LayerNormalization', 'ReduceL2', 'Softmax'):
            assert types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
        if node.op_type == 'MatMul':
            assert types[node.output[0]] == onnx.TensorProto.FLOAT16, node.name


@pytest.fixture(scope='module', params=[('random', 1), ('textured', 1), ('random', 3), ('textured', 3)],
                ids=lambda p: f'{p[0]}-b{p[1]}')
def vision_case(request, tiny_model, text_features):
    """Reference outputs of the model's own code for one batch of images."""
    kind, batch = request.param
    x = images(kind, batch)
    token, taps_list = reference(tiny_model, x)
    with torch.inference_mode():
        amap = zero_shot_map(tiny_model.image_decoder, taps_list, torch.from_numpy(text_features)).numpy()
        prompts = tiny_model.prompt_learner(torch.from_numpy(amap)).numpy()
    return {'image': x, 'image_token': token, 'taps': torch.stack(taps_list, 1).numpy(), 'map': amap,
            'prompts': prompts}


@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_vision_graphs_match_pytorch(exported, runners, text_features, vision_case, precision):
    section, ref = exported[1], vision_case
    batch = ref['image'].shape[0]
    enc = runners['encoder', precision].infer({'image': ref['image']})
    assert enc['image_token'].shape == ref['image_token'].shape and enc['taps'].shape == ref['taps'].shape
    assert within(enc['image_token'], ref['image_token'], section['encoder'][precision]['tolerance'])
    assert within(enc['taps'], ref['taps'], section['encoder'][precision]['tolerance'])

    got = runners['decoder', precision].infer({'taps': ref['taps'], 'text_features': text_features})['anomaly_map']
    assert got.shape == (batch, 1, 224, 224)
    assert np.abs(got - ref['map']).max() <= MAP_BOUND[precision]

    got = runners['prompt_learner', precision].infer({'anomaly_map': ref['map']})['prompts']
    assert got.shape == ref['prompts'].shape == (batch, 18, section['prompt_learner'][precision]['outputs'][0]['shape'][2])
    assert within(got, ref['prompts'], section['prompt_learner'][precision]['tolerance'])


@pytest.fixture(scope='module', params=[1, 2, 4], ids=lambda k: f'k{k}')
def fewshot_case(request, tiny_model):
    k = request.param
    query = np.concatenate([textured_images(1, seed=11), random_images(1, seed=12)])
    _, q_taps = reference(tiny_model, query)
    _, n_taps = reference(tiny_model, textured_images(k, seed=40, defect=False))
    with torch.inference_mode():
        expected = few_shot_map(q_taps, [t.reshape(-1, t.shape[-1]) for t in n_taps]).numpy()
    return k, torch.stack(q_taps, 1).numpy(), memory_from_taps(torch.stack(n_taps, 1).numpy()), expected


@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_fewshot_graph_matches_pytorch_for_k_normal_images(tiny_model, runners, fewshot_case, precision):
    k, taps, memory, expected = fewshot_case
    assert memory.shape == (4, k * 256, tiny_model.cfg.vision.width)
    got = runners['fewshot', precision].infer({'taps': taps, 'memory': memory})['anomaly_map']
    assert got.shape == expected.shape == (2, 1, 224, 224)
    assert np.abs(got - expected).max() <= MAP_BOUND[precision]


@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_chained_graphs_match_the_pytorch_pipeline(tiny_model, runners, text_features, precision):
    """encoder -> decoder in ONNX Runtime (the encoder's own taps feed the decoder), against PyTorch."""
    x = textured_images(2, seed=21)
    _, taps_list = reference(tiny_model, x)
    with torch.inference_mode():
        amap = zero_shot_map(tiny_model.image_decoder, taps_list, torch.from_numpy(text_features)).numpy()
    enc = runners['encoder', precision].infer({'image': x})
    got = runners['decoder', precision].infer({'taps': enc['taps'], 'text_features': text_features})['anomaly_map']
    assert np.abs(got - amap).max() <= MAP_BOUND[precision]


def test_external_data_goes_to_one_file_and_loads(tiny_model, exported, tmp_path):
    out, section = exported
    ext = export_vision(tiny_model, tmp_path, precisions=('fp32', 'fp16'), external_data_threshold=50_000,
                        components=('encoder', 'prompt_learner'))
    for comp in ('encoder', 'prompt_learner'):
        for prec, v in ext[comp].items():
            assert v['external_data'] == v['file'] + '.data'
            single = (out / v['file']).stat().st_size          # the same graph saved as one file
            graph, data = (tmp_path / v['file']).stat().st_size, (tmp_path / v['external_data']).stat().st_size
            assert data > 2 * graph and graph + data > 0.95 * single     # the weights moved out
            assert (tmp_path / v['external_data']).stat().st_mode == (tmp_path / v['file']).stat().st_mode
            onnx.checker.check_model(str(tmp_path / v['file']))
    assert sorted(os.listdir(tmp_path)) == sorted(
        f for vs in ext.values() for v in vs.values() for f in (v['file'], v['external_data']))
    x = textured_images(2, seed=5)
    a = OrtRunner(tmp_path / 'encoder.onnx').infer({'image': x})
    b = OrtRunner(out / 'encoder.onnx').infer({'image': x})
    for name in ('image_token', 'taps'):
        np.testing.assert_array_equal(a[name], b[name])
    # below the threshold nothing is external (the session fixture's default threshold)
    assert section['encoder']['fp32']['external_data'] is None


def test_opset_is_configurable(tiny_model, tmp_path):
    sec = export_vision(tiny_model, tmp_path, opset=18, components=('prompt_learner',))
    proto = onnx.load(str(tmp_path / sec['prompt_learner']['fp32']['file']))
    assert [o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')] == [18]
    assert sec['prompt_learner']['fp32']['opset'] == 18


def test_verification_catches_a_half_pixel_resize(tiny_model, tmp_path, monkeypatch):
    """A decoder upsampled with the default half-pixel resize instead of align_corners must be refused."""
    from anomalygpt_edge.export import onnx_graphs

    class HalfPixelDecoder(onnx_graphs.DecoderGraph):
        def forward(self, taps, text_features):
            feats = torch.matmul(taps, self.weight) + self.bias
            feats = feats / feats.norm(dim=-1, keepdim=True)
            logit = 100.0 * torch.matmul(feats, text_features[1] - text_features[0])
            logit = logit.reshape(logit.shape[0], logit.shape[1], self.grid, self.grid)
            up = torch.nn.functional.interpolate(logit, size=224, mode='bilinear', align_corners=False)
            return torch.sigmoid(up).mean(dim=1, keepdim=True)

    real = onnx_export.export_module
    monkeypatch.setattr(onnx_export, 'export_module',
                        lambda m, c: HalfPixelDecoder(m).eval() if str(getattr(c, 'value', c)) == 'decoder' else real(m, c))
    with pytest.raises(ExportVerificationError, match=r'decoder\.onnx: decoder \(fp32\) differs'):
        export_vision(tiny_model, tmp_path, components=('decoder',))


def test_decoder_sigmoid_keeps_its_saturated_tail_in_onnx_runtime(exported, tmp_path):
    """A trained map is ~0 on most of a normal surface (logits -20 .. -80): exported, its sigmoid must keep
    float32 relative accuracy there, as PyTorch's does, so pixels rank as in the reference. ONNX Runtime's
    Sigmoid kernel ties them all at 0 below -18."""
    from anomalygpt_edge.export.onnx_graphs import logistic

    class Logistic(torch.nn.Module):
        def forward(self, x):
            return logistic(x)
    x = np.linspace(-85.0, 30.0, 2000, dtype=np.float32)
    path = tmp_path / 'logistic.onnx'
    torch.onnx.export(Logistic(), (torch.from_numpy(x),), str(path), input_names=['x'], output_names=['y'],
                      opset_version=17, dynamo=False)
    got = OrtRunner(path, providers=['CPUExecutionProvider']).infer({'x': x})['y']
    want = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    assert len(np.unique(got[x < -18])) == (x < -18).sum()            # no ties in the tail
    ops = {n.op_type for n in onnx.load(str(exported[0] / 'decoder.onnx')).graph.node}
    assert 'Sigmoid' not in ops and {'Exp', 'Reciprocal'} <= ops       # the exported decoder uses this form


def test_fp16_conversion_keeps_the_converters_node_dumps_out_of_the_log(exported, tmp_path, caplog):
    from anomalygpt_edge.export.fp16 import to_fp16
    out, _ = exported
    with caplog.at_level(logging.INFO):
        to_fp16(onnx.load(str(out / 'encoder.onnx')), tmp_path)
    assert not [r for r in caplog.records if r.name.startswith('onnxruntime.transformers')]
    assert logging.getLogger('onnxruntime.transformers.float16').level == logging.NOTSET   # restored
