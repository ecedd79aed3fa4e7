"""The watch loop: one JSON line per inspected frame, triggers, drop-oldest under a slow inspector,
reopening failed sources with backoff, and clean stops with a summary (also as a subprocess)."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from anomalygpt_edge.cli import main
from anomalygpt_edge.runtime.fake import FakePipeline
from anomalygpt_edge.runtime.sources import Source, SourceError
from anomalygpt_edge.runtime.watch import FrameQueue, Watcher, backoff_delay

# Set to a bundle directory to run the subprocess test against the real pipeline (vision only).
REAL_BUNDLE = os.environ.get('ANOMALYGPT_EDGE_TEST_BUNDLE')


def frame(value: int, defect: bool = False) -> np.ndarray:
    f = np.full((32, 32, 3), value, np.uint8)
    if defect:
        f[2:12, 20:30] = 255
    return f


class ListSource(Source):
    """Frames whose first pixel is their index; ``fail_at`` = {frame index: times reading it fails}."""

    def __init__(self, n, live=False, fail_at=None, fail_opens=0, on_read=None):
        self.n, self.live, self.name = n, live, 'list source'
        self.fail_at = dict(fail_at or {})
        self.fail_opens = fail_opens
        self.on_read = on_read
        self.pos = 0
        self.opens = 0
        self.is_open = False
        self.exhausted = threading.Event()

    def open(self):
        self.opens += 1
        if self.opens > 1 and self.fail_opens:
            self.fail_opens -= 1
            raise SourceError(f"{self.name}: camera not answering")
        self.is_open = True

    def read(self):
        assert self.is_open, "read on a closed source"
        if self.fail_at.get(self.pos):
            self.fail_at[self.pos] -= 1
            raise SourceError(f"{self.name}: connection reset at frame {self.pos}")
        if self.pos >= self.n:
            self.exhausted.set()
            return None
        if self.on_read:
            self.on_read(self.pos)
        self.pos += 1
        return frame(self.pos - 1)

    def close(self):
        self.is_open = False


class Recorder:
    def __init__(self):
        self.lines = []

    def __call__(self, line):
        json.dumps(line)  # every line must be JSON-serialisable
        self.lines.append(line)

    @property
    def frames(self):
        return [ln['frame'] for ln in self.lines if ln['type'] == 'frame']


def test_frame_queue_drops_the_oldest():
    q = FrameQueue(2, drop_oldest=True)
    for i in range(5):
        assert q.put(i)
    assert q.dropped == 3 and [q.get(0), q.get(0)] == [3, 4] and q.get(0) is None
    q.close()
    assert q.finished and not q.put(9)


def test_frame_queue_wait_mode_blocks_until_space():
    q = FrameQueue(1, drop_oldest=False)
    q.put('a')
    done = threading.Event()
    t = threading.Thread(target=lambda: (q.put('b'), done.set()))
    t.start()
    assert not done.wait(0.3), "put must wait while the queue is full"
    assert q.get(1) == 'a'
    assert done.wait(2) and q.get(1) == 'b' and q.dropped == 0
    t.join(2)


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_delay(k, 0.5, 3.0) for k in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(100_000, 0.5, 30.0) == 30.0  # a camera unplugged for days


def test_slow_inspector_drops_the_oldest_frames():
    started = threading.Event()
    src = ListSource(10, on_read=lambda i: i == 1 and started.wait(5))

    class Gated(FakePipeline):
        def inspect(self, image, **kw):
            if self.calls == 0:
                started.set()
                assert src.exhausted.wait(5)  # the camera runs ahead while the first frame is inspected
            return super().inspect(image, **kw)

    out = Recorder()
    w = Watcher(Gated(), src, out, queue_size=2, drop_oldest=True, log=lambda m: None)
    s = w.run()
    assert out.frames == [0, 8, 9], "the newest frames are kept, the oldest dropped"
    assert s['dropped'] == 7 and s['frames_read'] == 10 and s['inspected'] == 3
    assert [ln['drops'] for ln in out.lines if ln['type'] == 'frame'] == [7, 7, 7]
    assert out.lines[-1]['type'] == 'summary' and s['stopped'] == 'end of source' and w.exit_code == 0


def test_finite_source_waits_instead_of_dropping_by_default():
    out = Recorder()
    s = Watcher(FakePipeline(delay=0.005), ListSource(15), out, queue_size=1, log=lambda m: None).run()
    assert out.frames == list(range(15)) and s['dropped'] == 0


def test_failing_source_is_reopened_with_backoff_and_nothing_is_lost():
    src = ListSource(1000, live=True, fail_at={4: 1, 7: 1}, fail_opens=1)
    out, log = Recorder(), []
    w = Watcher(FakePipeline(), src, out, drop_oldest=False, reconnect_delay=0.01, reconnect_max_delay=0.04,
                max_frames=10, log=log.append)
    t0 = time.monotonic()
    s = w.run()
    assert time.monotonic() - t0 < 5
    assert out.frames == list(range(10))
    assert s['disconnects'] == 2 and s['reconnects'] == 2 and s['stopped'] == 'max frames' and w.exit_code == 0
    waits = [m for m in log if 'reopening in' in m]
    # frame 4 fails (wait 0.01), the reopen fails once (0.02), frame 7 fails after good frames (0.01 again)
    assert [m.split('reopening in ')[1].split(' s')[0] for m in waits] == ['0.01', '0.02', '0.01']
    assert all('list source' in m for m in waits)


def test_max_frames_is_the_reason_even_when_the_source_ended_first():
    src = ListSource(3)

    class WaitsForTheSourceToEnd(FakePipeline):
        def inspect(self, image, **kw):
            assert src.exhausted.wait(5)
            deadline = time.monotonic() + 5
            while src.is_open:  # closed once the capture thread is done
                assert time.monotonic() < deadline
                time.sleep(0.005)
            return super().inspect(image, **kw)
    s = Watcher(WaitsForTheSourceToEnd(), src, Recorder(), queue_size=3, max_frames=1, log=lambda m: None).run()
    assert s['stopped'] == 'max frames' and s['inspected'] == 1 and s['pending'] == 2


def test_live_source_lost_for_good_gives_up_after_max_retries():
    src = ListSource(3, live=True, fail_at={2: 1}, fail_opens=100)
    out = Recorder()
    w = Watcher(FakePipeline(), src, out, reconnect_delay=0.01, reconnect_max_delay=0.02, max_retries=3,
                log=lambda m: None)
    s = w.run()
    assert out.frames == [0, 1] and s['stopped'].startswith('source lost') and w.exit_code == 1
    assert src.opens == 1 + 3


def test_max_retries_counts_the_reopens_and_a_source_that_never_opened_is_bad_input():
    class NeverOpens(ListSource):
        def open(self):
            self.opens += 1
            raise SourceError(f"{self.name}: cannot be opened (no such camera, or it is in use)")
    src, log = NeverOpens(3, live=True), []
    w = Watcher(FakePipeline(), src, Recorder(), reconnect_delay=0.01, reconnect_max_delay=0.02, max_retries=2,
                log=log.append)
    s = w.run()
    assert src.opens == 1 + 2 and log[-1].endswith('giving up after 2 retries'), log
    assert [m.split('(')[-1] for m in log[:-1]] == ['retry 1 of 2)', 'retry 2 of 2)']
    assert w.exit_code == 2 and s['stopped'].startswith('source failed: list source: cannot be opened')


def test_finite_source_that_never_opens_fails_at_once():
    class Unopenable(ListSource):
        def open(self):
            raise SourceError("line.avi: cannot be opened")
    w = Watcher(FakePipeline(), Unopenable(3), Recorder(), log=lambda m: None)
    s = w.run()
    assert w.exit_code == 2 and 'line.avi: cannot be opened' in s['stopped']


def test_inspector_error_on_one_frame_does_not_stop_the_loop():
    class FailsOnFrame2(FakePipeline):
        def inspect(self, image, **kw):
            if image[0, 0, 0] == 2:
                raise RuntimeError("onnxruntime: bad luck")
            return super().inspect(image, **kw)
    out, log = Recorder(), []
    s = Watcher(FailsOnFrame2(), ListSource(5), out, log=log.append).run()
    assert out.frames == [0, 1, 3, 4] and s['errors'] == 1 and any('frame 2' in m for m in log)


def test_trigger_mode_inspects_only_the_frame_after_each_trigger():
    w_box = {}
    src = ListSource(10, on_read=lambda i: w_box['w'].trigger() if i in (3, 7) else None)
    out = Recorder()
    w_box['w'] = w = Watcher(FakePipeline(), src, out, on_trigger=True, log=lambda m: None)
    s = w.run()
    assert out.frames == [3, 7] and s['skipped'] == 8 and s['frames_read'] == 10


def test_request_stop_from_another_thread_ends_with_summary():
    src = ListSource(10**9, live=True)
    out = Recorder()
    w = Watcher(FakePipeline(delay=0.002), src, out, log=lambda m: None)
    threading.Timer(0.3, w.request_stop).start()
    s = w.run()
    assert s['stopped'] == 'stop requested' and w.exit_code == 0 and s['inspected'] > 0
    assert s['latency_ms']['p50'] is not None and s['latency_ms']['p90'] >= s['latency_ms']['p50']


# -- the CLI ----------------------------------------------------------------------------------

def write_video(path, n):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), 10, (64, 48))
    for i in range(n):
        w.write(np.full((48, 64, 3), 40, np.uint8))
    w.release()
    return path


def parse(text):
    lines = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    return [ln for ln in lines if ln['type'] == 'frame'], lines[-1]


def test_cli_video_file_one_line_per_frame(tmp_path, capsys):
    video = write_video(tmp_path / 'line.avi', 12)
    assert main(['watch', '--fake-pipeline', '0', '--source', str(video)]) == 0
    frames, summary = parse(capsys.readouterr().out)
    assert [f['frame'] for f in frames] == list(range(12))
    f = frames[0]
    assert {'ts', 'frame', 'verdict', 'score', 'locations', 'regions', 'answer', 'latency_ms', 'drops'} <= set(f)
    assert f['verdict'] == 'no' and f['answer'].startswith('No') and f['drops'] == 0
    assert summary['type'] == 'summary' and summary['frames_read'] == 12 and summary['inspected'] == 12


def test_cli_every_n(tmp_path, capsys):
    video = write_video(tmp_path / 'line.avi', 12)
    assert main(['watch', '--fake-pipeline', '0', '--source', str(video), '--every', '5']) == 0
    frames, summary = parse(capsys.readouterr().out)
    assert [f['frame'] for f in frames] == [0, 5, 10] and summary['skipped'] == 9


def test_cli_folder_out_file_and_overlays_for_anomalous_frames_only(tmp_path, capsys):
    imgs = tmp_path / 'imgs'
    imgs.mkdir()
    for i in range(6):
        cv2.imwrite(str(imgs / f'{i:02d}.png'), frame(40, defect=i in (1, 4)))
    out = tmp_path / 'results.jsonl'
    out.write_text('{"type": "earlier run"}\n')
    maps = tmp_path / 'maps'
    assert main(['watch', '--fake-pipeline', '0', '--source', str(imgs), '--out', str(out),
                 '--save-maps', str(maps)]) == 0
    assert capsys.readouterr().out == ''
    lines = out.read_text().splitlines()
    assert json.loads(lines[0]) == {'type': 'earlier run'}, "--out appends"
    frames, summary = parse('\n'.join(lines[1:]))
    assert [f['anomalous'] for f in frames] == [False, True, False, False, True, False]
    assert frames[1]['image'].endswith('01.png') and frames[1]['locations'] == ['top right']
    names = sorted(p.name for p in maps.iterdir())
    assert [n[n.index('-frame-'):] for n in names] == ['-frame-00000001-map.png', '-frame-00000004-map.png']
    assert [os.path.basename(f['map']) for f in frames if 'map' in f] == names
    assert cv2.imread(frames[4]['map']).shape == (32, 32, 3)
    assert summary['anomalous'] == 2


def test_cli_a_second_run_into_the_same_maps_folder_keeps_the_first_runs_maps(tmp_path, capsys):
    imgs, maps, out = tmp_path / 'imgs', tmp_path / 'maps', tmp_path / 'results.jsonl'
    imgs.mkdir()
    cv2.imwrite(str(imgs / 'a.png'), frame(40, defect=True))
    for _ in range(2):
        assert main(['watch', '--fake-pipeline', '0', '--source', str(imgs), '--out', str(out),
                     '--save-maps', str(maps)]) == 0
    paths = [json.loads(ln)['map'] for ln in out.read_text().splitlines() if '"frame"' in ln]
    assert len(set(paths)) == 2 and sorted(map(str, maps.iterdir())) == sorted(paths)
    assert all(os.path.basename(p)[:8].isdigit() and 'Z-' in p for p in paths)  # UTC start time first


def test_cli_save_maps_in_place_of_a_file_is_refused_before_the_run(tmp_path, capsys):
    (tmp_path / 'maps').write_text('a file, not a folder')
    cv2.imwrite(str(tmp_path / 'a.png'), frame(40, defect=True))
    assert main(['watch', '--fake-pipeline', '0', '--source', str(tmp_path / 'a.png'),
                 '--save-maps', str(tmp_path / 'maps')]) == 2
    out, err = capsys.readouterr()
    assert out == '' and f"--save-maps {tmp_path / 'maps'}: {tmp_path / 'maps'} is a file, not a folder" in err


@pytest.mark.parametrize('option', [('--max-retries', '-1'), ('--max-frames', '0'), ('--max-frames', '-1'),
                                    ('--every', '0'), ('--queue-size', '0')])
def test_cli_out_of_range_counts_are_refused_at_parse_time(option, tmp_path, capsys):
    cv2.imwrite(str(tmp_path / 'a.png'), frame(40))
    with pytest.raises(SystemExit) as e:
        main(['watch', '--fake-pipeline', '0', '--source', str(tmp_path / 'a.png'), *option])
    assert e.value.code == 2 and f'argument {option[0]}' in capsys.readouterr().err


def test_cli_unknown_class_and_missing_source(tmp_path, capsys):
    assert main(['watch', '--fake-pipeline', '0', '--source', str(tmp_path), '--class', 'nope']) == 2
    assert "unknown class 'nope'" in capsys.readouterr().err
    assert main(['watch', '--fake-pipeline', '0', '--source', str(tmp_path / 'gone.mp4')]) == 2
    assert 'gone.mp4: no such file' in capsys.readouterr().err


def test_help_documents_the_jetson_csi_pipeline(capsys):
    with pytest.raises(SystemExit):
        main(['watch', '--help'])
    assert 'nvarguscamerasrc' in capsys.readouterr().out


def test_bundle_is_shown_as_required_and_checked_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(['watch', '--help'])
    usage = capsys.readouterr().out.split('\n\n')[0]
    assert ' --bundle BUNDLE' in usage and '[--bundle BUNDLE]' not in usage and 'fake' not in usage
    with pytest.raises(SystemExit) as e:
        main(['watch', '--source', '0'])
    assert e.value.code == 2 and '--bundle' in capsys.readouterr().err


# -- as a process: signals --------------------------------------------------------------------

class Proc:
    """A watch subprocess whose stdout/stderr lines arrive on queues (bounded waits only)."""

    def __init__(self, args):
        pipeline = ['--bundle', REAL_BUNDLE, '--no-llm'] if REAL_BUNDLE else ['--fake-pipeline', '0.005']
        self.p = subprocess.Popen([sys.executable, '-m', 'anomalygpt_edge', 'watch', *pipeline, *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out, self.err = queue.Queue(), queue.Queue()
        for stream, q in ((self.p.stdout, self.out), (self.p.stderr, self.err)):
            threading.Thread(target=lambda s=stream, q=q: [q.put(ln) for ln in s], daemon=True).start()

    def wait_line(self, q, contains='', timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ln = q.get(timeout=0.1)
            except queue.Empty:
                continue
            if contains in ln:
                return ln
        self.p.kill()
        raise AssertionError(f"no line containing {contains!r} within {timeout} s")

    def finish(self, timeout=30):
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise
        lines = []
        while not self.out.empty():
            lines.append(self.out.get())
        return rc, lines


@pytest.fixture
def folder(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f'{i}.png'), frame(40 + i))
    return tmp_path


def test_sigterm_stops_with_summary_and_exit_0(folder):
    w = Proc(['--source', str(folder), '--loop'])
    for _ in range(5):
        json.loads(w.wait_line(w.out, '"type": "frame"'))
    w.p.send_signal(signal.SIGTERM)
    rc, rest = w.finish()
    summary = json.loads(rest[-1])
    assert rc == 0 and summary['type'] == 'summary' and summary['stopped'] == 'stop requested'
    assert summary['inspected'] >= 5 and summary['frames_read'] >= summary['inspected']
    assert summary['latency_ms']['p50'] is not None


def test_sigusr1_triggers_one_inspection_each(folder):
    w = Proc(['--source', str(folder), '--loop', '--on-signal'])
    w.wait_line(w.err, 'watching')  # the handlers are installed
    for _ in range(3):
        w.p.send_signal(signal.SIGUSR1)
        json.loads(w.wait_line(w.out, '"type": "frame"'))
    time.sleep(0.3)
    w.p.send_signal(signal.SIGINT)
    rc, rest = w.finish()
    summary = json.loads(rest[-1])
    assert rc == 0 and summary['inspected'] == 3 and summary['skipped'] > 0
