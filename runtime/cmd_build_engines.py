"""Build TensorRT engines for this GPU from a bundle's ONNX graphs (run it on the device itself).

Engines go to bundle/engines/<gpu>-sm<XY>-trt<version>-<precision>/<component>.engine with a JSON
record of what they were built from; `inspect --backend tensorrt` (or auto) checks that record and
asks for a rebuild when the GPU, TensorRT or ONNX changed. Precisions: fp32; fp16 (LayerNorm, L2
norms, softmax/sigmoid kept FP32); int8 (the calibrated Q/DQ encoder, other graphs FP16); best
(int8, and TensorRT may also run the encoder's unquantized layers in FP16).
"""
from __future__ import annotations

import datetime
import sys
import time


def add_arguments(p) -> None:
    from .engines import COMPONENTS, PRECISIONS
    p.add_argument('--bundle', required=True, help='bundle directory')
    p.add_argument('--precision', choices=PRECISIONS, default='fp16', help='engine precision (default: %(default)s)')
    p.add_argument('--workspace', type=int, metavar='MB',
                   help="TensorRT builder workspace limit in MB (default: TensorRT's, the whole device memory; "
                        "on an 8 GB Orin use 1024-2048)")
    p.add_argument('--max-batch', type=int, default=4, help='largest batch of the profile (default: %(default)s)')
    p.add_argument('--opt-batch', type=int, default=1, help='batch TensorRT tunes for (default: %(default)s)')
    p.add_argument('--shots', default='1,4,8', metavar='MIN,OPT,MAX',
                   help='few-shot references k of the memory profile, M = k*patches (default: %(default)s)')
    p.add_argument('--components', nargs='+', choices=COMPONENTS, help='only these graphs (default: all)')
    p.add_argument('--force', action='store_true', help='rebuild even if matching engines exist')
    p.add_argument('--device', type=int, default=0, help='CUDA device index (default: %(default)s)')


def entry_for_file(manifest: dict, component: str, onnx: str) -> dict:
    return next(e for e in manifest['components'][component].values() if e['file'] == onnx)


def n_patches(manifest: dict) -> int:
    taps = next(o for o in next(iter(manifest['components']['encoder'].values()))['outputs'] if o['name'] == 'taps')
    return int(taps['shape'][2])


def build_engines(bundle, precision: str, device=None, workspace_mb=None, max_batch: int = 4, opt_batch: int = 1,
                  shots=(1, 4, 8), components=None, force: bool = False, plan=None, calibrators=None,
                  log=print) -> list:
    """Build (or keep, when they match) the engines of ``plan`` (default: ``engines.build_plan``);
    ``calibrators``: component -> legacy implicit INT8 calibrator. Returns the engine paths."""
    from . import engines as E
    from .tensorrt_runner import _write_atomic, build_serialized
    device = device or E.device_info()
    plan = plan or E.build_plan(bundle.manifest, precision, device.trt_version, components or E.COMPONENTS)
    cache = E.timing_cache_path(bundle.root, device)
    out = []
    for item in plan:
        engine = E.engine_path(bundle.root, device, precision, item.component)
        if not force:
            try:
                out.append(E.check_engine(bundle, item.component, precision, device))
                log(f"{engine}: up to date")
                continue
            except E.EngineMismatch:
                pass
        profiles = E.profile_shapes(entry_for_file(bundle.manifest, item.component, item.onnx),
                                    max_batch=max_batch, opt_batch=opt_batch, n_patches=n_patches(bundle.manifest),
                                    shots=tuple(shots))
        how = 'strongly typed' if item.strongly_typed else f"flags {','.join(item.flags) or 'none'}"
        log(f"building {engine} from {item.onnx} ({how}) ...")
        t0 = time.perf_counter()
        blob = build_serialized(bundle.root / item.onnx, item, profiles, workspace_mb, cache,
                                (calibrators or {}).get(item.component), log)
        meta = E.engine_meta(bundle, item, device, precision, profiles, workspace_mb, cache.name)
        meta['built_at'] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
        meta['build_seconds'] = round(time.perf_counter() - t0, 1)
        meta['implicit_calibration'] = item.component in (calibrators or {})
        # the record goes first and the engine last: a crash in between leaves no engine to trust
        E.meta_path(engine).unlink(missing_ok=True)
        engine.unlink(missing_ok=True)
        E.write_json_atomic(E.meta_path(engine), meta)
        _write_atomic(engine, blob)
        log(f"  {len(blob) / 1e6:.1f} MB in {meta['build_seconds']} s")
        out.append(engine)
    return out


def run(args) -> int:
    from .bundle import Bundle, BundleError
    from .runners import RunnerError

    def fail(msg, code=2):
        print(f"anomalygpt-edge build-engines: {msg}", file=sys.stderr)
        return code
    try:
        shots = tuple(int(s) for s in args.shots.split(','))
        if len(shots) != 3:
            raise ValueError
    except ValueError:
        return fail(f"--shots must be three integers MIN,OPT,MAX, not {args.shots!r}")
    try:
        bundle = Bundle.open(args.bundle)
    except BundleError as e:
        return fail(e)
    try:
        import pycuda.driver  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError as e:
        return fail(f"needs {e.name} (TensorRT's Python bindings and pycuda; on Jetson they come with JetPack, "
                    "see docs/tensorrt.md)", 3)
    from .engines import device_info
    try:
        build_engines(bundle, args.precision, device_info(args.device), args.workspace, args.max_batch,
                      args.opt_batch, shots, args.components, args.force)
    except (BundleError, RunnerError, ValueError, OSError) as e:
        return fail(e)
    return 0
