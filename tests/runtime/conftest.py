"""Fixtures of the llama.cpp session tests (the GGUF is written with the training-side exporter)."""
import pytest


@pytest.fixture(scope='session')
def tiny_gguf_f32(tmp_path_factory, tiny_model, tiny_tokenizer_dir):
    from anomalygpt_edge.export.llm_export import export_llm
    out = tmp_path_factory.mktemp('gguf_rt')
    export_llm(tiny_model.llama_model, tiny_tokenizer_dir, out, quants=('f32',))
    return out / 'llm-f32.gguf'


def _align_corners_upsample(grid, size: int):
    """Bilinear, corners aligned (as the decoder's), written out: map pixel m reads grid point m (n-1)/(size-1)."""
    import numpy as np
    n = grid.shape[0]
    pos = np.arange(size) * (n - 1) / (size - 1)
    lo = np.minimum(pos.astype(int), n - 2)
    f = pos - lo
    rows = grid[lo] * (1 - f)[:, None] + grid[lo + 1] * f[:, None]
    return rows[:, lo] * (1 - f) + rows[:, lo + 1] * f


@pytest.fixture
def align_corners_upsample():
    return _align_corners_upsample
