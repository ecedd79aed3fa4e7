"""Measure the demo model on a held-out simulated set and write its model card figures.

  python -m anomalygpt_edge.benchmarks.demo_report --bundle runtime/demo/bundle --work WORK --out DIR

Held-out set: a new seed, and defect kinds the training never used (thin scratches, colour stains,
holes; training only saw pasted patches). Measured through the runtime (ONNX Runtime + llama.cpp),
zero-shot and 1-shot; the runtime's greedy answers are compared with the PyTorch reference's
(rebuilt from the training checkpoint in WORK) on every image. ``--from-results`` measures nothing and
re-renders the card from OUT/results.json with new ``--ablation`` tables or ``--history``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from .bench_report import write_text

HELD_OUT_SEED = 1000
DEFECTS = ('scratch', 'stain', 'hole')
SAMPLE_KINDS = DEFECTS[:2]   # the defect kinds of the demo samples
# What the demo model is meant to reach on the held-out set (zero-shot); the model card names any it misses.
TARGETS = {'image_auroc': ('image AUROC', 0.97), 'pixel_auroc': ('pixel AUROC', 0.95),
           'yes_no_accuracy': ('Yes/No accuracy', 0.90), 'location_accuracy': ('location accuracy', 0.80)}


def short_of_targets(mean: dict) -> dict[str, float]:
    """How far each measured figure of ``mean`` falls below its target (0 where met); unmeasured ones are left out."""
    return {k: max(0.0, t - mean[k]) for k, (_, t) in TARGETS.items() if mean.get(k) is not None}


def targets_summary(mean: dict) -> str:
    """One line: how many of the measured targets ``mean`` meets, and by how much it misses the others."""
    short = short_of_targets(mean)
    missed = {k: v for k, v in short.items() if v > 0}
    line = f"targets met {len(short) - len(missed)} of {len(short)}"
    if missed:
        line += f", short by {sum(missed.values()):.3f} in all (" + ', '.join(
            f"{TARGETS[k][0]} {v:.3f}" for k, v in missed.items()) + ')'
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--bundle', required=True)
    ap.add_argument('--work', help='training directory (final.pt, tokenizer) for the reference comparison')
    ap.add_argument('--out', required=True, help='where to write results.json and MODEL_CARD.md')
    ap.add_argument('--per-kind', type=int, default=6, help='held-out images per defect kind and class')
    ap.add_argument('--good', type=int, default=12, help='held-out normal images per class')
    ap.add_argument('--samples', help='also copy a few held-out images here as demo samples')
    ap.add_argument('--ablation', action='append', default=[],
                    help='a demo_ablation.py JSON of training recipes, for the card\'s "Recipe ablations" (repeatable: '
                         'one table each, e.g. a --maps-only comparison of vision stages and one of whole recipes)')
    ap.add_argument('--history', help='a markdown file: how this particular model was trained (resumes, machine '
                                      'load), for the card')
    ap.add_argument('--keep-history', action='store_true',
                    help="carry OUT/results.json's history and ablation tables over to the new figures (a retrain, "
                         "`make demo-model`), unless --history or --ablation give new ones")
    ap.add_argument('--from-results', action='store_true',
                    help="measure nothing: re-render the card from OUT/results.json, the bundle's figures as they "
                         'were measured, with these --ablation tables and --history (for a recipe measured after the '
                         'bundle, when the checkpoint the bundle came from is gone)')
    args = ap.parse_args(argv)
    if args.from_results and (args.work or args.samples):
        ap.error('--from-results measures nothing: it takes neither --work nor --samples')
    for flag, path in [*(('--ablation', a) for a in args.ablation), ('--history', args.history)]:
        if path and not Path(path).is_file():
            print(f"demo_report: {flag} {path}: no such file", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        try:
            results = json.loads((out / 'results.json').read_text())
        except (OSError, ValueError) as e:
            print(f"demo_report: {out / 'results.json'}: {e}", file=sys.stderr)
            return 2
    else:
        previous = _previous_results(out) if args.keep_history else {}
        results = measure_bundle(args)
        results.update({k: previous[k] for k in ('history', 'ablation') if k in previous})
    if args.ablation:
        results['ablation'] = []
        for path in args.ablation:
            ablation = json.loads(Path(path).read_text())
            results['ablation'].append({'maps_only': bool(ablation.get('maps_only')), 'held_out': ablation.get('held_out'),
                                        'table': ablation['table'],
                                        'runs': {k: v['mean'] for k, v in ablation['runs'].items()}})
    if args.history:
        results['history'] = Path(args.history).read_text().strip()
    write_text(out / 'results.json', json.dumps(results, indent=1))
    manifest = json.loads((Path(args.bundle) / 'manifest.json').read_text())
    write_text(out / 'MODEL_CARD.md', model_card(results, manifest))
    return 0


def _previous_results(out: Path) -> dict:
    try:
        return json.loads((out / 'results.json').read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise SystemExit(f"demo_report: {out / 'results.json'}: not JSON ({e}); its history cannot be kept") from None


def measure_bundle(args) -> dict:
    """The bundle's held-out figures through the runtime (0- and 1-shot, the reference beside, the
    LLM-free verdicts) and, with ``--samples``, the demo samples."""
    from ..models.synthetic import CATEGORIES
    from ..models.synthetic_dataset import write_mvtec_layout
    from ..runtime.pipeline import Pipeline
    from .evaluate import evaluate, markdown
    from .metrics import map_half_accuracy, mean_or_none
    from .reference_compare import reference_for
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / 'heldout'
        write_mvtec_layout(root, list(CATEGORIES), n_train_good=16, n_test_good=args.good,
                           n_test_defect=args.per_kind, seed=HELD_OUT_SEED, defect_kinds=DEFECTS)
        results = {'held_out': {'seed': HELD_OUT_SEED, 'defect_kinds': list(DEFECTS), 'good_per_class': args.good,
                                'defects_per_kind_and_class': args.per_kind},
                   'machine': {'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count()}}
        with Pipeline.from_bundle(args.bundle, exact_llm=True) as pipe:
            # the PyTorch reference rebuilt from the training checkpoint runs beside the zero-shot pass
            ref = reference_for(pipe, Path(args.work) / 'final.pt') if args.work else None
            for k in (0, 1):
                rep = evaluate(pipe, root, k_shot=k, reference=ref if k == 0 else None)
                results[f'{k}_shot'] = {'mean': rep['mean'], 'intervals': rep['intervals'], 'classes': rep['classes'],
                                        'table': markdown(rep)}
                if k == 0:  # Yes where the map reaches 0.5, beside the LLM's Yes/No: the figure a vision recipe moves
                    results['map_half'] = {'mean': {'yes_no_accuracy': mean_or_none(
                        map_half_accuracy([a['score'] for a in answers], [a['anomalous'] for a in answers])
                        for answers in rep['answers'].values())}}
                print(f"{k}-shot\n{markdown(rep)}\n", flush=True)
                if 'reference' in rep:
                    results['runtime_vs_reference'] = rep['reference']
                    print(json.dumps(rep['reference']['overall']))
            rep = evaluate(pipe, root, llm=False)  # the calibrated decoder threshold decides (no LLM)
            results['threshold'] = {'mean': rep['mean'], 'table': markdown(rep)}
            if args.samples:
                results['samples'] = write_samples(pipe, root, Path(args.samples), list(CATEGORIES))
    return results


def write_samples(pipe, root: Path, dst: Path, categories) -> dict:
    """Copy a normal and two defective held-out images per class as demo samples, and record what
    the bundle answers for each (the shipped-bundle test checks the bundle still says so)."""
    dst.mkdir(parents=True, exist_ok=True)
    expected = {}
    for cat in categories:
        cls = cat.replace('_', ' ')

        def clearest(kind):  # the defect of this kind the map shows best: samples show the working path
            paths = sorted((root / cat / 'test' / kind).glob('*.png'))
            return max(paths, key=lambda p: pipe.inspect(p, class_name=cls, llm=False).score)
        picks = [('good', root / cat / 'test' / 'good' / '000.png')] + [(k, clearest(k)) for k in SAMPLE_KINDS]
        for kind, src in picks:
            name = f'{cat}-{kind}.png'
            shutil.copy(src, dst / name)
            r = pipe.inspect(dst / name, class_name=cls)
            expected[name] = {'class': r.class_name, 'anomalous': kind != 'good', 'verdict': r.verdict,
                              'answer': r.answer, 'score': round(r.score, 4)}
    write_text(dst / 'expected.json', json.dumps(expected, indent=1))
    return expected


def _fmt(v):
    return '-' if v is None else f"{v:.3f}"


def _fmt_iv(mode: dict, key: str) -> str:
    """A mean with its 95 % interval when the results have one: ``0.711 (0.62-0.80)``."""
    iv = (mode.get('intervals') or {}).get(key)
    return _fmt(mode['mean'].get(key)) + (f" ({iv[0]:.2f}-{iv[1]:.2f})" if iv else '')


def known_problems(results: dict, agree: dict | None, manifest: dict | None = None) -> list[str]:
    """The model card's known problems, read from the measured figures (so the card stays true)."""
    out = []
    unverified = [n for n, c in ((manifest or {}).get('components') or {}).items()
                  if not (c.get('fp32') or {}).get('verified')]
    if unverified:
        out.append(f"- The graphs {', '.join(unverified)} were exported without the exporter's ONNX-vs-PyTorch "
                   'self-check (`models.train --no-verify`); the runtime-vs-reference comparison on the held-out '
                   'images above is their check.')
    for mode, label in (('0_shot', 'Zero-shot'), ('1_shot', '1-shot')):
        m = results[mode]['mean']
        iv = results[mode].get('intervals') or {}
        missed = [f"{name} {m[k]:.3f} (target {t:.2f}"
                  + (', above its 95 % interval' if iv.get(k) and iv[k][1] < t else
                     ', inside its 95 % interval' if iv.get(k) else '') + ')'
                  for k, (name, t) in TARGETS.items() if m.get(k) is not None and m[k] < t]
        if missed:
            out.append(f"- {label}, it misses the demo's targets: " + ', '.join(missed) + '.')
    held = results['held_out']
    n_bad = held['defects_per_kind_and_class'] * len(held['defect_kinds'])
    majority = max(n_bad, held['good_per_class']) / (n_bad + held['good_per_class'])
    z = results['0_shot']['mean']
    if z.get('yes_no_accuracy') is not None and z['yes_no_accuracy'] <= majority:
        out.append(f"- **The LLM's Yes/No does not follow the map**: its accuracy ({z['yes_no_accuracy']:.3f}) is not above "
                   f"always answering the same ({majority:.3f}). The map, the score, the hot regions and the calibrated "
                   'threshold verdict are the useful outputs of this model.')
    if agree and agree.get('answers_compared', agree.get('images')) and \
            agree['identical_answers'] < agree.get('answers_compared', agree['images']):
        n = agree.get('answers_compared', agree['images'])
        out.append(f"- The runtime (llama.cpp) and the PyTorch reference give different greedy answers on "
                   f"{n - agree['identical_answers']} of {n} held-out images although their maps agree to "
                   f"{agree['max_map_abs_error']:.1e}: where two next-token logits are nearly tied, their float "
                   'differences flip the greedy choice.')
    return out or ['- None measured on the held-out set beyond the limits below.']


def ablation_set_heading(ablation_set: dict, held_out: dict) -> list[str]:
    """The lines that say on which set an ablation table was measured, where it is not the held-out set."""
    seed = ablation_set.get('seed', held_out['seed'])
    if seed == held_out['seed']:
        return []
    n = ablation_set.get('defects_per_kind_and_class', held_out['defects_per_kind_and_class'])
    good = ablation_set.get('good_per_class', held_out['good_per_class'])
    if (n, good) == (held_out['defects_per_kind_and_class'], held_out['good_per_class']):
        return [f'On a validation set (`--seed {seed}`: the same kinds and counts, other images), where the'
                ' shipped settings were chosen, so the held-out figures are not tuned on:', '']
    size = 'larger ' if n > held_out['defects_per_kind_and_class'] else ''
    return [f'On a {size}validation set (`--seed {seed} --per-kind {n} --good {good}`: the same kinds, {n} defect'
            f' images per kind and class and {good} normal ones, other images), for figures the smaller sets leave'
            ' to chance:', '']


def nsa_departures(settings: dict) -> str:
    """How the recorded training settings depart from the reference's NSA draw (empty when they do not)."""
    from ..models.anomaly_sim import SimParams
    reference = SimParams().gamma[1]
    vision, language = settings.get('nsa_size_scale', reference), settings.get('lm_nsa_size_scale', reference)
    parts = []
    if vision != reference or language != reference:
        parts.append(f"NSA patch half-widths drawn at scale {vision:g} in stage 1 and {language:g} in stage 2 "
                     f"(the reference's {reference:g})")
    thin, lm_thin = settings.get('nsa_thin_fraction', 0.0), settings.get('lm_nsa_thin_fraction', 0.0)
    if thin or lm_thin:
        share = (f"{thin:.0%} of NSA patches" if thin == lm_thin else
                 f"{thin:.0%} of stage 1's NSA patches" + (" (none of stage 2's)" if not lm_thin else
                                                            f" and {lm_thin:.0%} of stage 2's"))
        parts.append(f"{share} drawn as thin stripes, one half-width at the reference's lower bound")
    return ''.join(f'; {p}' for p in parts)


def model_card(results: dict, manifest: dict) -> str:
    cfg = manifest['model']['config']
    src = manifest['model']['source']
    z_iv = results['0_shot'].get('intervals')
    agree = results.get('runtime_vs_reference')
    agree = agree.get('overall', agree) if agree else None  # evaluate()'s reference section; older results: flat
    lines = [
        '# Demo model card',
        '',
        'A small model of the exact AnomalyGPT architecture (ImageBind-style vision tower, decoder, prompt',
        'learner, LLaMA with LoRA), trained here from scratch on 2 CPU cores with AnomalyGPT\'s own recipe',
        '(`models/train.py`; "Training data" names where it departs from it), so that `make demo` shows the',
        'whole chain working. **It is a demonstration, not a product model**: it knows five procedural',
        'materials and nothing else.',
        '',
        '## Model',
        f"- vision: width {cfg['vision']['width']}, {cfg['vision']['blocks']} blocks, taps {cfg['vision']['taps']}, "
        f"embedding {cfg['vision']['embed_dim']}; 224x224 input, 16x16 patches",
        f"- LLM: LLaMA, hidden {cfg['llm']['hidden']}, {cfg['llm']['layers']} layers, vocabulary {cfg['llm']['vocab']} "
        '(SentencePiece trained on the conversation corpus)',
        f"- training: {json.dumps(src.get('settings', {}))}",
        *([f"- training time: {src['minutes']['vision']:.1f} min vision + {src['minutes']['language']:.1f} min "
           f"language stage on {src.get('cores', '?')} CPU cores"] if src.get('minutes') else []),
        *(['- how this particular model was trained and chosen, and the recipes tried before it: "History" below']
          if results.get('history') else []),
        '',
        '## Training data',
        'Procedural normal images of five classes (woven fabric, brushed metal, wood grain, ceramic tiles, a washer',
        'on a dark background; `models/synthetic.py`) and NSA-style simulated anomalies exactly as the reference',
        'builds them (patches of another image, resized, Poisson-blended, logistic-intensity labels binarised',
        'at 0.3; `models/anomaly_sim.py`)'
        + (f"; {src['settings']['foreign_fraction']:.0%} of the simulated images get a foreign-content blob instead, in"
           ' the DRAEM style (another texture, the surface darker or lighter, a colour field or blur, in a smooth-noise'
           ' blob; `models/foreign_sim.py`), since a tower trained from scratch on pasted patches alone learns only'
           ' "pasted texture"' if src.get('settings', {}).get('foreign_fraction') else '')
        + nsa_departures(src.get('settings', {}))
        + '; with the reference\'s conversation templates and 3x3 position words.',
        'Stage 1 trains the vision tower, decoder and text tower with focal + dice loss on the 4 layer maps'
        + (f" and, weighted {src['settings']['probe_weight']:g}, a training-only per-patch probe loss on each tapped"
           ' layer (`models/patch_probe.py`; not exported), which the reference does not have: its tower comes'
           ' pretrained' if src.get('settings', {}).get('probe_weight') else '') + ';',
        'stage 2 freezes them and trains the prompt learner, `llama_proj` and the LLM with the LM loss on answers',
        'only (half the batches on few-shot maps, as the reference)'
        + (', on normal images of a seed stage 1 never saw, so the maps it learns to read look like the'
           ' maps of new images' if src.get('settings', {}).get('language_seed_offset') else '')
        + (f"; in that loss the Yes/No token weighs {src['settings']['verdict_weight']:g} and the count and"
           f" position words {src['settings']['position_weight']:g} (other answer tokens 1)"
           if src.get('settings', {}).get('verdict_weight', 1) != 1 or src.get('settings', {}).get('position_weight', 1) != 1
           else '') + '.',
        '',
        '## Measured accuracy (held-out set, through the runtime: ONNX Runtime + llama.cpp)',
        f"Held-out: a new seed and defect kinds never seen in training ({', '.join(results['held_out']['defect_kinds'])}); "
        f"{results['held_out']['good_per_class']} normal and {results['held_out']['defects_per_kind_and_class']} "
        'defective images per kind and class. Produced by `python -m anomalygpt_edge.benchmarks.demo_report`.',
        '',
        *(['In brackets, 95 % intervals (bootstrap: each class\'s images resampled 1000 times; none for pixel AUROC).', '']
          if z_iv else []),
        '| mode | image AUROC | pixel AUROC | Yes/No accuracy | location accuracy (single defect) |',
        '|---|---|---|---|---|',
        *(f"| {label} | {_fmt_iv(results[mode], 'image_auroc')} | {_fmt(results[mode]['mean']['pixel_auroc'])} | "
          f"{_fmt_iv(results[mode], 'yes_no_accuracy')} | {_fmt_iv(results[mode], 'location_accuracy')} |"
          for label, mode in (('zero-shot', '0_shot'), ('1-shot', '1_shot'))),
        f"| zero-shot, verdict by the calibrated map threshold (no LLM) | | | "
        f"{_fmt(results['threshold']['mean']['yes_no_accuracy'])} | |",
        *([f"| zero-shot, Yes where the map reaches 0.5 (no LLM) | | | "
           f"{_fmt(results['map_half']['mean']['yes_no_accuracy'])} | |"] if 'map_half' in results else []),
        '',
        'The sample images in `samples/` are held-out images: per class the first normal one and, of the',
        f"kinds {' and '.join(SAMPLE_KINDS)}, the one the map shows best; `samples/expected.json` records what the "
        'bundle answers.',
        '',
        'Per class, zero-shot:',
        '',
        results['0_shot']['table'],
        '',
    ]
    if agree:
        lines += ['## Runtime vs the PyTorch reference',
                  f"On all {agree['images']} held-out images (zero-shot): identical greedy answers on "
                  f"{agree['identical_answers']}"
                  + (f", identical Yes/No verdicts on {agree['identical_verdicts']}" if 'identical_verdicts' in agree else '')
                  + f", anomaly map max abs error {agree['max_map_abs_error']:.2e}"
                  + (f" (mean {agree['mean_map_abs_error']:.2e})" if agree.get('mean_map_abs_error') is not None else '')
                  + '.', '']
    ablations = results.get('ablation') or []
    if ablations:
        lines += ['## Recipe ablations',
                  'Other settings of `models/train.py` tried on the same held-out set, zero-shot, measured with the PyTorch',
                  'reference by `python -m anomalygpt_edge.benchmarks.demo_ablation` (the runtime gives the same answers).', '']
        for ab in ablations:
            lines += ablation_set_heading(ab.get('held_out') or {}, results['held_out'])
            if ab.get('maps_only'):
                lines += ['Vision stages alone (`--maps-only`: their stage-1 checkpoints, maps only, no LLM):', '']
            lines += [ab['table'], '']
    lines += ['## Known problems', *known_problems(results, agree, manifest), '']
    lines += ['## Limits',
              '- Trained for minutes on 2 CPU cores: the targets of a real deployment are not met; the figures',
              '  above are what it does. `make demo-model` retrains it; `python -m anomalygpt_edge.models.train',
              '  --help` lists the recipe\'s settings (e.g. `--vision-steps`).',
              '- Knows only the five procedural classes; on real photographs its answers mean nothing.',
              '- The released AnomalyGPT weights cannot be shipped (non-commercial licences, 20 GB); export your',
              '  own copy with `anomalygpt-edge export released`.', '']
    if results.get('history'):
        lines += ['## History', '', f"This model was {results['history']}", '']
    return '\n'.join(lines)


if __name__ == '__main__':
    raise SystemExit(main())
