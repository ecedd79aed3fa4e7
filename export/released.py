"""A bundle from the released checkpoints: ImageBind-Huge, the PandaGPT delta, an AnomalyGPT
checkpoint and a Vicuna v0 directory (spec section 5.4). Every key is checked strictly.

The vision side is loaded into PyTorch (about 2.6 GB in fp32); the LLM is never loaded whole:
its weights are read, LoRA-merged and written to GGUF one tensor at a time."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

from ..models.anomalygpt import AnomalyGPT
from ..models.config import get_config
from ..models.imagebind import TextTower
from ..models.loaders import (check_torch_file, check_vicuna_dir, load_anomalygpt_delta, load_imagebind,
                              load_llama_proj)

log = logging.getLogger(__name__)


def load_released_vision(imagebind, anomalygpt, pandagpt, vicuna, config: str = 'huge'):
    """-> (AnomalyGPT without its LLM, ImageBind text tower), fp32 on the CPU."""
    # the huge config fixes vocab 32001; smaller configs (tests) take the checkpoint's own
    cfg = get_config(config) if config == 'huge' else \
        get_config(config, vocab=check_vicuna_dir(vicuna, expected_vocab=None)['vocab_size'])
    model = AnomalyGPT(cfg)
    text = TextTower(cfg.text)
    log.info("loading ImageBind from %s", imagebind)
    load_imagebind(imagebind, model.visual_encoder, text)
    load_llama_proj(pandagpt, model.llama_proj)
    load_anomalygpt_delta(anomalygpt, model)
    return model.eval(), text.eval()


def released_llm_exporter(vicuna, pandagpt, cfg):
    """The bundle's LLM step for released files: stream Vicuna + the PandaGPT LoRA into GGUF."""
    from .llm_export import export_llm_released
    return functools.partial(export_llm_released, vicuna, pandagpt, lora_r=cfg.llm.lora_r,
                             lora_alpha=cfg.llm.lora_alpha, expected_vocab=cfg.llm.vocab)


def export_released(out_dir, imagebind, anomalygpt, pandagpt, vicuna, config: str = 'huge', **kwargs) -> Path:
    from .bundle_export import write_bundle
    from .bundle_writer import BundleWriter
    # every input and the target checked first: loading the huge vision side takes minutes and GBs
    BundleWriter(out_dir, overwrite=kwargs.get('overwrite', False)).check_target()
    for path in (imagebind, anomalygpt, pandagpt):
        check_torch_file(Path(path))
    check_vicuna_dir(vicuna, expected_vocab=32001 if config == 'huge' else None)
    model, text = load_released_vision(imagebind, anomalygpt, pandagpt, vicuna, config)
    source = {'kind': 'released', 'files': {'imagebind': Path(imagebind).name, 'anomalygpt': str(anomalygpt),
                                            'pandagpt': Path(pandagpt).name, 'vicuna': Path(vicuna).name}}
    return write_bundle(out_dir, model, text, vicuna, source,
                        llm_exporter=released_llm_exporter(vicuna, pandagpt, model.cfg), **kwargs)
