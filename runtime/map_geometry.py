"""Where a point of the anomaly map lies in the image.

The decoder upsamples its grid x grid patch scores to the image's size with ``align_corners=True`` (as the
reference does), which puts the outer patches' centres on the map's edge pixels, though they lie half a patch
inside the image. Read as an image, the map is stretched outward from its centre: at 224 px and 16 patches by
2.3 px at the borders of the 3x3 grid and 6.5 px at the edges (the demo model's maps measure x1.045, against
x1.062 in theory: its defects' regions sit ~3 px outward of their masks in the outer cells). The map itself stays
the reference's; what reads a place off it (location words, overlays) goes through these.
"""
from __future__ import annotations

import cv2
import numpy as np


def map_to_image(v: float, size: int, grid: int) -> float:
    """A map pixel's coordinate along a side of ``size`` pixels -> the image coordinate of what it shows."""
    patch = size / grid
    return v * (grid - 1) / (size - 1) * patch + (patch - 1) / 2


def image_to_map(u, size: int, grid: int):
    """The inverse of ``map_to_image``."""
    patch = size / grid
    return (u - (patch - 1) / 2) / patch * (size - 1) / (grid - 1)


def map_at_size(anomaly_map: np.ndarray, height: int, width: int, grid: int | None = None) -> np.ndarray:
    """The map resized to ``height`` x ``width`` (e.g. the input image's), bilinear. ``grid``: the patch grid the
    map was upsampled from; each output pixel then reads the map where that pixel's place in the image is shown."""
    m = anomaly_map.astype(np.float32)
    if grid is None:
        return cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    rows, cols = m.shape

    def axis(out: int, size: int) -> tuple[float, float]:
        # output pixel x -> its place in the map's frame, (x + 0.5) size / out - 0.5 -> map coordinate: a x + b
        a = image_to_map(size / out, size, grid) - image_to_map(0.0, size, grid)
        return a, image_to_map(0.5 * size / out - 0.5, size, grid)
    (ax, bx), (ay, by) = axis(width, cols), axis(height, rows)
    to_map = np.array([[ax, 0, bx], [0, ay, by]], np.float64)
    return cv2.warpAffine(m, to_map, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
