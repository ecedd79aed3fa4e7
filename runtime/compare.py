"""One comparator for every parity check: export verification, tests, benchmarks, ``compare``.

Any two runners (or two dicts of outputs) are compared output by output: max absolute error,
max relative error, mean absolute error, cosine similarity, and pass/fail with
``numpy.allclose`` semantics, ``|actual - expected| <= atol + rtol * |expected|``, where
``expected`` is the reference (the second runner). NaN never passes. numpy only.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """|actual - expected| <= atol + range_atol * max|expected| + rtol * |expected|, element-wise.
    ``range_atol`` scales the absolute bound with the output's own range: a raw residual stream of a
    trained tower reaches tens, and float32 summation order alone then moves values near zero by more
    than a fixed atol or an rtol allows."""
    atol: float
    rtol: float = 0.0
    range_atol: float = 0.0

    @classmethod
    def coerce(cls, value) -> "Tolerance":
        """A Tolerance, a ``{"atol", "rtol", "range_atol"}`` dict or an ``(atol, rtol)`` pair."""
        if isinstance(value, Tolerance):
            return value
        if isinstance(value, Mapping):
            return cls(float(value['atol']), float(value.get('rtol', 0.0)), float(value.get('range_atol', 0.0)))
        atol, rtol = value
        return cls(float(atol), float(rtol))

    def atol_for(self, expected) -> float:
        """The absolute bound for this reference array."""
        if not self.range_atol or not np.size(expected):
            return self.atol
        return self.atol + self.range_atol * float(np.max(np.abs(np.asarray(expected, dtype=np.float64))))

    def to_dict(self) -> dict:
        d = {'atol': self.atol, 'rtol': self.rtol}
        if self.range_atol:
            d['range_atol'] = self.range_atol
        return d


def _tolerance_for(tolerances, name: str) -> Tolerance:
    """``tolerances``: one tolerance for every output, or a mapping output name -> tolerance
    (``'*'`` is the default for outputs not named)."""
    if isinstance(tolerances, Mapping) and not ({'atol'} <= set(tolerances)):
        if name in tolerances:
            return Tolerance.coerce(tolerances[name])
        if '*' in tolerances:
            return Tolerance.coerce(tolerances['*'])
        raise KeyError(f"no tolerance given for output {name!r} (known: {sorted(tolerances)})")
    return Tolerance.coerce(tolerances)


@dataclass
class OutputComparison:
    """One output of one case, compared against its reference."""
    case: str
    name: str
    shape: tuple
    ref_shape: tuple
    atol: float
    rtol: float
    max_abs: float = math.nan
    max_rel: float = math.nan
    mean_abs: float = math.nan
    cosine: float = math.nan
    n_failed: int = 0            # elements outside atol + rtol * |expected|
    size: int = 0
    error: str | None = None     # shape mismatch, missing output, NaN ...

    @property
    def passed(self) -> bool:
        return self.error is None and self.n_failed == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d['shape'], d['ref_shape'] = list(self.shape), list(self.ref_shape)
        d['passed'] = self.passed
        # JSON has no NaN/inf: write them as strings
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def compare_arrays(actual, expected, atol: float, rtol: float = 0.0, name: str = 'output',
                   case: str = '') -> OutputComparison:
    """Compare one array with its reference; errors are computed in float64."""
    a, b = np.asarray(actual), np.asarray(expected)
    res = OutputComparison(case, name, tuple(a.shape), tuple(b.shape), float(atol), float(rtol), size=int(b.size))
    if a.shape != b.shape:
        res.error = f"shape {list(a.shape)} differs from the reference's {list(b.shape)}"
        return res
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if a64.size == 0:
        res.max_abs = res.max_rel = res.mean_abs = 0.0
        res.cosine = 1.0
        return res
    diff = np.abs(a64 - b64)
    with np.errstate(divide='ignore', invalid='ignore'):
        rel = np.where(diff == 0, 0.0, diff / np.abs(b64))
    res.max_abs, res.mean_abs = float(np.max(diff)), float(np.mean(diff))
    res.max_rel = float(np.max(rel))
    res.cosine = _cosine(a64, b64)
    ok = np.isclose(a64, b64, atol=atol, rtol=rtol, equal_nan=False)
    res.n_failed = int(ok.size - np.count_nonzero(ok))
    nan_a, nan_b = int(np.isnan(a64).sum()), int(np.isnan(b64).sum())
    if nan_a or nan_b:
        res.error = f"NaN in output ({nan_a} elements) / reference ({nan_b} elements)"
    return res


@dataclass
class ComparisonReport:
    """Every output of every case; ``passed`` only if all are within tolerance."""
    label: str = 'actual'
    ref_label: str = 'reference'
    results: list[OutputComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    def worst(self, name: str | None = None) -> dict:
        """Largest errors over all cases (for one output, or all): max_abs, max_rel, min cosine."""
        rs = [r for r in self.results if (name is None or r.name == name) and r.error is None]
        if not rs:
            return {'max_abs': None, 'max_rel': None, 'min_cosine': None}
        return {'max_abs': max(r.max_abs for r in rs), 'max_rel': max(r.max_rel for r in rs),
                'min_cosine': min(r.cosine for r in rs)}

    def extend(self, other: "ComparisonReport") -> "ComparisonReport":
        self.results.extend(other.results)
        return self

    def to_dict(self) -> dict:
        return {'label': self.label, 'reference': self.ref_label, 'passed': self.passed,
                'results': [r.to_dict() for r in self.results]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        head = ('case', 'output', 'shape', 'max_abs', 'max_rel', 'cosine', 'atol', 'rtol', 'fails', 'result')
        rows = [head]
        for r in self.results:
            verdict = 'ok' if r.passed else ('FAIL: ' + r.error if r.error else 'FAIL')
            rows.append((r.case, r.name, 'x'.join(map(str, r.shape)), f'{r.max_abs:.3g}', f'{r.max_rel:.3g}',
                         f'{r.cosine:.7f}', f'{r.atol:g}', f'{r.rtol:g}', f'{r.n_failed}/{r.size}', verdict))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [f'{self.label} vs {self.ref_label}: ' + ('PASSED' if self.passed else 'FAILED')]
        for i, row in enumerate(rows):
            lines.append('  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append('  '.join('-' * w for w in widths))
        return '\n'.join(lines)

    __str__ = table


def compare_outputs(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], tolerances,
                    case: str = '', label: str = 'actual', ref_label: str = 'reference') -> ComparisonReport:
    """Compare every reference output with the same-named actual output (a missing one fails)."""
    report = ComparisonReport(label, ref_label)
    for name, ref in expected.items():
        tol = _tolerance_for(tolerances, name)
        if name not in actual:
            r = OutputComparison(case, name, (), tuple(np.shape(ref)), tol.atol, tol.rtol, size=int(np.size(ref)))
            r.error = f"{label} produced no output {name!r} (it produced {sorted(actual)})"
            report.results.append(r)
            continue
        report.results.append(compare_arrays(actual[name], ref, tol.atol_for(ref), tol.rtol, name=name, case=case))
    return report


def _cases(feeds_list) -> Iterable[tuple[str, dict]]:
    for i, item in enumerate(feeds_list):
        yield (item if isinstance(item, tuple) else (f'#{i}', item))


def compare_runners(a, b, feeds_list, tolerances, label: str | None = None,
                    ref_label: str | None = None) -> ComparisonReport:
    """Run both runners on each feeds dict (or ``(case_label, feeds)`` pair); ``b`` is the reference."""
    label = label or getattr(a, 'name', type(a).__name__)
    ref_label = ref_label or getattr(b, 'name', type(b).__name__)
    report = ComparisonReport(label, ref_label)
    for case, feeds in _cases(feeds_list):
        report.extend(compare_outputs(a.infer(feeds), b.infer(feeds), tolerances, case, label, ref_label))
    return report
