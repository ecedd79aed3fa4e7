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


def locations(anomaly_map: np.ndarray, words, threshold: float = 0.5, max_regions: int = 3,
              min_area_frac: float = 0.002, grid: int | None = None) -> list[str]:
    """Position words of the regions where the map is at least ``threshold``, largest first,
    each word once (as the reference's answers name each position once). ``grid``: the patch grid the map
    was upsampled from; each region's centroid is then placed where it lies in the image (``map_geometry``)."""
    mask = (anomaly_map >= threshold).astype(np.uint8)
    n, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    h, w = anomaly_map.shape
    regions = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    out = []
    for i in regions:
        if stats[i, cv2.CC_STAT_AREA] < min_area_frac * h * w:
            continue
        cx, cy = centroids[i]
        if grid is not None:
            cx, cy = map_to_image(cx, w, grid), map_to_image(cy, h, grid)
        word = position_word(cy / h, cx / w, words)
        if word not in out:
            out.append(word)
        if len(out) == max_regions:
            break
    return out
