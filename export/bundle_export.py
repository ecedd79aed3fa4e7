"""Assemble a bundle from a PyTorch AnomalyGPT: vision graphs, text features, GGUF, manifest."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..models import spec
from ..models.anomalygpt import AnomalyGPT
from ..models.text_features import text_feature_table
from .bundle_writer import BundleWriter, package_versions, preprocess_manifest, prompt_manifest

log = logging.getLogger(__name__)


def class_table(extra: dict[str, str] | None = None) -> dict[str, str | None]:
    """Ordered class name -> description. The reference's inference order first (its first-match rule
    depends on it), then the other described classes, then the user's own products."""
    table: dict[str, str | None] = {name: spec.DESCRIPTIONS.get(name) for name in spec.CLASS_NAMES}
    for name, desc in spec.DESCRIPTIONS.items():
        table.setdefault(name, desc)
    for name, desc in (extra or {}).items():
        table[name.replace('_', ' ')] = desc
    return table


def write_bundle(out_dir, model: AnomalyGPT, text_tower, tokenizer_dir, source: dict, *,
                 precisions=('fp32',), quants=('f16',), opset: int = 17, extra_classes=None,
                 overwrite: bool = False, external_data_threshold: int | None = None, verify: bool = True,
                 llm_exporter=None) -> Path:
    """``llm_exporter(out_dir, quants=...) -> manifest llm section``; by default the model's own
    (PEFT-wrapped) LLM is merged and written with the tokenizer in ``tokenizer_dir``."""
    from .llm_export import export_llm
    from .onnx_export import export_vision

    if llm_exporter is None:
        def llm_exporter(out, quants):
            return export_llm(model.llama_model, tokenizer_dir, out, quants=quants)

    classes = class_table(extra_classes)
    with BundleWriter(out_dir, overwrite=overwrite) as w:
        log.info("text features for %d classes", len(classes))
        feats = text_feature_table(text_tower, list(classes))
        table = np.stack([feats[name].float().numpy() for name in classes]).astype(np.float32)
        np.save(w.path('text_features.npy'), table)
        kwargs = {} if external_data_threshold is None else {'external_data_threshold': external_data_threshold}
        components = export_vision(model, w.tmp, precisions=precisions, opset=opset, verify=verify, **kwargs)
        llm = llm_exporter(w.tmp, quants=quants) if quants else None
        manifest = {
            'model': {'config': model.cfg.to_dict(), 'source': source},
            'preprocess': preprocess_manifest(),
            'prompt': prompt_manifest(),
            'classes': {name: {'description': desc, 'row': i} for i, (name, desc) in enumerate(classes.items())},
            'default_class': spec.DEFAULT_CLASS,
            'text_features': {'file': 'text_features.npy', 'shape': list(table.shape)},
            'components': components,
            'llm': llm,
            'created_by': package_versions('torch', 'onnx', 'onnxruntime', 'transformers', 'peft', 'gguf',
                                           'llama-cpp-python'),
        }
        return w.commit(manifest)


def update_bundle_llm(bundle_dir, vicuna, pandagpt, quants=('f16',)) -> Path:
    """Rewrite only the LLM files of an existing bundle (Vicuna + the PandaGPT LoRA, streamed), atomically:
    the other files are hard-linked into the new bundle and the manifest's ``llm`` section is replaced."""
    import os

    from ..models.config import ModelConfig
    from ..runtime.bundle import MANIFEST, Bundle
    from .released import released_llm_exporter

    bundle = Bundle.open(bundle_dir, verify_hashes=True)
    cfg = ModelConfig.from_dict(bundle.manifest['model']['config'])
    old_llm = set((bundle.manifest.get('llm') or {}).get('files', {}).values())
    with BundleWriter(bundle_dir, overwrite=True) as w:
        for name in bundle.manifest['files']:
            if name not in old_llm and name != MANIFEST:
                os.link(bundle.root / name, w.path(name))
        manifest = {k: v for k, v in bundle.manifest.items() if k not in ('files', 'format', 'format_version')}
        manifest['llm'] = released_llm_exporter(vicuna, pandagpt, cfg)(w.tmp, quants=quants)
        return w.commit(manifest)
