"""Frame sources for the line-camera loop: camera, video file, RTSP/HTTP stream, image folder,
GStreamer pipeline. Each yields RGB uint8 frames.

A source is either *live* (camera, stream, GStreamer: the end of its frames means it dropped out,
so the loop reopens it) or *finite* (video file, folder: the end is the end). Finite sources keep
their position across a reopen, so a read error mid-file resumes where it stopped.

Jetson CSI camera (needs an OpenCV built with GStreamer, as JetPack's system OpenCV is; pip's
opencv-python-headless is not)::

    nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1
      ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR
      ! appsink drop=true max-buffers=1
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .preprocess import load_image

IMAGE_EXTENSIONS = {'.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.pgm', '.ppm'}
STREAM_TIMEOUT_MS = 10_000

JETSON_CSI_PIPELINE = (
    'nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1 '
    '! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1')


class SourceError(RuntimeError):
    """A source that cannot be opened or read; the message names the source."""
    exit_code = 2  # bad input (cli.exit_code)


class Source:
    """``open()``; ``read()`` -> RGB uint8 [H,W,3], or None at the end of the frames; ``close()``.

    ``read`` raises SourceError when the source fails, and ImageError (from preprocess) for one
    unusable frame that can be skipped."""
    live = False
    name = '<source>'
    current: str | None = None  # what the last frame was, when the source can say (a folder's file)

    def open(self) -> None:
        raise NotImplementedError

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def rewind(self) -> None:
        """Finite sources: start again from the first frame (for --loop)."""
        raise SourceError(f"{self.name}: a live source cannot be rewound")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


class CaptureSource(Source):
    """Anything cv2.VideoCapture opens."""

    def __init__(self, target, name: str, api: int = cv2.CAP_ANY, params: list[int] | None = None,
                 live: bool = True, hint: str = ''):
        self.target, self.name, self.api, self.params = target, name, api, params or []
        self.live, self.hint = live, hint
        self.cap = None
        self.pos = 0  # frames read so far (finite sources resume here after a reopen)

    def open(self) -> None:
        self.close()
        cap = cv2.VideoCapture(self.target, self.api, self.params) if self.params \
            else cv2.VideoCapture(self.target, self.api)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{self.name}: cannot be opened{self.hint}")
        if not self.live and self.pos:
            cap.set(cv2.CAP_PROP_POS_FRAMES, self.pos)
        self.cap = cap

    def read(self) -> np.ndarray | None:
        if self.cap is None:
            raise SourceError(f"{self.name}: read before open")
        try:
            ok, frame = self.cap.read()
        except cv2.error as e:
            raise SourceError(f"{self.name}: read failed ({e})") from None
        if not ok or frame is None or frame.size == 0:
            return None
        self.pos += 1
        return _to_rgb(frame)

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None

    def rewind(self) -> None:
        if self.live:
            super().rewind()
        self.pos = 0
        self.open()


class FolderSource(Source):
    """The images of a folder in name order (or one image file), as frames."""
    live = False

    def __init__(self, path):
        self.path = Path(path)
        self.name = os.fspath(self.path)
        self.files: list[Path] = []
        self.pos = 0

    def open(self) -> None:
        if self.path.is_file():
            self.files = [self.path]
        elif self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        else:
            raise SourceError(f"{self.name}: no such file or folder")
        if not self.files:
            raise SourceError(f"{self.name}: no images in the folder (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")

    def read(self) -> np.ndarray | None:
        if self.pos >= len(self.files):
            return None
        path = self.files[self.pos]
        self.pos += 1  # past a bad image too: an ImageError skips it
        self.current = os.fspath(path)
        return load_image(path)

    def rewind(self) -> None:
        self.pos = 0
        self.open()


def open_source(spec: str) -> Source:
    """Pick the source kind from SRC (not opened yet). Raises SourceError for an unusable spec."""
    spec = str(spec).strip()
    if not spec:
        raise SourceError("empty source")
    if spec.isdigit():
        return CaptureSource(int(spec), f'camera {spec}', hint=' (no such camera, or it is in use)')
    if spec.startswith('/dev/video'):
        return CaptureSource(spec, spec, cv2.CAP_V4L2, hint=' (no such camera, or it is in use)')
    if '!' in spec:
        return CaptureSource(spec, f'gstreamer pipeline "{spec}"', cv2.CAP_GSTREAMER,
                             hint=' (check the pipeline with gst-launch-1.0; this needs an OpenCV built with '
                                  'GStreamer, which pip\'s opencv-python-headless is not: on Jetson use JetPack\'s OpenCV)')
    if '://' in spec:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS]
        return CaptureSource(spec, spec, cv2.CAP_FFMPEG, params, hint=' (unreachable, wrong URL or credentials, '
                             'or a codec FFmpeg lacks; for RTSP over TCP set OPENCV_FFMPEG_CAPTURE_OPTIONS=rtsp_transport;tcp)')
    path = Path(spec)
    if path.is_dir() or (path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS):
        return FolderSource(path)
    if path.is_file():
        return CaptureSource(spec, spec, live=False, hint=' (not a video file OpenCV can decode)')
    raise SourceError(f"{spec}: no such file or folder, and not a camera index, /dev/video device, "
                      f"stream URL or GStreamer pipeline")
