"""``anomalygpt-edge compare``: passes on a good bundle, fails on a graph from another model."""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from anomalygpt_edge.cli import main  # noqa: E402
from anomalygpt_edge.runtime.bundle import MANIFEST, sha256_file  # noqa: E402


def build_bundle(out_dir, config, seed=0, precisions=('fp32', 'fp16')):
    """A tiny bundle with what ``compare`` reads: vision graphs, text features [N,2,E], and the
    manifest's model config and source. (A stand-in for export.tiny.export_tiny.)"""
    from anomalygpt_edge.export.bundle_writer import BundleWriter
    from anomalygpt_edge.export.onnx_export import export_vision
    from anomalygpt_edge.models.anomalygpt import AnomalyGPT
    model = AnomalyGPT.random(config, seed=seed, with_llm=False)
    with BundleWriter(out_dir) as w:
        components = export_vision(model, w.tmp, precisions=precisions)
        t = np.random.default_rng(seed).standard_normal((3, 2, config.vision.embed_dim)).astype(np.float32)
        np.save(w.path('text_features.npy'), t / np.linalg.norm(t, axis=-1, keepdims=True))
        return w.commit({'model': {'config': config.to_dict(), 'source': {'kind': 'random', 'seed': seed}},
                         'components': components})


@pytest.fixture(scope='module')
def tiny_bundle(tiny_config, tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp('bundles') / 'tiny', tiny_config)


@pytest.fixture(scope='module')
def foreign_decoder(tiny_config, tmp_path_factory):
    """decoder.onnx exported from a model with another seed."""
    from anomalygpt_edge.export.onnx_export import export_vision
    from anomalygpt_edge.models.anomalygpt import AnomalyGPT
    out = tmp_path_factory.mktemp('foreign')
    export_vision(AnomalyGPT.random(tiny_config, seed=1, with_llm=False), out, components=('decoder',))
    return out / 'decoder.onnx'


def copy_bundle(src, dst):
    shutil.copytree(src, dst)
    return dst


def replace_file(bundle, name, new, update_manifest: bool):
    shutil.copyfile(new, bundle / name)
    if update_manifest:
        m = json.loads((bundle / MANIFEST).read_text())
        m['files'][name] = {'size': (bundle / name).stat().st_size, 'sha256': sha256_file(bundle / name)}
        (bundle / MANIFEST).write_text(json.dumps(m))


def test_good_bundle_passes(tiny_bundle, capsys):
    assert main(['compare', '--bundle', str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert 'all graphs within tolerance' in out
    for comp in ('encoder', 'decoder', 'fewshot', 'prompt_learner'):
        assert f'== {comp} [fp32]' in out and f'== {comp} [fp16]' in out


def test_json_report_lists_every_variant_and_case(tiny_bundle, capsys):
    assert main(['compare', '--bundle', str(tiny_bundle), '--json', '--precision', 'fp32']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['passed'] is True
    assert set(report['components']) == {'encoder', 'decoder', 'fewshot', 'prompt_learner'}
    assert all(set(v) == {'fp32'} for v in report['components'].values())
    dec = report['components']['decoder']['fp32']
    cases = {r['case'] for r in dec['results']}
    assert {'random', 'textured', 'class-1', 'class-2'} <= cases      # every text-feature row is used
    worst = max(r['max_abs'] for r in dec['results'])
    assert 0 < worst <= 1e-4 and all(r['atol'] == 1e-4 for r in dec['results'])


def test_graph_from_another_model_fails_with_exit_1(tiny_bundle, foreign_decoder, tmp_path, capsys):
    bundle = copy_bundle(tiny_bundle, tmp_path / 'swapped')
    replace_file(bundle, 'decoder.onnx', foreign_decoder, update_manifest=True)  # hashes stay consistent
    assert main(['compare', '--bundle', str(bundle), '--json']) == 1
    report = json.loads(capsys.readouterr().out)
    assert report['passed'] is False
    assert report['components']['decoder']['fp32']['passed'] is False
    assert report['components']['decoder']['fp16']['passed'] is True            # untouched graphs still pass
    assert report['components']['encoder']['fp32']['passed'] is True
    assert max(r['max_abs'] for r in report['components']['decoder']['fp32']['results']) > 1e-2


def test_altered_file_is_caught_by_the_hash_check(tiny_bundle, foreign_decoder, tmp_path, capsys):
    bundle = copy_bundle(tiny_bundle, tmp_path / 'altered')
    replace_file(bundle, 'decoder.onnx', foreign_decoder, update_manifest=False)
    assert main(['compare', '--bundle', str(bundle)]) == 2
    err = capsys.readouterr().err
    assert 'decoder.onnx' in err and ('sha256' in err or 'bytes' in err)
    # --json: scripts get a JSON report on stdout for this failure too
    assert main(['compare', '--bundle', str(bundle), '--json']) == 2
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report['passed'] is False and report['bundle'] == str(bundle)
    assert 'decoder.onnx' in report['error'] and report['error'] in out.err


def test_unusable_bundles_exit_2(tiny_bundle, tmp_path, capsys):
    assert main(['compare', '--bundle', str(tmp_path / 'nothing')]) == 2
    assert 'not a bundle directory' in capsys.readouterr().err
    bundle = copy_bundle(tiny_bundle, tmp_path / 'nomodel')
    m = json.loads((bundle / MANIFEST).read_text())
    del m['model']
    (bundle / MANIFEST).write_text(json.dumps(m))
    assert main(['compare', '--bundle', str(bundle)]) == 2
    assert "no 'model' section" in capsys.readouterr().err
    m['model'] = {'config': json.loads((tiny_bundle / MANIFEST).read_text())['model']['config'],
                  'source': {'kind': 'released'}}
    (bundle / MANIFEST).write_text(json.dumps(m))
    assert main(['compare', '--bundle', str(bundle)]) == 2
    assert '--imagebind --anomalygpt --pandagpt' in capsys.readouterr().err


def test_released_bundle_is_rebuilt_from_checkpoint_files(tiny_bundle, tiny_config, tmp_path, capsys):
    """Checkpoints written with the released key layout (here: the seed-0 weights the bundle holds)."""
    from anomalygpt_edge.models.anomalygpt import AnomalyGPT
    model = AnomalyGPT.random(tiny_config, seed=0, with_llm=False)
    torch.save(model.visual_encoder.state_dict(), tmp_path / 'imagebind.pth')
    torch.save({**{f'image_decoder.{k}': v for k, v in model.image_decoder.state_dict().items()},
                **{f'prompt_learner.{k}': v for k, v in model.prompt_learner.state_dict().items()}},
               tmp_path / 'anomalygpt.pt')
    lora = {'llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight': torch.zeros(4, 64)}
    torch.save({**{f'llama_proj.{k}': v for k, v in model.llama_proj.state_dict().items()}, **lora},
               tmp_path / 'pandagpt.pt')
    bundle = copy_bundle(tiny_bundle, tmp_path / 'released')
    m = json.loads((bundle / MANIFEST).read_text())
    m['model']['source'] = {'kind': 'released'}
    (bundle / MANIFEST).write_text(json.dumps(m))
    args = ['compare', '--bundle', str(bundle), '--precision', 'fp32', '--component', 'encoder',
            '--component', 'prompt_learner', '--imagebind', str(tmp_path / 'imagebind.pth'),
            '--anomalygpt', str(tmp_path / 'anomalygpt.pt'), '--pandagpt', str(tmp_path / 'pandagpt.pt')]
    assert main(args) == 0, capsys.readouterr().err
    # a checkpoint with the wrong layout is a usage error that names the file
    torch.save({'something.else': torch.zeros(1)}, tmp_path / 'anomalygpt.pt')
    assert main(args) == 2
    assert 'anomalygpt.pt' in capsys.readouterr().err
