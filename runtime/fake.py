"""A stand-in for Pipeline without a bundle: for tests, soak runs and dry runs of watch/serve.

The map is the image's brightness (bright spots are "defects"), so verdicts are predictable.
It raises if two threads are inside ``inspect`` at once: the real LLM session is not re-entrant,
so a caller that lets that happen has a bug.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np

from .answers import region_words, regions
from .pipeline import Pipeline, Result
from .preprocess import ImageError, decode_image, load_image, to_rgb8

LOCATION_WORDS = [['top left', 'top', 'top right'], ['left', 'center', 'right'],
                  ['bottom left', 'bottom', 'bottom right']]


class ConcurrentUseError(AssertionError):
    pass


class FakePipeline:
    def __init__(self, delay: float = 0.0, classes=('bottle', 'object')):
        self.delay = delay
        self.classes = {c: {'description': f'This is a photo of a {c} for anomaly detection.'} for c in classes}
        self.default_class = 'object'
        self.bundle = None
        self.runners: dict = {}
        self.session = None
        self.calls = 0
        self.violations = 0
        self._inside = threading.Lock()

    def resolve_class(self, class_name, describe=None) -> str:
        if class_name is not None:
            key = class_name.replace('_', ' ')
            if key not in self.classes:
                raise KeyError(f"unknown class {class_name!r}; the bundle has: {', '.join(self.classes)}")
            return key
        return next((n for n in self.classes if n in (describe or '')), self.default_class)

    def memory(self, references) -> np.ndarray:
        if not references:
            raise ValueError("few-shot needs at least one normal reference image")
        return np.zeros((4, 256 * len(references), 8), np.float32)

    load_memory = staticmethod(Pipeline.load_memory)

    def _rgb(self, image) -> tuple[np.ndarray, str]:
        if isinstance(image, (bytes, bytearray)):
            return decode_image(bytes(image)), '<bytes>'
        if isinstance(image, (str, Path)):
            return load_image(image), str(image)
        return to_rgb8(image), '<array>'

    def inspect(self, image, class_name=None, describe=None, question=None, references=None, memory=None,
                llm=True, verdict_first=False, threshold=0.5, label=None) -> Result:
        if not self._inside.acquire(blocking=False):
            self.violations += 1
            raise ConcurrentUseError("FakePipeline.inspect entered by two threads at once")
        try:
            t0 = time.perf_counter()
            rgb, name = self._rgb(image)
            cls = self.resolve_class(class_name, ' '.join(t for t in (describe, question) if t))
            if references is not None and memory is None:
                memory = self.memory(references)
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            amap = cv2.resize(gray, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
            if self.delay:
                time.sleep(self.delay)
            score = float(amap.max())
            verdict = answer = None
            if llm:
                verdict = 'yes' if score >= 0.5 else 'no'
                answer = ('Yes, there is an anomaly in the image.' if verdict == 'yes'
                          else 'No, there is no anomaly in the image.')
            self.calls += 1
            found = regions(amap, LOCATION_WORDS, threshold)
            return Result(image=name if label is None else label, class_name=cls, score=score, anomaly_map=amap,
                          regions=found, locations=region_words(found), verdict=verdict, answer=answer,
                          timings_ms={'total': (time.perf_counter() - t0) * 1e3}, original_size=rgb.shape[:2],
                          few_shot=memory is not None)
        finally:
            self._inside.release()

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
