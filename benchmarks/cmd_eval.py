"""Accuracy of a bundle on MVTec-AD / VisA style folders (our simulated sets use the same layout):
per class and mean image AUROC, pixel AUROC, Yes/No accuracy (the reference's rule) and location
accuracy, zero-shot or k-shot, through the device runtime.

With --reference (or --reference-checkpoint), the same images also go through the PyTorch reference
pipeline rebuilt from the manifest (a seeded random bundle from its seed; a models/train.py bundle
from its checkpoint), and the report counts identical greedy answers and Yes/No verdicts and the
anomaly map error, per class and overall. Needs the training side (torch); the LLM then runs in
its exact (F32 KV cache) mode."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..arguments import non_negative_int, positive_int


def add_arguments(p) -> None:
    p.add_argument('--bundle', required=True, help='bundle directory')
    p.add_argument('--data', required=True, help='dataset root in MVTec-AD layout')
    p.add_argument('--classes', nargs='+', help='only these class folders')
    p.add_argument('--class-map', nargs='+', metavar='FOLDER=CLASS', default=[],
                   help="bundle class for a folder when the names differ (default: folder name, '_' -> ' ')")
    p.add_argument('--k-shot', type=non_negative_int, default=0,
                   help='normal reference images per class (default: zero-shot)')
    p.add_argument('--no-llm', action='store_true', help='maps only: skip Yes/No and location accuracy')
    p.add_argument('--quant', help='GGUF type to load')
    p.add_argument('--precision', default='fp32', help='vision graph precision')
    p.add_argument('--threads', type=positive_int, help='CPU threads for ONNX Runtime and llama.cpp')
    p.add_argument('--max-new-tokens', type=int, default=128, help='answer length limit (default 128)')
    p.add_argument('--json', metavar='PATH', help='write the full report (with every answer) here')
    p.add_argument('--reference', action='store_true',
                   help='also compare with the PyTorch reference pipeline (a seeded random bundle is rebuilt '
                        'from its manifest; needs torch)')
    p.add_argument('--reference-checkpoint', metavar='PATH',
                   help='the training checkpoint the bundle was exported from (models/train.py: WORK/final.pt or '
                        'WORK; a plain state dict also works); implies --reference')
    p.add_argument('--reference-tokenizer', metavar='DIR',
                   help="the bundle's tokenizer directory (default: beside the checkpoint, or export tiny's "
                        'recipe for a random bundle); implies --reference')


def run(args) -> int:
    from ..runtime.bundle import BundleError
    from ..runtime.pipeline import Pipeline
    from .bench_report import check_output
    from .evaluate import evaluate, markdown, write_json
    class_map = dict(item.split('=', 1) for item in args.class_map)
    compare = bool(args.reference or args.reference_checkpoint or args.reference_tokenizer)
    if args.json:
        check_output(args.json, '--json')   # before an evaluation that can take hours
    data = Path(args.data)
    missing = [c for c in args.classes or [] if data.is_dir() and not (data / c / 'test').is_dir()]
    if missing:
        print(f"anomalygpt-edge eval: {data}: no class folder {', '.join(f'{c}/test' for c in missing)} "
              "(--classes takes folder names)", file=sys.stderr)
        return 2
    errors = (BundleError, FileNotFoundError, KeyError)
    if compare:
        from .reference_compare import ReferenceSetupError
        errors += (ReferenceSetupError,)
    try:
        with Pipeline.from_bundle(args.bundle, llm=not args.no_llm, quant=args.quant, precision=args.precision,
                                  threads=args.threads, max_new_tokens=args.max_new_tokens,
                                  exact_llm=compare) as pipe:
            reference = None
            if compare:
                from .reference_compare import reference_for
                reference = reference_for(pipe, args.reference_checkpoint, args.reference_tokenizer)
            report = evaluate(pipe, args.data, args.classes, args.k_shot, class_map, llm=not args.no_llm,
                              reference=reference)
    except errors as e:
        print(f"anomalygpt-edge eval: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    report['bundle'] = str(args.bundle)
    if args.json:
        write_json(args.json, report)
    print(markdown(report))
    print(json.dumps(report['mean']), file=sys.stderr)
    if 'reference' in report:
        print(json.dumps(report['reference']['overall']), file=sys.stderr)
    return 0
