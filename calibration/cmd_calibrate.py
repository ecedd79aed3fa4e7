"""Calibrate a bundle from normal images: INT8 (explicit Q/DQ, with an accuracy gate), score
thresholds for the LLM-free mode, or a legacy TensorRT INT8 engine (TensorRT < 10.1).

  calibrate int8      --bundle DIR --images NORMAL_DIR --heldout MVTEC_ROOT [--method minmax|entropy|percentile]
  calibrate int8      --bundle DIR --heldout MVTEC_ROOT --method dynamic --target onnxruntime   (CPU; no calibration set)
  calibrate int8      --bundle DIR --heldout MVTEC_ROOT --method dynamic --target onnxruntime --component prompt_learner
  calibrate threshold --bundle DIR --images NORMAL_DIR --class NAME [--percentile 100] [--reference IMG ...]
  calibrate trt-legacy --bundle DIR --images NORMAL_DIR   (on the device; writes an int8 engine set)

`int8` leaves the bundle unchanged and exits 1 when the INT8 encoder loses more than --max-drop
image-AUROC points (or its maps move more than --max-map-error), or the INT8 prompt learner's prompts
move more than --max-prompt-error, on the held-out images.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ..arguments import non_negative_int, positive_int


def _folder_class(text: str) -> tuple[str, str]:
    folder, sep, cls = text.partition('=')
    if not sep or not folder or not cls:
        raise argparse.ArgumentTypeError(f"takes FOLDER=CLASS, got {text!r}")
    return folder, cls


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest='what', metavar='WHAT', required=True)
    q = sub.add_parser('int8', help='INT8 Q/DQ encoder from normal images, kept only if it passes the accuracy gate')
    q.add_argument('--bundle', required=True, help='bundle directory; gets <component>-int8.onnx if the gate passes')
    q.add_argument('--images', metavar='NORMAL_DIR',
                   help='folder of normal images (calibration; not used by --method dynamic); an unreadable image stops '
                        'the calibration, naming it: a calibration set must be clean')
    q.add_argument('--heldout', required=True, metavar='MVTEC_ROOT',
                   help='held-out images in MVTec layout (<class>/test/good, <class>/test/<defect>, train/good)')
    q.add_argument('--method', choices=('minmax', 'entropy', 'percentile', 'dynamic'), default='minmax',
                   help='activation ranges: calibrated on --images (minmax, entropy, percentile: Q/DQ for TensorRT and '
                        'ONNX Runtime), or computed per inference (dynamic: ONNX Runtime only, the fastest on a '
                        'VNNI CPU; see benchmarks/README.md) (default: %(default)s)')
    q.add_argument('--percentile', type=float, default=99.999, help='for --method percentile (default: %(default)s)')
    q.add_argument('--target', choices=('tensorrt', 'onnxruntime'), default='tensorrt',
                   help='tensorrt: FP32 weights behind Q/DQ (TensorRT 8.6 needs them; works in ONNX Runtime too); '
                        'onnxruntime: INT8 weights, a quarter of the file (default: %(default)s)')
    q.add_argument('--no-attention', action='store_true', help='keep the attention MatMuls (Q.K^T, attn.V) FP32')
    q.add_argument('--component', choices=('encoder', 'prompt_learner'), default='encoder',
                   help='the graph to quantize: the encoder, or the prompt learner (--method dynamic only: its last '
                        'conv, 105M parameters at the released size, goes to INT8 in an exactly equal MatMul form; '
                        'a quarter of its memory) (default: %(default)s)')
    q.add_argument('--max-prompt-error', type=float, default=0.02,
                   help="largest relative L2 error of the 18 prompts (INT8 vs FP32 prompt learner on the FP32 map) "
                        "allowed on any held-out image (default: %(default)s)")
    q.add_argument('--max-images', type=positive_int, default=256,
                   help='cap on calibration images (default: %(default)s)')
    q.add_argument('--batch-size', type=positive_int, default=4,
                   help='images per calibration batch (default: %(default)s)')
    q.add_argument('--seed', type=int, default=0, help='shuffling seed (default: %(default)s)')
    q.add_argument('--recursive', action='store_true', help='take images from sub-folders of --images too')
    q.add_argument('--k-shot', type=non_negative_int, default=1,
                   help='also gate the k-shot map (0: zero-shot only; default: %(default)s)')
    q.add_argument('--max-drop', type=float, default=0.5, help='largest image-AUROC drop allowed, in points (default: %(default)s)')
    q.add_argument('--max-map-error', type=float, default=0.02,
                   help='largest mean absolute anomaly-map error allowed (default: %(default)s)')
    q.add_argument('--class-map', nargs='+', type=_folder_class, metavar='FOLDER=CLASS', default=[],
                   help="the bundle's class of a held-out folder whose name differs (default: the folder name, "
                        "'_' -> ' ')")
    q.add_argument('--json', help='write the gate report here')

    t = sub.add_parser('threshold', help='per-class score threshold on normal images, for inspect --no-llm')
    t.add_argument('--bundle', required=True, help="bundle directory; the threshold goes into its manifest's "
                   "thresholds section (an atomic update)")
    t.add_argument('--images', required=True, metavar='NORMAL_DIR',
                   help='folder of normal images of the class; an unreadable image stops the calibration, naming it')
    t.add_argument('--class', dest='class_name', required=True, help="the bundle's class these images show")
    t.add_argument('--percentile', type=float, default=100.0,
                   help='threshold = this percentile of the normal scores (default: %(default)s = the maximum)')
    t.add_argument('--margin', type=float, default=0.0, help='added to the threshold (default: %(default)s)')
    t.add_argument('--reference', nargs='+', metavar='NORMAL_IMG', help='few-shot references: calibrates the k-shot mode')
    t.add_argument('--max-images', type=positive_int, help='cap on normal images (default: all)')
    t.add_argument('--precision', default='fp32', help='vision precision to score with (default: %(default)s)')
    t.add_argument('--backend', default='onnxruntime', choices=('onnxruntime', 'tensorrt', 'auto'),
                   help='vision backend to score with (default: %(default)s)')
    t.add_argument('--threads', type=positive_int, help='CPU threads for ONNX Runtime')

    g = sub.add_parser('trt-legacy', help='INT8 engine with TensorRT\'s implicit entropy calibrator (TensorRT < 10.1)')
    g.add_argument('--bundle', required=True, help='bundle directory (its FP32 encoder is calibrated)')
    g.add_argument('--images', required=True, metavar='NORMAL_DIR',
                   help='folder of normal images; an unreadable image stops the calibration, naming it')
    g.add_argument('--max-images', type=positive_int, default=256,
                   help='cap on calibration images (default: %(default)s)')
    g.add_argument('--batch-size', type=positive_int, default=4, help='images per batch (default: %(default)s)')
    g.add_argument('--seed', type=int, default=0, help='shuffling seed (default: %(default)s)')
    g.add_argument('--workspace', type=positive_int, metavar='MB',
                   help="TensorRT's builder workspace (default: TensorRT's own)")
    g.add_argument('--cache', help='calibration cache file (default: bundle/engines/<set>/encoder.calib)')


def calibrate_int8(bundle_dir, images, heldout, method='minmax', percentile=99.999, target='tensorrt',
                   quantize_attention=True, max_images=256, batch_size=4, seed=0, recursive=False, k_shot=1,
                   max_drop=0.5, max_map_mae=0.02, log=print, component='encoder', max_prompt_error=0.02,
                   class_map=None):
    """Quantize ``component`` (the encoder, or the prompt learner: dynamic only), gate, and (only if the
    gate passes) add ``<component>-int8.onnx`` to the bundle. Returns the GateReport; the bundle is
    unchanged when it did not pass."""
    from ..runtime.bundle import Bundle
    from ..runtime.pipeline import Pipeline
    from ..runtime.runners import OrtRunner
    from .bundle_update import update_bundle
    from .data_reader import CalibrationError, ImageBatches
    from .gate import accuracy_gate, heldout_classes
    from .int8 import INT8_TOLERANCE, QuantizeOptions, int8_file, quantize_onnx

    inputs = {'encoder': 'image', 'prompt_learner': 'anomaly_map'}
    if component not in inputs:
        raise CalibrationError(f"cannot quantize {component!r}: INT8 is made for {sorted(inputs)}")
    if component == 'prompt_learner' and method != 'dynamic':
        raise CalibrationError("the prompt learner's INT8 is dynamic only (its input is an anomaly map, not a "
                               "calibration image): --method dynamic --target onnxruntime")
    bundle = Bundle.open(bundle_dir, verify_hashes=True)
    fp32 = bundle.component(component, 'fp32')
    heldout_classes(bundle.classes, heldout, class_map)
    # the histogram calibrators (entropy, percentile) stack every batch's activations, so all batches
    # must have one size: a short last batch would make ONNX Runtime fail on a ragged array
    opts = QuantizeOptions(method=method, percentile=percentile, target=target, quantize_attention=quantize_attention)
    batches = None
    if method != 'dynamic':
        if images is None:
            raise CalibrationError(f"--method {method} calibrates on normal images: give --images NORMAL_DIR")
        batches = ImageBatches.from_folder(images, bundle, recursive, batch_size=batch_size, seed=seed,
                                           max_images=max_images, drop_last=method != 'minmax')
        if batches.n_used == 0:
            raise CalibrationError(f"{images}: {len(batches.paths)} images, fewer than one batch of {batch_size}")
    name = int8_file(component)
    with tempfile.TemporaryDirectory(prefix=f'.{bundle.root.name}.int8-', dir=bundle.root.parent) as work:
        candidate = Path(work) / name
        log(f"quantizing {name} (dynamic) ..." if batches is None else
            f"calibrating {name} on {len(batches.paths)} images ({method}) ...")
        info = quantize_onnx(bundle.path(fp32['file']), candidate, batches, component, inputs[component], opts)
        log("accuracy gate on the held-out images ...")
        with Pipeline(bundle, llm=False, precision='fp32') as ref, Pipeline(bundle, llm=False, precision='fp32') as cand:
            cand.runners[component] = OrtRunner(candidate, name=f'onnxruntime:{name}')
            report = accuracy_gate(ref, cand, heldout, k_shot=k_shot, max_drop=max_drop, max_map_mae=max_map_mae,
                                   max_prompt_error=max_prompt_error, class_map=class_map)
        if not report.passed:
            return report
        entry = {'file': name, 'external_data': info['external_data'], 'precision': 'int8', 'opset': fp32['opset'],
                 'inputs': fp32['inputs'], 'outputs': fp32['outputs'], 'tolerance': dict(INT8_TOLERANCE[component]),
                 'verified': None, 'source': {'file': fp32['file'], 'sha256': bundle.manifest['files'][fp32['file']]['sha256']},
                 'quantization': {k: v for k, v in info.items() if k != 'external_data'},
                 'gate': report.to_dict()}
        new = {name: candidate}
        if info['external_data']:
            new[info['external_data']] = candidate.parent / info['external_data']
        old = bundle.manifest['components'][component].get('int8') or {}
        stale = tuple(f for f in (old.get('file'), old.get('external_data')) if f and f not in new)

        def edit(manifest):
            manifest['components'][component]['int8'] = entry
        update_bundle(bundle.root, edit, new_files=new, remove=stale)
    return report


def _int8(args) -> int:
    report = calibrate_int8(args.bundle, args.images, args.heldout, args.method, args.percentile, args.target,
                            not args.no_attention, args.max_images, args.batch_size, args.seed, args.recursive,
                            args.k_shot, args.max_drop, args.max_map_error, component=args.component,
                            max_prompt_error=args.max_prompt_error, class_map=dict(args.class_map))
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1))
    if not report.passed:
        print(f"anomalygpt-edge calibrate int8: refused; {args.bundle} is unchanged", file=sys.stderr)
        return 1
    print(f"{args.bundle}: added {args.component}-int8.onnx (inspect --precision int8 or auto"
          + (", build-engines --precision int8)" if args.component == 'encoder' else ")"))
    return 0


def _threshold(args) -> int:
    from ..runtime.pipeline import Pipeline
    from .thresholds import calibrate_threshold, store_threshold
    with Pipeline.from_bundle(args.bundle, llm=False, precision=args.precision, backend=args.backend,
                              threads=args.threads) as pipe:
        cls, mode, entry = calibrate_threshold(pipe, args.images, args.class_name, args.percentile, args.margin,
                                               args.reference, args.max_images)
    store_threshold(args.bundle, cls, mode, entry)
    s = entry['normal_scores']
    print(f"{args.bundle}: threshold {entry['score']:.6f} for {cls!r} ({mode}) from {entry['n_images']} normal "
          f"images (p{entry['percentile']:g}; normal scores min {s['min']:.4f} median {s['median']:.4f} "
          f"max {s['max']:.4f}); inspect --no-llm now gives threshold-based verdicts")
    return 0


def _trt_legacy(args) -> int:
    from ..runtime import engines as E
    from ..runtime.bundle import Bundle
    from ..runtime.cmd_build_engines import build_engines
    from .data_reader import ImageBatches
    from .trt_calibrator import entropy_calibrator, legacy_supported
    device = E.device_info()
    if not legacy_supported(device.trt_version):
        print(f"anomalygpt-edge calibrate trt-legacy: TensorRT {device.trt_version} has no implicit calibration; "
              "use `calibrate int8`", file=sys.stderr)
        return 2
    bundle = Bundle.open(args.bundle)
    batches = ImageBatches.from_folder(args.images, bundle, batch_size=args.batch_size, seed=args.seed,
                                       max_images=args.max_images, drop_last=True)
    cache = Path(args.cache) if args.cache else E.engine_dir(bundle.root, device, 'int8') / 'encoder.calib'
    cache.parent.mkdir(parents=True, exist_ok=True)
    fp32 = bundle.component('encoder', 'fp32')['file']
    plan = [E.BuildItem('encoder', fp32, False, ('int8', 'fp16'), True)]
    plan += [i for i in E.build_plan(bundle.manifest, 'fp16', device.trt_version) if i.component != 'encoder']
    build_engines(bundle, 'int8', device, args.workspace, plan=plan, force=True,
                  calibrators={'encoder': entropy_calibrator(batches, cache)})
    return 0


def run(args) -> int:
    from ..runtime.bundle import BundleError
    from ..runtime.preprocess import ImageError
    from .data_reader import CalibrationError
    handlers = {'int8': _int8, 'threshold': _threshold, 'trt-legacy': _trt_legacy}
    try:
        return handlers[args.what](args)
    except (CalibrationError, BundleError, ImageError, FileNotFoundError, KeyError) as e:
        print(f"anomalygpt-edge calibrate {args.what}: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
