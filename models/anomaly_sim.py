"""The reference's synthetic anomalies (spec 7.1: NSA-style ``patch_ex`` with Poisson blending,
'logistic-intensity' labels) and its answer text (spec 7.2/7.3), re-implemented with an injectable
numpy Generator so every sample is reproducible.

One deliberate reproduction of a reference quirk: the centre reported for each patch is the centre
of the bounding box of *all patches placed so far* (``cumulative_centres=True``); pass False to use
each patch's own box instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage

from . import spec
from .synthetic import CATEGORIES, get_category

BINARY_THRESHOLD = 0.3   # the model binarises the label with gt > 0.3


@dataclass(frozen=True)
class SimParams:
    """Per-class settings of ``patch_ex``; the defaults are the reference's MVTec texture settings."""
    width_bounds: tuple[tuple[float, float], tuple[float, float]] = ((0.03, 0.4), (0.03, 0.4))
    resize_bounds: tuple[float, float] = (0.5, 2.0)
    logistic: tuple[float, float] = (1 / 3, 7.0)          # (k, x0) of the intensity -> label map
    background: tuple[float, float] | None = None         # (brightness, threshold): skip plain background
    num_patches: int = 2
    gamma: tuple[float, float, float] = (2.0, 0.05, 0.03)  # (shape, scale, offset) of the half-width
    # share of patches with one half-width (a random axis) at its lower bound instead of the Gamma draw: thin
    # stripes, still within the reference's width bounds (0: the reference's stream, no extra draw)
    thin_fraction: float = 0.0
    min_object_pct: float = 0.0
    min_overlap_pct: float = 0.25
    tol: float = 1.0
    attempts: int = 200
    min_mask_px: int = 50


# Our categories mapped onto the nearest MVTec class's settings: fabric ~ carpet, ceramic tiles ~ tile,
# brushed metal ~ grid (fine regular texture, same texture values), wood grain ~ wood (softer logistic:
# its own pattern already has strong contrast), the washer ~ metal nut (object resize bounds, k=1/3, x0=7)
# with the background skip on, as for the MVTec objects photographed on a plain background.
SIM_PARAMS: dict[str, SimParams] = {
    'woven_fabric': SimParams(),
    'brushed_metal': SimParams(),
    'wood_grain': SimParams(logistic=(1 / 6, 15.0)),
    'ceramic_tiles': SimParams(),
    'washer': SimParams(resize_bounds=(0.7, 1.3), background=CATEGORIES['washer'].background),
}


@dataclass(frozen=True)
class ForcedPatch:
    """Pin parts of one patch's random draw (tests, demos). ``dest_centre`` is (row, col) in pixels
    and skips the background check; ``half_widths`` is (rows, cols) in pixels before clipping."""
    dest_centre: tuple[int, int] | None = None
    src_centre: tuple[int, int] | None = None
    half_widths: tuple[int, int] | None = None
    scale: float | None = None


@dataclass
class SimResult:
    image: np.ndarray            # [H,W,3] uint8, the destination with the patches blended in
    mask: np.ndarray             # [H,W] float32 label in [0,1] ('logistic-intensity')
    binary_mask: np.ndarray      # [H,W] uint8 0/1, mask > 0.3
    centres: list[tuple[float, float]]   # (row, col) as fractions of height/width, one per placed patch
    positions: list[str]
    answer: str
    question: str
    rects: list[tuple[int, int, int, int]] = field(default_factory=list)  # (r0, r1, c0, c1), end exclusive

    @property
    def is_anomalous(self) -> bool:
        return bool(self.positions)


def answer_for(positions: list[str]) -> str:
    """The reference's answer for the position words of its (at most two) patches, spec 7.3."""
    if not positions:
        return spec.ANSWER_NORMAL
    if len(positions) == 1:
        return spec.ANSWER_ONE.format(positions[0])
    if len(positions) == 2:
        a, b = positions
        return spec.ANSWER_TWO_SAME.format(a) if a == b else spec.ANSWER_TWO.format(a, b)
    raise ValueError(f"the reference's answer template covers 1 or 2 anomalies, got {len(positions)}")


def object_mask(image: np.ndarray, background: tuple[float, float]) -> np.ndarray:
    """uint8 0/1: pixels whose mean RGB is far from the background brightness, 7x7 median-blurred."""
    brightness, threshold = background
    m = (np.abs(image.mean(axis=-1) - brightness) > threshold).astype(np.uint8)
    return cv2.medianBlur(m, 7)


_DISK5 = (np.add.outer(np.arange(-5, 6) ** 2, np.arange(-5, 6) ** 2) <= 25)


def logistic_label(dest: np.ndarray, patched: np.ndarray, patch_mask: np.ndarray,
                   logistic: tuple[float, float], tol: float = 1.0) -> np.ndarray:
    """The 'logistic-intensity' label: changed pixels inside the patches, median-cleaned, weighted by a
    logistic of the disk-median-filtered change intensity. Returns [H,W] float32 in [0,1]."""
    diff = np.abs(dest.astype(np.float32) - patched.astype(np.float32)).mean(axis=-1)
    label_mask = cv2.medianBlur(((diff * patch_mask) > tol).astype(np.uint8), 5)
    label = np.zeros(diff.shape, np.float32)
    if not label_mask.any():
        return label
    # the median only reads 5 px around each labelled pixel: filter that box alone (same result)
    rows, cols = np.nonzero(label_mask)
    r0, r1 = max(rows.min() - 5, 0), min(rows.max() + 6, diff.shape[0])
    c0, c1 = max(cols.min() - 5, 0), min(cols.max() + 6, diff.shape[1])
    box = (diff * label_mask)[r0:r1, c0:c1]
    intensity = ndimage.median_filter(box, footprint=_DISK5, mode='nearest')
    k, x0 = logistic
    label[r0:r1, c0:c1] = label_mask[r0:r1, c0:c1] / (1 + np.exp(-k * (intensity - x0)))
    return label


def _pixel_bounds(p: SimParams, dims) -> tuple[int, int, int, int]:
    (a1, b1), (a2, b2) = p.width_bounds
    return (int(np.round(a1 * dims[0])), int(np.round(b1 * dims[0])),
            int(np.round(a2 * dims[1])), int(np.round(b2 * dims[1])))


def _place_patch(dest, src_img, dest_obj, src_obj, p: SimParams, rng, forced: ForcedPatch | None):
    """One patch of the reference's ``_patch_ex``. Returns (image, (r0, r1, c0, c1), patch_mask) or None."""
    forced = forced or ForcedPatch()
    dims = dest.shape[:2]
    min1, max1, min2, max2 = _pixel_bounds(p, dims)
    skip = dest_obj is not None
    if forced.half_widths is not None:
        hw1, hw2 = (int(np.clip(h, lo, hi)) for h, lo, hi in zip(forced.half_widths, (min1, min2), (max1, max2)))
    else:
        shape, scale, offset = p.gamma
        hw1 = int(np.clip((offset + rng.gamma(shape, scale)) * dims[0], min1, max1))
        hw2 = int(np.clip((offset + rng.gamma(shape, scale)) * dims[1], min2, max2))
        if p.thin_fraction and rng.random() < p.thin_fraction:
            hw1, hw2 = (min1, hw2) if rng.integers(2) == 0 else (hw1, min2)

    for _ in range(p.attempts):
        if forced.src_centre is not None:
            c1, c2 = forced.src_centre
        else:
            c1, c2 = int(rng.integers(min1, dims[0] - min1)), int(rng.integers(min2, dims[1] - min2))
        s0, s1 = max(c1 - hw1, 0), min(c1 + hw1, dims[0])
        t0, t1 = max(c2 - hw2, 0), min(c2 + hw2, dims[1])
        if not skip or src_obj[s0:s1, t0:t1].sum() / ((s1 - s0) * (t1 - t0)) > p.min_object_pct:
            break
    else:
        return None

    patch = src_img[s0:s1, t0:t1]
    height, width = patch.shape[:2]
    lb, ub = p.resize_bounds
    scale = forced.scale if forced.scale is not None else float(np.clip(rng.normal(1, 0.5), lb, ub))
    # the reference clips the whole resized patch (not its half) to the half-width bounds
    new_h = np.clip(scale * height, min1, max1)
    new_w = int(np.clip(int(new_h / height * width), min2, max2))
    new_h = int(np.clip(int(new_w / width * height), min1, max1))
    patch = cv2.resize(patch, (new_w, new_h))
    height, width = new_h, new_w
    patch_mask = np.ones((height, width), np.uint8)
    src_obj_r = cv2.resize(np.ascontiguousarray(src_obj[s0:s1, t0:t1]), (width, height)) if skip else None

    for _ in range(p.attempts):
        if forced.dest_centre is not None:
            d1, d2 = forced.dest_centre
            if not (height // 2 + 1 <= d1 < dims[0] - height // 2 - 1 and width // 2 + 1 <= d2 < dims[1] - width // 2 - 1):
                raise ValueError(f"forced centre {forced.dest_centre} does not fit a {height}x{width} patch")
        else:
            d1 = int(rng.integers(height // 2 + 1, dims[0] - height // 2 - 1))
            d2 = int(rng.integers(width // 2 + 1, dims[1] - width // 2 - 1))
        r0, r1 = d1 - height // 2, d1 + (height + 1) // 2
        q0, q1 = d2 - width // 2, d2 + (width + 1) // 2
        if not skip or forced.dest_centre is not None:
            break
        both = (dest_obj[r0:r1, q0:q1] & src_obj_r & patch_mask).sum()
        n_src = src_obj_r.sum()
        if n_src / (height * width) > p.min_object_pct and both / n_src > p.min_overlap_pct:
            break
    else:
        return None

    if skip:
        d_obj = dest_obj[r0:r1, q0:q1]
        patch_mask &= src_obj_r | d_obj
        # background that is background in both images joins the blend region to avoid seams
        clone_mask = 255 * (patch_mask | ((1 - src_obj_r) & (1 - d_obj)))
    else:
        clone_mask = 255 * patch_mask
    clone_mask = clone_mask.astype(np.uint8)
    clone_mask[0], clone_mask[-1], clone_mask[:, 0], clone_mask[:, -1] = 0, 0, 0, 0
    if np.count_nonzero(clone_mask) < p.min_mask_px:
        return None
    centre = (q1 - width // 2, r0 + height // 2)   # (x, y) as OpenCV wants it
    try:
        out = cv2.seamlessClone(patch, dest, clone_mask, centre, cv2.NORMAL_CLONE)
    except cv2.error:
        return None
    return out, (r0, r1, q0, q1), patch_mask


def _label_centroid(binary: np.ndarray, rect, dims) -> tuple[float, float] | None:
    """Centroid (row, col fractions) of the labelled pixels inside ``rect`` (r0, r1, c0, c1); None if none."""
    r0, r1, c0, c1 = rect
    rows, cols = np.nonzero(binary[r0:r1, c0:c1])
    if not len(rows):
        return None
    return ((r0 + rows.mean()) / dims[0], (c0 + cols.mean()) / dims[1])


def simulate(dest: np.ndarray, src: np.ndarray, category, rng=None, *, params: SimParams | None = None,
             cumulative_centres: bool = True, forced: list[ForcedPatch] | None = None,
             label_centres: bool = False) -> SimResult:
    """Blend 1 (or, with probability 0.5, 2) patches of ``src`` into ``dest`` (both [H,W,3] uint8 RGB).
    ``forced`` places exactly len(forced) patches (no coin flip) with the given draws pinned. ``label_centres``:
    name each patch by the centroid of its binarised label (what the map learns to show), as the reference's
    supervised set names defects by their masks' centroids, instead of by a box centre; a patch whose label is
    empty keeps its box centre."""
    if dest.shape != src.shape or dest.ndim != 3 or dest.shape[2] != 3 or dest.dtype != np.uint8:
        raise ValueError(f"dest and src must be [H,W,3] uint8 of one shape, got {dest.shape} {dest.dtype} "
                         f"and {src.shape} {src.dtype}")
    cat = get_category(category)
    p = params or SIM_PARAMS.get(cat.name, SimParams())
    rng = np.random.default_rng(rng)
    dest_obj = object_mask(dest, p.background) if p.background else None
    src_obj = object_mask(src, p.background) if p.background else None

    dims = dest.shape[:2]
    patched = dest.copy()
    mask = np.zeros(dims, np.uint8)
    box = [dims[0] - 1, 0, dims[1] - 1, 0]   # cumulative (r0, r1, c0, c1), as the reference starts it
    centres, rects = [], []
    for i in range(len(forced) if forced else p.num_patches):
        if not forced and i > 0 and rng.integers(2) == 0:
            continue
        placed = _place_patch(patched, src, dest_obj, src_obj, p, rng, forced[i] if forced else None)
        if placed is None:
            continue
        patched, (r0, r1, c0, c1), patch_mask = placed
        mask[r0:r1, c0:c1] = patch_mask
        box = [min(box[0], r0), max(box[1], r1), min(box[2], c0), max(box[3], c1)]
        b = box if cumulative_centres else (r0, r1, c0, c1)
        centres.append(((b[0] + b[1]) / 2 / dims[0], (b[2] + b[3]) / 2 / dims[1]))
        rects.append((r0, r1, c0, c1))

    label = logistic_label(dest, patched, mask, p.logistic, p.tol)
    binary = (label > BINARY_THRESHOLD).astype(np.uint8)
    if label_centres:
        centres = [_label_centroid(binary, rect, dims) or c for c, rect in zip(centres, rects)]
    positions = [spec.position_word(r, c) for r, c in centres]
    return SimResult(image=patched, mask=label, binary_mask=binary,
                     centres=centres, positions=positions, answer=answer_for(positions),
                     question=cat.question, rects=rects)
