"""Accuracy metrics of the AnomalyGPT evaluation (spec section 8), computed with scikit-learn."""
from __future__ import annotations

import numpy as np


def image_auroc(scores, labels) -> float | None:
    """AUROC of the image score (max of the map) against 0/1 labels; None when one class is absent."""
    from sklearn.metrics import roc_auc_score
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def pixel_auroc(maps, masks) -> float | None:
    """AUROC over all pixels of all images: maps [N,H,W] in any range, masks [N,H,W] 0/1."""
    from sklearn.metrics import roc_auc_score
    y = np.concatenate([np.asarray(m).ravel() > 0 for m in masks]).astype(np.uint8)
    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, np.concatenate([np.asarray(m, np.float32).ravel() for m in maps])))


# a zero-shot map reaches this where at least half of the decoder's layers (whose softmax maps it averages) call a
# pixel abnormal; the demo model's LLM answers Yes where its map does (not the runtime's calibrated map_verdict)
MAP_HALF_LEVEL = 0.5


def map_half_accuracy(scores, labels) -> float:
    """The share of images for which "the map reaches ``MAP_HALF_LEVEL``" (score: the map's maximum) is their 0/1 label."""
    return float(np.mean((np.asarray(scores, np.float64) >= MAP_HALF_LEVEL) == np.asarray(labels, bool)))


def reference_correct(answer: str | None, anomalous: bool) -> bool:
    """The reference evaluation's rule: 'Yes' in the answer for anomalous images, 'No' for good ones."""
    return bool(answer) and (('Yes' in answer) if anomalous else ('No' in answer))


def answer_positions(answer: str | None, words) -> list[str]:
    """The 3x3 position words named in an answer, longest match first ('top left' before 'top')."""
    if not answer:
        return []
    flat = sorted({w for row in words for w in row}, key=len, reverse=True)
    found, text = [], answer
    for w in flat:
        if f"the {w} " in text or f"the {w}," in text or f" {w} of" in text or f"and {w} " in text:
            found.append(w)
            text = text.replace(w, ' ')
    return found


def mean_or_none(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def bootstrap_interval(per_class, statistic, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of the mean over classes of ``statistic``, each class's items resampled with
    replacement (stratified by class, as the mean is over classes). ``per_class``: one tuple of equal-length
    arrays per class (e.g. (scores, labels)); ``statistic(*arrays)`` -> float or None (then that draw of that
    class is left out of its mean). None when fewer than 2 items, or no draw gives a value."""
    classes = [tuple(np.asarray(a) for a in arrays) for arrays in per_class if len(arrays[0]) >= 2]
    if not classes:
        return None
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        vals = []
        for arrays in classes:
            idx = rng.integers(len(arrays[0]), size=len(arrays[0]))
            vals.append(statistic(*(a[idx] for a in arrays)))
        if (m := mean_or_none(vals)) is not None:
            means.append(m)
    if not means:
        return None
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def share(values) -> float:
    """The share of true values (the statistic of an accuracy's interval)."""
    return float(np.mean(values))
