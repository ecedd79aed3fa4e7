"""Inspect images with a bundle: verdict (Yes/No), the LLM's answer, the anomaly score (max of the
map), the 3x3 location of the hot regions, and optionally heatmap overlays.

Zero-shot by default (the class's text features); with --reference NORMAL_IMG... the few-shot map
from normal images replaces it, as in the reference. One bad image is reported and skipped.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files (PNG, JPEG, BMP, TIFF ...)')
    p.add_argument('--bundle', required=True, help='bundle directory (from `anomalygpt-edge export`)')
    who = p.add_mutually_exclusive_group()
    who.add_argument('--class', dest='class_name', help="product class from the bundle (e.g. bottle); "
                     "default: first class named in --describe/--question, else 'object'")
    who.add_argument('--describe', help='your own description sentence of a good product')
    p.add_argument('--question', help='ask this instead of the default "<description> Is there any anomaly in the image?"')
    p.add_argument('--reference', nargs='+', metavar='NORMAL_IMG', help='normal images for few-shot mode')
    p.add_argument('--memory', help='load a saved few-shot memory (.npz) instead of --reference')
    p.add_argument('--save-memory', help='save the few-shot memory built from --reference to this .npz')
    p.add_argument('--no-llm', action='store_true', help='map, score and locations only (no LLM loaded)')
    p.add_argument('--verdict-first', action='store_true', help='stop generating once Yes/No is known')
    p.add_argument('--json', action='store_true', help='one JSON object per image on stdout')
    p.add_argument('--save-maps', metavar='DIR', help='write heatmap overlays <image>-map.png here')
    p.add_argument('--precision', default='fp32', help='vision graph precision from the bundle (default: %(default)s)')
    p.add_argument('--backend', choices=('onnxruntime', 'tensorrt', 'auto'), default='onnxruntime',
                   help='vision backend; auto = TensorRT when engines for this GPU exist (default: %(default)s)')
    p.add_argument('--quant', help="GGUF type to load (default: the bundle's default)")
    p.add_argument('--threads', type=int, help='CPU threads for ONNX Runtime and llama.cpp')
    p.add_argument('--resize', choices=('squash', 'center_crop'), help="resize mode (default: the bundle's, squash)")
    p.add_argument('--threshold', type=float, default=0.5, help='map level for the location regions (default: %(default)s)')
    p.add_argument('--verify', action='store_true', help='check every file sha256 against the manifest first')


def run(args) -> int:
    from .bundle import BundleError
    from .pipeline import Pipeline
    from .preprocess import ImageError

    def fail(msg):
        print(f"anomalygpt-edge inspect: {msg}", file=sys.stderr)

    try:
        pipe = Pipeline.from_bundle(args.bundle, verify_hashes=args.verify, llm=not args.no_llm,
                                    precision=args.precision, backend=args.backend, quant=args.quant, threads=args.threads,
                                    resize_mode=args.resize)
    except (BundleError, OSError) as e:
        fail(e)
        return 2
    status = 0
    with pipe:
        memory = None
        try:
            if args.memory:
                memory, _ = pipe.load_memory(args.memory)
            elif args.reference:
                memory = pipe.memory(args.reference)
                if args.save_memory:
                    pipe.save_memory(args.save_memory, memory, pipe.resolve_class(args.class_name, args.describe))
            pipe.resolve_class(args.class_name, args.describe)
        except (ImageError, BundleError, KeyError, ValueError) as e:
            fail(e.args[0] if isinstance(e, KeyError) else e)
            return 2
        for image in args.images:
            try:
                res = pipe.inspect(image, class_name=args.class_name, describe=args.describe, question=args.question,
                                   memory=memory, llm=not args.no_llm, verdict_first=args.verdict_first,
                                   threshold=args.threshold)
            except ImageError as e:
                fail(e)
                status = 2
                continue
            if args.save_maps:
                from .overlay import overlay, write_png
                from .preprocess import load_image
                out = Path(args.save_maps) / f"{Path(image).stem}-map.png"
                write_png(out, overlay(load_image(image), res.anomaly_map))
            if args.json:
                print(json.dumps(res.to_dict()), flush=True)
            else:
                where = ', '.join(res.locations) or '-'
                verdict = (res.verdict or 'n/a').upper()
                if res.verdict_source == 'threshold':
                    verdict += f' (threshold {res.threshold:.3f}, no LLM)'
                print(f"{image}: {verdict}  score {res.score:.3f}  hot regions: {where}  "
                      f"({res.timings_ms['total']:.0f} ms)")
                if res.answer is not None:
                    print(f"  {res.answer}")
    return status
