"""Shared fixtures: a tiny tokenizer trained once per session, the tiny model built from it."""
from __future__ import annotations

import pytest

torch = pytest.importorskip('torch')


@pytest.fixture(scope='session')
def tiny_tokenizer_dir(tmp_path_factory):
    from anomalygpt_edge.models.tokenizer import reference_corpus, train_sentencepiece
    return train_sentencepiece(tmp_path_factory.mktemp('tok'), reference_corpus(), vocab_size=400)


@pytest.fixture(scope='session')
def tiny_tokenizer(tiny_tokenizer_dir):
    from anomalygpt_edge.models.tokenizer import load_tokenizer
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope='session')
def tiny_config(tiny_tokenizer_dir):
    from anomalygpt_edge.models.config import get_config
    from anomalygpt_edge.models.tokenizer import vocab_size
    return get_config('tiny', vocab=vocab_size(tiny_tokenizer_dir))


@pytest.fixture(scope='session')
def tiny_model(tiny_config):
    from anomalygpt_edge.models.anomalygpt import AnomalyGPT
    return AnomalyGPT.random(tiny_config, seed=0)


@pytest.fixture(scope='session')
def tiny_text_tower(tiny_config):
    from anomalygpt_edge.models.imagebind import TextTower, init_random
    tower = TextTower(tiny_config.text)
    init_random(tower, seed=3)
    return tower.eval()


@pytest.fixture(scope='session')
def tiny_bundle(tmp_path_factory, tiny_model, tiny_text_tower, tiny_tokenizer_dir):
    """The tiny model exported (fp32 graphs, f32 GGUF): the runtime answers exactly as the reference."""
    from anomalygpt_edge.export.bundle_export import write_bundle
    out = tmp_path_factory.mktemp('bundle') / 'tiny'
    return write_bundle(out, tiny_model, tiny_text_tower, tiny_tokenizer_dir, {'kind': 'random', 'seed': 0},
                        precisions=('fp32',), quants=('f32',))
