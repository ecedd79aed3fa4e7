"""Heatmap overlays of the anomaly map on the input image, written atomically as PNG."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .map_geometry import map_at_size


def overlay(rgb: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.45, grid: int | None = None) -> np.ndarray:
    """RGB uint8 [H,W,3] + map in [0,1] (any size) -> BGR uint8 [H,W,3] for cv2.imwrite.
    The map is drawn on an absolute 0..1 scale (not min-max per image), so colours compare across images.
    ``grid``: the patch grid the map was upsampled from; the heat is then drawn where the map places it in the
    image (``map_geometry``; the result's ``token_grid``)."""
    h, w = rgb.shape[:2]
    m = map_at_size(anomaly_map, h, w, grid)
    heat = cv2.applyColorMap((np.clip(m, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 1 - alpha, heat, alpha, 0)


def write_png(path, bgr: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.stem}.partial.png')
    if not cv2.imwrite(str(tmp), bgr):
        raise OSError(f"{path}: could not be written")
    os.replace(tmp, path)
    return path
