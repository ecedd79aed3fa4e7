"""Training pairs in the reference's unsupervised layout (spec 7.1/7.3), from procedural images, and an
MVTec-AD-style folder of held-out defects for evaluation.

Sample i is: a fixed normal image of category ``categories[i % n]`` (the same every epoch, like a
training set on disk), the normal conversation and a zero mask; then the same image with NSA patches
from another sample's image (any category, as the reference's "previous sample"), its answer and label;
with ``foreign_fraction`` > 0, that share of the simulated images gets a foreign-content blob instead
(``foreign_sim``), from the same other image for its 'texture' content; with ``faint_fraction`` > 0,
that share of the simulated images is blended back towards the normal image (same label and answer).
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from . import spec
from .anomaly_sim import BINARY_THRESHOLD, SIM_PARAMS, SimParams, simulate
from .foreign_sim import simulate_foreign
from .defects import DEFECT_KINDS, DefectResult, add_defect
from .synthetic import CATEGORIES, get_category, normal_image

_MEAN = torch.tensor(spec.CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(spec.CLIP_STD).view(3, 1, 1)

# how much of a faint anomaly's change is kept (uniform in this range)
FAINT_STRENGTH = (0.25, 0.6)


def to_clip_tensor(image: np.ndarray) -> torch.Tensor:
    """[H,W,3] uint8 RGB -> [3,H,W] float32, CLIP-normalised (ToTensor then Normalize)."""
    t = torch.tensor(image).permute(2, 0, 1).float() / 255
    return (t - _MEAN) / _STD


class SyntheticAnomalyDataset(Dataset):
    """``length`` samples; item i is deterministic given (seed, epoch, i). Each item is a dict:
    images [2,3,224,224] (normal, simulated), masks [2,1,224,224] (zero, label > 0.3), questions and
    answers (2 strings each), category, and ``positions`` of the simulated image's patches."""

    def __init__(self, length: int, seed: int = 0, categories=None, cumulative_centres: bool = True,
                 cache_normals: bool = False, foreign_fraction: float = 0.0, faint_fraction: float = 0.0,
                 nsa_size_scale: float | None = None, logistic: dict[str, tuple[float, float]] | None = None,
                 nsa_thin_fraction: float = 0.0, label_centres: bool = False):
        self.categories = [get_category(c).name for c in (categories or CATEGORIES)]
        if length < 2:
            raise ValueError("need at least 2 samples: the patch source is another sample's image")
        self.length, self.seed, self.epoch = length, seed, 0
        self.cumulative_centres = cumulative_centres
        self.label_centres = label_centres   # NSA patches named by their labels' centroids (anomaly_sim.simulate)
        for name, value in (('foreign_fraction', foreign_fraction), ('faint_fraction', faint_fraction),
                            ('nsa_thin_fraction', nsa_thin_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        # the share of simulated images made by ``foreign_sim`` instead of the reference's NSA patches
        self.foreign_fraction = foreign_fraction
        # the share of simulated images made faint (their change scaled by FAINT_STRENGTH), to teach subtler changes
        self.faint_fraction = faint_fraction
        if nsa_size_scale is not None and nsa_size_scale <= 0:
            raise ValueError(f"nsa_size_scale must be positive, got {nsa_size_scale}")
        # the scale of the Gamma draw of NSA patch half-widths (None: each class's SimParams, the reference's)
        self.nsa_size_scale = nsa_size_scale
        # the share of NSA patches drawn as thin stripes (SimParams.thin_fraction)
        self.nsa_thin_fraction = nsa_thin_fraction
        # per-class (k, x0) of the label's logistic, replacing SIM_PARAMS' for both simulators
        self.logistic = dict(logistic or {})
        for name in self.logistic:
            get_category(name)
        # each sample renders two normal images (its own and the patch source); caching them keeps
        # ~150 kB per sample and leaves only the simulation per item (per DataLoader worker)
        self._cache: dict[int, np.ndarray] | None = {} if cache_normals else None

    def set_epoch(self, epoch: int) -> None:
        """New patches each epoch (the reference re-simulates every time); the normal images stay fixed."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def category_of(self, index: int) -> str:
        return self.categories[index % len(self.categories)]

    def normal(self, index: int) -> np.ndarray:
        """The fixed normal image of sample ``index`` (read-only when cached)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        img = normal_image(self.category_of(index), [self.seed, 0, index])
        if self._cache is not None:
            img.flags.writeable = False
            self._cache[index] = img
        return img

    def simulated(self, index: int):
        """(normal image, SimResult) of sample ``index``, as numpy arrays."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        rng = np.random.default_rng([self.seed, 1, self.epoch, index])
        src_index = (index + 1 + int(rng.integers(self.length - 1))) % self.length   # any sample but this one
        dest = self.normal(index)
        if self.foreign_fraction and rng.random() < self.foreign_fraction:
            sim = simulate_foreign(dest, self.normal(src_index), self.category_of(index), rng,
                                   sim_params=self._sim_params(self.category_of(index)))
        else:
            sim = simulate(dest, self.normal(src_index), self.category_of(index), rng,
                           params=self._sim_params(self.category_of(index)),
                           cumulative_centres=self.cumulative_centres, label_centres=self.label_centres)
        if self.faint_fraction and sim.is_anomalous and rng.random() < self.faint_fraction:
            keep = rng.uniform(*FAINT_STRENGTH)
            faint = dest + keep * (sim.image.astype(np.float32) - dest)
            sim = dataclasses.replace(sim, image=np.clip(faint + 0.5, 0, 255).astype(np.uint8))
        return dest, sim

    def _sim_params(self, category: str) -> SimParams | None:
        """The class's simulation settings with this dataset's overrides (None: none, SIM_PARAMS' own)."""
        if self.nsa_size_scale is None and not self.nsa_thin_fraction and category not in self.logistic:
            return None
        p = SIM_PARAMS.get(category, SimParams())
        if self.nsa_thin_fraction:
            p = dataclasses.replace(p, thin_fraction=self.nsa_thin_fraction)
        if self.nsa_size_scale is not None:
            shape, _, offset = p.gamma
            p = dataclasses.replace(p, gamma=(shape, self.nsa_size_scale, offset))
        if category in self.logistic:
            p = dataclasses.replace(p, logistic=tuple(self.logistic[category]))
        return p

    def __getitem__(self, index: int) -> dict:
        dest, sim = self.simulated(index)
        mask = torch.from_numpy(sim.mask > BINARY_THRESHOLD).float()[None]
        return {
            'images': torch.stack([to_clip_tensor(dest), to_clip_tensor(sim.image)]),
            'masks': torch.stack([torch.zeros_like(mask), mask]),
            'questions': [sim.question, sim.question],
            'answers': [spec.ANSWER_NORMAL, sim.answer],
            'category': self.category_of(index),
            'positions': sim.positions,
        }


def collate_pairs(items: list[dict]) -> dict:
    """Flatten pairs into one batch of 2B (normal, simulated, normal, ...), as the reference's collate."""
    return {
        'images': torch.cat([it['images'] for it in items]),
        'masks': torch.cat([it['masks'] for it in items]),
        'questions': [q for it in items for q in it['questions']],
        'answers': [a for it in items for a in it['answers']],
        'categories': [it['category'] for it in items for _ in range(2)],
        'positions': [p for it in items for p in ([], it['positions'])],
    }


def _write_png(path: Path, image: np.ndarray) -> None:
    """Atomic PNG write: encode, write a temporary file beside the target, then rename over it."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode('.png', image)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, 'wb') as f:
            f.write(buf.tobytes())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def layout_seed(seed: int, category: str, split: str, index: int) -> list[int]:
    """Seed of one image of :func:`write_mvtec_layout` (``split``: 'train/good', 'test/good' or a defect
    kind); independent of which other categories or kinds are written, and disjoint from the dataset's."""
    return [seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index]


def defect_sample(category: str, kind: str, seed) -> tuple[np.ndarray, DefectResult]:
    """(the normal image, the same image with one ``kind`` defect) for a seed."""
    rng = np.random.default_rng(seed)
    normal = normal_image(category, rng)
    return normal, add_defect(normal, kind, category, rng)


def write_mvtec_layout(root, categories=None, n_train_good: int = 20, n_test_good: int = 10,
                       n_test_defect: int = 10, seed: int = 0, defect_kinds=DEFECT_KINDS) -> dict:
    """Write ``<root>/<cat>/{train/good, test/good, test/<kind>, ground_truth/<kind>}`` PNGs (masks
    ``NNN_mask.png``, 0/255) as MVTec-AD lays them out; image i of a folder is seeded by
    :func:`layout_seed`. Returns {category: {folder: count}}."""
    root = Path(root)
    summary = {}
    for name in (get_category(c).name for c in (categories or CATEGORIES)):
        counts = {}
        for sub, n in (('train/good', n_train_good), ('test/good', n_test_good)):
            d = root / name / sub
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _write_png(d / f"{i:03d}.png", normal_image(name, layout_seed(seed, name, sub, i)))
            counts[sub] = n
        for kind in defect_kinds:
            d, g = root / name / 'test' / kind, root / name / 'ground_truth' / kind
            d.mkdir(parents=True, exist_ok=True)
            g.mkdir(parents=True, exist_ok=True)
            for i in range(n_test_defect):
                _, res = defect_sample(name, kind, layout_seed(seed, name, kind, i))
                _write_png(d / f"{i:03d}.png", res.image)
                _write_png(g / f"{i:03d}_mask.png", res.mask * np.uint8(255))
            counts[f'test/{kind}'] = n_test_defect
        summary[name] = counts
    return summary
