"""The shipped demo bundle matches its manifest and answers the sample images as recorded when it
was measured (runtime/demo/samples/expected.json, written by benchmarks/demo_report.py)."""
import json
from pathlib import Path

import pytest

from anomalygpt_edge.runtime.bundle import Bundle
from anomalygpt_edge.runtime.pipeline import Pipeline

DEMO = Path(__file__).resolve().parents[2] / 'runtime' / 'demo'


def test_files_match_the_manifest():
    bundle = Bundle.open(DEMO / 'bundle', verify_hashes=True)
    assert bundle.llm['files'] and set(bundle.manifest['components']) >= {'encoder', 'decoder', 'fewshot', 'prompt_learner'}
    size = sum(p.stat().st_size for p in DEMO.rglob('*') if p.is_file())
    assert size < 30e6, f"the demo (bundle + samples) is {size / 1e6:.1f} MB, over 30 MB"


def test_answers_the_samples_as_recorded():
    expected = json.loads((DEMO / 'samples' / 'expected.json').read_text())
    assert len(expected) >= 10
    with Pipeline.from_bundle(DEMO / 'bundle', exact_llm=True, threads=2) as pipe:
        for name, want in expected.items():
            got = pipe.inspect(DEMO / 'samples' / name, class_name=want['class'])
            assert got.verdict == want['verdict'], name
            assert got.answer == want['answer'], name
            assert got.score == pytest.approx(want['score'], abs=2e-3), name
