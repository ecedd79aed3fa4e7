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


def versions() -> dict:
    out = {'python': platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict:
    import psutil
    return {'cpu': cpu_model(), 'cores_logical': os.cpu_count(),
            'cores_physical': psutil.cpu_count(logical=False),
            'memory_gb': round(psutil.virtual_memory().total / 2**30, 1),
            'platform': platform.platform(),
            'versions': versions()}


def memory_bandwidth(threads: int = 2, mib_per_thread: int = 256, repeats: int = 5) -> dict:
    """Read bandwidth in GB/s: ``threads`` threads each take the max of their own float32 array
    (numpy's SIMD max streams faster than its pairwise sum, and releases the GIL), arrays far larger
    than any cache. Also a single-thread copy (read + write).
    ``read_gb_s`` is the best of ``repeats`` (a ceiling is a best case); the median is kept too."""
    n = mib_per_thread * 2**20 // 4
    arrays = [np.ones(n, dtype=np.float32) for _ in range(threads)]
    nbytes = sum(a.nbytes for a in arrays)
    reads = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, arrays))  # fault the pages in, start the threads
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.max, arrays))
            reads.append(nbytes / (time.perf_counter() - t0) / 1e9)
    dst = np.empty_like(arrays[0])
    copies = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, arrays[0])
        copies.append(2 * arrays[0].nbytes / (time.perf_counter() - t0) / 1e9)
    return {'read_gb_s': round(max(reads), 2), 'read_gb_s_median': round(float(np.median(reads)), 2),
            'copy_1thread_gb_s': round(max(copies), 2), 'threads': threads,
            'bytes_per_pass': nbytes, 'method': f'{threads} threads x np.max over {mib_per_thread} MiB float32, '
                                                f'best of {repeats}'}
