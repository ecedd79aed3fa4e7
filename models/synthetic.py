"""Procedural "industrial" product images: the normal samples the small demo model is trained and
evaluated on, since no real anomaly dataset can reach these machines.

Each category has one consistent look (colour band, pattern, scale) with natural variation between
samples (colour jitter, pattern phase/scale/orientation, lighting gradient, sensor noise), so a
defect stands out. Everything is seeded: ``normal_image(name, seed)`` is a pure function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from . import spec

SIZE = spec.IMAGE_SIZE
_F = np.float32
_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(_F)


@dataclass(frozen=True)
class Category:
    name: str
    description: str           # the human turn's first sentence, spec 7.3 style
    kind: str                  # 'texture' or 'object' (objects sit on a plain background)
    render: Callable[[np.random.Generator], np.ndarray]
    background: tuple[float, float] | None = None   # (brightness, threshold) of the plain background

    @property
    def question(self) -> str:
        return f"{self.description} {spec.QUESTION}"


def _rotated(theta: float, offset=(0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u across, v along) rotated by theta about the image centre, plus a phase offset."""
    c, s = float(np.cos(theta)), float(np.sin(theta))
    x, y = _X - SIZE / 2, _Y - SIZE / 2
    return x * c + y * s + float(offset[0]), -x * s + y * c + float(offset[1])


def _smooth_noise(rng, cells: int | tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a coarse Gaussian grid upsampled bicubically."""
    shape = (cells, cells) if isinstance(cells, int) else cells
    return cv2.resize(rng.standard_normal(shape).astype(_F), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)


def _jitter(rng, rgb, spread: float) -> np.ndarray:
    """A colour [3,1,1] within a narrow band: a common brightness shift plus a smaller per-channel one."""
    rgb = np.asarray(rgb, _F) + _F(rng.normal(0, spread)) + rng.normal(0, spread / 4, 3).astype(_F)
    return rgb.reshape(3, 1, 1)


# Images are built planar ([3,H,W]): numpy broadcasts over a trailing axis of 3 very slowly.
# Sensor noise is cut from one fixed bank of Gaussian noise at a random offset: drawing 150k fresh
# normals per image would cost as much as rendering the image itself.
_NOISE_BANK = np.random.default_rng(20240607).standard_normal((3, 2 * SIZE, 2 * SIZE), dtype=_F)


def _noise(rng, size: int = SIZE, channel: int | None = None) -> np.ndarray:
    """A random [3,size,size] window of the bank, or one channel of it."""
    r, c = rng.integers(0, 2 * SIZE - size + 1, 2)
    return _NOISE_BANK[slice(None) if channel is None else channel, r:r + size, c:c + size]


def _finish(img: np.ndarray, rng, noise: float, light: tuple[float, float] = (0.03, 0.10)) -> np.ndarray:
    """Planar float image -> linear lighting gradient in a random direction, sensor noise, HWC uint8."""
    phi = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(*light) / (SIZE / 2)
    grad = 1 + (_X - SIZE / 2) * float(amp * np.cos(phi)) + (_Y - SIZE / 2) * float(amp * np.sin(phi))
    img = img * grad
    img += _noise(rng) * _F(noise)
    img += 0.5
    return cv2.merge(list(np.clip(img, 0, 255, out=img).astype(np.uint8)))


def _woven_fabric(rng) -> np.ndarray:
    pitch = 9.0 * rng.uniform(0.94, 1.06)
    u, v = _rotated(np.deg2rad(rng.uniform(-4, 4)), rng.uniform(0, 2 * pitch, 2))
    iu, iv = np.floor(u / pitch), np.floor(v / pitch)
    fu, fv = u / pitch - iu, v / pitch - iv
    iu, iv = iu.astype(np.int64) % 64, iv.astype(np.int64) % 64
    warp_gain = (1 + 0.05 * rng.standard_normal(64)).astype(_F)[iu]   # thread-to-thread variation
    weft_gain = (1 + 0.05 * rng.standard_normal(64)).astype(_F)[iv]
    over = (((iu + iv) & 1) == 0).astype(_F)                           # plain weave: over one, under one
    # a thread is brightest along its axis and arches up in the middle of each crossing
    su, sv = np.sin(np.pi * fu), np.sin(np.pi * fv)
    warp = su ** 0.6 * (0.75 + 0.25 * sv) * warp_gain
    weft = sv ** 0.6 * (0.75 + 0.25 * su) * weft_gain
    lum = (0.35 + 0.65 * (weft + (warp - weft) * over)) * (1 + 0.04 * _smooth_noise(rng, 56))
    c_warp = _jitter(rng, (196, 176, 138), 6)
    c_weft = c_warp * _F(rng.uniform(0.88, 0.93))
    return _finish((c_weft + (c_warp - c_weft) * over) * lum, rng, noise=3.0)


def _brushed_metal(rng) -> np.ndarray:
    big = SIZE + 64
    fine = cv2.blur(_noise(rng, big, 0), (41, 1)) * _F(np.sqrt(41))
    coarse = cv2.blur(_noise(rng, big, 1), (121, 3)) * _F(np.sqrt(121 * 3))
    streaks = 4.0 * fine + 3.0 * coarse
    angle = rng.uniform(-3, 3)
    m = cv2.getRotationMatrix2D((big / 2, big / 2), angle, 1.0)
    m[:, 2] -= 32
    streaks = cv2.warpAffine(streaks, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    _, across = _rotated(np.deg2rad(angle))
    sheen = 1 + 0.10 * np.cos(across * _F(2 * np.pi / SIZE * rng.uniform(0.4, 0.8)) + _F(rng.uniform(0, 6.3)))
    grey = rng.uniform(152, 168)
    base = np.array([0.98, 1.0, 1.03], _F).reshape(3, 1, 1) * _F(grey)
    return _finish(base * sheen + streaks, rng, noise=2.0, light=(0.02, 0.06))


def _wood_grain(rng) -> np.ndarray:
    theta = np.deg2rad(rng.uniform(-6, 6))
    u, v = _rotated(theta, (rng.uniform(0, 200), 0))
    period = 15.0 * rng.uniform(0.88, 1.12)
    turb = 0.9 * _smooth_noise(rng, (3, 6)) + 0.25 * _smooth_noise(rng, (6, 14))
    rings = u / period + turb + 0.2 * np.sin(v * _F(2 * np.pi / SIZE * rng.uniform(0.5, 1.2)) + _F(rng.uniform(0, 6.3)))
    late = (0.5 + 0.5 * np.cos(_F(2 * np.pi) * rings)) ** 3            # narrow dark late-wood bands
    light = _jitter(rng, (196, 146, 96), 6)
    dark = light * np.array([0.68, 0.60, 0.55], _F).reshape(3, 1, 1)
    grain = cv2.blur(_noise(rng, SIZE, 2), (1, 31)) * _F(5.0 * np.sqrt(31))
    return _finish(light + (dark - light) * late + grain, rng, noise=2.0)


def _ceramic_tiles(rng) -> np.ndarray:
    s = 56.0 * rng.uniform(0.95, 1.05)
    u, v = _rotated(np.deg2rad(rng.uniform(-1.5, 1.5)), rng.uniform(0, s, 2))
    iu, iv = np.floor(u / s), np.floor(v / s)
    left, top = u - iu * s, v - iv * s                                 # px to the tile's left/top edge
    right, bottom = s - left, s - top
    edge = np.minimum(np.minimum(left, right), np.minimum(top, bottom))
    half = rng.uniform(2.0, 2.6)
    grout_a = np.clip((half - edge) / 1.2 + 0.5, 0, 1)
    # glazed bevel lit from the top left
    bevel = 0.05 * (np.exp(-(left - half) / 2) + np.exp(-(top - half) / 2)
                    - np.exp(-(right - half) / 2) - np.exp(-(bottom - half) / 2))
    tile_var = rng.normal(0, 2.5, (16, 16)).astype(_F)[iu.astype(np.int64) % 16, iv.astype(np.int64) % 16]
    tile = (_jitter(rng, (224, 220, 210), 4) + (tile_var + 2.0 * _smooth_noise(rng, 12))) \
        * (1 + np.clip(bevel, -0.2, 0.2))
    grout = _jitter(rng, (128, 124, 118), 5) + 6.0 * _smooth_noise(rng, 40)
    return _finish(tile + (grout - tile) * grout_a, rng, noise=2.0)


WASHER_BACKGROUND = 38.0


def _washer(rng) -> np.ndarray:
    cx, cy = (float(SIZE / 2 + d) for d in rng.normal(0, 3, 2))
    outer = 72.0 * rng.uniform(0.96, 1.04)
    inner = outer * rng.uniform(0.38, 0.42)
    dx, dy = _X - cx, _Y - cy
    rad = np.sqrt(dx * dx + dy * dy)
    cover = np.clip(outer - rad + 0.5, 0, 1) * np.clip(rad - inner + 0.5, 0, 1)
    phi = rng.uniform(0, np.pi)
    # turned surface: fine concentric marks and the bow-tie highlight of anisotropic reflection
    # (cos 2(angle - phi) written with the double-angle identity to avoid arctan2)
    r2 = np.maximum(rad * rad, 1e-3)
    cos2 = ((dx * dx - dy * dy) * float(np.cos(2 * phi)) + 2 * dx * dy * float(np.sin(2 * phi))) / r2
    lum = (1 + 0.16 * cos2 + 0.03 * np.sin(rad * _F(2 * np.pi / 2.3))
           + 0.04 * np.sin(rad * _F(2 * np.pi / rng.uniform(18, 26)) + _F(rng.uniform(0, 6.3))))
    lum *= 1 - 0.35 * (np.exp(-np.abs(outer - rad) / 2.5) + np.exp(-np.abs(rad - inner) / 2.5))
    metal = _jitter(rng, (172, 174, 178), 6) * lum
    shadow = 1 - 0.25 * np.exp(-np.clip(rad - outer, 0, None) / 6)
    bg = _jitter(rng, (WASHER_BACKGROUND,) * 3, 2) * shadow
    return _finish(bg + (metal - bg) * cover, rng, noise=2.0, light=(0.02, 0.06))


def _category(name, kind, render, background=None) -> Category:
    return Category(name, spec.SYNTHETIC_DESCRIPTIONS[name], kind, render, background)


CATEGORIES: dict[str, Category] = {c.name: c for c in (
    _category('woven_fabric', 'texture', _woven_fabric),
    _category('brushed_metal', 'texture', _brushed_metal),
    _category('wood_grain', 'texture', _wood_grain),
    _category('ceramic_tiles', 'texture', _ceramic_tiles),
    _category('washer', 'object', _washer, background=(WASHER_BACKGROUND, 30.0)),
)}


def get_category(category: str | Category) -> Category:
    if isinstance(category, Category):
        return category
    try:
        return CATEGORIES[category]
    except KeyError:
        raise KeyError(f"unknown synthetic category {category!r}; known: {sorted(CATEGORIES)}") from None


def normal_image(category: str | Category, rng_or_seed=None) -> np.ndarray:
    """One normal sample, [224,224,3] RGB uint8. ``rng_or_seed``: a numpy Generator (advanced in
    place), or anything ``np.random.default_rng`` accepts (int, sequence of ints, SeedSequence)."""
    return get_category(category).render(np.random.default_rng(rng_or_seed))
