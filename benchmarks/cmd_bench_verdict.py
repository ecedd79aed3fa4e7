"""Time to verdict (image in -> Yes/No known) at the real shapes: every lever measured in one run
beside PyTorch at its best (eager FP32, eager bf16, bf16 + torch.compile), the LLM at Vicuna-7B width
fitted over a few depths and extrapolated to 32 layers (labelled), plus the resident memory of the
chosen configuration.

  anomalygpt-edge bench-verdict --json benchmarks/results/verdict-cpu.json --markdown benchmarks/results/verdict-cpu.md

On 2 cores the huge run takes about 30-40 minutes and ~12 GB of RAM; run nothing else beside it.
`--config tiny` is a smoke run of the same code (seconds). `--memory-only` measures resident memory
only (each memory variant in a fresh process, no timing; minutes, reusing `--work-dir`'s files).
"""
from __future__ import annotations

import shlex
import sys

from ..arguments import positive_int


def _list(text: str) -> tuple:
    return tuple(t.strip() for t in text.split(',') if t.strip())


def add_arguments(p) -> None:
    from .verdict import LLM_VARIANTS, MEMORY_VARIANTS, VISION_BASELINES, VISION_OURS
    p.add_argument('--config', choices=('tiny', 'huge'), default='huge',
                   help='model shapes, random weights: huge = the released model (default: %(default)s)')
    p.add_argument('--llm-layers', default='2,4', help='LLM depths to measure and fit (default: %(default)s)')
    p.add_argument('--threads', type=positive_int, default=2,
                   help='CPU threads of every runner (default: %(default)s)')
    p.add_argument('--runs', type=int, default=6, help='measured runs per configuration (default: %(default)s)')
    p.add_argument('--warmup', type=int, default=1, help='unmeasured runs at the start of each block (default: %(default)s)')
    p.add_argument('--rounds', type=int, default=2,
                   help='configurations are timed in blocks, this many rounds, order reversed each round (default: %(default)s)')
    p.add_argument('--decode-tokens', type=int, default=16, help='decode steps timed per LLM run (default: %(default)s)')
    p.add_argument('--vision', default=','.join(VISION_OURS), help='our vision configurations (default: all: %(default)s)')
    p.add_argument('--baselines', default=','.join(VISION_BASELINES), help='PyTorch vision baselines (default: %(default)s)')
    p.add_argument('--llm-variants', help='LLM configurations, separated by ";" (default: all of: '
                   + '; '.join(v.name for v in LLM_VARIANTS) + ')')
    p.add_argument('--no-memory', action='store_true', help='skip the resident-memory probe')
    p.add_argument('--memory-only', action='store_true',
                   help='resident memory of the memory variants only (no speed runs); reuses --work-dir files')
    p.add_argument('--memory-variants', help='with --memory-only, separated by ";" (default: all of: '
                   + '; '.join(v.name for v in MEMORY_VARIANTS) + ')')
    p.add_argument('--work-dir', help='keep the exported graphs and GGUF files here (default: temporary)')
    p.add_argument('--json', required=True, metavar='PATH', help='the results, machine and options')
    p.add_argument('--markdown', metavar='PATH', help='also a markdown report')
    p.add_argument('--quiet', action='store_true', help='no progress bars')


def run(args) -> int:
    from .bench_report import check_output, save_report, write_json
    from .verdict import LLM_VARIANTS, MEMORY_VARIANTS, VerdictOptions, markdown, memory_markdown, run_memory, run_verdict
    for option, path in (('--json', args.json), ('--markdown', args.markdown)):
        if path:
            check_output(path, option)
    try:
        layers = tuple(int(n) for n in _list(args.llm_layers))
    except ValueError:
        print(f"anomalygpt-edge bench-verdict: --llm-layers must be integers, got {args.llm_layers!r}", file=sys.stderr)
        return 2
    if len(set(layers)) < 2:
        print("anomalygpt-edge bench-verdict: --llm-layers needs two depths or more (the fit)", file=sys.stderr)
        return 2
    variants = tuple(v.strip() for v in args.llm_variants.split(';')) if args.llm_variants else tuple(v.name for v in LLM_VARIANTS)
    if args.runs < 1 or args.rounds < 1:
        print("anomalygpt-edge bench-verdict: --runs and --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.memory_variants and not args.memory_only:
        print("anomalygpt-edge bench-verdict: --memory-variants goes with --memory-only", file=sys.stderr)
        return 2
    memory_variants = (tuple(v.strip() for v in args.memory_variants.split(';')) if args.memory_variants
                       else tuple(v.name for v in MEMORY_VARIANTS))
    opts = VerdictOptions(config=args.config, llm_layers=layers, threads=args.threads, runs=args.runs, rounds=args.rounds,
                          warmup=args.warmup, decode_tokens=args.decode_tokens, vision=_list(args.vision),
                          baselines=_list(args.baselines), llm_variants=variants, memory=not args.no_memory,
                          memory_variants=memory_variants,
                          work_dir=args.work_dir, progress=not args.quiet, on_phase=lambda r: write_json(args.json, r),
                          command='anomalygpt-edge bench-verdict ' + shlex.join(sys.argv[2:] if sys.argv[1:2] == ['bench-verdict'] else []))
    try:
        report = run_memory(opts) if args.memory_only else run_verdict(opts)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"anomalygpt-edge bench-verdict: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    save_report(report, args.json, (memory_markdown if args.memory_only else markdown)(report), args.markdown)
    return 0
