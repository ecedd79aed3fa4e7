"""Verify a bundle, then compare every vision graph in it with the PyTorch module it was exported
from, on random inputs and on a real-looking textured image, against each graph's own tolerance.

The PyTorch model is rebuilt from the manifest: a bundle made from a seeded random model is
rebuilt from its config and seed; a bundle made from the released weights needs the checkpoint
files (--imagebind, --anomalygpt, --pandagpt). Exit 0 if every graph is within tolerance, 1 if
any is not, 2 if the bundle or a checkpoint cannot be used.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PRECISIONS = ('fp32', 'fp16')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--bundle', required=True, type=Path, help='bundle directory (with manifest.json)')
    parser.add_argument('--json', action='store_true', help='print the report as JSON instead of tables')
    parser.add_argument('--precision', choices=PRECISIONS, action='append',
                        help='compare only this precision (repeatable; default: every variant in the bundle)')
    parser.add_argument('--component', action='append',
                        choices=('encoder', 'decoder', 'fewshot', 'prompt_learner'), help='compare only this component (repeatable; default: all)')
    parser.add_argument('--batch', type=int, default=2, help='batch size of the random-input case (default 2)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random inputs (default 0)')
    parser.add_argument('--imagebind', type=Path, help='imagebind_huge.pth (released bundles)')
    parser.add_argument('--anomalygpt', type=Path, help='AnomalyGPT checkpoint (released bundles)')
    parser.add_argument('--pandagpt', type=Path, help='PandaGPT delta, for llama_proj (released bundles)')


def rebuild_model(manifest: dict, args):
    """The PyTorch model a bundle's graphs were exported from."""
    from ..models.anomalygpt import AnomalyGPT
    from ..models.config import ModelConfig
    model_info = manifest.get('model')
    if not isinstance(model_info, dict) or 'config' not in model_info:
        raise ValueError("the manifest has no 'model' section with the model config")
    cfg = ModelConfig.from_dict(model_info['config'])
    source = model_info.get('source', {})
    kind = source.get('kind')
    if kind == 'random':
        return AnomalyGPT.random(cfg, seed=int(source['seed']), with_llm=False)
    if kind == 'released':
        missing = [f'--{n}' for n in ('imagebind', 'anomalygpt', 'pandagpt') if getattr(args, n) is None]
        if missing:
            raise ValueError(f"this bundle was exported from the released weights: pass {' '.join(missing)}")
        return load_released(cfg, args.imagebind, args.anomalygpt, args.pandagpt)
    raise ValueError(f"unknown model source kind {kind!r} in the manifest (expected 'random' or 'released')")


def load_released(cfg, imagebind: Path, anomalygpt: Path, pandagpt: Path):
    """Vision tower, decoder, prompt learner and llama_proj from the released files (no LLM)."""
    from ..models import loaders
    from ..models.anomalygpt import AnomalyGPT
    model = AnomalyGPT(cfg)
    loaders.load_imagebind(imagebind, model.visual_encoder)
    loaders.load_anomalygpt_delta(anomalygpt, model)
    proj = {k: v for k, v in loaders.read_state_dict(pandagpt).items() if k.startswith('llama_proj.')}
    loaders.load_into(model.llama_proj, pandagpt, proj, 'PandaGPT delta (llama_proj)', prefix='llama_proj.')
    return model.eval()


def compare_bundle(bundle, model, precisions=None, components=None, batch: int = 2, seed: int = 0) -> dict:
    """{component: {precision: ComparisonReport}} for every selected variant in the manifest."""
    import numpy as np

    from ..runtime.compare import ComparisonReport, compare_outputs
    from ..runtime.runners import OrtRunner
    from ..runtime.torch_runner import TorchRunner
    from . import samples
    from .onnx_graphs import Component, component_specs, reference_module

    text_features = np.load(bundle.path('text_features.npy'))
    if text_features.ndim != 3 or text_features.shape[1] != 2:
        raise ValueError(f"{bundle.path('text_features.npy')}: shape {list(text_features.shape)}, expected [N,2,E]")
    specs = component_specs(model.cfg)
    out = {}
    for name, variants in bundle.manifest.get('components', {}).items():
        if components and name not in components:
            continue
        if name not in {c.value for c in Component}:
            print(f"compare: skipping component {name!r}: not a vision graph this version knows", file=sys.stderr)
            continue
        comp = Component(name)
        spec = specs[comp]
        # random images (batch), one real-looking image, and for the decoder each class's text row
        tf = text_features[0]
        normals = samples.textured_images(1, seed=seed + 100, defect=False)
        cases = [('random', samples.component_feeds(model, comp, samples.random_images(batch, seed), tf, normals)),
                 ('textured', samples.component_feeds(model, comp, samples.textured_images(1, seed), tf, normals))]
        if comp is Component.DECODER:
            taps = cases[1][1]['taps']
            cases += [(f'class-{i}', {'taps': taps, 'text_features': text_features[i]})
                      for i in range(1, len(text_features))]
        ref = TorchRunner(reference_module(model, comp), spec.input_names, spec.output_names)
        expected = [ref.infer(feeds) for _, feeds in cases]
        for precision, entry in variants.items():
            if precisions and precision not in precisions:
                continue
            runner = OrtRunner(bundle.root / entry['file'], providers=['CPUExecutionProvider'])
            report = ComparisonReport(f"onnxruntime:{entry['file']}", f'torch:{name}')
            for (case, feeds), exp in zip(cases, expected):
                report.extend(compare_outputs(runner.infer(feeds), exp, entry['tolerance'], case))
            out.setdefault(name, {})[precision] = report
    return out


def _unusable(args, message: str) -> int:
    """Exit 2, with the reason on stderr and, under --json, as the report on stdout."""
    print(f"anomalygpt-edge compare: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({'bundle': str(args.bundle), 'passed': False, 'error': message}, indent=1))
    return 2


def run(args) -> int:
    from ..runtime.bundle import Bundle, BundleError
    from ..runtime.runners import RunnerError
    try:
        bundle = Bundle.open(args.bundle, verify_hashes=True)
    except BundleError as e:
        return _unusable(args, str(e))
    from ..models.loaders import CheckpointError
    try:
        model = rebuild_model(bundle.manifest, args)
        reports = compare_bundle(bundle, model, args.precision, args.component, args.batch, args.seed)
    except (ValueError, CheckpointError, RunnerError, BundleError) as e:
        return _unusable(args, f"{bundle.root}: {e}")
    if not reports:
        return _unusable(args, f"{bundle.root}: no component variant to compare")
    passed = all(r.passed for variants in reports.values() for r in variants.values())
    if args.json:
        print(json.dumps({'bundle': str(bundle.root), 'passed': passed,
                          'components': {c: {p: r.to_dict() for p, r in v.items()} for c, v in reports.items()}},
                         indent=1))
    else:
        for name, variants in reports.items():
            for precision, report in variants.items():
                print(f'== {name} [{precision}]')
                print(report.table())
                print()
        print(f"{bundle.root}: {'all graphs within tolerance' if passed else 'OUT OF TOLERANCE'}")
    return 0 if passed else 1
