"""Fixtures of the llama.cpp session tests (the GGUF is written with the training-side exporter)."""
import pytest


@pytest.fixture(scope='session')
def tiny_gguf_f32(tmp_path_factory, tiny_model, tiny_tokenizer_dir):
    from anomalygpt_edge.export.llm_export import export_llm
    out = tmp_path_factory.mktemp('gguf_rt')
    export_llm(tiny_model.llama_model, tiny_tokenizer_dir, out, quants=('f32',))
    return out / 'llm-f32.gguf'
