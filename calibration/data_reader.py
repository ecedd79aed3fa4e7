"""Calibration batches from a folder of normal images, preprocessed exactly as the runtime does.

The images go through ``runtime.preprocess`` with the bundle's own settings (size, CLIP mean/std,
resize mode), so INT8 ranges and score thresholds are measured on the very tensors the device will
see. Order is shuffled with a seed and the number of images can be capped, so a calibration is
reproducible and bounded in time. numpy and OpenCV only: the same reader feeds ONNX Runtime's
static quantization and the legacy TensorRT calibrator.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..runtime.bundle import Bundle
from ..runtime.preprocess import load_image, preprocess

IMAGE_EXT = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


class CalibrationError(ValueError):
    """Calibration that cannot run or whose result is refused; the message names the file or folder."""
    exit_code = 2  # bad input (cli.exit_code)


def list_images(folder, recursive: bool = False) -> list[Path]:
    """Image files of a folder, sorted by name (``recursive``: in sub-folders too)."""
    folder = Path(folder)
    if folder.is_file():
        raise CalibrationError(f"{folder}: a file, not a folder of images")
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: no such image folder")
    found = folder.rglob('*') if recursive else folder.iterdir()
    paths = sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXT)
    if not paths:
        raise CalibrationError(f"{folder}: no images ({', '.join(IMAGE_EXT)}) found")
    return paths


class ImageBatches:
    """``for x in ImageBatches(paths, preprocess_cfg, batch_size=4)``: float32 [B,3,S,S] batches.

    ``preprocess_cfg`` is the manifest's ``preprocess`` section. ``shuffle``/``seed`` fix the order,
    ``max_images`` caps how many of the (shuffled) images are used; the last batch may be smaller
    unless ``drop_last``. Iterating again gives the same batches."""

    def __init__(self, paths, preprocess_cfg: dict, batch_size: int = 1, shuffle: bool = True, seed: int = 0,
                 max_images: int | None = None, resize_mode: str | None = None, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        paths = [Path(p) for p in paths]
        if not paths:
            raise CalibrationError("no calibration images given")
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(paths))
            paths = [paths[i] for i in order]
        if max_images is not None:
            if max_images < 1:
                raise ValueError(f"max_images must be at least 1, not {max_images}")
            paths = paths[:max_images]
        self.paths = paths
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.cfg = preprocess_cfg
        self.resize_mode = resize_mode or preprocess_cfg['resize']

    @property
    def n_used(self) -> int:
        """Images the batches actually contain (a short last batch is left out with ``drop_last``)."""
        n = len(self.paths)
        return n - n % self.batch_size if self.drop_last else n

    @classmethod
    def from_folder(cls, folder, bundle: Bundle, recursive: bool = False, **kwargs) -> "ImageBatches":
        return cls(list_images(folder, recursive), bundle.manifest['preprocess'], **kwargs)

    def load(self, path) -> np.ndarray:
        """One image -> [1,3,S,S], the runtime's preprocessing (``Pipeline.load``)."""
        c = self.cfg
        return preprocess(load_image(path), c['mean'], c['std'], c['size'], self.resize_mode)

    def __len__(self) -> int:
        n, b = len(self.paths), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def batch_paths(self) -> Iterator[list[Path]]:
        for i in range(0, len(self.paths), self.batch_size):
            chunk = self.paths[i:i + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield chunk

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in self.batch_paths():
            yield np.ascontiguousarray(np.concatenate([self.load(p) for p in chunk]))


def ort_reader(batches: ImageBatches, input_name: str = 'image', cache: bool = True):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over ``batches`` (feeds ``{input_name: x}``).

    ``cache`` keeps the preprocessed batches after the first pass: ONNX Runtime's entropy and
    percentile methods read the data twice (ranges, then histograms)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._cached: list[np.ndarray] | None = None
            self._it = None
            self.rewind()

        def get_next(self):
            try:
                x = next(self._it)
            except StopIteration:
                return None
            return {input_name: x}

        def rewind(self):
            if cache and self._cached is None:
                self._cached = list(batches)
            self._it = iter(self._cached if cache else batches)

        def __len__(self):
            return len(batches)

    return _Reader()
