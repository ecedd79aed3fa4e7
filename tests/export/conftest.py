"""Fixtures of the LLM export tests: the tiny model's LLM exported once per session."""
import pytest


@pytest.fixture(scope='session')
def tiny_llm(tiny_model):
    """The reference LLM: the tiny model's PEFT-wrapped LLaMA (LoRA active, alpha/r = 2)."""
    return tiny_model.llama_model


@pytest.fixture(scope='session')
def tiny_gguf(tmp_path_factory, tiny_llm, tiny_tokenizer_dir):
    """(directory, manifest llm section) with every supported type of the tiny LLM."""
    from anomalygpt_edge.export.llm_export import export_llm
    out = tmp_path_factory.mktemp('gguf')
    section = export_llm(tiny_llm, tiny_tokenizer_dir, out, quants=('f32', 'f16', 'q8_0', 'q4_k_m', 'q4_0'))
    return out, section
