"""Heatmap overlays of the anomaly map on the input image, written atomically as PNG."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .map_geometry import map_at_size


def overlay(rgb: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.45, grid: int | None = None,
            regions=()) -> np.ndarray:
    """RGB uint8 [H,W,3] + map in [0,1] (any size) -> BGR uint8 [H,W,3] for cv2.imwrite.
    The map is drawn on an absolute 0..1 scale (not min-max per image), so colours compare across images.
    ``grid``: the patch grid the map was upsampled from; the heat is then drawn where the map places it in the
    image (``map_geometry``; the result's ``token_grid``). ``regions``: the result's hot regions
    (``answers.regions``), each boxed in white with its position word."""
    h, w = rgb.shape[:2]
    m = map_at_size(anomaly_map, h, w, grid)
    heat = cv2.applyColorMap((np.clip(m, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 1 - alpha, heat, alpha, 0)
    thick = max(1, round(min(h, w) / 300))
    for r in regions:
        x0, y0, x1, y1 = (int(round(v * s)) for v, s in zip(r['box'], (w, h, w, h)))
        cv2.rectangle(out, (x0, y0), (max(x1 - 1, x0), max(y1 - 1, y0)), (255, 255, 255), thick)
        cv2.putText(out, r['where'], (x0, max(y0 - 3 * thick, 10 * thick)), cv2.FONT_HERSHEY_SIMPLEX, 0.35 * thick,
                    (255, 255, 255), thick, cv2.LINE_AA)
    return out


def write_png(path, bgr: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.stem}.partial.png')
    if not cv2.imwrite(str(tmp), bgr):
        raise OSError(f"{path}: could not be written")
    os.replace(tmp, path)
    return path
