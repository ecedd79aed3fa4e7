"""Frame sources: what each SRC spec opens, frame order and colour order, resuming after a reopen,
and errors that name the source."""
import cv2
import numpy as np
import pytest

from anomalygpt_edge.runtime.preprocess import ImageError
from anomalygpt_edge.runtime.sources import CaptureSource, FolderSource, SourceError, open_source


def write_video(path, n=12, size=(64, 48)):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), 10, size)
    assert w.isOpened()
    for i in range(n):
        frame = np.full((size[1], size[0], 3), i * 20, np.uint8)
        frame[:8, :8] = (255, 0, 0)  # blue in BGR: the top-left corner must come back as blue in RGB
        w.write(frame)
    w.release()
    return path


def read_all(src):
    frames = []
    while (f := src.read()) is not None:
        frames.append(f)
    return frames


def test_spec_kinds(tmp_path):
    cam = open_source('0')
    assert isinstance(cam, CaptureSource) and cam.live and cam.target == 0
    assert open_source('/dev/video2').live
    gst = open_source('videotestsrc ! videoconvert ! appsink')
    assert gst.live and gst.api == cv2.CAP_GSTREAMER
    rtsp = open_source('rtsp://127.0.0.1:8554/line1')
    assert rtsp.live and rtsp.api == cv2.CAP_FFMPEG and cv2.CAP_PROP_READ_TIMEOUT_MSEC in rtsp.params
    assert isinstance(open_source(str(tmp_path)), FolderSource)
    video = write_video(tmp_path / 'line.avi')
    src = open_source(str(video))
    assert isinstance(src, CaptureSource) and not src.live
    cv2.imwrite(str(tmp_path / 'one.png'), np.zeros((32, 32, 3), np.uint8))
    one = open_source(str(tmp_path / 'one.png'))
    assert isinstance(one, FolderSource) and not one.live


def test_unknown_spec_names_it(tmp_path):
    with pytest.raises(SourceError, match='no-such-thing.mp4: no such file or folder'):
        open_source(str(tmp_path / 'no-such-thing.mp4'))


def test_video_file_frames_in_order_rgb_and_resume_after_reopen(tmp_path):
    src = open_source(str(write_video(tmp_path / 'line.avi', n=12)))
    src.open()
    first = [src.read() for _ in range(5)]
    assert first[0].shape == (48, 64, 3) and first[0].dtype == np.uint8
    r, g, b = first[0][2, 2]
    assert b > 200 and r < 60, "frames must be RGB (OpenCV decodes BGR)"
    src.close()
    src.open()                       # a reopen after a failure resumes at frame 5, not at 0
    rest = read_all(src)
    assert len(rest) == 7
    levels = [int(np.median(f[20:, 20:])) for f in first + rest]
    assert all(abs(lv - i * 20) <= 6 for i, lv in enumerate(levels)), levels
    src.rewind()
    assert len(read_all(src)) == 12
    src.close()


def test_folder_order_bad_image_skippable_and_errors(tmp_path):
    for i, name in enumerate(['b.png', 'a.png', 'c.jpg']):
        cv2.imwrite(str(tmp_path / name), np.full((20, 20, 3), 50 + i, np.uint8))
    (tmp_path / 'b2.png').write_bytes(b'not an image')
    (tmp_path / 'notes.txt').write_text('ignored')
    src = FolderSource(tmp_path)
    src.open()
    assert [p.name for p in src.files] == ['a.png', 'b.png', 'b2.png', 'c.jpg']
    assert src.read()[0, 0, 0] == 51 and src.current.endswith('a.png')
    assert src.read()[0, 0, 0] == 50
    with pytest.raises(ImageError, match='b2.png'):
        src.read()
    assert src.read() is not None          # the loop goes on after a bad image
    assert src.read() is None
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(SourceError, match='empty: no images'):
        FolderSource(empty).open()


def test_file_that_is_not_a_video_fails_to_open_naming_it(tmp_path):
    bad = tmp_path / 'broken.mp4'
    bad.write_bytes(b'\0' * 1000)
    with pytest.raises(SourceError, match='broken.mp4: cannot be opened'):
        open_source(str(bad)).open()


@pytest.mark.skipif('GStreamer:                   YES' in cv2.getBuildInformation(), reason='OpenCV has GStreamer')
def test_gstreamer_without_support_says_why():
    with pytest.raises(SourceError, match='GStreamer'):
        open_source('videotestsrc num-buffers=1 ! videoconvert ! appsink').open()
