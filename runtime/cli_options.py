"""Options and set-up shared by the device-side commands (inspect, watch, serve)."""
from __future__ import annotations

import argparse
import sys

from ..arguments import positive_int
from .pipeline import DEFAULT_N_CTX


def add_bundle_argument(p) -> None:
    """--bundle, required; the hidden --fake-pipeline (a bundle-free stand-in whose inspect takes that many
    seconds: tests and dry runs) takes its place, so the two are a required either-or that shows --bundle only."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument('--bundle', help='bundle directory (from `anomalygpt-edge export`)')
    which.add_argument('--fake-pipeline', type=float, metavar='SECONDS', help=argparse.SUPPRESS)


def add_backend_arguments(p) -> None:
    p.add_argument('--precision', default='auto',
                   help="vision graph precision: fp32, fp16, int8, or auto = int8 when the bundle has a gated INT8 graph "
                        "(encoder, prompt learner; ONNX Runtime) / the best engines built for this GPU (TensorRT), else fp32 "
                        "(default: %(default)s)")
    p.add_argument('--backend', choices=('onnxruntime', 'tensorrt', 'auto'), default='onnxruntime',
                   help='vision backend; auto = TensorRT when engines for this GPU exist (default: %(default)s)')
    p.add_argument('--quant', help="GGUF type to load (default: the bundle's default)")
    p.add_argument('--threads', type=positive_int, help='CPU threads for ONNX Runtime and llama.cpp')
    p.add_argument('--resize', choices=('squash', 'center_crop'), help="resize mode (default: the bundle's, squash)")
    p.add_argument('--verify', action='store_true', help='check every file sha256 against the manifest first')
    p.add_argument('--n-ctx', type=positive_int, default=DEFAULT_N_CTX,
                   help='LLM context in positions: one question and its answer (default: %(default)s, the smallest '
                        'llama.cpp opens; the KV cache takes n_ctx x 0.5 MiB at Vicuna-7B size in f16, so a larger one '
                        'costs memory; a prompt that does not fit stops with "context full", an answer that does '
                        'not is cut at the end of the context)')
    p.add_argument('--kv-type', choices=('f16', 'q8_0'), default='f16',
                   help='LLM KV cache type: q8_0 halves it (needs flash attention, turned on; logits within ~3 %%) '
                        '(default: %(default)s)')


def add_question_arguments(p) -> None:
    who = p.add_mutually_exclusive_group()
    who.add_argument('--class', dest='class_name', help="product class from the bundle (e.g. bottle); "
                     "default: first class named in --describe/--question, else 'object'")
    who.add_argument('--describe', help='your own description sentence of a good product')
    p.add_argument('--question', help='ask this instead of the default "<description> Is there any anomaly in the image?"')
    few = p.add_mutually_exclusive_group()
    few.add_argument('--reference', nargs='+', metavar='NORMAL_IMG', help='normal images for few-shot mode')
    few.add_argument('--memory', help='load a saved few-shot memory (.npz) instead of --reference')
    p.add_argument('--no-llm', action='store_true', help='map, score and locations only (no LLM loaded)')
    p.add_argument('--verdict-first', action='store_true', help='stop generating once Yes/No is known')


def open_pipeline(args):
    """The bundle's pipeline with the backend options; raises BundleError/OSError."""
    from .pipeline import Pipeline
    return Pipeline.from_bundle(args.bundle, verify_hashes=args.verify, llm=not args.no_llm, precision=args.precision,
                                backend=args.backend, quant=args.quant, threads=args.threads, resize_mode=args.resize,
                                n_ctx=args.n_ctx, kv_type=args.kv_type)


def _stderr_warning(msg: str) -> None:
    print(f"anomalygpt-edge: warning: {msg}", file=sys.stderr)


def few_shot_memory(pipe, args, save_to: str | None = None, warn=_stderr_warning):
    """The few-shot memory from --memory or --reference (None for zero-shot); checks the class too, and
    ``warn``s when a loaded memory was saved for another class.
    Raises ImageError/BundleError/KeyError/ValueError with the file or class named."""
    memory = None
    cls = pipe.resolve_class(args.class_name, ' '.join(t for t in (args.describe, args.question) if t))  # as inspect
    if args.memory:
        memory, saved_for = pipe.load_memory(args.memory)
        if saved_for != cls:
            warn(f"{args.memory} is a memory of class {saved_for!r}; the images are inspected as class {cls!r}")
    elif args.reference:
        memory = pipe.memory(args.reference)
        if save_to:
            pipe.save_memory(save_to, memory, cls)
    return memory
