"""TensorRT engines of a bundle: where they live, what they were built from, whether they still fit.

An engine only runs on the GPU model and the exact TensorRT version it was built with, and only
means something for the ONNX it was built from. So engines live under

    bundle/engines/<gpu>-sm<XY>-trt<version>-<precision>/<component>.engine
                                                       /<component>.json   what it was built from

and the JSON records the ONNX file and its sha256, the TensorRT version, the GPU name, its compute
capability, the optimisation profile and the build options. At load, a GPU, TensorRT or ONNX that
differs is reported with the command that rebuilds. This module needs neither tensorrt nor pycuda
except in ``device_info`` (imported there, lazily); everything else is plain file logic.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .bundle import Bundle, BundleError, sha256_file

ENGINES_DIR = 'engines'
PRECISIONS = ('fp32', 'fp16', 'int8', 'best')
COMPONENTS = ('encoder', 'decoder', 'fewshot', 'prompt_learner')
META_FORMAT = 1


class EngineMismatch(BundleError):
    """Engines missing, or built for another GPU, TensorRT version or ONNX; the message says how to rebuild."""


@dataclass(frozen=True)
class DeviceInfo:
    gpu: str                       # e.g. 'Orin', 'NVIDIA GeForce RTX 4090'
    compute_capability: tuple      # (major, minor)
    trt_version: str               # tensorrt.__version__, e.g. '10.3.0.30'

    @property
    def sm(self) -> str:
        return f'sm{self.compute_capability[0]}{self.compute_capability[1]}'

    def to_dict(self) -> dict:
        return {'gpu': self.gpu, 'compute_capability': list(self.compute_capability), 'trt_version': self.trt_version}


def device_info(device_id: int = 0) -> DeviceInfo:
    """This machine's GPU and TensorRT (imports tensorrt and pycuda)."""
    import pycuda.driver as cuda
    import tensorrt as trt
    cuda.init()
    dev = cuda.Device(device_id)
    return DeviceInfo(dev.name(), tuple(dev.compute_capability()), trt.__version__)


def slug(text: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'nvidia-geforce-rtx-4090'."""
    return re.sub(r'[^a-z0-9.]+', '-', text.lower()).strip('-') or 'gpu'


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise EngineMismatch(f"unknown engine precision {precision!r}; choose one of {PRECISIONS}")
    return precision


def engine_set_name(device: DeviceInfo, precision: str) -> str:
    return f'{slug(device.gpu)}-{device.sm}-trt{device.trt_version}-{check_precision(precision)}'


def engine_dir(bundle_root, device: DeviceInfo, precision: str) -> Path:
    return Path(bundle_root) / ENGINES_DIR / engine_set_name(device, precision)


def engine_path(bundle_root, device: DeviceInfo, precision: str, component: str) -> Path:
    return engine_dir(bundle_root, device, precision) / f'{component}.engine'


def meta_path(engine: Path) -> Path:
    return Path(engine).with_suffix('.json')


def timing_cache_path(bundle_root, device: DeviceInfo) -> Path:
    """One timing cache per GPU and TensorRT version, shared by every precision."""
    return Path(bundle_root) / ENGINES_DIR / f'timing-{slug(device.gpu)}-{device.sm}-trt{device.trt_version}.cache'


def rebuild_hint(bundle_root, precision: str) -> str:
    return f"rebuild with: anomalygpt-edge build-engines --bundle {bundle_root} --precision {precision}"


# -- what an engine is built from -----------------------------------------------------------------
def trt_major_minor(version: str) -> tuple[int, int]:
    parts = (version.split('.') + ['0'])[:2]
    return int(parts[0]), int(re.match(r'\d+', parts[1]).group())


@dataclass(frozen=True)
class BuildItem:
    component: str
    onnx: str                  # bundle-relative ONNX file
    strongly_typed: bool       # the ONNX types decide every layer's precision (TensorRT >= 10)
    flags: tuple[str, ...]     # builder precision flags, weakly typed networks only
    fp32_layers: bool          # pin LayerNorm/Softmax/Sigmoid/reductions to FP32 (weakly typed FP16)


def tensorrt_variants(variants: dict) -> dict:
    """The component's graphs TensorRT builds from: not an INT8 graph made for ONNX Runtime (``calibrate int8
    --target onnxruntime``: dynamic quantization, or INT8 weights behind DequantizeLinear), which it cannot take."""
    def for_tensorrt(entry):
        return ((entry.get('quantization') or {}).get('calibration') or {}).get('target', 'tensorrt') == 'tensorrt'
    return {k: v for k, v in variants.items() if k != 'int8' or for_tensorrt(v)}


def build_plan(manifest: dict, precision: str, trt_version: str, components=COMPONENTS) -> list[BuildItem]:
    """Which ONNX each engine is built from, and how, for this TensorRT version.

    TensorRT >= 10 builds *strongly typed* networks: the bundle's FP16 graphs already carry the
    FP32 islands (LayerNorm, L2 norms, Softmax/Sigmoid), the INT8 graphs carry Q/DQ, so no precision
    flag is needed (TensorRT 11 has none). TensorRT 8.6 builds the FP32 graph with the FP16/INT8 flags
    and pins the sensitive layers to FP32, or the Q/DQ graph with the INT8 flag. A 10.x build falls
    back to flags when the bundle lacks the FP16 graph; 11 cannot, and the error says to export it."""
    check_precision(precision)
    major, _ = trt_major_minor(trt_version)
    comps = manifest.get('components', {})
    plan = []
    for name in components:
        variants = tensorrt_variants(comps.get(name) or {})
        if not variants:
            continue
        want = {'fp32': ['fp32'], 'fp16': ['fp16'], 'int8': ['int8', 'fp16'], 'best': ['int8', 'fp16']}[precision]
        if major >= 11 and precision in ('int8', 'best'):
            want = want + ['fp32']  # no flags on 11: a graph without an FP16 variant stays FP32
        chosen = next((v for v in want if v in variants), None)
        if major >= 10 and chosen is not None:
            plan.append(BuildItem(name, variants[chosen]['file'], True, (), False))
            continue
        if major >= 11:
            raise EngineMismatch(
                f"{name}: TensorRT {trt_version} builds strongly typed networks only and the bundle has no "
                f"{'/'.join(want)} graph of it; export one (anomalygpt-edge export --precision fp16, or "
                f"anomalygpt-edge calibrate int8) or build --precision fp32")
        if chosen == 'int8':
            # 'int8': layers outside the Q/DQ pairs stay FP32; 'best' lets them run FP16 (islands pinned)
            flags = ('int8', 'fp16') if precision == 'best' else ('int8',)
            plan.append(BuildItem(name, variants['int8']['file'], False, flags, precision == 'best'))
        elif precision == 'fp32':
            plan.append(BuildItem(name, variants['fp32']['file'], major >= 10, (), False))
        else:
            # weakly typed: the FP32 graph with the FP16 flag and the sensitive layers pinned to FP32
            # (never the INT8 flag without Q/DQ: that would ask for an implicit calibrator)
            plan.append(BuildItem(name, variants['fp32']['file'], False, ('fp16',), True))
    if precision in ('int8', 'best') and 'int8' not in comps.get('encoder', {}):
        raise EngineMismatch("the bundle has no INT8 encoder; calibrate one first: anomalygpt-edge calibrate int8 "
                             "--bundle DIR --images NORMAL_DIR --heldout MVTEC_ROOT")
    return plan


def profile_shapes(entry: dict, max_batch: int = 4, opt_batch: int = 1, n_patches: int = 256,
                   shots: tuple[int, int, int] = (1, 4, 8)) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Optimisation profile (min, opt, max) per input from a manifest component entry: 'batch' runs
    1..opt..max, the few-shot memory size 'M' runs over k*n_patches for k in ``shots``."""
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch ({opt_batch}) <= max_batch ({max_batch})")
    if not 1 <= shots[0] <= shots[1] <= shots[2]:
        raise ValueError(f"shots must be min <= opt <= max, not {shots}")
    ranges = {'batch': (1, opt_batch, max_batch), 'M': tuple(k * n_patches for k in shots)}
    out = {}
    for t in entry['inputs']:
        dims = []
        for d in t['shape']:
            if isinstance(d, str):
                if d not in ranges:
                    raise EngineMismatch(f"input {t['name']!r} has a dynamic axis {d!r} with no profile range")
                dims.append(ranges[d])
            else:
                dims.append((d, d, d))
        out[t['name']] = tuple(tuple(x[i] for x in dims) for i in range(3))
    return out


# -- metadata and mismatch detection --------------------------------------------------------------
def write_json_atomic(path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def engine_meta(bundle: Bundle, item: BuildItem, device: DeviceInfo, precision: str, profiles: dict,
                workspace_mb: int | None, timing_cache: str | None) -> dict:
    info = bundle.manifest['files'].get(item.onnx, {})
    return {'format': META_FORMAT, 'component': item.component, 'precision': precision,
            'onnx': item.onnx, 'onnx_sha256': info.get('sha256') or sha256_file(bundle.root / item.onnx),
            **device.to_dict(), 'strongly_typed': item.strongly_typed, 'flags': list(item.flags),
            'fp32_layers': item.fp32_layers, 'workspace_mb': workspace_mb, 'timing_cache': timing_cache,
            'profiles': {k: [list(s) for s in v] for k, v in profiles.items()}}


def list_engine_sets(bundle_root) -> list[str]:
    d = Path(bundle_root) / ENGINES_DIR
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def check_engine(bundle: Bundle, component: str, precision: str, device: DeviceInfo) -> Path:
    """The engine's path if it was built for this GPU, this TensorRT and the bundle's current ONNX;
    otherwise EngineMismatch naming what differs and the command that rebuilds."""
    engine = engine_path(bundle.root, device, precision, component)
    hint = rebuild_hint(bundle.root, precision)
    if not engine.is_file():
        others = [s for s in list_engine_sets(bundle.root) if s.endswith(f'-{precision}')]
        here = f"{device.gpu} ({device.sm}) with TensorRT {device.trt_version}"
        if others:
            raise EngineMismatch(f"{engine}: missing; the bundle has {precision} engines built elsewhere "
                                 f"({', '.join(others)}), not for this device, {here}; {hint}")
        raise EngineMismatch(f"{engine}: no {precision} engine for {here}; {hint}")
    mpath = meta_path(engine)
    try:
        meta = json.loads(mpath.read_text(encoding='utf-8'))
    except (OSError, json.JSONDecodeError) as e:
        raise EngineMismatch(f"{mpath}: missing or unreadable build record ({e}); {hint}") from None
    problems = []
    if meta.get('trt_version') != device.trt_version:
        problems.append(f"built with TensorRT {meta.get('trt_version')}, this device has {device.trt_version}")
    if meta.get('gpu') != device.gpu or tuple(meta.get('compute_capability') or ()) != device.compute_capability:
        cc = '.'.join(map(str, meta.get('compute_capability') or ()))
        problems.append(f"built for {meta.get('gpu')} (compute {cc}), this device is {device.gpu} "
                        f"(compute {'.'.join(map(str, device.compute_capability))})")
    onnx = meta.get('onnx')
    current = bundle.manifest.get('files', {}).get(onnx, {}).get('sha256') if onnx else None
    if current is None:
        problems.append(f"built from {onnx!r}, which the bundle no longer lists")
    elif meta.get('onnx_sha256') != current:
        problems.append(f"built from a different {onnx} (sha256 {str(meta.get('onnx_sha256'))[:12]}..., "
                        f"the bundle's is {current[:12]}...)")
    if problems:
        raise EngineMismatch(f"{engine}: " + '; '.join(problems) + f"; {hint}")
    return engine


def engine_for(bundle: Bundle, component: str, precision: str, device: DeviceInfo | None = None) -> Path:
    return check_engine(bundle, component, precision, device or device_info())


def tensorrt_usable(bundle: Bundle, precision: str) -> bool:
    """For backend 'auto': tensorrt and pycuda import, a GPU answers, and every component of the
    bundle has a matching engine of this precision."""
    try:
        device = device_info()
    except Exception:  # no tensorrt / pycuda / driver / GPU: fall back to ONNX Runtime
        return False
    try:
        for name in bundle.manifest.get('components', {}):
            check_engine(bundle, name, precision, device)
    except (EngineMismatch, KeyError, ValueError):
        return False
    return True


# -- the ONNX Runtime GPU route -------------------------------------------------------------------
def _shape_option(profiles: dict, which: int) -> str:
    return ','.join(f"{name}:{'x'.join(map(str, shapes[which]))}" for name, shapes in profiles.items())


def ort_gpu_providers(bundle: Bundle, component: str, precision: str, available, device_id: int = 0,
                      workspace_mb: int = 2048, max_batch: int = 4) -> list:
    """ONNX Runtime execution providers for this component: TensorRT (engine and timing caches kept
    under ``engines/ort-trt-<precision>``, explicit profiles), then CUDA, then CPU, as available."""
    out = []
    if 'TensorrtExecutionProvider' in available:
        cache = bundle.root / ENGINES_DIR / f'ort-trt-{precision}'
        variants = bundle.manifest['components'][component]
        entry = variants.get(precision) or variants['fp32']
        profiles = profile_shapes(entry, max_batch=max_batch)
        out.append(('TensorrtExecutionProvider', {
            'device_id': device_id, 'trt_max_workspace_size': workspace_mb << 20,
            # INT8 only for a Q/DQ graph: on any other graph the provider would ask for a calibration table
            'trt_fp16_enable': precision in ('fp16', 'int8', 'best'),
            'trt_int8_enable': precision in ('int8', 'best') and 'int8' in variants,
            'trt_engine_cache_enable': True, 'trt_engine_cache_path': str(cache),
            'trt_timing_cache_enable': True, 'trt_timing_cache_path': str(cache),
            'trt_profile_min_shapes': _shape_option(profiles, 0), 'trt_profile_opt_shapes': _shape_option(profiles, 1),
            'trt_profile_max_shapes': _shape_option(profiles, 2)}))
    if 'CUDAExecutionProvider' in available:
        out.append(('CUDAExecutionProvider', {'device_id': device_id}))
    out.append('CPUExecutionProvider')
    return out
