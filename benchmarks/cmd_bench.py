"""Latency of every stage of the chain, the exported runtime (ONNX Runtime + llama.cpp) beside the
PyTorch baseline (eager FP32 and bf16; HF transformers for the LLM) in one run on the same weights
and inputs: medians/p90/p99, peak RSS, speed-ups, decode against the memory-bandwidth ceiling.

  anomalygpt-edge bench --config tiny --json out.json
  anomalygpt-edge bench --config huge --llm-layers 2,4 --quants q4_k_m,q8_0 --json r.json --markdown r.md --plot r.png

``huge`` = the real shapes with random weights: ImageBind-Huge tower, decoder and prompt learner
exported here, and an LLM of Vicuna-7B width with a few layers, extrapolated to 32 (labelled).
"""
from __future__ import annotations

import shlex
import sys

from ..arguments import non_negative_int, positive_int


def _list(text: str) -> tuple:
    return tuple(t.strip() for t in text.split(',') if t.strip())


def add_arguments(p) -> None:
    p.add_argument('--config', choices=('tiny', 'small', 'huge'), default='tiny',
                   help='model shapes, random weights: huge = the released model (ImageBind-Huge, Vicuna-7B width; '
                        'the LLM fitted from --llm-layers) (default: %(default)s)')
    p.add_argument('--bundle', help="bundle directory to time (its graphs and GGUF files); 'small' and 'tiny' only")
    p.add_argument('--llm-layers', default='2,4', help='LLM depths to build and fit (comma list; default 2,4)')
    p.add_argument('--precisions', default='fp32',
                   help="vision graph precisions (fp32,fp16; int8 with --bundle, for a bundle's gated INT8 encoder)")
    p.add_argument('--quants', default='f16,q8_0,q4_k_m', help='GGUF types (f16,q8_0,q4_k_m,q4_0,f32)')
    p.add_argument('--baselines', default='fp32,bf16', help='PyTorch dtypes of the baseline (fp32,bf16)')
    p.add_argument('--threads', type=positive_int, default=2, help='CPU threads of every runner (default: %(default)s)')
    p.add_argument('--runs', type=int, default=5, help='measured runs per runner (after warm-up)')
    p.add_argument('--llm-runs', type=int, help='measured runs for the LLM (default: --runs)')
    p.add_argument('--warmup', type=non_negative_int, default=1, help='unmeasured runs first (default: %(default)s)')
    p.add_argument('--decode-tokens', type=int, default=32, help='tokens decoded per run')
    p.add_argument('--answer-tokens', type=int, default=24, help='length of a whole answer (<= --decode-tokens)')
    p.add_argument('--prompt-positions', type=int,
                   help='stretch the prompt to this many positions (default: 100 for huge, else as tokenized)')
    p.add_argument('--image-size', type=int, default=1024, help='side of the square camera frame (default 1024)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random weights and inputs (default: %(default)s)')
    p.add_argument('--no-vision', action='store_true', help='time the LLM only')
    p.add_argument('--no-llm', action='store_true', help='time the vision graphs only')
    p.add_argument('--work-dir', help='keep exported graphs here (default: a temporary directory, removed)')
    p.add_argument('--json', required=True, metavar='PATH',
                   help='the results, machine and options; rewritten after each phase')
    p.add_argument('--markdown', metavar='PATH', help='also a markdown report')
    p.add_argument('--plot', metavar='PATH', help='also a PNG chart of the stages (needs matplotlib)')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    p.add_argument('--check', action='store_true',
                   help='exit 1 when a speed target is missed (for a CI gate); the report is written either way')


def run(args) -> int:
    from .bench_report import check_output, markdown, plot, save_report, write_json
    from .latency import BenchOptions, run_bench
    for option, path in (('--json', args.json), ('--markdown', args.markdown), ('--plot', args.plot)):
        if path:
            check_output(path, option)
    if args.bundle and args.config == 'huge':
        print("anomalygpt-edge bench: --bundle is for tiny/small bundles; huge runs the real shapes with random weights",
              file=sys.stderr)
        return 2
    if args.answer_tokens > args.decode_tokens:
        print("anomalygpt-edge bench: --answer-tokens must be <= --decode-tokens", file=sys.stderr)
        return 2
    try:
        layers = tuple(int(n) for n in _list(args.llm_layers))
    except ValueError:
        print(f"anomalygpt-edge bench: --llm-layers must be integers, got {args.llm_layers!r}", file=sys.stderr)
        return 2
    opts = BenchOptions(config=args.config, bundle=args.bundle, llm_layers=layers, precisions=_list(args.precisions),
                        quants=_list(args.quants), baselines=_list(args.baselines), threads=args.threads,
                        runs=args.runs, warmup=args.warmup, llm_runs=args.llm_runs, decode_tokens=args.decode_tokens,
                        answer_tokens=args.answer_tokens, prompt_positions=args.prompt_positions,
                        image_size=args.image_size, seed=args.seed, work_dir=args.work_dir, vision=not args.no_vision,
                        llm=not args.no_llm, progress=not args.quiet, on_phase=lambda r: write_json(args.json, r),
                        command='anomalygpt-edge bench ' + shlex.join(sys.argv[2:] if sys.argv[1:2] == ['bench'] else []))
    allowed = ('fp32', 'fp16', 'int8') if opts.bundle else ('fp32', 'fp16')
    bad = [b for b in opts.baselines if b not in ('fp32', 'bf16')] + [p for p in opts.precisions if p not in allowed]
    if bad:
        print(f"anomalygpt-edge bench: unknown precision/baseline {bad}", file=sys.stderr)
        return 2
    try:
        report = run_bench(opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"anomalygpt-edge bench: {e}", file=sys.stderr)
        return 2
    if args.plot:
        plot(report, args.plot)
    save_report(report, args.json, markdown(report), args.markdown)
    missed = [f"{t['what']} against {t['against']}: {t['measured']:.2f}x" for t in report.get('targets', [])
              if not t['met']]
    if args.check and missed:
        print("anomalygpt-edge bench: targets missed:\n  " + '\n  '.join(missed), file=sys.stderr)
        return 1
    return 0
