"""Accuracy of a bundle on MVTec-AD / VisA style folders, through the device runtime.

  <root>/<class>/test/good/*.png                  normal test images
  <root>/<class>/test/<defect>/*.png              anomalous test images
  <root>/<class>/ground_truth/<defect>/<stem>_mask.png
  <root>/<class>/train/good/*.png                 normal images (k-shot references)

Per class and mean: image AUROC (max of the map), pixel AUROC, Yes/No accuracy with the
reference's rule, and the accuracy of the position word on single-defect images; for the means of image
AUROC and the two accuracies, 95 % bootstrap intervals (``report['intervals']``: the images of each class
resampled; none for pixel AUROC, whose resampling costs minutes per set). With a PyTorch
reference pipeline (``reference_compare.reference_for``), also how far the runtime is from it on the
same images (``report['reference']``).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..runtime.answers import border_distance, position_word
from .metrics import (answer_positions, bootstrap_interval, image_auroc, mean_or_none, pixel_auroc, reference_correct,
                      share)

IMAGE_EXT = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
# a defect whose centroid lies this close to a border between two cells (5 px of a 224-px side) is "on a border":
# there a map's region a few pixels off names the neighbouring cell
NEAR_BORDER = 5 / 224


@dataclass
class Sample:
    path: Path
    anomalous: bool
    mask: Path | None = None


@dataclass
class ClassReport:
    name: str
    n_images: int = 0
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    yes_no_accuracy: float | None = None
    location_accuracy: float | None = None
    # the location the map itself gives (its largest region at >= 0.5), whatever the LLM answers: the most
    # any reader of this map could reach (0.5 is the zero-shot map's midpoint; few-shot maps have their own scale)
    map_location_accuracy: float | None = None
    n_single_defect: int = 0
    seconds: float = 0.0
    answers: list = field(default_factory=list, repr=False)
    # per single-defect image, with an LLM: (row of the defect's cell, map names it, LLM names it, map has a
    # region at >= 0.5, defect centroid within NEAR_BORDER of a cell border); ``location_breakdown`` sums them,
    # to tell the reader's misses from the map's
    location_cases: list = field(default_factory=list, repr=False)
    # the per-image values the means' intervals resample: (scores, labels), Yes/No right, location right
    per_image: dict = field(default_factory=dict, repr=False)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT) if folder.is_dir() else []


def discover(root, classes=None) -> dict[str, list[Sample]]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset directory")
    out = {}
    for cdir in sorted(p for p in root.iterdir() if p.is_dir() and (p / 'test').is_dir()):
        if classes and cdir.name not in classes:
            continue
        samples = []
        for ddir in sorted(p for p in (cdir / 'test').iterdir() if p.is_dir()):
            good = ddir.name == 'good'
            for img in _images(ddir):
                mask = None if good else cdir / 'ground_truth' / ddir.name / f"{img.stem}_mask.png"
                samples.append(Sample(img, not good, mask if mask is not None and mask.is_file() else None))
        out[cdir.name] = samples
    if not out:
        raise FileNotFoundError(f"{root}: no <class>/test folders found (MVTec-AD layout expected)")
    return out


def reference_shots(root, class_name: str, k: int) -> list[Path]:
    """The reference's choice of normal images: train/good index round*4 + j (round 3), wrapped."""
    train = _images(Path(root) / class_name / 'train' / 'good')
    if len(train) < k:
        raise FileNotFoundError(f"{Path(root) / class_name / 'train' / 'good'}: {len(train)} images, {k} needed")
    return [train[(3 * 4 + j) % len(train)] for j in range(k)]


def load_mask(path: Path | None, size: int = 224) -> np.ndarray:
    if path is None:
        return np.zeros((size, size), np.uint8)
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise ValueError(f"{path}: not a readable mask")
    return (cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0.1 * 255).astype(np.uint8)


def evaluate(pipeline, root, classes=None, k_shot: int = 0, class_map=None, llm: bool = True,
             progress: bool = True, reference=None) -> dict:
    """Run the pipeline over the dataset. ``class_map``: folder name -> bundle class (default: the
    folder name with '_' as ' '). ``reference``: a ``ReferencePipeline`` run on the same inputs
    (the report then has a ``reference`` section: answer agreement, map error)."""
    words = pipeline.prompt['location_words']
    reports = []
    found = discover(root, classes)
    agreement = None
    if reference is not None:
        from . import reference_compare
        agreement = reference_compare.Agreement()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(v) for v in found.values()), desc='evaluate', unit='img', file=sys.stderr)
    for name, samples in found.items():
        t0 = time.perf_counter()
        cls = (class_map or {}).get(name, name.replace('_', ' '))
        shots = reference_shots(root, name, k_shot) if k_shot else []
        memory = pipeline.memory(shots) if k_shot else None
        ref_shots = reference_compare.reference_inputs(pipeline, shots) if agreement is not None else None
        scores, labels, maps, masks, correct, loc_ok, map_loc_ok = [], [], [], [], [], [], []
        rep = ClassReport(name)
        for s in samples:
            res = pipeline.inspect(s.path, class_name=cls, memory=memory, llm=llm)
            if agreement is not None:
                t_ref = time.perf_counter()
                agreement.add(name, s.path, res, *reference_compare.reference_run(
                    pipeline, reference, s.path, cls, ref_shots, llm=llm and res.answer is not None))
                t0 += time.perf_counter() - t_ref  # the class's seconds stay the runtime's own
            gt = load_mask(s.mask)
            scores.append(res.score)
            labels.append(int(s.anomalous))
            maps.append(res.anomaly_map)
            masks.append(gt)
            if not llm and res.verdict in ('yes', 'no'):  # a calibrated threshold's verdict (LLM-free mode)
                correct.append((res.verdict == 'yes') == s.anomalous)
            want = None
            if s.anomalous and cv2.connectedComponents(gt)[0] == 2:  # one defect region
                ys, xs = np.nonzero(gt)
                centroid = (ys.mean() / gt.shape[0], xs.mean() / gt.shape[1])
                want = position_word(*centroid, words)
                map_words = res.locations   # as the pipeline reads its map (the runtime's own rule)
                map_loc_ok.append(map_words[:1] == [want])
            if llm:
                correct.append(reference_correct(res.answer, s.anomalous))
                if want is not None:
                    loc_ok.append(answer_positions(res.answer, words) == [want])
                    row = next(i for i, r in enumerate(words) if want in r)
                    rep.location_cases.append((row, map_loc_ok[-1], loc_ok[-1], bool(map_words),
                                               border_distance(*centroid) < NEAR_BORDER))
                rep.answers.append({'image': str(s.path), 'answer': res.answer, 'verdict': res.verdict,
                                    'score': res.score, 'anomalous': s.anomalous})
            if bar is not None:
                bar.update(1)
        rep.n_images = len(samples)
        rep.image_auroc = image_auroc(scores, labels)
        rep.pixel_auroc = pixel_auroc(maps, masks)
        rep.yes_no_accuracy = float(np.mean(correct)) if correct else None
        rep.location_accuracy = float(np.mean(loc_ok)) if loc_ok else None
        rep.map_location_accuracy = float(np.mean(map_loc_ok)) if map_loc_ok else None
        rep.n_single_defect = len(map_loc_ok)
        rep.per_image = {'image_auroc': (scores, labels), 'yes_no_accuracy': (correct,), 'location_accuracy': (loc_ok,)}
        rep.seconds = time.perf_counter() - t0
        reports.append(rep)
    if bar is not None:
        bar.close()
    keys = ('image_auroc', 'pixel_auroc', 'yes_no_accuracy', 'location_accuracy', 'map_location_accuracy')
    out = {
        'k_shot': k_shot,
        'classes': {r.name: {k: getattr(r, k) for k in ('n_images', 'n_single_defect', 'seconds') + keys}
                    for r in reports},
        'mean': {k: mean_or_none(getattr(r, k) for r in reports) for k in keys},
        'answers': {r.name: r.answers for r in reports},
    }
    out['intervals'] = {
        key: bootstrap_interval([r.per_image[key] for r in reports if r.per_image[key][0]], stat)
        for key, stat in (('image_auroc', image_auroc), ('yes_no_accuracy', share), ('location_accuracy', share))}
    if llm:
        out['location_breakdown'] = location_breakdown([c for r in reports for c in r.location_cases])
    if agreement is not None:
        out['reference'] = agreement.summary()
    return out


ROW_NAMES = ('top', 'middle', 'bottom')


def location_breakdown(cases) -> dict:
    """Where the location answers go wrong, over (row, map_ok, llm_ok, map_fired, near_border) cases: the LLM
    and the map's own largest region both right, one of them, neither (split by whether the map has a region at
    >= 0.5 as large as ``locations`` counts, i.e. whether the defect was found at all); the LLM's accuracy by the
    row of the defect's cell; and the LLM's and the map's accuracy on defects near a cell border and elsewhere."""
    out = {'both': 0, 'llm_only': 0, 'map_only': 0, 'neither_map_fired': 0, 'neither_map_silent': 0}
    rows = {name: [0, 0] for name in ROW_NAMES}
    border = {where: {'images': 0, 'llm_correct': 0, 'map_correct': 0} for where in ('near_border', 'elsewhere')}
    for row, map_ok, llm_ok, fired, near in cases:
        key = ('both' if llm_ok else 'map_only') if map_ok else \
            ('llm_only' if llm_ok else 'neither_map_fired' if fired else 'neither_map_silent')
        out[key] += 1
        rows[ROW_NAMES[row]][0] += int(llm_ok)
        rows[ROW_NAMES[row]][1] += 1
        b = border['near_border' if near else 'elsewhere']
        b['images'] += 1
        b['llm_correct'] += int(llm_ok)
        b['map_correct'] += int(map_ok)
    out['by_row'] = {name: {'correct': ok, 'images': n} for name, (ok, n) in rows.items()}
    out['by_border'] = border
    return out


def markdown(report: dict) -> str:
    rows = ['| class | images | image AUROC | pixel AUROC | Yes/No acc. | location acc. |', '|---|---|---|---|---|---|']

    def f(v):
        return '-' if v is None else f"{v:.3f}"
    for name, r in report['classes'].items():
        rows.append(f"| {name} | {r['n_images']} | {f(r['image_auroc'])} | {f(r['pixel_auroc'])} | "
                    f"{f(r['yes_no_accuracy'])} | {f(r['location_accuracy'])} |")
    m = report['mean']
    rows.append(f"| **mean** | | {f(m['image_auroc'])} | {f(m['pixel_auroc'])} | {f(m['yes_no_accuracy'])} | "
                f"{f(m['location_accuracy'])} |")
    if 'reference' in report:
        from .reference_compare import markdown_line
        rows += ['', markdown_line(report['reference'])]
    return '\n'.join(rows)


def write_json(path, report: dict) -> None:
    from .bench_report import write_text
    write_text(path, json.dumps(report, indent=1))
