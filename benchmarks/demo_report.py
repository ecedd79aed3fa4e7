"""Measure the demo model on a held-out simulated set and write its model card figures.

  python -m anomalygpt_edge.benchmarks.demo_report --bundle runtime/demo/bundle --work WORK --out DIR

Held-out set: a new seed, and defect kinds the training never used (thin scratches, colour stains,
holes; training only saw pasted patches). Measured through the runtime (ONNX Runtime + llama.cpp),
zero-shot and 1-shot; the runtime's greedy answers are compared with the PyTorch reference's
(rebuilt from the training checkpoint in WORK) on every image.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

HELD_OUT_SEED = 1000
DEFECTS = ('scratch', 'stain', 'hole')


def reference_agreement(pipe, work, root) -> dict:
    """Runtime vs PyTorch reference on the same preprocessed inputs: greedy answer ids and map error."""
    import torch

    from ..models.reference import ReferencePipeline
    from ..models.tokenizer import load_tokenizer
    from ..models.train import build_small, load_trained
    from .evaluate import discover
    model, text = build_small(Path(work) / 'tokenizer', seed=0)
    load_trained(work, model, text)
    feats = {n: torch.from_numpy(pipe.text_features[c['row']]) for n, c in pipe.classes.items()}
    ref = ReferencePipeline(model, load_tokenizer(Path(work) / 'tokenizer'), feats, max_new_tokens=pipe.max_new_tokens)
    same, total, worst = 0, 0, 0.0
    for name, samples in discover(root).items():
        cls = name.replace('_', ' ')
        for s in samples:
            got = pipe.inspect(s.path, class_name=cls)
            want = ref.inspect(torch.from_numpy(pipe.load(s.path)[0]), class_name=cls)
            same += got.answer_ids == want.answer_ids
            total += 1
            worst = max(worst, float(np.abs(got.anomaly_map - want.anomaly_map).max()))
    return {'images': total, 'identical_answers': same, 'max_map_abs_error': worst}


def main(argv=None) -> int:
    from ..models.synthetic import CATEGORIES
    from ..models.synthetic_dataset import write_mvtec_layout
    from ..runtime.pipeline import Pipeline
    from .evaluate import evaluate, markdown
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--bundle', required=True)
    ap.add_argument('--work', help='training directory (final.pt, tokenizer) for the reference comparison')
    ap.add_argument('--out', required=True, help='where to write results.json and results.md')
    ap.add_argument('--per-kind', type=int, default=6, help='held-out images per defect kind and class')
    ap.add_argument('--good', type=int, default=12, help='held-out normal images per class')
    ap.add_argument('--samples', help='also copy a few held-out images here as demo samples')
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / 'heldout'
        write_mvtec_layout(root, list(CATEGORIES), n_train_good=16, n_test_good=args.good,
                           n_test_defect=args.per_kind, seed=HELD_OUT_SEED, defect_kinds=DEFECTS)
        results = {'held_out': {'seed': HELD_OUT_SEED, 'defect_kinds': list(DEFECTS), 'good_per_class': args.good,
                                'defects_per_kind_and_class': args.per_kind},
                   'machine': {'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count()}}
        with Pipeline.from_bundle(args.bundle, exact_llm=True) as pipe:
            for k in (0, 1):
                rep = evaluate(pipe, root, k_shot=k)
                results[f'{k}_shot'] = {'mean': rep['mean'], 'classes': rep['classes'], 'table': markdown(rep)}
                print(f"{k}-shot\n{markdown(rep)}\n", flush=True)
            if args.work:
                results['runtime_vs_reference'] = reference_agreement(pipe, args.work, root)
                print(json.dumps(results['runtime_vs_reference']))
        if args.samples:
            dst = Path(args.samples)
            dst.mkdir(parents=True, exist_ok=True)
            for cat in CATEGORIES:
                shutil.copy(root / cat / 'test' / 'good' / '000.png', dst / f'{cat}-good.png')
                for kind in DEFECTS[:2]:
                    shutil.copy(root / cat / 'test' / kind / '000.png', dst / f'{cat}-{kind}.png')
    tmp_json = out / 'results.json.partial'
    tmp_json.write_text(json.dumps(results, indent=1))
    os.replace(tmp_json, out / 'results.json')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
