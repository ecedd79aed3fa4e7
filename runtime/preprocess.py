"""Image decoding and preprocessing with OpenCV (no torch, no Pillow).

Decodes any common image (8/16-bit, gray, RGBA, BGR order handled), refuses what is not a whole
image with an error that names the file (a JPEG goes through libjpeg-turbo strictly, with simplejpeg: OpenCV
decodes a JPEG whose data is damaged mid-stream, grey or garbled past the damage, with only a warning),
and reproduces the reference's two resize modes: ``squash`` (Resize((224,224)), training and web demo; the
default) and ``center_crop`` (shorter side to 224 then centre crop; test scripts and few-shot references).
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

RESIZE_MODES = ('squash', 'center_crop')
MIN_SIDE = 16
MAX_PIXELS = 100_000_000  # 100 MP: a line camera's frame is far smaller; a decompression bomb is larger


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and the problem."""
    exit_code = 2  # bad input (cli.exit_code)


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG SOF header, without decoding the pixels."""
    if data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) >= 24:
        return int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
    if data[:2] == b'\xff\xd8':
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], 'big')
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(data[i + 7:i + 9], 'big'), int.from_bytes(data[i + 5:i + 7], 'big')
            i += 2 + length
    return None


def _truncated(data: bytes) -> str | None:
    """OpenCV decodes a truncated JPEG/PNG into a partly grey image with only a warning: catch it here."""
    if data[:3] == b'\xff\xd8\xff' and b'\xff\xd9' not in data[-64:]:
        return 'truncated JPEG (no end-of-image marker)'
    if data[:8] == b'\x89PNG\r\n\x1a\n' and b'IEND' not in data[-32:]:
        return 'truncated PNG (no IEND chunk)'
    return None


def _decode_jpeg(data: bytes, name: str) -> np.ndarray | None:
    """RGB from a JPEG, or ImageError if its data is damaged; None for what libjpeg-turbo's simple API does
    not convert (a CMYK JPEG), which OpenCV then decodes."""
    import simplejpeg
    try:
        return simplejpeg.decode_jpeg(data, colorspace='rgb', strict=True)
    except ValueError as e:
        if 'nsupported' in str(e):
            return None
        raise ImageError(f"{name}: damaged JPEG ({e})") from None


def decode_image(data: bytes, name: str = '<bytes>') -> np.ndarray:
    """Encoded bytes -> RGB uint8 [H,W,3]."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    problem = _truncated(data)
    if problem:
        raise ImageError(f"{name}: {problem}")
    declared = _declared_size(data)
    if declared and declared[0] * declared[1] > MAX_PIXELS:
        raise ImageError(f"{name}: declares {declared[0]}x{declared[1]} pixels, over the {MAX_PIXELS // 10**6} MP "
                         "limit (refused before decoding)")
    if data[:3] == b'\xff\xd8\xff':
        img = _decode_jpeg(data, name)
        if img is not None:
            return checked_size(img, name)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageError(f"{name}: not a decodable image (corrupt, or not an image format OpenCV reads)")
    return to_rgb8(img, name, bgr=True)


def to_rgb8(img: np.ndarray, name: str = '<array>', bgr: bool = False) -> np.ndarray:
    """Grey [H,W] or [H,W,1], colour [H,W,3] or with alpha [H,W,4] (RGB order, or OpenCV's BGR with ``bgr``),
    8- or 16-bit (or float, stretched to its range) -> RGB uint8 [H,W,3] of at least MIN_SIDE px a side."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise ImageError(f"{name}: expected a grey [H,W] or colour [H,W,3|4] image, got {img.dtype} {list(img.shape)}")
    checked_size(img, name)
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.number) or not np.isfinite(img).all():
            raise ImageError(f"{name}: not finite numbers ({img.dtype})")
        img = cv2.normalize(img.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:   # alpha dropped, as PIL's convert('RGB')
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    elif bgr:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return checked_size(img, name)


def checked_size(img: np.ndarray, name: str) -> np.ndarray:
    """``img`` if both its sides are at least MIN_SIDE pixels, else ImageError."""
    h, w = img.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"{name}: image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    return img


def load_image(path) -> np.ndarray:
    """A file path -> RGB uint8 [H,W,3], or an ImageError naming the file."""
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if not p.is_file():
        raise ImageError(f"{p}: not a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageError(f"{p}: cannot be read ({e.strerror})") from None
    return decode_image(data, os.fspath(p))


def resize(rgb: np.ndarray, size: int = 224, mode: str = 'squash') -> np.ndarray:
    """Bicubic resize; downscaling uses area averaging, closer to Pillow's antialiased bicubic."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    h, w = rgb.shape[:2]
    if mode == 'squash':
        interp = cv2.INTER_AREA if (w > size and h > size) else cv2.INTER_CUBIC
        return cv2.resize(rgb, (size, size), interpolation=interp)
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    img = cv2.resize(rgb, (nw, nh), interpolation=interp)
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[top:top + size, left:left + size]


def normalise(rgb224: np.ndarray, mean, std) -> np.ndarray:
    """RGB uint8 [224,224,3] -> float32 [1,3,224,224] with the CLIP mean/std."""
    x = rgb224.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def preprocess(rgb: np.ndarray, mean, std, size: int = 224, mode: str = 'squash') -> np.ndarray:
    return normalise(resize(rgb, size, mode), mean, std)
