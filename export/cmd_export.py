"""Build a bundle (ONNX vision graphs + GGUF LLM + manifest.json) for the device.

  export released  from the released checkpoints (ImageBind-Huge, AnomalyGPT, PandaGPT, Vicuna v0)
  export tiny      from a seeded random-weight tiny model (the fixture for tests and benchmarks)
  export llm       (re)write only the LLM files of a bundle from Vicuna + the PandaGPT delta

The bundle is written atomically: a failed export leaves no partial directory behind.
"""
from __future__ import annotations

import argparse
import logging
import sys


def _split(text: str) -> tuple[str, ...]:
    return tuple(t.strip().lower() for t in text.split(',') if t.strip())


def quant_types(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated GGUF types, each one ``quantize.QUANT_TYPES`` knows."""
    from .quantize import QUANT_TYPES, QuantizeError, ftype_of
    names = _split(text)
    for name in names:
        try:
            ftype_of(name)
        except QuantizeError:
            raise argparse.ArgumentTypeError(f"unknown GGUF type {name!r}; choose from {', '.join(QUANT_TYPES)}") \
                from None
    return names


def _precisions(text: str) -> tuple[str, ...]:
    from .onnx_graphs import Precision
    names = _split(text)
    valid = [p.value for p in Precision]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown vision precision {(bad or [text])[0]!r}; "
                                         f"choose from {', '.join(valid)}")
    return names


def _opset(text: str) -> int:
    from ..arguments import number
    from .onnx_export import MAX_OPSET, MIN_OPSET
    value = number(text, int)
    if not MIN_OPSET <= value <= MAX_OPSET:
        raise argparse.ArgumentTypeError(f"opset {value} is not supported: the exporter writes {MIN_OPSET}-{MAX_OPSET}")
    return value


def _classes(items) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, desc = item.partition('=')
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"--class-description takes NAME=DESCRIPTION, got {item!r}")
        out[name.strip()] = desc.strip()
    return out


RELEASED_QUANTS = 'iq4_xs,q4_k_m,q8_0,f16'


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .quantize import QUANT_TYPES
    sub = p.add_subparsers(dest='what', required=True, metavar='WHAT')

    def common(sp, quant_default):
        sp.add_argument('--out', required=True, help='bundle directory to create')
        sp.add_argument('--precision', default='fp32,fp16', type=_precisions,
                        help='vision graph precisions, comma-separated (fp32, fp16; default: %(default)s)')
        sp.add_argument('--quant', default=quant_default, type=quant_types,
                        help=f"GGUF types, comma-separated: {', '.join(QUANT_TYPES)}; the first is the one the runtime "
                             'opens unless told otherwise (inspect --quant) (default: %(default)s)')
        sp.add_argument('--opset', type=_opset, default=17, help='ONNX opset (17 suits TensorRT 8.6 on JetPack 5)')
        sp.add_argument('--class-description', action='append', metavar='NAME=DESCRIPTION',
                        help='add your own product class with its description sentence (repeatable)')
        sp.add_argument('--overwrite', action='store_true', help='replace an existing bundle')

    r = sub.add_parser('released', help='bundle from the released checkpoints')
    r.add_argument('--imagebind', required=True, help='imagebind_huge.pth')
    r.add_argument('--anomalygpt', required=True, help='AnomalyGPT pytorch_model.pt (e.g. train_supervised)')
    r.add_argument('--pandagpt', required=True, help='PandaGPT delta pytorch_model.pt (llama_proj + LoRA)')
    r.add_argument('--vicuna', required=True, help='Vicuna v0 HF directory (vocab 32001)')
    r.add_argument('--config', default='huge', help=argparse.SUPPRESS)
    # the first type is the file the runtime opens by default: IQ4_XS is the one 4-bit type with which the
    # whole model stays under 5 GB resident, and the fastest to the verdict on a CPU (benchmarks/README.md)
    common(r, RELEASED_QUANTS)

    t = sub.add_parser('tiny', help='bundle from a seeded random tiny model')
    t.add_argument('--seed', type=int, default=0, help='seed of the random weights (default: %(default)s)')
    common(t, 'f32,q8_0')

    lm = sub.add_parser('llm', help='(re)write the LLM files of an existing bundle')
    lm.add_argument('--vicuna', required=True, help='Vicuna v0 HF directory')
    lm.add_argument('--pandagpt', required=True, help='PandaGPT delta (LoRA) file')
    lm.add_argument('--out', required=True, help='existing bundle directory to update')
    lm.add_argument('--quant', default=RELEASED_QUANTS, type=quant_types,
                    help='GGUF types, the first is the default file (default: %(default)s)')


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stderr)
    from ..models.loaders import CheckpointError
    try:
        if args.what == 'tiny':
            from .tiny import export_tiny
            out = export_tiny(args.out, seed=args.seed, precisions=args.precision, quants=args.quant,
                              overwrite=args.overwrite, extra_classes=_classes(args.class_description),
                              opset=args.opset)
        elif args.what == 'released':
            from .released import export_released
            out = export_released(args.out, args.imagebind, args.anomalygpt, args.pandagpt, args.vicuna,
                                  config=args.config, precisions=args.precision, quants=args.quant,
                                  overwrite=args.overwrite, extra_classes=_classes(args.class_description),
                                  opset=args.opset)
        else:
            from .bundle_export import update_bundle_llm
            out = update_bundle_llm(args.out, args.vicuna, args.pandagpt, quants=args.quant)
    except (CheckpointError, FileExistsError, FileNotFoundError, argparse.ArgumentTypeError) as e:
        print(f"anomalygpt-edge export: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
