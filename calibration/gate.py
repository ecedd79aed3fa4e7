"""The accuracy gate of an INT8 calibration: the candidate against the FP32 bundle on held-out images.

Both pipelines run the same held-out MVTec-layout folder (normal and defective images) without the
LLM, zero-shot and, with ``k_shot``, few-shot from the class's first normal training images. What is
measured: anomaly-map errors (max and mean absolute), encoder output errors (the comparator), and
image AUROC and pixel AUROC (means over classes, per mode) for FP32 and INT8. The calibration is
refused when the
AUROC drops by more than ``max_drop`` points (1 point = 0.01) in any mode, or when the mean
absolute map error exceeds ``max_map_mae``. The prompt learners of both are also run on the same
(reference) map of the first ``PROMPT_CASES`` images: the worst relative L2 error of the 18 prompts must
stay within ``max_prompt_error`` (it is 0 when the candidate's prompt learner is the FP32 one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..benchmarks.evaluate import discover, load_mask, reference_shots
from ..benchmarks.metrics import image_auroc, mean_or_none, pixel_auroc
from ..runtime.compare import ComparisonReport, compare_outputs
from .data_reader import CalibrationError

ENCODER_CASES = 16  # held-out images on which the encoder outputs themselves are compared
PROMPT_CASES = 32   # held-out images on which the prompt learners' outputs are compared


@dataclass
class GateReport:
    max_drop: float
    max_map_mae: float
    modes: dict = field(default_factory=dict)     # mode -> {fp32_auroc, int8_auroc, drop_points, per_class,
                                                  #          fp32_pixel_auroc, int8_pixel_auroc}
    map_max_abs: float = 0.0
    map_mean_abs: float = 0.0
    encoder: dict = field(default_factory=dict)   # output -> worst max_abs / max_rel / min_cosine
    prompts: dict = field(default_factory=dict)   # worst max_abs, rel_l2 and min cosine of the 18 prompts
    max_prompt_error: float = 0.02
    n_images: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {'passed': self.passed, 'reasons': self.reasons, 'max_drop_points': self.max_drop,
                'max_map_mae': self.max_map_mae, 'n_images': self.n_images, 'map_max_abs': self.map_max_abs,
                'map_mean_abs': self.map_mean_abs, 'encoder': self.encoder, 'prompts': self.prompts,
                'max_prompt_error': self.max_prompt_error, 'modes': self.modes}

    def summary(self) -> str:
        lines = [f"accuracy gate: {'PASSED' if self.passed else 'REFUSED'} on {self.n_images} held-out images"]
        for mode, m in self.modes.items():
            f = (lambda v: '-' if v is None else f'{v:.4f}')
            lines.append(f"  {mode}: image AUROC fp32 {f(m['fp32_auroc'])}  int8 {f(m['int8_auroc'])}  "
                         f"drop {m['drop_points']:+.2f} points (limit {self.max_drop:g}); pixel AUROC fp32 "
                         f"{f(m.get('fp32_pixel_auroc'))}  int8 {f(m.get('int8_pixel_auroc'))}")
        lines.append(f"  anomaly map error: max {self.map_max_abs:.4f}  mean {self.map_mean_abs:.5f} "
                     f"(limit {self.max_map_mae:g})")
        for name, w in self.encoder.items():
            lines.append(f"  encoder {name}: max abs {w['max_abs']:.4g}  max rel {w['max_rel']:.4g}  "
                         f"min cosine {w['min_cosine']:.6f}")
        if self.prompts:
            p = self.prompts
            lines.append(f"  prompts: max abs {p['max_abs']:.4g}  relative L2 {p['rel_l2']:.4g} (limit "
                         f"{self.max_prompt_error:g})  min cosine {p['min_cosine']:.6f}")
        lines += [f"  refused: {r}" for r in self.reasons]
        return '\n'.join(lines)


def _compare_prompts(reference, candidate, amap: np.ndarray, worst: dict) -> None:
    """Both prompt learners on the same map; the worst errors so far kept in ``worst``."""
    x = np.ascontiguousarray(amap[None, None], dtype=np.float32)
    p = reference.runners['prompt_learner'].infer({'anomaly_map': x})['prompts'].astype(np.float64)
    q = candidate.runners['prompt_learner'].infer({'anomaly_map': x})['prompts'].astype(np.float64)
    d = q - p
    rel = float(np.linalg.norm(d) / max(np.linalg.norm(p), 1e-12))
    cos = float((p * q).sum() / max(np.linalg.norm(p) * np.linalg.norm(q), 1e-12))
    worst['max_abs'] = max(worst['max_abs'], float(np.abs(d).max()))
    worst['rel_l2'] = max(worst['rel_l2'], rel) if np.isfinite(rel) else float('nan')
    worst['min_cosine'] = min(worst['min_cosine'], cos)
    worst['n_images'] += 1


def heldout_classes(known, heldout_root, class_map=None, classes=None) -> dict[str, str]:
    """Each held-out class folder -> the bundle's class (``known``) that names it; a class the bundle does not
    know is refused, as ``eval`` refuses it (its text features would not be the class's)."""
    out = {}
    for folder in discover(heldout_root, classes):
        name = (class_map or {}).get(folder, folder.replace('_', ' '))
        if name not in known:
            raise CalibrationError(f"{Path(heldout_root) / folder}: unknown class {name!r}; the bundle has: "
                                   f"{', '.join(known)} (--class-map {folder}=CLASS names another)")
        out[folder] = name
    return out


def accuracy_gate(reference, candidate, heldout_root, k_shot: int = 1, max_drop: float = 0.5,
                  max_map_mae: float = 0.02, classes=None, class_map=None, max_prompt_error: float = 0.02) -> GateReport:
    """``reference`` / ``candidate``: Pipelines (LLM not needed) differing only in their vision runners."""
    report = GateReport(max_drop, max_map_mae, max_prompt_error=max_prompt_error)
    prompt_err = {'max_abs': 0.0, 'rel_l2': 0.0, 'min_cosine': 1.0, 'n_images': 0}
    found = discover(heldout_root, classes)
    bundle_class = heldout_classes(reference.classes, heldout_root, class_map, classes)
    modes = ['zero-shot'] + ([f'{k_shot}-shot'] if k_shot else [])
    per_mode = {m: {'fp32': [], 'int8': [], 'px_fp32': [], 'px_int8': [], 'per_class': {}} for m in modes}
    enc = ComparisonReport('int8', 'fp32')
    max_abs, abs_sum, n_px = 0.0, 0.0, 0
    for folder, samples in found.items():
        cls = bundle_class[folder]
        memories = {'zero-shot': (None, None)}
        if k_shot:
            shots = reference_shots(heldout_root, folder, k_shot)
            memories[f'{k_shot}-shot'] = (reference.memory(shots), candidate.memory(shots))
        labels = [int(s.anomalous) for s in samples]
        masks = [load_mask(s.mask) for s in samples]
        for mode, (mem_ref, mem_cand) in memories.items():
            s_ref, s_cand, m_ref, m_cand = [], [], [], []
            for s in samples:
                if mode == 'zero-shot' and len(enc.results) < 2 * ENCODER_CASES:
                    x, _, _ = reference.load(s.path)
                    enc.extend(compare_outputs(candidate.runners['encoder'].infer({'image': x}),
                                               reference.runners['encoder'].infer({'image': x}),
                                               {'atol': 0.0, 'rtol': 0.0}, str(s.path)))
                a = reference.inspect(s.path, class_name=cls, memory=mem_ref, llm=False)
                b = candidate.inspect(s.path, class_name=cls, memory=mem_cand, llm=False)
                if mode == 'zero-shot' and prompt_err['n_images'] < PROMPT_CASES:
                    _compare_prompts(reference, candidate, a.anomaly_map, prompt_err)
                d = np.abs(a.anomaly_map.astype(np.float64) - b.anomaly_map)
                max_abs, abs_sum, n_px = max(max_abs, float(d.max())), abs_sum + float(d.sum()), n_px + d.size
                s_ref.append(a.score)
                s_cand.append(b.score)
                m_ref.append(a.anomaly_map)
                m_cand.append(b.anomaly_map)
            r, c = image_auroc(s_ref, labels), image_auroc(s_cand, labels)
            pr, pc = pixel_auroc(m_ref, masks), pixel_auroc(m_cand, masks)
            for key, v in (('fp32', r), ('int8', c), ('px_fp32', pr), ('px_int8', pc)):
                per_mode[mode][key].append(v)
            per_mode[mode]['per_class'][folder] = {'fp32': r, 'int8': c, 'fp32_pixel': pr, 'int8_pixel': pc}
        report.n_images += len(samples)
    for mode, m in per_mode.items():
        r, c = mean_or_none(m['fp32']), mean_or_none(m['int8'])
        drop = 0.0 if r is None or c is None else 100.0 * (r - c)
        report.modes[mode] = {'fp32_auroc': r, 'int8_auroc': c, 'drop_points': drop, 'per_class': m['per_class'],
                              'fp32_pixel_auroc': mean_or_none(m['px_fp32']), 'int8_pixel_auroc': mean_or_none(m['px_int8'])}
        if drop > max_drop:
            report.reasons.append(f"{mode} image AUROC drops {drop:.2f} points ({r:.4f} -> {c:.4f}), "
                                  f"more than --max-drop {max_drop:g}")
    report.map_max_abs = max_abs
    report.map_mean_abs = abs_sum / max(n_px, 1)
    if report.map_mean_abs > max_map_mae:
        report.reasons.append(f"mean absolute anomaly-map error {report.map_mean_abs:.4f} exceeds "
                              f"--max-map-error {max_map_mae:g}")
    report.prompts = prompt_err
    if not np.isfinite(prompt_err['rel_l2']) or prompt_err['rel_l2'] > max_prompt_error:
        report.reasons.append(f"the prompts move by {prompt_err['rel_l2']:.4f} (relative L2, worst image), more than "
                              f"--max-prompt-error {max_prompt_error:g}")
    names = dict.fromkeys(r.name for r in enc.results)
    report.encoder = {n: enc.worst(n) for n in names}
    if any(r.error for r in enc.results):
        report.reasons.append("the INT8 encoder produced NaN or wrongly shaped outputs")
    return report
