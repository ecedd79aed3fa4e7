"""Foreign-content anomalies, DRAEM-style (Zavrtanik et al., ICCV 2021): a smooth-noise blob of the
image replaced, partly transparent, by something that does not belong there: another image's texture,
the surface much darker or lighter, a smooth colour field, or the surface blurred.

The reference trains on NSA patches alone (``anomaly_sim``); its ImageBind tower comes pretrained, so
"abnormal" is already in its features. A tower trained from scratch on NSA learns only "pasted
texture": on the demo's tiles it misses a black hole entirely. This simulator is the demo model's
second source of anomalies (``SyntheticAnomalyDataset(foreign_fraction=...)``); the held-out defect
kinds (``defects``: scratch, stain, hole) are made by none of its mechanisms.

Labels are the reference's: the 'logistic-intensity' label of the change inside the blob, binarised
at 0.3; the answer names the (at most two) largest labelled regions, in reading order.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from . import spec
from .anomaly_sim import BINARY_THRESHOLD, SIM_PARAMS, SimParams, SimResult, answer_for, logistic_label, object_mask
from .synthetic import get_category

CONTENTS = ('texture', 'shade', 'colour', 'blur')


@dataclass(frozen=True)
class ForeignParams:
    cells: tuple[int, int] = (3, 9)          # smooth-noise grid per axis: fewer cells, bigger blobs
    area: tuple[float, float] = (0.004, 0.06)  # fraction of the surface above the noise threshold
    opacity: tuple[float, float] = (0.5, 1.0)
    min_region_px: int = 40


def blob_mask(rng: np.random.Generator, shape: tuple[int, int], p: ForeignParams,
              region: np.ndarray | None = None) -> np.ndarray:
    """uint8 0/1: the 1 or 2 largest blobs where anisotropic smooth noise exceeds its (1 - area)
    quantile (over ``region`` when given, and only inside it)."""
    h, w = shape
    cy, cx = (int(rng.integers(p.cells[0], p.cells[1] + 1)) for _ in range(2))
    # upsampled over twice the image and cropped at random: an upsampled grid peaks at its borders
    big = cv2.resize(rng.standard_normal((2 * cy, 2 * cx)).astype(np.float32), (2 * w, 2 * h),
                     interpolation=cv2.INTER_CUBIC)
    r0, c0 = int(rng.integers(h // 2 + 1)), int(rng.integers(w // 2 + 1))
    noise = big[r0:r0 + h, c0:c0 + w]
    inside = np.ones(shape, bool) if region is None else region.astype(bool)
    if not inside.any():
        return np.zeros(shape, np.uint8)
    level = np.quantile(noise[inside], 1 - rng.uniform(*p.area))
    mask = ((noise > level) & inside).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])[:1 + int(rng.integers(2))]
    return np.isin(labels, keep).astype(np.uint8)


def foreign_content(image: np.ndarray, other: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The float32 [H,W,3] content that replaces the blob."""
    img = image.astype(np.float32)
    if kind == 'texture':
        return other.astype(np.float32)
    if kind == 'shade':
        factor = rng.uniform(0.2, 0.55) if rng.random() < 0.5 else rng.uniform(1.5, 2.2)
        return np.clip(img * factor, 0, 255)
    if kind == 'colour':
        base = rng.uniform(0, 255, 3).astype(np.float32)
        field = cv2.resize(rng.standard_normal((4, 4, 3)).astype(np.float32), img.shape[1::-1],
                           interpolation=cv2.INTER_CUBIC)
        return np.clip(base + 25 * field, 0, 255)
    if kind == 'blur':
        return cv2.GaussianBlur(img, (0, 0), rng.uniform(2.5, 5.0))
    raise ValueError(f"unknown foreign content {kind!r}; known: {CONTENTS}")


def _regions(binary: np.ndarray, min_px: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """(the two largest labelled regions of at least ``min_px`` as a 0/1 mask, their centroids as
    (row, col) fractions in reading order): the answer names exactly what the label marks."""
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(binary, connectivity=8)
    big = [i for i in sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
           if stats[i, cv2.CC_STAT_AREA] >= min_px][:2]
    h, w = binary.shape
    return np.isin(labels, big).astype(np.uint8), sorted((centroids[i][1] / h, centroids[i][0] / w) for i in big)


def simulate_foreign(dest: np.ndarray, other: np.ndarray, category, rng=None, *,
                     params: ForeignParams | None = None, sim_params: SimParams | None = None,
                     content: str | None = None) -> SimResult:
    """One foreign-content anomaly on ``dest`` ([H,W,3] uint8 RGB); ``other`` is the 'texture' content's
    source image (another sample). Objects get the blob on the part only."""
    if dest.shape != other.shape or dest.ndim != 3 or dest.shape[2] != 3 or dest.dtype != np.uint8:
        raise ValueError(f"dest and other must be [H,W,3] uint8 of one shape, got {dest.shape} {dest.dtype} "
                         f"and {other.shape} {other.dtype}")
    cat = get_category(category)
    p = params or ForeignParams()
    sp = sim_params or SIM_PARAMS.get(cat.name, SimParams())
    rng = np.random.default_rng(rng)
    region = None
    if sp.background is not None:
        region = cv2.erode(object_mask(dest, sp.background), np.ones((9, 9), np.uint8))
    blob = blob_mask(rng, dest.shape[:2], p, region)
    kind = content or CONTENTS[int(rng.integers(len(CONTENTS)))]
    alpha = cv2.GaussianBlur(blob.astype(np.float32), (0, 0), 1.0)[..., None] * rng.uniform(*p.opacity)
    out = dest * (1 - alpha) + foreign_content(dest, other, kind, rng) * alpha
    image = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    label = logistic_label(dest, image, blob, sp.logistic, sp.tol)
    binary, centres = _regions((label > BINARY_THRESHOLD).astype(np.uint8), p.min_region_px)
    label *= binary
    positions = [spec.position_word(r, c) for r, c in centres]
    return SimResult(image=image, mask=label, binary_mask=binary, centres=centres, positions=positions,
                     answer=answer_for(positions), question=cat.question)
