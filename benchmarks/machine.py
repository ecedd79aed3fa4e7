"""The machine a benchmark ran on, and its memory bandwidth measured in the same run.

Decode speed of an LLM on a CPU is bounded by how fast the weights stream from memory, and on
these shared machines that bandwidth moves between runs (the vCPUs land on one or two dies), so
every report carries its own measurement rather than a datasheet figure.
"""
from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

import numpy as np

PACKAGES = ('numpy', 'torch', 'transformers', 'onnxruntime', 'onnx', 'llama-cpp-python', 'gguf', 'psutil')


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(packages=PACKAGES) -> dict:
    out = {'python': platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_detail() -> dict:
    """Family/model and the SIMD extensions that decide which kernels run ("AMD EPYC" alone does not
    say whether bf16 and int8 dot products are native here)."""
    info = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, val = line.partition(':')
                key = key.strip()
                if key in ('cpu family', 'model', 'stepping') and key not in info:
                    info[key.replace(' ', '_')] = val.strip()
                elif key == 'flags':
                    flags = set(val.split())
                    info['simd'] = sorted(f for f in flags if f.startswith(('avx', 'amx', 'fma', 'f16c', 'sse4')))
                    break
    except OSError:
        pass
    return info


def machine_info() -> dict:
    import psutil
    return {'cpu': cpu_model(), 'cpu_detail': cpu_detail(), 'cores_logical': os.cpu_count(),
            'cores_physical': psutil.cpu_count(logical=False),
            'memory_gb': round(psutil.virtual_memory().total / 2**30, 1),
            'platform': platform.platform(),
            'versions': versions()}


def memory_bandwidth(threads: int = 2, mib_per_thread: int = 256, repeats: int = 5) -> dict:
    """Memory bandwidth in GB/s, arrays far larger than any cache, ``threads`` threads each on its own
    array (numpy releases the GIL in these loops). Three streaming kernels, because which one gets
    closest to the memory system differs between CPUs: ``np.max`` and ``np.dot`` (read only) and
    ``np.copyto`` (read + write, both counted). ``read_gb_s``, the decode ceiling's bandwidth, is the
    best read-only figure over ``repeats`` passes (decode only reads weights; a copy's write stream
    can read higher than any read loop reaches); each kernel's best and median are kept."""
    n = mib_per_thread * 2**20 // 4
    src = [np.ones(n, dtype=np.float32) for _ in range(threads)]
    dst = [np.zeros(n, dtype=np.float32) for _ in range(threads)]
    nbytes = sum(a.nbytes for a in src)
    kernels = {'max': (lambda i: np.max(src[i]), 1), 'dot': (lambda i: np.dot(src[i], src[i]), 1),
               'copy': (lambda i: np.copyto(dst[i], src[i]), 2)}
    per = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, (fn, traffic) in kernels.items():
            list(pool.map(fn, range(threads)))  # fault the pages in, start the threads
            speeds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(fn, range(threads)))
                speeds.append(traffic * nbytes / (time.perf_counter() - t0) / 1e9)
            per[name] = {'best': round(max(speeds), 2), 'median': round(float(np.median(speeds)), 2)}
    best = max(('max', 'dot'), key=lambda k: per[k]['best'])
    return {'read_gb_s': per[best]['best'], 'kernel': best, 'copy_gb_s': per['copy']['best'], 'kernels': per,
            'threads': threads, 'method': f'{threads} threads x {mib_per_thread} MiB float32 each; best of the '
                                          f'read-only np.max / np.dot over {repeats} passes'}
