"""Numbers for the latency benchmark: percentiles, repeated timing, speed-ups, the per-layer fit,
peak resident memory of a phase. numpy + psutil; no timing claims live here."""
from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import numpy as np


def summarize(values_ms: Sequence[float]) -> dict:
    """median / p90 / p99 (numpy's linear interpolation), mean, min, max of a list of milliseconds."""
    v = np.asarray(list(values_ms), dtype=np.float64)
    if v.size == 0:
        raise ValueError("summarize: no values (was the number of runs 0?)")
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {'n': int(v.size), 'median': float(p50), 'p90': float(p90), 'p99': float(p99),
            'mean': float(v.mean()), 'min': float(v.min()), 'max': float(v.max())}


def speedup(baseline: float, ours: float) -> float:
    """How many times faster ours is: baseline time / our time (> 1: ours is faster)."""
    if not ours > 0:
        raise ValueError(f"speedup: our time must be positive, got {ours}")
    return baseline / ours


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares t = a + b*x; needs at least two distinct x."""
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape or len(set(x.tolist())) < 2:
        raise ValueError(f"fit_linear needs >= 2 distinct x with one y each, got x={list(xs)} y={list(ys)}")
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def extrapolate(xs: Sequence[float], ys: Sequence[float], at: float) -> dict:
    """The fitted value at ``at``, labelled extrapolated unless ``at`` was measured (then the measurement)."""
    if at in list(xs):
        return {'value': float(list(ys)[list(xs).index(at)]), 'extrapolated': False, 'at': at,
                'from': list(xs)}
    a, b = fit_linear(xs, ys)
    return {'value': a + b * at, 'extrapolated': True, 'at': at, 'from': list(xs), 'fit': {'a': a, 'b': b}}


def block_schedule(names: Sequence, runs: int, warmup: int, rounds: int = 1) -> list[tuple[object, bool]]:
    """The order in which to time several configurations: ``rounds`` rounds, each giving every
    configuration one contiguous block of ``warmup`` unmeasured runs and its share of the ``runs``
    measured ones, the order reversed every other round. Blocks keep what one configuration leaves
    running (ONNX Runtime's and OpenMP's spinning threads, llama.cpp's polling pool) inside its own
    warm-up; rounds spread a change of the machine's state during the phase (these VMs' cores move
    between dies, and memory bandwidth with them) over all configurations. -> [(name, measured)]."""
    if runs < 1 or rounds < 1:
        raise ValueError(f"runs and rounds must be >= 1, got {runs} and {rounds}")
    rounds = min(rounds, runs)
    shares = [runs // rounds + (1 if k < runs % rounds else 0) for k in range(rounds)]
    order = list(names)
    out = []
    for k, share in enumerate(shares):
        for name in (order if k % 2 == 0 else order[::-1]):
            out += [(name, False)] * warmup + [(name, True)] * share
    return out


def time_calls(fn: Callable[[], object], runs: int, warmup: int, progress=None) -> list[float]:
    """Call ``fn`` warmup + runs times; the wall time of each measured call in ms."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    out = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        fn()
        dt = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            out.append(dt)
        if progress is not None:
            progress.update(1)
    return out


def rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


class PeakRSS:
    """Resident memory of this process around a phase: before, peak (sampled every ``interval`` s
    by a thread) and after, in MiB. ``delta_peak`` is what the phase added on top of ``before``."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.before = self.peak = self.after = 0.0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self):
        self.before = self.peak = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.after = rss_mb()
        self.peak = max(self.peak, self.after)

    def to_dict(self) -> dict:
        return {'before': round(self.before, 1), 'peak': round(self.peak, 1), 'after': round(self.after, 1),
                'delta_peak': round(self.peak - self.before, 1)}
