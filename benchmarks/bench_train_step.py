"""Stage 1's training step of the demo recipe (``models/train.py``), timed side by side for variants: a model
config, optionally with training settings (``TrainSettings`` fields) after ``+``.

  python -m anomalygpt_edge.benchmarks.bench_train_step [--variants small,small-p16,small+frozen_text]
      [--rounds N] [--json OUT]

By default compute only: the batches are simulated before the clock starts. ``--with-loader`` times each variant
with the training loader instead, a worker process simulating the batches beside the step as in training (on 2
cores it takes CPU from the step). The variants take turns, ``--steps`` steps each per round, so a drift of the
machine's speed falls on all of them alike; each gets its own model and optimiser, from the same seed.
The first variant is the baseline of the ratios.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
import time
from pathlib import Path

from .bench_stats import summarize


def parse_variant(variant: str) -> tuple[str, dict]:
    """``CONFIG[+SETTING[=VALUE]]...`` -> (config, settings); a boolean setting alone means true."""
    from ..models.train import TrainSettings
    config, *pairs = variant.split('+')
    fields = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    settings = {}
    for pair in pairs:
        name, eq, value = pair.partition('=')
        if name not in fields:
            raise ValueError(f"{variant}: unknown setting {name!r}")
        default = fields[name]
        if isinstance(default, bool):
            if eq and value.lower() not in ('true', 'false'):
                raise ValueError(f"{variant}: {name} takes true or false, not {value!r}")
            settings[name] = not eq or value.lower() == 'true'
        else:
            try:
                settings[name] = type(default)(value)
            except ValueError:
                raise ValueError(f"{variant}: {name} takes a {type(default).__name__}, not {value!r}") from None
    return config, settings


def run(variants=('small', 'small-p16'), steps: int = 10, rounds: int = 3, warmup: int = 2,
        threads: int = 2, batch: int = 8, progress: bool = True, with_loader: bool = False) -> dict:
    import torch

    from ..models import train
    from ..models.synthetic import CATEGORIES
    from ..models.synthetic_dataset import SyntheticAnomalyDataset
    from ..models.tokenizer import train_sentencepiece
    from .machine import machine_info
    torch.set_num_threads(threads)
    s = train.TrainSettings(batch=batch, threads=threads)
    ds = SyntheticAnomalyDataset(4000 if with_loader else 64, seed=s.seed, cache_normals=True,
                                 foreign_fraction=s.foreign_fraction, nsa_thin_fraction=s.nsa_thin_fraction)
    cached = None if with_loader else list(itertools.islice(train._batches(ds, batch, s.seed, workers=0), 8))
    names = list(variants)
    times = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / 'tokenizer'
        train_sentencepiece(tok, train.demo_corpus(CATEGORIES), vocab_size=600)
        runs = {}
        for name in names:
            config, settings = parse_variant(name)
            vs = dataclasses.replace(s, **settings)
            torch.manual_seed(vs.seed)
            model, text = train.build_small(tok, vs.seed, config)
            stage = train.VisionStage.build(model, text, vs)
            stage.train()
            stage.freeze_text(CATEGORIES)
            source = train._batches(ds, batch, s.seed, workers=1) if with_loader else itertools.cycle(cached)
            runs[name] = (stage, train.vision_optimizer(stage.params, vs), source)
        for r in range(rounds):
            for name in names:
                stage, opt, source = runs[name]
                for i in range(steps + (warmup if r == 0 else 0)):
                    t0 = time.perf_counter()
                    train.optimizer_step(stage.loss(next(source), i), stage.params, opt)
                    if r > 0 or i >= warmup:
                        times[name].append((time.perf_counter() - t0) * 1e3)
                if progress:
                    print(f"round {r + 1}/{rounds} {name}: "
                          f"{sorted(times[name])[len(times[name]) // 2]:.0f} ms", file=sys.stderr)
    base = summarize(times[names[0]])['median']
    rows = []
    for name in names:
        st = summarize(times[name])
        config, settings = parse_variant(name)
        rows.append({'variant': name, 'config': config, 'settings': settings, 'step_ms': st,
                     'speedup_vs_first': round(base / st['median'], 3)})
    what = 'with the training loader beside it' if with_loader else 'compute only'
    return {'benchmark': f'stage-1 training step ({what})', 'machine': machine_info(), 'threads': threads,
            'batch': batch, 'steps_per_round': steps, 'rounds': rounds, 'variants': rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='python -m anomalygpt_edge.benchmarks.bench_train_step',
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--variants', default='small,small-p16',
                    help='comma-separated variants, each a model config with optional training settings after '
                         '"+" (small+frozen_text, small+probe_weight=0); the first is the baseline '
                         '(default: %(default)s)')
    ap.add_argument('--steps', type=int, default=10, help='timed steps per variant per round (default: %(default)s)')
    ap.add_argument('--rounds', type=int, default=3, help='(default: %(default)s)')
    ap.add_argument('--threads', type=int, default=2, help='(default: %(default)s)')
    ap.add_argument('--batch', type=int, default=8, help='(default: %(default)s)')
    ap.add_argument('--with-loader', action='store_true',
                    help="time each step with the training loader's worker simulating the batches beside it, "
                         'as in training (default: pre-simulated batches, compute only)')
    ap.add_argument('--json', help='write the report here')
    args = ap.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        ap.error('--steps and --rounds must be at least 1')
    from ..models.config import CONFIGS
    variants = [v.strip() for v in args.variants.split(',')]
    try:
        parsed = [parse_variant(v) for v in variants]
        from ..models.train import TrainSettings
        for _, settings in parsed:
            TrainSettings(**settings)
    except ValueError as e:
        ap.error(f"--variants: {e}")
    if bad := [c for c, _ in parsed if c not in CONFIGS]:
        ap.error(f"--variants: unknown config(s) {bad}; choose from {sorted(CONFIGS)}")
    report = run(variants, args.steps, args.rounds, threads=args.threads, batch=args.batch,
                 with_loader=args.with_loader)
    if args.json:
        from ..runtime.engines import write_json_atomic
        write_json_atomic(Path(args.json), report)
    for row in report['variants']:
        print(f"{row['variant']:>24}  median {row['step_ms']['median']:7.1f} ms  "
              f"x{row['speedup_vs_first']:.2f}")
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
