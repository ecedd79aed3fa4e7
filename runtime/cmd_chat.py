"""Chat about one image, multi-turn. Type a question and press Enter; an empty line asks the default
anomaly question; Ctrl-D (or 'exit') ends. The KV cache is kept between turns."""
from __future__ import annotations

import sys

from ..arguments import positive_int


def add_arguments(p) -> None:
    p.add_argument('image', help='the image to talk about')
    p.add_argument('--bundle', required=True, help='bundle directory')
    who = p.add_mutually_exclusive_group()
    who.add_argument('--class', dest='class_name', help='product class from the bundle')
    who.add_argument('--describe', help='your own description sentence of a good product')
    p.add_argument('--reference', nargs='+', metavar='NORMAL_IMG', help='normal images for few-shot mode')
    p.add_argument('--quant', help="GGUF type to load (default: the bundle's default)")
    p.add_argument('--threads', type=positive_int, help='CPU threads')
    p.add_argument('--n-ctx', type=positive_int, default=2048,
                   help='LLM context in positions: the whole conversation must fit (default: %(default)s)')


def run(args) -> int:
    from .bundle import BundleError
    from .llama_session import LlamaError
    from .pipeline import Pipeline
    from .preprocess import ImageError
    try:
        pipe = Pipeline.from_bundle(args.bundle, quant=args.quant, threads=args.threads, n_ctx=args.n_ctx)
        chat = pipe.chat(args.image, class_name=args.class_name, describe=args.describe, references=args.reference)
    except (BundleError, ImageError, KeyError, OSError) as e:
        print(f"anomalygpt-edge chat: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    print(f"[{args.image}: class {chat.class_name}, anomaly score {chat.score:.3f}]", file=sys.stderr)
    with pipe:
        while True:
            if interactive:
                print('you> ', end='', flush=True, file=sys.stderr)
            line = sys.stdin.readline()
            if not line or line.strip() in ('exit', 'quit'):
                break
            try:
                answer = chat.ask(line.strip() or None)
            except LlamaError as e:
                print(f"anomalygpt-edge chat: {e} (after {len(chat.history)} turns)", file=sys.stderr)
                return 2
            print(answer, flush=True)
    return 0
