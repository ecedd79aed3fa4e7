"""Sample inputs for parity checks: random tensors and real-looking images, and the feeds of each
vision graph derived from them through the PyTorch reference (taps, memory, anomaly maps), so
that every graph sees inputs with realistic magnitudes.
"""
from __future__ import annotations

import numpy as np
import torch

from ..models import spec
from ..models.anomalygpt import AnomalyGPT
from .onnx_graphs import Component


def normalise_image(rgb: np.ndarray) -> np.ndarray:
    """HWC uint8/float in [0,255] -> CHW float32 with the CLIP mean/std."""
    x = np.asarray(rgb, np.float32) / 255.0
    x = (x - np.array(spec.CLIP_MEAN, np.float32)) / np.array(spec.CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def textured_image(seed: int = 0, size: int = spec.IMAGE_SIZE, defect: bool = True) -> np.ndarray:
    """A real-looking product surface (wood-like grain, lighting gradient, sensor noise; with
    ``defect`` a dark scratch and a bright spot) as an RGB uint8 image [size,size,3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq, phase, tilt = rng.uniform(8, 20), rng.uniform(0, 2 * np.pi), rng.uniform(-0.4, 0.4)
    warp = 0.08 * np.sin(2 * np.pi * (3 * yy + rng.uniform()))
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx + tilt * yy + warp) + phase)
    light = 0.75 + 0.25 * (1 - ((xx - 0.4) ** 2 + (yy - 0.3) ** 2))
    base = rng.uniform(90, 200, size=3).astype(np.float32)
    img = base * light[..., None] * (0.8 + 0.2 * grain[..., None])
    img += rng.normal(0, 4, img.shape)
    if defect:
        r0, c0 = rng.uniform(0.2, 0.8, size=2)
        ang = rng.uniform(0, np.pi)
        dist = np.abs((xx - c0) * np.sin(ang) - (yy - r0) * np.cos(ang))
        along = np.abs((xx - c0) * np.cos(ang) + (yy - r0) * np.sin(ang))
        img[(dist < 0.008) & (along < 0.15)] *= 0.35
        r1, c1 = rng.uniform(0.15, 0.85, size=2)
        img[(xx - c1) ** 2 + (yy - r1) ** 2 < 0.03 ** 2] = 245
    return np.clip(img, 0, 255).astype(np.uint8)


def random_images(batch: int, seed: int = 0, size: int = spec.IMAGE_SIZE) -> np.ndarray:
    """Standard-normal images [B,3,size,size] (the range of CLIP-normalised pixels)."""
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def textured_images(batch: int, seed: int = 0, defect: bool = True) -> np.ndarray:
    return np.stack([normalise_image(textured_image(seed + i, defect=defect)) for i in range(batch)])


def random_text_features(embed_dim: int, seed: int = 0) -> np.ndarray:
    t = np.random.default_rng(seed).standard_normal((2, embed_dim)).astype(np.float32)
    return t / np.linalg.norm(t, axis=-1, keepdims=True)


@torch.inference_mode()
def encode(model: AnomalyGPT, images: np.ndarray) -> np.ndarray:
    """Reference taps [B,4,256,C] of normalised images."""
    _, taps = model.encode_image(torch.from_numpy(images))
    return torch.stack(taps, dim=1).numpy()


def memory_from_taps(taps: np.ndarray) -> np.ndarray:
    """Raw taps of k normal images [k,4,256,C] -> the few-shot memory [4, k*256, C]."""
    k, n, p, c = taps.shape
    return np.ascontiguousarray(taps.transpose(1, 0, 2, 3).reshape(n, k * p, c))


@torch.inference_mode()
def zero_shot_maps(model: AnomalyGPT, taps: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(taps)
    return model.anomaly_map(list(t.unbind(1)), torch.from_numpy(text_features)).numpy()


def component_feeds(model: AnomalyGPT, component: Component | str, images: np.ndarray,
                    text_features: np.ndarray, normal_images: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for one graph computed from query images (and normal references for few-shot)."""
    c = Component(component)
    if c is Component.ENCODER:
        return {'image': images}
    taps = encode(model, images)
    if c is Component.DECODER:
        return {'taps': taps, 'text_features': text_features}
    if c is Component.FEWSHOT:
        return {'taps': taps, 'memory': memory_from_taps(encode(model, normal_images))}
    return {'anomaly_map': zero_shot_maps(model, taps, text_features)}


def verification_cases(model: AnomalyGPT, component: Component | str, batch: int = 2, seed: int = 0,
                       text_features: np.ndarray | None = None, k_shot: int = 2) -> list[tuple[str, dict]]:
    """Two cases per graph: random images and real-looking textured images with defects.

    The batch size and memory size differ from the ones used to trace the export (1 and 256),
    so the dynamic axes are exercised too."""
    tf = random_text_features(model.cfg.vision.embed_dim, seed) if text_features is None else text_features
    normals = textured_images(k_shot, seed=seed + 100, defect=False)
    cases = [('random', component_feeds(model, component, random_images(batch, seed), tf, normals)),
             ('textured', component_feeds(model, component, textured_images(batch, seed), tf, normals))]
    if Component(component) is Component.PROMPT_LEARNER:
        size = model.cfg.vision.image_size
        rng = np.random.default_rng(seed)
        cases.append(('uniform-map', {'anomaly_map': rng.uniform(0, 1, (batch, 1, size, size)).astype(np.float32)}))
    return cases
