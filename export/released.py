"""A bundle from the released checkpoints: ImageBind-Huge, the PandaGPT delta, an AnomalyGPT
checkpoint and a Vicuna v0 directory (spec section 5.4). Every key is checked strictly."""
from __future__ import annotations

import logging
from pathlib import Path

from ..models.anomalygpt import AnomalyGPT
from ..models.config import get_config
from ..models.imagebind import TextTower
from ..models.llm import add_lora
from ..models.loaders import check_vicuna_dir, load_anomalygpt_delta, load_imagebind, load_pandagpt_delta, load_vicuna

log = logging.getLogger(__name__)


def load_released(imagebind, anomalygpt, pandagpt, vicuna, config: str = 'huge'):
    """-> (AnomalyGPT with LoRA unmerged, ImageBind text tower), fp32 on the CPU."""
    # the huge config fixes vocab 32001; smaller configs (tests) take the checkpoint's own
    cfg = get_config(config) if config == 'huge' else \
        get_config(config, vocab=check_vicuna_dir(vicuna, expected_vocab=None)['vocab_size'])
    log.info("loading Vicuna from %s", vicuna)
    llm = add_lora(load_vicuna(vicuna, expected_vocab=cfg.llm.vocab), cfg.llm)
    model = AnomalyGPT(cfg, llm)
    text = TextTower(cfg.text)
    log.info("loading ImageBind from %s", imagebind)
    load_imagebind(imagebind, model.visual_encoder, text)
    load_pandagpt_delta(pandagpt, model)
    load_anomalygpt_delta(anomalygpt, model)
    return model.eval(), text.eval()


def export_released(out_dir, imagebind, anomalygpt, pandagpt, vicuna, config: str = 'huge', **kwargs) -> Path:
    from .bundle_export import write_bundle
    model, text = load_released(imagebind, anomalygpt, pandagpt, vicuna, config)
    source = {'kind': 'released', 'files': {'imagebind': Path(imagebind).name, 'anomalygpt': str(anomalygpt),
                                            'pandagpt': Path(pandagpt).name, 'vicuna': Path(vicuna).name}}
    return write_bundle(out_dir, model, text, vicuna, source, **kwargs)
