"""Watch a line camera, video, stream or image folder and inspect its frames with a bundle.

One JSON line per inspected frame (timestamp, frame index, verdict, score, locations, regions, answer,
latencies, frames dropped so far) on stdout or appended to --out; overlays of anomalous frames
with --save-maps. SIGINT/SIGTERM stop cleanly with a final summary line (exit code 0).

SRC is one of:
  0, 1 ...            camera index (or /dev/video0)
  line.mp4            a video file (finite: the run ends with it, unless --loop)
  rtsp://host/stream  an RTSP/HTTP stream (FFmpeg)
  frames/             a folder of images, in name order (finite)
  '... ! appsink'     a GStreamer pipeline; a Jetson CSI camera, for example:
      'nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1
       ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR
       ! appsink drop=true max-buffers=1'
      (needs an OpenCV built with GStreamer, e.g. JetPack's; pip's opencv-python-headless is not)

Frames are read continuously; which ones are inspected: every Nth (--every N), or with --on-signal
only the next frame after each SIGUSR1 (`kill -USR1 <pid>`, e.g. from a PLC's part-present
signal). When inspection is slower than a live source, the oldest waiting frame is dropped.
A live source that fails or disconnects is reopened with exponential backoff.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from ..arguments import map_level, non_negative_int, positive_int
from .cli_options import (add_backend_arguments, add_bundle_argument, add_question_arguments, few_shot_memory,
                          open_pipeline)


def add_arguments(p) -> None:
    p.add_argument('--source', required=True, metavar='SRC', help='camera index, video file, stream URL, image '
                   'folder or GStreamer pipeline (see above)')
    add_bundle_argument(p)
    add_question_arguments(p)
    trig = p.add_mutually_exclusive_group()
    trig.add_argument('--every', type=positive_int, default=1, metavar='N',
                      help='inspect every Nth frame (default: %(default)s)')
    trig.add_argument('--on-signal', action='store_true', help='inspect the next frame after each SIGUSR1 only')
    p.add_argument('--out', metavar='FILE', help='append the JSON lines to FILE (flushed per line) instead of stdout')
    p.add_argument('--save-maps', metavar='DIR', help='write heatmap overlays of anomalous frames here (made if '
                   'missing), as <UTC start time>-<random>-frame-<index>-map.png, so runs never overwrite each other')
    p.add_argument('--threshold', type=map_level, default=0.5,
                   help='map level for location regions, and for "anomalous" with --no-llm, in (0, 1] '
                        '(default: %(default)s)')
    p.add_argument('--queue-size', type=positive_int, default=2,
                   help='frames waiting for inspection (default: %(default)s)')
    p.add_argument('--overflow', choices=('auto', 'drop-oldest', 'wait'), default='auto',
                   help='when the queue is full: drop the oldest frame, or make the reader wait '
                        '(auto: drop for live sources, wait for files and folders)')
    p.add_argument('--loop', action='store_true', help='replay a video file or folder forever')
    p.add_argument('--max-frames', type=positive_int, metavar='N',
                   help='stop after N inspected frames (default: no limit)')
    p.add_argument('--reconnect-delay', type=float, default=0.5, metavar='S',
                   help='first wait before reopening a failed source; doubles per failure (default: %(default)s)')
    p.add_argument('--reconnect-max-delay', type=float, default=30.0, metavar='S',
                   help='longest wait between reopen attempts (default: %(default)s)')
    p.add_argument('--max-retries', type=non_negative_int, default=0, metavar='N',
                   help='reopen a failed source at most N times in a row, then give up (exit 2 when it never '
                        'opened, 1 when it was lost); 0 retries forever (default: %(default)s)')
    add_backend_arguments(p)


class JsonLines:
    """One JSON object per line on stdout or appended to a file, flushed per line."""

    def __init__(self, path=None):
        self.f = open(path, 'a', encoding='utf-8') if path else sys.stdout
        self.owned = bool(path)

    def __call__(self, obj: dict) -> None:
        self.f.write(json.dumps(obj) + '\n')
        self.f.flush()

    def close(self) -> None:
        if self.owned:
            self.f.close()


def build_pipeline(args):
    """-> pipeline, or raises BundleError/OSError. Shared with serve."""
    if args.fake_pipeline is not None:
        from .fake import FakePipeline
        return FakePipeline(delay=args.fake_pipeline)
    if not args.bundle:
        raise ValueError("--bundle is required")
    return open_pipeline(args)


def install_signals(watcher) -> dict:
    """SIGINT/SIGTERM: stop cleanly (a second one acts as usual); SIGUSR1: trigger. -> previous handlers."""
    previous = {}

    def stop(signum, _frame):
        watcher.request_stop()
        for s, h in previous.items():
            if s != getattr(signal, 'SIGUSR1', None):
                signal.signal(s, h)

    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.signal(s, stop)
    if watcher.on_trigger and hasattr(signal, 'SIGUSR1'):
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda *_: watcher.trigger())
    return previous


def run(args) -> int:
    from .bundle import BundleError
    from .preprocess import ImageError
    from .sources import SourceError, open_source
    from .watch import Watcher

    def fail(msg):
        print(f"anomalygpt-edge watch: {msg}", file=sys.stderr)
        return 2

    try:
        source = open_source(args.source)
    except SourceError as e:
        return fail(e)
    if args.save_maps:
        try:
            Path(args.save_maps).mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:
            return fail(f"--save-maps {args.save_maps}: {e.filename} is a file, not a folder")
        except OSError as e:
            return fail(f"--save-maps {args.save_maps}: the folder cannot be made ({e.strerror}: {e.filename})")
    try:
        pipe = build_pipeline(args)
    except (BundleError, OSError, ValueError) as e:
        return fail(e)
    try:
        try:
            memory = few_shot_memory(pipe, args, warn=lambda m: print(f"anomalygpt-edge watch: warning: {m}",
                                                                      file=sys.stderr))
        except (ImageError, BundleError, KeyError, ValueError) as e:
            return fail(e.args[0] if isinstance(e, KeyError) else e)
        kwargs = dict(class_name=args.class_name, describe=args.describe, question=args.question, memory=memory,
                      llm=not args.no_llm, verdict_first=args.verdict_first, threshold=args.threshold)
        try:
            out = JsonLines(args.out)
        except OSError as e:
            return fail(f"{args.out}: cannot be opened for appending ({e.strerror})")
        try:
            watcher = Watcher(pipe, source, out, inspect_kwargs=kwargs, every=args.every, on_trigger=args.on_signal,
                              queue_size=args.queue_size,
                              drop_oldest=None if args.overflow == 'auto' else args.overflow == 'drop-oldest',
                              loop=args.loop, reconnect_delay=args.reconnect_delay,
                              reconnect_max_delay=args.reconnect_max_delay, max_retries=args.max_retries,
                              max_frames=args.max_frames, save_maps=args.save_maps, threshold=args.threshold)
        except ValueError as e:
            out.close()
            return fail(e)
        previous = install_signals(watcher)
        trigger = f"SIGUSR1 (kill -USR1 {os.getpid()})" if args.on_signal else f"every {args.every} frame(s)"
        print(f"anomalygpt-edge watch: watching {source.name}; inspecting {trigger}; "
              f"SIGINT/SIGTERM stop with a summary", file=sys.stderr, flush=True)
        try:
            watcher.run()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            out.close()
        return watcher.exit_code
    finally:
        pipe.close()
