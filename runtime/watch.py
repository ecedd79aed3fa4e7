"""The line-camera loop: a capture thread reads frames into a small bounded queue, the calling
thread inspects them one at a time and emits one JSON-able dict per inspected frame.

- The capture thread reads every frame (so a camera's driver buffer never goes stale); a trigger
  decides which frames are queued for inspection: every Nth, or the next one after each
  ``trigger()`` call (SIGUSR1 in the CLI).
- When inspection is slower than the camera the queue drops its OLDEST frame (live sources), so
  what is inspected is always recent; finite sources (files, folders) wait instead by default.
- A source that fails or ends (live) is reopened with exponential backoff; the inspection loop
  never stops for it. ``request_stop()`` (SIGINT/SIGTERM in the CLI) ends the run with a summary.
- Overlays (``save_maps``) are named ``<run stamp>-frame-<index>-map.png``: the run stamp (UTC start time and
  a random suffix) keeps a later run into the same folder from overwriting the maps earlier lines point at.

The inspector is anything with ``inspect(rgb, **kw)`` returning an object with ``to_dict()``,
``verdict``, ``score`` and ``anomaly_map`` (Pipeline, or FakePipeline in tests).
"""
from __future__ import annotations

import collections
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .preprocess import ImageError
from .sources import Source

LATENCY_WINDOW = 10_000        # percentiles in the summary cover the most recent frames
MAX_CONSECUTIVE_FAILURES = 20  # inspector errors in a row before the loop gives up on it
POLL_S = 0.1                   # how often the inspection loop looks at the stop flag


class FrameQueue:
    """Bounded FIFO. Full: drop the oldest item (``drop_oldest``) or make ``put`` wait."""

    def __init__(self, maxsize: int, drop_oldest: bool):
        if maxsize < 1:
            raise ValueError("queue size must be at least 1")
        self.maxsize, self.drop_oldest = maxsize, drop_oldest
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def put(self, item, stop: threading.Event | None = None) -> bool:
        """False when the item was not queued (the queue was closed or ``stop`` was set while waiting)."""
        with self._cond:
            if self.drop_oldest:
                while len(self._items) >= self.maxsize:
                    self._items.popleft()
                    self.dropped += 1
            else:
                while len(self._items) >= self.maxsize and not self._closed and not (stop and stop.is_set()):
                    self._cond.wait(POLL_S)
                if len(self._items) >= self.maxsize:
                    return False
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float):
        """The oldest item, or None after ``timeout`` or once closed and empty (see ``finished``)."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._closed and not self._items

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Seconds to wait before reopening attempt ``attempt`` (1-based): initial, 2x, 4x ... capped."""
    return min(initial * 2.0 ** min(attempt - 1, 64), maximum)  # the cap on the exponent: no float overflow after days


def percentiles(values, qs=(50, 90)) -> dict:
    if not len(values):
        return {f'p{q}': None for q in qs} | {'max': None}
    a = np.asarray(values, np.float64)
    return {f'p{q}': round(float(np.percentile(a, q)), 3) for q in qs} | {'max': round(float(a.max()), 3)}


def _stderr(msg: str) -> None:
    print(f"anomalygpt-edge watch: {msg}", file=sys.stderr, flush=True)


class Watcher:
    def __init__(self, inspector, source: Source, emit: Callable[[dict], None], *, inspect_kwargs: dict | None = None,
                 every: int = 1, on_trigger: bool = False, queue_size: int = 2, drop_oldest: bool | None = None,
                 loop: bool = False, reconnect_delay: float = 0.5, reconnect_max_delay: float = 30.0,
                 max_retries: int = 0, max_frames: int | None = None, save_maps=None, threshold: float = 0.5,
                 log: Callable[[str], None] = _stderr, join_timeout: float = 3.0):
        if every < 1:
            raise ValueError("--every must be at least 1")
        if max_retries < 0:
            raise ValueError("--max-retries must be at least 0 (0 retries forever)")
        if max_frames is not None and max_frames < 1:
            raise ValueError("--max-frames must be at least 1")
        if reconnect_delay <= 0 or reconnect_max_delay < reconnect_delay:
            raise ValueError("reconnect delays must be positive and the maximum at least the initial delay")
        self.inspector, self.source, self.emit, self.log = inspector, source, emit, log
        self.kwargs = dict(inspect_kwargs or {})
        self.every, self.on_trigger, self.loop = every, on_trigger, loop
        self.queue = FrameQueue(queue_size, source.live if drop_oldest is None else drop_oldest)
        self.reconnect_delay, self.reconnect_max_delay, self.max_retries = reconnect_delay, reconnect_max_delay, max_retries
        self.max_frames = max_frames
        self.save_maps = Path(save_maps) if save_maps else None
        self.run_stamp = ''  # set by run(); names the overlays
        self.threshold, self.join_timeout = threshold, join_timeout
        # counters: each is written by one thread only
        self.frames_read = self.skipped = self.bad_frames = self.disconnects = self.reconnects = 0
        self.inspected = self.errors = self.anomalous = 0
        self.latency_ms: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
        self.end_to_end_ms: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
        self.stopped: str | None = None
        self.exit_code = 0
        self._failures = 0    # inspector errors in a row
        # Signal handlers only touch these plain attributes (taking a lock inside a handler can
        # deadlock against the interrupted main thread); the inspection loop turns them into events.
        self._stop_requested = False
        self._triggers_requested = 0
        self._triggers_served = 0
        self._stop = threading.Event()
        self._t0 = time.perf_counter()

    # -- control (safe from signal handlers and other threads) ---------------------------------
    def request_stop(self) -> None:
        self._stop_requested = True

    def trigger(self) -> None:
        """Inspect the next frame read (trigger mode)."""
        self._triggers_requested += 1

    # -- capture thread -----------------------------------------------------------------------
    def _selected(self, index: int) -> bool:
        if self.on_trigger:
            if self._triggers_requested > self._triggers_served:
                self._triggers_served += 1
                return True
            return False
        return index % self.every == 0

    def _finish(self, reason: str, code: int = 0) -> None:
        if self.stopped is None:
            self.stopped, self.exit_code = reason, code

    def _capture(self) -> None:
        src = self.source
        is_open = lost = False
        failures = 0          # consecutive failed opens/reads; reset by a good frame
        since_rewind = 0
        try:
            while not self._stop.is_set():
                if not is_open:
                    try:
                        src.open()
                        is_open = True
                        if lost:
                            self.reconnects += 1
                            self.log(f"{src.name}: reopened (reconnect {self.reconnects})")
                    except Exception as e:
                        if not src.live and not lost:
                            self._finish(f"source failed: {e}", 2)  # a file that never opened will not start to
                            return
                        if not self._backoff(failures := failures + 1, e, opened=lost):
                            return
                        continue
                try:
                    frame = src.read()
                except ImageError as e:
                    self.bad_frames += 1
                    self.log(f"skipping a bad frame: {e}")
                    continue
                except Exception as e:
                    frame, error = None, e
                else:
                    error = None
                if frame is None and error is None and not src.live:
                    if not (self.loop and since_rewind):
                        return  # the inspection loop says 'end of source' once it has inspected what is queued
                    try:
                        src.rewind()
                        since_rewind = 0
                        continue
                    except Exception as e:
                        error = e
                if frame is None:  # a live source ended or any source failed: reopen it
                    self.disconnects += 1
                    src.close()
                    is_open, lost = False, True
                    if not self._backoff(failures := failures + 1, error or f"{src.name}: stream ended"):
                        return
                    continue
                failures = 0
                since_rewind += 1
                index = self.frames_read
                self.frames_read += 1
                if not self._selected(index):
                    self.skipped += 1
                    continue
                self.queue.put((index, time.time(), time.perf_counter(), frame, src.current), self._stop)
        except Exception as e:  # a bug here must end the run visibly, not leave the loop waiting forever
            self._finish(f"capture failed: {type(e).__name__}: {e}", 1)
        finally:
            src.close()
            self.queue.close()

    def _backoff(self, attempt: int, error, opened: bool = True) -> bool:
        """Wait before retry ``attempt`` (the failures in a row so far); False once ``max_retries`` retries
        failed: exit code 2 for a source that never opened (bad input, as a missing file), 1 for one lost."""
        if self.max_retries and attempt > self.max_retries:
            retries = f"{self.max_retries} {'retry' if self.max_retries == 1 else 'retries'}"
            self.log(f"{error}; giving up after {retries}")
            if opened:
                self._finish(f"source lost: {error}", 1)
            else:
                self._finish(f"source failed: {error} (never opened; {retries})", 2)
            return False
        delay = backoff_delay(attempt, self.reconnect_delay, self.reconnect_max_delay)
        of = f" of {self.max_retries}" if self.max_retries else ''
        self.log(f"{error}; reopening in {delay:.2f} s (retry {attempt}{of})")
        self._stop.wait(delay)
        return not self._stop.is_set()

    # -- inspection loop (the calling thread) -------------------------------------------------
    def _inspect(self, item) -> None:
        index, wall, t_cap, rgb, label = item
        t0 = time.perf_counter()
        try:
            res = self.inspector.inspect(rgb, **self.kwargs)
        except Exception as e:
            self.errors += 1
            self._failures += 1
            self.log(f"frame {index}: inspection failed: {type(e).__name__}: {e}")
            if self._failures >= MAX_CONSECUTIVE_FAILURES:
                self._finish(f"inspector failing ({self._failures} frames in a row): {e}", 1)
            return
        self._failures = 0
        t1 = time.perf_counter()
        self.inspected += 1
        self.latency_ms.append((t1 - t0) * 1e3)
        self.end_to_end_ms.append((t1 - t_cap) * 1e3)
        d = res.to_dict()
        d.pop('image', None)
        line = {'type': 'frame', 'ts': datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec='milliseconds'),
                'frame': index, 'source': self.source.name, **({'image': label} if label else {}), **d,
                'latency_ms': {'queue': round((t0 - t_cap) * 1e3, 3), 'inspect': round((t1 - t0) * 1e3, 3),
                               'end_to_end': round((t1 - t_cap) * 1e3, 3)},
                'drops': self.queue.dropped}
        anomalous = res.verdict == 'yes' if res.verdict is not None else res.score >= self.threshold
        line['anomalous'] = bool(anomalous)
        if anomalous:
            self.anomalous += 1
            if self.save_maps is not None:
                line['map'] = self._save_map(index, rgb, res)
        self.emit(line)

    def _save_map(self, index: int, rgb, res) -> str | None:
        from .overlay import overlay, write_png
        try:
            return str(write_png(self.save_maps / f'{self.run_stamp}-frame-{index:08d}-map.png',
                                 overlay(rgb, res.anomaly_map, grid=res.token_grid, regions=res.regions)))
        except (OSError, ValueError) as e:
            self.errors += 1
            self.log(f"frame {index}: overlay not saved: {e}")
            return None

    def run(self) -> dict:
        """Run until the source ends, a stop is requested, max_frames are inspected or the source is
        lost for good. Emits and returns the summary; ``exit_code`` says how it ended."""
        self._t0 = time.perf_counter()
        self.run_stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        thread = threading.Thread(target=self._capture, name='capture', daemon=True)
        thread.start()
        try:
            while True:
                if self._stop_requested:
                    self._finish('stop requested')
                    break
                if self.stopped is not None and self.exit_code != 0:
                    break  # inspector failing / source lost: stop now
                item = self.queue.get(POLL_S)
                if item is None:
                    if self.queue.finished:
                        break
                    continue
                self._inspect(item)
                if self.max_frames and self.inspected >= self.max_frames:
                    self._finish('max frames')
                    break
        except OSError as e:  # the output went away (closed pipe, full disk)
            self._finish(f"output failed: {e}", 1)
        finally:
            self._stop.set()
            self.queue.close()
            thread.join(self.join_timeout)  # a camera read can block; the thread is a daemon
        self._finish('end of source')
        summary = self.summary()
        try:
            self.emit(summary)
        except OSError as e:
            self.log(f"summary not written: {e}")
        return summary

    def summary(self) -> dict:
        elapsed = time.perf_counter() - self._t0
        return {'type': 'summary', 'stopped': self.stopped, 'source': self.source.name,
                'frames_read': self.frames_read, 'inspected': self.inspected, 'dropped': self.queue.dropped,
                'skipped': self.skipped, 'pending': len(self.queue), 'bad_frames': self.bad_frames,
                'errors': self.errors, 'anomalous': self.anomalous, 'disconnects': self.disconnects,
                'reconnects': self.reconnects, 'latency_ms': percentiles(self.latency_ms),
                'end_to_end_ms': percentiles(self.end_to_end_ms), 'elapsed_s': round(elapsed, 3),
                'inspected_per_s': round(self.inspected / elapsed, 3) if elapsed > 0 else None}
