"""Compare demo-model training recipes on the demo's held-out set, with the PyTorch reference.

  python -m anomalygpt_edge.benchmarks.demo_ablation --json OUT.json NAME=WORK [NAME=WORK ...]
  python -m anomalygpt_edge.benchmarks.demo_ablation --maps-only --json OUT.json NAME=WORK ...

Each WORK is a training directory of ``models/train.py`` (its ``final.pt`` and ``tokenizer``; with
``--maps-only``, its stage-1 checkpoint ``vision.pt``, so vision recipes compare before any LLM is trained), or
an exported bundle (a directory with ``manifest.json``, e.g. the shipped ``runtime/demo/bundle`` whose checkpoint
is gone), measured through the runtime (ONNX Runtime + llama.cpp) instead of the PyTorch reference. Every
checkpoint is measured on the same held-out images as ``demo_report`` (seed 1000; scratch, stain, hole),
zero-shot, with the reference's rules: image and pixel AUROC, Yes/No accuracy, location accuracy on the
single-region defect images; the accuracy of "anomalous where the map reaches 0.5" (some pixel at or above
0.5), which a --maps-only run measures before any LLM is trained (the demo model's LLM answers Yes where its map
reaches 0.5 on 299 of the 300 held-out and validation images, so this figure foretells its Yes/No); and how often
the map's largest region at >= 0.5 lies in the defect's cell (the location a reader of the map alone gets). The
PyTorch reference answers as the runtime does (``demo_report`` checks that on the shipped bundle), so recipes can
be compared without exporting each one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from .demo_report import DEFECTS, HELD_OUT_SEED, targets_summary

KEYS = ('image_auroc', 'pixel_auroc', 'yes_no_accuracy', 'location_accuracy', 'map_half_accuracy',
        'map_location_accuracy')


class ReferenceAsPipeline:
    """The PyTorch reference behind the runtime pipeline's interface, so ``evaluate`` measures it with the
    same rules; each synthetic class is asked its own training question."""

    def __init__(self, reference, questions: dict[str, str], words):
        self.reference, self.questions = reference, questions
        self.prompt = {'location_words': words}

    def inspect(self, path, class_name: str, memory=None, llm: bool = True):
        if memory is not None:
            raise ValueError("the ablation measures the zero-shot pipeline only")
        if not llm:
            _, amap, _ = self.reference.vision(path, class_name)
            m = amap[0, 0].float().numpy()
            return MapResult(anomaly_map=m, score=float(m.max()), locations=self.reference.locations(m))
        return self.reference.inspect(path, class_name, question=self.questions[class_name])


class ScoreRecorder:
    """A pipeline that passes each call on and keeps each image's score (the map's maximum), by path."""

    def __init__(self, pipeline):
        self.pipeline, self.prompt, self.scores = pipeline, pipeline.prompt, {}

    def inspect(self, path, class_name: str, memory=None, llm: bool = True):
        res = self.pipeline.inspect(path, class_name, memory=memory, llm=llm)
        self.scores[str(path)] = float(res.score)
        return res


@dataclasses.dataclass
class MapResult:
    """The zero-shot map of one image, its score (the maximum) and its regions' words, as the reference computes
    them."""
    anomaly_map: np.ndarray
    score: float
    locations: list[str]
    verdict: None = None
    answer: None = None


def measure(work: Path, root: Path, config: str = 'small', progress: bool = True, maps_only: bool = False) -> dict:
    """Per class and mean figures of the checkpoint in ``work`` on the held-out folder ``root``; ``maps_only``:
    of its stage-1 checkpoint, the maps' figures only (image and pixel AUROC, the map >= 0.5 accuracy, and the
    location of the map's largest region on the single-defect images, which no LLM needs)."""
    from ..models.reference import ReferencePipeline
    from ..models.spec import POSITION_WORDS
    from ..models.synthetic import CATEGORIES
    from ..models.text_features import text_feature_table
    from ..models.tokenizer import load_tokenizer
    from ..models.train import build_small, load_trained
    from .evaluate import evaluate
    model, text = build_small(work / 'tokenizer', 0, config)
    state = load_vision(work, model, text) if maps_only else load_trained(work, model, text)
    ref = ReferencePipeline(model, load_tokenizer(work / 'tokenizer'), text_feature_table(text, list(CATEGORIES)))
    questions = {name.replace('_', ' '): c.question for name, c in CATEGORIES.items()}
    pipe = ScoreRecorder(ReferenceAsPipeline(ref, questions, POSITION_WORDS))
    out = {'work': str(work), 'minutes': state.get('minutes'),
           **figures(pipe, evaluate(pipe, root, progress=progress, llm=not maps_only), root)}
    if maps_only:
        out.update(vision_step=int(state['step']), minutes={'vision': float(state.get('seconds', 0.0)) / 60})
    return out


def measure_bundle(bundle: Path, root: Path, progress: bool = True, maps_only: bool = False) -> dict:
    """``measure``'s figures of an exported bundle, through the runtime."""
    from ..runtime.pipeline import Pipeline
    from .evaluate import evaluate
    with Pipeline.from_bundle(bundle, llm=not maps_only, verify_hashes=True) as pipeline:
        pipe = ScoreRecorder(pipeline)
        rep = evaluate(pipe, root, progress=progress, llm=not maps_only)
    if maps_only:   # without its LLM the runtime answers by the bundle's calibrated thresholds: not measured here
        for c in rep['classes'].values():
            c['yes_no_accuracy'] = None
    return {'bundle': str(bundle), 'minutes': None, **figures(pipe, rep, root)}


def figures(pipe: ScoreRecorder, rep: dict, root: Path) -> dict:
    """Per class and mean figures (``KEYS``) of ``evaluate``'s report ``rep`` on ``root``, with the map >= 0.5
    accuracy from the scores ``pipe`` recorded, the intervals of the means and the location breakdown."""
    from .evaluate import discover
    from .metrics import map_half_accuracy, mean_or_none
    classes = {}
    for name, samples in discover(root).items():
        verdict = map_half_accuracy([pipe.scores[str(s.path)] for s in samples], [s.anomalous for s in samples])
        classes[name] = {**{k: rep['classes'][name].get(k) for k in KEYS}, 'map_half_accuracy': verdict}
    mean = {k: mean_or_none(c[k] for c in classes.values()) for k in KEYS}
    out = {'mean': mean, 'classes': classes,
           'intervals': {k: v for k, v in rep['intervals'].items() if mean.get(k) is not None}}
    if 'location_breakdown' in rep:
        out['location_breakdown'] = rep['location_breakdown']
    return out


def load_vision(work: Path, model, text) -> dict:
    """Load the stage-1 checkpoint ``<work>/vision.pt`` (vision tower, decoder, text tower; their weight
    average where the run kept one, as stage 2 gets them)."""
    from ..models.train import load_checkpoint, stage_one_weights
    state = load_checkpoint(work / 'vision.pt')
    if state is None:
        raise FileNotFoundError(f"{work / 'vision.pt'}: no stage-1 checkpoint")
    weights, text_weights = stage_one_weights(state)
    model.load_state_dict(weights, strict=False)
    text.load_state_dict(text_weights)
    model.eval(), text.eval()
    return state


def markdown(results: dict) -> str:
    """The runs as a table; a figure no run has (Yes/No and location of a --maps-only report) gets no column."""
    heads = {'image_auroc': 'image AUROC', 'pixel_auroc': 'pixel AUROC', 'yes_no_accuracy': 'Yes/No',
             'location_accuracy': 'location', 'map_half_accuracy': 'map >= 0.5 (accuracy)',
             'map_location_accuracy': "map's region location"}
    keys = [k for k in KEYS if any(r['mean'].get(k) is not None for r in results.values())]
    rows = ['| recipe | ' + ' | '.join(heads[k] for k in keys) + ' |', '|---' * (len(keys) + 1) + '|']
    for name, r in results.items():
        rows.append(f"| {name} | " + ' | '.join('' if r['mean'].get(k) is None else f"{r['mean'][k]:.3f}" for k in keys)
                    + ' |')
    return '\n'.join(rows)


def kept_runs(args, held_out: dict | None) -> tuple[dict, dict]:
    """(the runs of ``--keep``'s report, less ``--drop``, relabelled by ``--rename``; the held-out set they were
    measured on). ``held_out`` None: adopt the report's set and mode (``args.maps_only``), as a relabelling does.
    ValueError names what does not fit (another held-out set or mode, an unknown run)."""
    if (args.drop or args.rename) and not args.keep:
        raise ValueError("--drop and --rename act on the runs of --keep's report; no --keep given")
    if not args.keep:
        return {}, held_out
    try:
        old = json.loads(Path(args.keep).read_text())
        runs = old['runs']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--keep {args.keep}: not a report of this script ({e})") from None
    if held_out is None:
        held_out, args.maps_only = old.get('held_out'), bool(old.get('maps_only'))
    if old.get('held_out') != held_out:
        raise ValueError(f"--keep {args.keep}: measured on another held-out set ({old.get('held_out')}, "
                         f"this run: {held_out})")
    if bool(old.get('maps_only')) != args.maps_only:
        raise ValueError(f"--keep {args.keep}: its maps_only is {bool(old.get('maps_only'))}, this run's "
                         f"{args.maps_only}")
    if unknown := [n for n in [*args.drop, *(o for o, _ in args.rename)] if n not in runs]:
        raise ValueError(f"{unknown[0]!r}: no such run in {args.keep}")
    names = dict(args.rename)
    return {names.get(n, n): r for n, r in runs.items() if n not in args.drop}, held_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='python -m anomalygpt_edge.benchmarks.demo_ablation', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('runs', nargs='*', metavar='NAME=WORK',
                    help="a label and a training directory; none, with --keep: only relabel or drop the kept runs "
                         "(the kept report's held-out set and mode)")
    ap.add_argument('--json', required=True, help='write the figures here')
    ap.add_argument('--config', default='small', help='the model config the runs were trained with')
    ap.add_argument('--per-kind', type=int, default=6, help='held-out images per defect kind and class')
    ap.add_argument('--good', type=int, default=12, help='held-out normal images per class')
    ap.add_argument('--seed', type=int, default=HELD_OUT_SEED,
                    help="the images' seed (default: the held-out set's, %(default)s); another seed makes a validation "
                         'set of the same kinds, to choose between recipes without tuning on the held-out figures')
    ap.add_argument('--maps-only', action='store_true',
                    help="measure each WORK's stage-1 checkpoint (vision.pt): image and pixel AUROC, no LLM")
    ap.add_argument('--keep', metavar='OLD.json',
                    help='an earlier report of this script on the same held-out set: its runs stay in the table (ahead '
                         'of the new ones; a new run of the same name replaces one in its place), for recipes whose '
                         'checkpoints are gone')
    ap.add_argument('--drop', action='append', default=[], metavar='NAME', help='a kept run to leave out (repeatable)')
    ap.add_argument('--rename', action='append', default=[], nargs=2, metavar=('OLD', 'NEW'),
                    help='give a kept run a new label, e.g. once it is no longer the shipped one (repeatable)')
    args = ap.parse_args(argv)
    if not args.runs and not args.keep:
        ap.error('give at least one NAME=WORK to measure, or --keep OLD.json to relabel')
    held_out = {'seed': args.seed, 'defect_kinds': list(DEFECTS), 'good_per_class': args.good,
                'defects_per_kind_and_class': args.per_kind} if args.runs else None
    try:
        kept, held_out = kept_runs(args, held_out)
    except ValueError as e:
        print(f"demo_ablation: {e}", file=sys.stderr)
        return 2
    runs = {}
    need = 'vision.pt' if args.maps_only else 'final.pt'
    for item in args.runs:
        name, sep, work = item.partition('=')
        if not sep or not name or not any((Path(work) / f).is_file() for f in (need, 'manifest.json')):
            print(f"demo_ablation: {item!r}: expected NAME=WORK with WORK/{need}, or NAME=BUNDLE (a directory with "
                  "manifest.json)", file=sys.stderr)
            return 2
        runs[name] = Path(work)
    from ..models.synthetic import CATEGORIES
    from ..models.synthetic_dataset import write_mvtec_layout
    results = dict(kept)   # a run measured anew keeps its place
    if runs:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / 'heldout'
            write_mvtec_layout(root, list(CATEGORIES), n_train_good=0, n_test_good=args.good,
                               n_test_defect=args.per_kind, seed=args.seed, defect_kinds=DEFECTS)
            for name, work in runs.items():
                results[name] = (measure_bundle(work, root, maps_only=args.maps_only)
                                 if (work / 'manifest.json').is_file() else
                                 measure(work, root, args.config, maps_only=args.maps_only))
    report = {'maps_only': args.maps_only, 'held_out': held_out, 'runs': results, 'table': markdown(results)}
    tmp_path = Path(args.json).with_name(Path(args.json).name + '.partial')
    tmp_path.write_text(json.dumps(report, indent=1))
    os.replace(tmp_path, args.json)
    print(report['table'])
    for name in runs:
        print(f"{name}: {targets_summary(results[name]['mean'])}", file=sys.stderr)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
