"""Soak test of the line-camera runtime: many frames through the watch loop, a source that drops out
every few hundred frames, and a corpus of bad inputs through the HTTP service. Prints a JSON report.

  python -m anomalygpt_edge.benchmarks.soak --bundle DIR [--frames 2000] [--no-llm]
  python -m anomalygpt_edge.benchmarks.soak --fake --frames 2000      # no bundle, seconds

Pass criteria: resident memory grows at most --max-growth-pct from after warm-up to the last frame;
the last 10 % of frames' median latency is at most --max-drift times the first 10 %'s (bundles only);
every drop-out is followed by a reconnect; the loop inspects every frame it is asked to; each bad
input gets its expected 4xx and the service still answers a good image afterwards.
Exit code 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import cv2
import numpy as np

from anomalygpt_edge.runtime.sources import Source, SourceError


class DroppingSource(Source):
    """A synthetic live camera: new frames of a product on a belt, a defect now and then, and a
    disconnect after every ``drop_every`` frames (the next read raises; a reopen continues)."""
    live = True
    name = 'synthetic camera'

    def __init__(self, drop_every: int = 300, size=(320, 240), fps: float = 0.0, defect_every: int = 50, seed: int = 0):
        self.drop_every, self.size, self.fps, self.defect_every = drop_every, size, fps, defect_every
        self.rng = np.random.default_rng(seed)
        self.produced = 0
        self.drops = 0
        self._open = False
        self._next_t = 0.0

    def open(self) -> None:
        self._open = True

    def read(self) -> np.ndarray:
        if not self._open:
            raise SourceError(f"{self.name}: read before open")
        if self.drop_every and self.produced and self.produced % self.drop_every == 0 and self.drops < self.produced // self.drop_every:
            self.drops += 1
            self._open = False
            raise SourceError(f"{self.name}: connection lost (simulated, after frame {self.produced})")
        if self.fps:
            now = time.perf_counter()
            time.sleep(max(0.0, self._next_t - now))
            self._next_t = max(now, self._next_t) + 1.0 / self.fps
        w, h = self.size
        frame = self.rng.integers(30, 90, (h, w, 3), dtype=np.uint8)
        if self.defect_every and self.produced % self.defect_every == 0:
            x, y = self.rng.integers(0, w - 20), self.rng.integers(0, h - 20)
            frame[y:y + 20, x:x + 20] = 255
        self.produced += 1
        return frame

    def close(self) -> None:
        self._open = False


def rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def machine() -> dict:
    import psutil
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), cpu)
    except OSError:
        pass
    return {'cpu': cpu, 'cores': os.cpu_count(), 'memory_gb': round(psutil.virtual_memory().total / 2**30, 1),
            'python': platform.python_version(), 'platform': platform.platform()}


def soak_watch(pipe, frames: int, drop_every: int, warmup: int, fps: float, queue_size: int, llm: bool) -> dict:
    from anomalygpt_edge.runtime.watch import Watcher, percentiles
    source = DroppingSource(drop_every=drop_every, fps=fps)
    latencies: list[float] = []
    rss = {'before': rss_bytes(), 'samples': []}

    def emit(line: dict) -> None:
        if line['type'] != 'frame':
            return
        latencies.append(line['latency_ms']['inspect'])
        n = len(latencies)
        if n == warmup:
            rss['start'] = rss_bytes()
        if n % 100 == 0:
            rss['samples'].append([n, rss_bytes()])
        if n == frames:
            rss['end'] = rss_bytes()

    messages: list[str] = []
    watcher = Watcher(pipe, source, emit, inspect_kwargs={'llm': llm}, queue_size=queue_size,
                      drop_oldest=bool(fps), reconnect_delay=0.01, reconnect_max_delay=0.05, max_frames=frames,
                      log=messages.append)
    summary = watcher.run()
    rss['after_run'] = rss_bytes()
    rss.setdefault('start', rss['before'])
    rss.setdefault('end', rss['after_run'])
    tenth = max(1, len(latencies) // 10)
    first, last = percentiles(latencies[:tenth])['p50'], percentiles(latencies[-tenth:])['p50']
    # the last drop-out may come after the final inspected frame was read
    expected = (source.produced - 1) // drop_every if drop_every else 0
    return {'summary': summary, 'frames_produced': source.produced, 'dropouts': source.drops,
            'expected_dropouts_at_least': expected, 'log_lines': len(messages),
            'rss_mb': {'before_warmup': round(rss['before'] / 2**20, 2), 'start': round(rss['start'] / 2**20, 2),
                       'end': round(rss['end'] / 2**20, 2), 'after_run': round(rss['after_run'] / 2**20, 2),
                       'growth_pct': round((rss['end'] - rss['start']) / rss['start'] * 100, 3),
                       'samples': [[n, round(b / 2**20, 2)] for n, b in rss['samples']]},
            'latency_drift': {'first_10pct_p50_ms': first, 'last_10pct_p50_ms': last,
                              'ratio': round(last / first, 4) if first else None}}


def _png(img) -> bytes:
    return cv2.imencode('.png', img)[1].tobytes()


def bad_inputs(max_upload: int) -> list[tuple[str, dict, int]]:
    """(name, multipart request kwargs, expected status)."""
    rng = np.random.default_rng(1)
    good = _png(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    jpeg = cv2.imencode('.jpg', rng.integers(0, 255, (96, 128), dtype=np.uint8))[1].tobytes()
    img16 = _png((rng.integers(0, 65535, (64, 64), dtype=np.uint16)))

    def files(data, name='part.png', **extra):
        return {'files': [('image', (name, data, 'application/octet-stream'))] + extra.pop('more', []), 'data': extra}

    return [
        ('good png', files(good), 200),
        ('empty file', files(b''), 422),
        ('truncated jpeg', files(jpeg[:len(jpeg) // 2], 'part.jpg'), 422),
        ('truncated png', files(good[:len(good) // 2]), 422),
        ('random bytes', files(rng.bytes(5000), 'part.bin'), 422),
        ('text named .png', files(b'this is not an image\n' * 10), 422),
        ('4x4 image', files(_png(np.zeros((4, 4, 3), np.uint8))), 422),
        ('16-bit grey png', files(img16), 200),
        ('grey jpeg', files(jpeg, 'part.jpg'), 200),
        ('unknown class', files(good, **{'class': 'no-such-class'}), 400),
        ('no image field', {'data': {'question': 'anything?'}, 'files': [('other', ('x.png', good, 'image/png'))]}, 422),
        ('oversized upload', files(b'\0' * (max_upload + 1)), 413),
        ('bad reference image', files(good, more=[('reference', ('ref.png', b'\x89PNG\r\n\x1a\n', 'image/png'))]), 422),
        ('good png after all that', files(good, heatmap='true'), 200),
    ]


def soak_serve(pipe, llm: bool, max_upload: int = 256 * 1024) -> dict:
    import httpx
    from anomalygpt_edge.runtime.serve import BackgroundServer, create_app
    app = create_app(pipe, max_upload_bytes=max_upload, llm=llm)
    cases = []
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        for name, req, want in bad_inputs(max_upload):
            try:
                r = client.post('/inspect', **req)
                got, detail = r.status_code, (r.json().get('detail') if r.status_code != 200 else None)
            except httpx.HTTPError as e:
                got, detail = None, f"{type(e).__name__}: {e}"
            cases.append({'input': name, 'expected': want, 'status': got, 'pass': got == want,
                          **({'detail': detail if isinstance(detail, str) else json.dumps(detail)[:200]}
                             if detail else {})})
        health = client.get('/health').json()
        metrics = client.get('/metrics').json()
    return {'cases': cases, 'health_ok': health.get('ok'), 'metrics': metrics['requests']}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m anomalygpt_edge.benchmarks.soak', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument('--bundle', help='bundle directory')
    what.add_argument('--fake', action='store_true', help='a bundle-free stand-in pipeline (quick runs)')
    p.add_argument('--fake-delay', type=float, default=0.002, help='seconds per fake inspection (default: %(default)s)')
    p.add_argument('--frames', type=int, default=2000, help='frames to inspect (default: %(default)s)')
    p.add_argument('--drop-every', type=int, default=300, help='the source disconnects after every N frames (default: %(default)s)')
    p.add_argument('--warmup', type=int, default=50, help='frames before the starting RSS is taken (default: %(default)s)')
    p.add_argument('--fps', type=float, default=0.0, help='pace the source like a camera and drop the oldest frames '
                   '(default: unpaced, every frame inspected)')
    p.add_argument('--queue-size', type=int, default=2)
    p.add_argument('--max-growth-pct', type=float, default=2.0, help='allowed RSS growth from after warm-up to the '
                   'last frame (default: %(default)s)')
    p.add_argument('--max-drift', type=float, default=1.25, help='allowed ratio of the last to the first 10%% p50 '
                   'latency; not judged with --fake, whose latency is a sleep (default: %(default)s)')
    p.add_argument('--no-llm', action='store_true', help='vision only')
    p.add_argument('--threads', type=int, help='CPU threads for ONNX Runtime and llama.cpp')
    p.add_argument('--no-serve', action='store_true', help='skip the bad-input corpus through the HTTP service')
    p.add_argument('--out', help='also write the report to this file')
    args = p.parse_args(argv)
    if args.frames <= args.warmup:
        p.error('--frames must be larger than --warmup')

    if args.fake:
        from anomalygpt_edge.runtime.fake import FakePipeline
        pipe = FakePipeline(delay=args.fake_delay)
    else:
        from anomalygpt_edge.runtime.pipeline import Pipeline
        pipe = Pipeline.from_bundle(args.bundle, llm=not args.no_llm, threads=args.threads)
    t0 = time.perf_counter()
    with pipe:
        watch = soak_watch(pipe, args.frames, args.drop_every, args.warmup, args.fps, args.queue_size, not args.no_llm)
        serve = None if args.no_serve else soak_serve(pipe, not args.no_llm)
    s = watch['summary']
    checks = {
        'rss_growth': watch['rss_mb']['growth_pct'] <= args.max_growth_pct,
        'all_frames_inspected': s['inspected'] == args.frames and s['stopped'] == 'max frames',
        'reconnected_after_every_dropout': (watch['dropouts'] >= watch['expected_dropouts_at_least']
                                            and s['reconnects'] == watch['dropouts']),
        'no_inspection_errors': s['errors'] == 0,
    }
    if not args.fake:
        checks['latency_drift'] = (watch['latency_drift']['ratio'] or 0) <= args.max_drift
    if serve is not None:
        checks['bad_inputs_rejected_and_still_serving'] = all(c['pass'] for c in serve['cases']) and serve['health_ok']
    report = {'benchmark': 'soak', 'pipeline': 'fake' if args.fake else args.bundle, 'machine': machine(),
              'config': {k: v for k, v in vars(args).items() if k not in ('out',)},
              'watch': watch, 'serve': serve, 'checks': checks, 'pass': all(checks.values()),
              'wall_s': round(time.perf_counter() - t0, 2)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        tmp = args.out + '.partial'
        with open(tmp, 'w') as f:
            f.write(text + '\n')
        os.replace(tmp, args.out)
    return 0 if report['pass'] else 1


if __name__ == '__main__':
    sys.exit(main())
