"""Reading the LLM's answer and the anomaly map: verdict, 3x3 location words."""
from __future__ import annotations

import re

import cv2
import numpy as np

from .map_geometry import map_to_image

_YES = re.compile(r'^\W*yes\b', re.IGNORECASE)
_NO = re.compile(r'^\W*no\b', re.IGNORECASE)
_COMMITTED = re.compile(r'^\W*(yes|no)\W', re.IGNORECASE)


def parse_verdict(answer: str | None) -> str:
    """'yes' | 'no' | 'unclear'. The answer's first word decides; failing that, the reference's rule
    ('Yes' in the answer -> anomalous, 'No' -> normal), when exactly one of them appears."""
    if not answer:
        return 'unclear'
    if _YES.match(answer):
        return 'yes'
    if _NO.match(answer):
        return 'no'
    yes, no = 'Yes' in answer, 'No' in answer
    return 'yes' if yes and not no else 'no' if no and not yes else 'unclear'


def verdict_known(text: str) -> bool:
    """True once the generated text has committed to Yes or No (the verdict-first fast path).
    Waits for the character after the word, so "No" cannot still become "Normal"."""
    return bool(_COMMITTED.match(text))


CELL_BORDERS = (1 / 3, 2 / 3)   # of the 3x3 grid, as fractions of a side


def position_word(row: float, col: float, words) -> str:
    """Row/col as fractions of height/width -> one of the 3x3 words (1/3 and 2/3 belong to the lower cell)."""
    def cell(v: float) -> int:
        return sum(v > b for b in CELL_BORDERS)
    return words[cell(row)][cell(col)]


def border_distance(row: float, col: float) -> float:
    """How far a point (fractions of height/width) lies from the nearest border between two cells."""
    return min(abs(v - b) for v in (row, col) for b in CELL_BORDERS)


def regions(anomaly_map: np.ndarray, words, threshold: float = 0.5, min_area_frac: float = 0.002,
            grid: int | None = None) -> list[dict]:
    """The connected regions where the map is at least ``threshold``, largest first, less those under
    ``min_area_frac`` of the map. Each: ``where`` (its centroid's 3x3 word), ``x``, ``y`` (the centroid) and ``box``
    ([left, top, right, bottom]) as fractions of the image's width and height, ``area`` (a fraction of the image)
    and ``peak`` (the map's maximum in it). ``grid``: the patch grid the map was upsampled from; the regions are
    then placed where they lie in the image (``map_geometry``)."""
    mask = (anomaly_map >= threshold).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    h, w = anomaly_map.shape

    def to_image(v: float, size: int) -> float:   # a pixel-index coordinate of the map -> of the image
        return v if grid is None else map_to_image(v, size, grid)
    scale = 1.0 if grid is None else (to_image(1.0, w) - to_image(0.0, w)) * (to_image(1.0, h) - to_image(0.0, h))
    out = []
    for i in sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA]):
        area = stats[i, cv2.CC_STAT_AREA]
        if area < min_area_frac * h * w:
            continue
        cx, cy = to_image(centroids[i][0], w), to_image(centroids[i][1], h)
        left, top = stats[i, cv2.CC_STAT_LEFT], stats[i, cv2.CC_STAT_TOP]
        right, bottom = left + stats[i, cv2.CC_STAT_WIDTH], top + stats[i, cv2.CC_STAT_HEIGHT]
        # a pixel's edges lie half a pixel either side of its index
        box = [to_image(left - 0.5, w) + 0.5, to_image(top - 0.5, h) + 0.5,
               to_image(right - 0.5, w) + 0.5, to_image(bottom - 0.5, h) + 0.5]
        out.append({'where': position_word(cy / h, cx / w, words), 'x': float(cx + 0.5) / w, 'y': float(cy + 0.5) / h,
                    'box': [min(max(float(v) / size, 0.0), 1.0) for v, size in zip(box, (w, h, w, h))],
                    'area': float(area * scale) / (h * w), 'peak': float(anomaly_map[labels == i].max())})
    return out


def region_words(found: list[dict], max_regions: int = 3) -> list[str]:
    """The position words of ``regions``, largest first, each word once (as the reference's answers name each
    position once), at most ``max_regions``."""
    out = []
    for r in found:
        if r['where'] not in out:
            out.append(r['where'])
        if len(out) == max_regions:
            break
    return out


def locations(anomaly_map: np.ndarray, words, threshold: float = 0.5, max_regions: int = 3,
              min_area_frac: float = 0.002, grid: int | None = None) -> list[str]:
    """Position words of the regions where the map is at least ``threshold`` (``regions``, ``region_words``)."""
    return region_words(regions(anomaly_map, words, threshold, min_area_frac, grid), max_regions)
