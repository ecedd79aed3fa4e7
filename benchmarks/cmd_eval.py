"""Accuracy of a bundle on MVTec-AD / VisA style folders (our simulated sets use the same layout):
per class and mean image AUROC, pixel AUROC, Yes/No accuracy (the reference's rule) and location
accuracy, zero-shot or k-shot, through the device runtime."""
from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument('--bundle', required=True, help='bundle directory')
    p.add_argument('--data', required=True, help='dataset root in MVTec-AD layout')
    p.add_argument('--classes', nargs='+', help='only these class folders')
    p.add_argument('--class-map', nargs='+', metavar='FOLDER=CLASS', default=[],
                   help="bundle class for a folder when the names differ (default: folder name, '_' -> ' ')")
    p.add_argument('--k-shot', type=int, default=0, help='normal reference images per class (default: zero-shot)')
    p.add_argument('--no-llm', action='store_true', help='maps only: skip Yes/No and location accuracy')
    p.add_argument('--quant', help='GGUF type to load')
    p.add_argument('--precision', default='fp32', help='vision graph precision')
    p.add_argument('--threads', type=int)
    p.add_argument('--json', metavar='PATH', help='write the full report (with every answer) here')


def run(args) -> int:
    from ..runtime.bundle import BundleError
    from ..runtime.pipeline import Pipeline
    from .evaluate import evaluate, markdown, write_json
    class_map = dict(item.split('=', 1) for item in args.class_map)
    try:
        with Pipeline.from_bundle(args.bundle, llm=not args.no_llm, quant=args.quant, precision=args.precision,
                                  threads=args.threads) as pipe:
            report = evaluate(pipe, args.data, args.classes, args.k_shot, class_map, llm=not args.no_llm)
    except (BundleError, FileNotFoundError, KeyError) as e:
        print(f"anomalygpt-edge eval: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    report['bundle'] = str(args.bundle)
    if args.json:
        write_json(args.json, report)
    print(markdown(report))
    print(json.dumps(report['mean']), file=sys.stderr)
    return 0
