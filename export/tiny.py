"""The tiny bundle: a random-weight model of the exact architecture, the fixture for tests and
benchmarks. Everything is seeded, so ``compare`` can rebuild the PyTorch modules from the manifest."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..models.anomalygpt import AnomalyGPT
from ..models.config import get_config
from ..models.imagebind import TextTower, init_random
from ..models.tokenizer import reference_corpus, train_sentencepiece, vocab_size


def build_tiny(tokenizer_dir, seed: int = 0, config: str = 'tiny'):
    """(model, text tower) of the given config with seeded random weights; the vocabulary is the tokenizer's."""
    cfg = get_config(config, vocab=vocab_size(tokenizer_dir))
    model = AnomalyGPT.random(cfg, seed=seed)
    text = TextTower(cfg.text)
    init_random(text, seed + 2)
    return model, text.eval()


def export_tiny(out_dir, seed: int = 0, precisions=('fp32',), quants=('f32',), overwrite: bool = False,
                extra_classes=None, **kwargs) -> Path:
    from .bundle_export import write_bundle
    from .bundle_writer import BundleWriter
    BundleWriter(out_dir, overwrite=overwrite).check_target()   # before the tokenizer and model are built
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_sentencepiece(Path(tmp) / 'tokenizer', reference_corpus(), vocab_size=400)
        model, text = build_tiny(tok, seed)
        return write_bundle(out_dir, model, text, tok, {'kind': 'random', 'seed': seed},
                            precisions=precisions, quants=quants, overwrite=overwrite,
                            extra_classes=extra_classes, **kwargs)
