"""Score thresholds for the LLM-free mode (the paper's ablation without the LLM).

Per class and per mode (zero-shot, or k-shot with k normal references), the threshold is the
maximum anomaly score (max of the map) over normal images, or a chosen percentile of those scores,
plus an optional margin. It is stored in the manifest under ``thresholds.<class>.<mode>`` and used
by ``Pipeline.inspect(..., llm=False)``: score above the threshold -> verdict 'yes', reported as
threshold-based (``Result.verdict_source == 'threshold'``), never as the LLM's.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

from .data_reader import CalibrationError, list_images


def mode_key(k_shot: int) -> str:
    """'zero-shot' or 'k-shot' (the runtime's key; see ``Pipeline.threshold_for``)."""
    return 'zero-shot' if not k_shot else f'{int(k_shot)}-shot'


def normal_scores(pipeline, images, class_name: str, memory=None) -> np.ndarray:
    return np.array([pipeline.inspect(p, class_name=class_name, memory=memory, llm=False).score for p in images],
                    dtype=np.float64)


def threshold_entry(scores, percentile: float = 100.0, margin: float = 0.0, **facts) -> dict:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise CalibrationError("no normal images were scored")
    if not 0 < percentile <= 100:
        raise CalibrationError(f"percentile must be in (0, 100], not {percentile}")
    base = float(np.percentile(scores, percentile))
    value = base + float(margin)
    if not 0 < value <= 1:   # the map's range: below it every image is anomalous, above it none ever is
        raise CalibrationError(f"threshold {value:.4g} (the normal scores' percentile {percentile:g}, {base:.4g}, "
                               f"+ margin {margin:g}) is outside (0, 1], the anomaly map's range: choose another "
                               "margin")
    return {'score': value, 'percentile': float(percentile), 'margin': float(margin), 'n_images': int(scores.size),
            'normal_scores': {'min': float(scores.min()), 'median': float(np.median(scores)),
                              'max': float(scores.max()), 'mean': float(scores.mean())},
            'created_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), **facts}


def calibrate_threshold(pipeline, images_dir, class_name: str, percentile: float = 100.0, margin: float = 0.0,
                        references=None, max_images: int | None = None, recursive: bool = False) -> tuple[str, str, dict]:
    """-> (class, mode, manifest entry). ``references``: normal images for few-shot mode; they are left
    out of the scored images (a reference scores ~0 against itself)."""
    cls = pipeline.resolve_class(class_name, None)
    refs = [Path(r) for r in references or ()]
    ref_set = {r.resolve() for r in refs}
    images = [p for p in list_images(images_dir, recursive) if p.resolve() not in ref_set]
    if max_images is not None:
        images = images[:max_images]
    if not images:
        raise CalibrationError(f"{images_dir}: no normal images left to score after removing the references")
    memory = pipeline.memory(refs) if refs else None
    scores = normal_scores(pipeline, images, cls, memory)
    precision = getattr(pipeline, 'precision', None)
    entry = threshold_entry(scores, percentile, margin, k_shot=len(refs), images=str(images_dir),
                            resize=pipeline.resize_mode, precision=precision,
                            references=[str(r) for r in refs] or None)
    return cls, mode_key(len(refs)), entry


def store_threshold(bundle_dir, class_name: str, mode: str, entry: dict):
    """Write the entry into the manifest atomically (bundle writer; hashes recomputed)."""
    from .bundle_update import update_bundle

    def edit(manifest):
        if class_name not in manifest.get('classes', {}):
            raise CalibrationError(f"{bundle_dir}: the bundle has no class {class_name!r}")
        manifest.setdefault('thresholds', {}).setdefault(class_name, {})[mode] = entry
    return update_bundle(bundle_dir, edit)
