"""Compare demo-model training recipes on the demo's held-out set, with the PyTorch reference.

  python -m anomalygpt_edge.benchmarks.demo_ablation --json OUT.json NAME=WORK [NAME=WORK ...]

Each WORK is a training directory of ``models/train.py`` (its ``final.pt`` and ``tokenizer``). Every
checkpoint is measured on the same held-out images as ``demo_report`` (seed 1000; scratch, stain, hole),
zero-shot, with the reference's rules: image and pixel AUROC, Yes/No accuracy, location accuracy on the
single-region defect images. The PyTorch reference answers as the runtime does (``demo_report`` checks that on
the shipped bundle), so recipes can be compared without exporting each one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from .demo_report import DEFECTS, HELD_OUT_SEED
from .metrics import answer_positions, image_auroc, mean_or_none, pixel_auroc, reference_correct

KEYS = ('image_auroc', 'pixel_auroc', 'yes_no_accuracy', 'location_accuracy')


def measure(work: Path, root: Path, config: str = 'small', progress=None) -> dict:
    """Per class and mean figures of the checkpoint in ``work`` on the held-out folder ``root``."""
    from ..models.reference import ReferencePipeline
    from ..models.spec import POSITION_WORDS
    from ..models.synthetic import CATEGORIES
    from ..models.text_features import text_feature_table
    from ..models.tokenizer import load_tokenizer
    from ..models.train import build_small, load_trained
    from ..runtime.answers import position_word
    from .evaluate import discover, load_mask
    model, text = build_small(work / 'tokenizer', 0, config)
    state = load_trained(work, model, text)
    ref = ReferencePipeline(model, load_tokenizer(work / 'tokenizer'), text_feature_table(text, list(CATEGORIES)))
    classes = {}
    for name, samples in discover(root).items():
        scores, labels, maps, masks, correct, loc_ok = [], [], [], [], [], []
        for s in samples:
            r = ref.inspect(s.path, name.replace('_', ' '), question=CATEGORIES[name].question)
            gt = load_mask(s.mask)
            scores.append(r.score), labels.append(int(s.anomalous)), maps.append(r.anomaly_map), masks.append(gt)
            correct.append(reference_correct(r.answer, s.anomalous))
            if s.anomalous and cv2.connectedComponents(gt)[0] == 2:   # one defect region, as evaluate.py
                ys, xs = np.nonzero(gt)
                want = position_word(ys.mean() / gt.shape[0], xs.mean() / gt.shape[1], POSITION_WORDS)
                loc_ok.append(answer_positions(r.answer, POSITION_WORDS) == [want])
            if progress is not None:
                progress.update(1)
        classes[name] = {'image_auroc': image_auroc(scores, labels), 'pixel_auroc': pixel_auroc(maps, masks),
                         'yes_no_accuracy': float(np.mean(correct)), 'location_accuracy': float(np.mean(loc_ok))}
    mean = {k: mean_or_none([c[k] for c in classes.values()]) for k in KEYS}
    return {'work': str(work), 'minutes': state.get('minutes'), 'mean': mean, 'classes': classes}


def markdown(results: dict) -> str:
    rows = ['| recipe | image AUROC | pixel AUROC | Yes/No | location |', '|---|---|---|---|---|']
    for name, r in results.items():
        rows.append(f"| {name} | " + ' | '.join(f"{r['mean'][k]:.3f}" for k in KEYS) + ' |')
    return '\n'.join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='python -m anomalygpt_edge.benchmarks.demo_ablation', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('runs', nargs='+', metavar='NAME=WORK', help='a label and a training directory')
    ap.add_argument('--json', required=True, help='write the figures here')
    ap.add_argument('--config', default='small', help='the model config the runs were trained with')
    ap.add_argument('--per-kind', type=int, default=6, help='held-out images per defect kind and class')
    ap.add_argument('--good', type=int, default=12, help='held-out normal images per class')
    args = ap.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, work = item.partition('=')
        if not sep or not name or not (Path(work) / 'final.pt').is_file():
            print(f"demo_ablation: {item!r}: expected NAME=WORK with WORK/final.pt", file=sys.stderr)
            return 2
        runs[name] = Path(work)
    from tqdm import tqdm

    from ..models.synthetic import CATEGORIES
    from ..models.synthetic_dataset import write_mvtec_layout
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / 'heldout'
        write_mvtec_layout(root, list(CATEGORIES), n_train_good=0, n_test_good=args.good,
                           n_test_defect=args.per_kind, seed=HELD_OUT_SEED, defect_kinds=DEFECTS)
        per_run = len(CATEGORIES) * (args.good + len(DEFECTS) * args.per_kind)
        with tqdm(total=per_run * len(runs), desc='ablation', unit='img', file=sys.stderr) as bar:
            for name, work in runs.items():
                results[name] = measure(work, root, args.config, bar)
    report = {'held_out': {'seed': HELD_OUT_SEED, 'defect_kinds': list(DEFECTS), 'good_per_class': args.good,
                           'defects_per_kind_and_class': args.per_kind}, 'runs': results, 'table': markdown(results)}
    tmp_path = Path(args.json).with_name(Path(args.json).name + '.partial')
    tmp_path.write_text(json.dumps(report, indent=1))
    os.replace(tmp_path, args.json)
    print(report['table'])
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
