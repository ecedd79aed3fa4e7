"""Inspect images with a bundle: verdict (Yes/No), the LLM's answer, the anomaly score (max of the
map), the 3x3 location of the hot regions, and optionally heatmap overlays.

Zero-shot by default (the class's text features); with --reference NORMAL_IMG... the few-shot map
from normal images replaces it, as in the reference. One bad image is reported and skipped.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..arguments import map_level
from .cli_options import add_backend_arguments, add_question_arguments, few_shot_memory, open_pipeline


def add_arguments(p) -> None:
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files (PNG, JPEG, BMP, TIFF ...)')
    p.add_argument('--bundle', required=True, help='bundle directory (from `anomalygpt-edge export`)')
    add_question_arguments(p)
    p.add_argument('--save-memory', help='save the few-shot memory built from --reference to this .npz')
    p.add_argument('--json', action='store_true', help='one JSON object per image on stdout')
    p.add_argument('--save-maps', metavar='DIR', help='write heatmap overlays <image>-map.png here')
    add_backend_arguments(p)
    p.add_argument('--threshold', type=map_level, default=0.5,
                   help='map level for the location regions, in (0, 1] (default: %(default)s)')


def run(args) -> int:
    from .bundle import BundleError
    from .llama_session import LlamaError
    from .preprocess import ImageError

    def fail(msg):
        print(f"anomalygpt-edge inspect: {msg}", file=sys.stderr)

    if args.save_memory and not args.reference:
        fail("--save-memory needs --reference (the normal images the memory is built from)")
        return 2
    try:
        pipe = open_pipeline(args)
    except (BundleError, OSError) as e:
        fail(e)
        return 2
    status = 0
    with pipe:
        try:
            memory = few_shot_memory(pipe, args, save_to=args.save_memory, warn=lambda m: fail(f"warning: {m}"))
        except (ImageError, BundleError, KeyError, ValueError) as e:
            fail(e.args[0] if isinstance(e, KeyError) else e)
            return 2
        map_names: set[str] = set()
        tally = {'failed': 0}
        for image in args.images:
            try:
                res = pipe.inspect(image, class_name=args.class_name, describe=args.describe, question=args.question,
                                   memory=memory, llm=not args.no_llm, verdict_first=args.verdict_first,
                                   threshold=args.threshold)
            except ImageError as e:
                fail(e)
                status, tally['failed'] = 2, tally['failed'] + 1
                continue
            except LlamaError as e:
                fail(f"{image}: {e}")
                status, tally['failed'] = 2, tally['failed'] + 1
                continue
            verdict = res.verdict or 'no verdict'
            tally[verdict] = tally.get(verdict, 0) + 1
            if args.json:
                print(json.dumps(res.to_dict()), flush=True)
            else:
                where = ', '.join(res.locations) or '-'
                print(f"{image}: {verdict_text(res)}  score {number(res.score)}  hot regions: {where}  "
                      f"({res.timings_ms['total']:.0f} ms)")
                if res.answer is not None:
                    print(f"  {res.answer}")
            if args.save_maps:
                out = Path(args.save_maps) / map_name(image, map_names)
                try:
                    save_map(out, image, res)
                except FileExistsError as e:  # from making the folder: a file has its name
                    fail(f"{out}: map not written ({e.filename} is a file, not a folder)")
                    status = 2
                except OSError as e:
                    why = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else e.strerror or e
                    fail(f"{out}: map not written ({why})")
                    status = 2
    if len(args.images) > 1:   # on stderr: stdout stays one line (or JSON object) per image
        print(f"anomalygpt-edge inspect: {summary(tally, len(args.images))}", file=sys.stderr)
    return status


def summary(tally: dict, n: int) -> str:
    """'5 images: 3 yes, 1 no, 1 failed' (the verdicts counted as given, in a fixed order)."""
    order = ['yes', 'no', 'unclear', 'no verdict', 'failed']
    return f"{n} images: " + ', '.join(f"{tally[k]} {k}" for k in order if tally.get(k))


def map_name(image, taken: set) -> str:
    """<stem>-map.png, or <stem>-2-map.png ... when an image of the same name (another folder) has it this run."""
    stem = Path(image).stem
    name, n = f"{stem}-map.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}-map.png"
    taken.add(name)
    return name


def save_map(out: Path, image, res) -> None:
    from .overlay import overlay, write_png
    from .preprocess import load_image
    write_png(out, overlay(load_image(image), res.anomaly_map, grid=res.token_grid, regions=res.regions))


def verdict_text(res) -> str:
    """The verdict for people, and who gave it; the calibrated map threshold's call is shown beside the LLM's,
    never in its place."""
    verdict = (res.verdict or 'n/a').upper()
    if res.verdict_source == 'threshold':
        return verdict + f' (threshold {number(res.threshold)}, no LLM)'
    if res.map_verdict is None:
        return verdict
    agrees = res.map_verdict == res.verdict
    return verdict + (f" by the LLM (the calibrated map threshold {number(res.threshold)} "
                      + ('agrees)' if agrees else f'says {res.map_verdict.upper()})'))


def number(x: float) -> str:
    """A score or threshold for people: 3 decimals, or 3 significant digits below 0.001 (a trained model's
    maps are ~1e-5 on normal surfaces, and its thresholds too: '0.000' would hide them)."""
    return f"{x:.3f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.2e}"
