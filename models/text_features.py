"""Per-class normal/abnormal text features (spec 3.2), computed offline with the ImageBind text tower.

The CLIP BPE tokenizer and its vocabulary come from the installed ``open_clip_torch`` package,
installed *without its dependencies* (``pip install --no-deps open_clip_torch``): its
``tokenizer.py`` is loaded by file path, so ``open_clip/__init__`` (which imports torchvision, a
package that does not import beside this torch) never runs. Nothing is downloaded.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from . import spec

CONTEXT = 77


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    found = importlib.util.find_spec('open_clip')  # locates the package without executing it
    if found is None or not found.submodule_search_locations:
        raise ImportError("the CLIP BPE vocabulary comes from open_clip_torch: "
                          "pip install --no-deps open_clip_torch==3.3.0 (plus ftfy and regex)")
    folder = Path(list(found.submodule_search_locations)[0])
    loader = importlib.util.spec_from_file_location('_anomalygpt_edge_clip_bpe', folder / 'tokenizer.py')
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.SimpleTokenizer(bpe_path=str(folder / 'bpe_simple_vocab_16e6.txt.gz'), context_length=CONTEXT)


def class_sentences(class_name: str) -> tuple[list[str], list[str]]:
    """State-major prompt ensemble: 14 normal and 10 abnormal sentences for one object name."""
    obj = class_name.replace('_', ' ')

    def build(states):
        return [t.format(s.format(obj)) for s in states for t in spec.PROMPT_TEMPLATES]
    return build(spec.PROMPT_NORMAL), build(spec.PROMPT_ABNORMAL)


@functools.lru_cache(maxsize=256)
def class_token_ids(class_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP BPE ids [14,L] and [10,L] of the normal and abnormal sentences of one class, cut after the
    longest sentence's end-of-text (L <= 77; the text tower gives the same embeddings as on all 77)."""
    tok = clip_tokenizer()
    ids = [tok(sentences) for sentences in class_sentences(class_name)]
    n = 1 + max(int(t.argmax(dim=-1).max()) for t in ids)
    return tuple(t[:, :n] for t in ids)


def class_text_features(text_tower, class_name: str) -> torch.Tensor:
    """[2,E]: row 0 normal, row 1 abnormal; each the L2-normalised mean of its sentence embeddings.
    Differentiable (training); wrap in ``torch.no_grad()`` for export."""
    rows = []
    for ids in class_token_ids(class_name):
        mean = text_tower(ids).mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


@torch.no_grad()
def text_feature_table(text_tower, class_names) -> dict[str, torch.Tensor]:
    return {name.replace('_', ' '): class_text_features(text_tower, name) for name in class_names}
