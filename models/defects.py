"""Held-out defect kinds for evaluation: the training's patch blending never makes these, so a model
that finds them has learnt "abnormal", not "pasted patch".

Each defect returns the image, its binary ground-truth mask and the reference-format answer, whose
position word comes from the mask centroid (as the reference's supervised set computes positions).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from . import spec
from .anomaly_sim import answer_for, object_mask
from .synthetic import get_category

DEFECT_KINDS = ('scratch', 'stain', 'hole')


@dataclass
class DefectResult:
    image: np.ndarray        # [H,W,3] uint8
    mask: np.ndarray         # [H,W] uint8 0/1
    kind: str
    centroid: tuple[float, float]   # (row, col) as fractions of height/width
    positions: list[str]
    answer: str
    question: str


def _pick_centre(image, category, rng, margin: int) -> tuple[int, int]:
    """A random (row, col) at least ``margin`` px inside the image, and on the part for objects."""
    h, w = image.shape[:2]
    if category.background is not None:
        inside = cv2.erode(object_mask(image, category.background), np.ones((9, 9), np.uint8))
        inside[:margin], inside[h - margin:], inside[:, :margin], inside[:, w - margin:] = 0, 0, 0, 0
        rows, cols = np.nonzero(inside)
        if len(rows):
            i = int(rng.integers(len(rows)))
            return int(rows[i]), int(cols[i])
    return int(rng.integers(margin, h - margin)), int(rng.integers(margin, w - margin))


def _scratch(img, centre, rng):
    """A thin anti-aliased curve, lighter or darker than the surface."""
    length = rng.uniform(40, 110)
    theta = rng.uniform(0, np.pi)
    d, n = np.array([np.cos(theta), np.sin(theta)]), np.array([-np.sin(theta), np.cos(theta)])
    c = np.array(centre[::-1], float)                       # (x, y)
    bend = rng.normal(0, 0.15) * length
    p0, p2 = c - d * length / 2 - n * bend / 2, c + d * length / 2 - n * bend / 2
    p1 = c + n * bend / 2                                   # the curve's midpoint lands on the centre
    t = np.linspace(0, 1, 48)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2
    canvas = np.zeros(img.shape[:2], np.uint8)
    cv2.polylines(canvas, [np.round(pts * 8).astype(np.int32)], False, 255,
                  thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_AA, shift=3)
    alpha = canvas.astype(np.float32)[..., None] / 255
    delta = rng.uniform(55, 95) * (1 if rng.random() < 0.5 else -1)
    out = img.astype(np.float32) + delta * alpha
    mask = cv2.dilate((canvas > 50).astype(np.uint8), np.ones((3, 3), np.uint8))
    return out, mask


_STAIN_COLOURS = ((70, 45, 25), (150, 75, 30), (50, 55, 72), (120, 110, 40))


def _stain(img, centre, rng):
    """A soft-edged blob of tinted colour (rust, oil, dirt)."""
    radius = rng.uniform(12, 26)
    canvas = np.zeros(img.shape[:2], np.float32)
    for _ in range(int(rng.integers(3, 6))):
        off = rng.normal(0, radius / 3, 2)
        axes = tuple(int(a) for a in rng.uniform(0.4, 0.8, 2) * radius)
        ctr = (int(centre[1] + off[1]), int(centre[0] + off[0]))
        cv2.ellipse(canvas, ctr, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
    alpha = cv2.GaussianBlur(canvas, (0, 0), radius / 5)[..., None] * rng.uniform(0.55, 0.85)
    colour = np.array(_STAIN_COLOURS[int(rng.integers(len(_STAIN_COLOURS)))], np.float32)
    # tint the surface rather than paint over it: the texture stays visible through the stain
    tinted = img.astype(np.float32) * (0.35 + 0.65 * colour / 255)
    out = img * (1 - alpha) + tinted * alpha
    return out, (alpha[..., 0] > 0.3).astype(np.uint8)


def _hole(img, centre, rng):
    """A missing chunk: an irregular dark opening with a lighter torn rim."""
    radius = rng.uniform(8, 18)
    k = 12
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = radius * (1 + 0.25 * rng.standard_normal(k)).clip(0.5, 1.6)
    pts = np.stack([centre[1] + rad * np.cos(ang), centre[0] + rad * np.sin(ang)], 1)
    canvas = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(canvas, [np.round(pts * 8).astype(np.int32)], 255, cv2.LINE_AA, shift=3)
    inside = canvas.astype(np.float32)[..., None] / 255
    rim = cv2.dilate(canvas, np.ones((5, 5), np.uint8)).astype(np.float32)[..., None] / 255 - inside
    dark = np.float32(rng.uniform(12, 30))
    out = img.astype(np.float32) * (1 + 0.35 * rim)
    out = out * (1 - inside) + dark * inside
    return out, (canvas > 127).astype(np.uint8)


_MAKERS = {'scratch': (_scratch, 30), 'stain': (_stain, 30), 'hole': (_hole, 24)}


def add_defect(image: np.ndarray, kind: str, category, rng=None,
               centre: tuple[int, int] | None = None) -> DefectResult:
    """Put one ``kind`` defect on a normal ``image`` ([H,W,3] uint8 RGB) of ``category``.
    ``centre`` (row, col) in pixels pins where it goes; otherwise a random spot (on the part for objects)."""
    if kind not in _MAKERS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {DEFECT_KINDS}")
    cat = get_category(category)
    rng = np.random.default_rng(rng)
    make, margin = _MAKERS[kind]
    if centre is None:
        centre = _pick_centre(image, cat, rng, margin)
    out, mask = make(image, centre, rng)
    if not mask.any():
        raise RuntimeError(f"{kind} at {centre} left an empty mask")
    m = cv2.moments(mask, binaryImage=True)
    h, w = mask.shape
    row, col = m['m01'] / m['m00'] / h, m['m10'] / m['m00'] / w
    positions = [spec.position_word(row, col)]
    return DefectResult(image=np.clip(out + 0.5, 0, 255).astype(np.uint8), mask=mask, kind=kind,
                        centroid=(row, col), positions=positions, answer=answer_for(positions),
                        question=cat.question)
