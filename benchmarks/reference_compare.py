"""The device runtime against the PyTorch reference pipeline, on the same preprocessed inputs.

Counted per class and overall: identical greedy answer token ids, identical Yes/No verdicts, and the
anomaly map's absolute error (max and mean). The reference is rebuilt from the bundle's manifest:

- ``source.kind == 'random'`` (``anomalygpt-edge export tiny``): the seeded random model of the
  manifest's config; a checkpoint, if given, is loaded over it;
- ``source.kind == 'trained'`` (``models/train.py``): the checkpoint (``<work>/final.pt``) is required;
- anything else (the released weights) is refused: ``compare`` checks those graphs one by one.

The tokenizer is not in a bundle: a trained checkpoint's sits beside it (``<work>/tokenizer``), a
random bundle's is retrained with export tiny's deterministic recipe; either way it is checked
against the GGUF's vocabulary before use. Training side: rebuilding and running the reference
imports torch, inside those functions only (``Agreement`` and ``markdown_line`` need only numpy).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

CHECKPOINT_NAME = 'final.pt'     # what models/train.py writes in its work directory
TINY_VOCAB = 400                 # export tiny's tokenizer size (export/tiny.py)


class ReferenceSetupError(ValueError):
    """The reference cannot be rebuilt for this bundle (the message names the file)."""
    exit_code = 2  # bad input (cli.exit_code)


def _read_checkpoint(path: Path) -> dict:
    """A model state dict from ``path``: a plain one, or models/train.py's ``{'model': ..., ...}``."""
    import torch
    if not path.is_file():
        raise ReferenceSetupError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refusals, truncation, not a zip/pickle at all
        raise ReferenceSetupError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get('model'), dict):
        obj = obj['model']
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ReferenceSetupError(f"{path}: expected a model state dict (name -> tensor) or a training "
                                  f"checkpoint with a 'model' entry, found {type(obj).__name__}")
    return obj


def _gguf_tokens(path: Path) -> list[bytes]:
    from gguf import GGUFReader
    field = GGUFReader(str(path)).fields.get('tokenizer.ggml.tokens')
    if field is None:
        raise ReferenceSetupError(f"{path}: the GGUF has no tokenizer.ggml.tokens")
    return [bytes(field.parts[i]) for i in field.data]


def check_tokenizer(tokenizer_dir: Path, gguf_path: Path, n_vocab: int) -> None:
    """Refuse a tokenizer whose vocabulary is not the one written into the bundle's GGUF."""
    from ..export.gguf_writer import GGUFExportError, load_spm_vocab
    try:
        ours = [bytes(t) for t in load_spm_vocab(tokenizer_dir, n_vocab=n_vocab).tokens]
    except GGUFExportError as e:
        raise ReferenceSetupError(str(e)) from None
    theirs = _gguf_tokens(gguf_path)
    if ours != theirs:
        diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise ReferenceSetupError(f"{tokenizer_dir}: not the tokenizer of {gguf_path} ({len(ours)} vs "
                                  f"{len(theirs)} tokens, first difference at id {diff})")


def reference_for(pipe, checkpoint=None, tokenizer=None):
    """The PyTorch reference pipeline (``models.reference.ReferencePipeline``) for the bundle ``pipe``
    runs, with the bundle's own text features."""
    import torch

    from ..models.anomalygpt import AnomalyGPT
    from ..models.config import ModelConfig
    from ..models.loaders import CheckpointError, load_into
    from ..models.reference import ReferencePipeline
    from ..models.tokenizer import load_tokenizer, reference_corpus, train_sentencepiece
    manifest = pipe.bundle.manifest
    where = pipe.bundle.root / 'manifest.json'
    info = manifest.get('model')
    if not isinstance(info, dict) or 'config' not in info:
        raise ReferenceSetupError(f"{where}: no 'model' section with the model config")
    llm = manifest.get('llm')
    if not llm:
        raise ReferenceSetupError(f"{where}: the bundle has no LLM to compare answers with")
    source = info.get('source') or {}
    kind = source.get('kind')
    ckpt = None if checkpoint is None else Path(checkpoint)
    if ckpt is not None and ckpt.is_dir():
        ckpt = ckpt / CHECKPOINT_NAME
    if kind == 'trained' and ckpt is None:
        raise ReferenceSetupError(f"{where}: the bundle was trained ({source.get('recipe', 'models/train.py')}): "
                                  f"pass --reference-checkpoint WORK/{CHECKPOINT_NAME}")
    if kind not in ('random', 'trained'):
        raise ReferenceSetupError(f"{where}: no reference comparison for model source {kind!r} (only seeded "
                                  "random and models/train.py bundles; `anomalygpt-edge compare` checks the graphs)")
    state = _read_checkpoint(ckpt) if ckpt is not None else None
    cfg = ModelConfig.from_dict(info['config'])
    model = AnomalyGPT.random(cfg, seed=int(source.get('seed', 0)))
    if state is not None:
        try:
            load_into(model, ckpt, state, 'AnomalyGPT model of the bundle config')
        except CheckpointError as e:
            raise ReferenceSetupError(str(e)) from None
    model.eval()
    gguf_path = pipe.bundle.path(llm['files'][llm['default']])
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is not None:
            tok_dir = Path(tokenizer)
        elif ckpt is not None and (ckpt.parent / 'tokenizer').is_dir():
            tok_dir = ckpt.parent / 'tokenizer'
        elif kind == 'random':
            tok_dir = train_sentencepiece(Path(tmp) / 'tokenizer', reference_corpus(), vocab_size=TINY_VOCAB)
        else:
            raise ReferenceSetupError(f"{ckpt.parent / 'tokenizer'}: no tokenizer beside the checkpoint "
                                      "(pass --reference-tokenizer DIR)")
        check_tokenizer(tok_dir, gguf_path, int(llm['n_vocab']))
        tok = load_tokenizer(tok_dir)
    feats = {name: torch.from_numpy(pipe.text_features[c['row']]) for name, c in pipe.classes.items()}
    return ReferencePipeline(model, tok, feats, max_new_tokens=pipe.max_new_tokens)


def reference_inputs(pipe, paths):
    """Normal reference images as the reference takes them: the runtime's centre-cropped inputs."""
    import torch
    if not paths:
        return None
    return torch.cat([torch.from_numpy(pipe.load(p, 'center_crop')[0]) for p in paths])


def reference_run(pipe, ref, image, class_name: str, references=None, llm: bool = True):
    """(anomaly map [224,224], answer ids or None, verdict or None) of the reference on the runtime's
    preprocessed input and the runtime's question."""
    import torch
    x = torch.from_numpy(pipe.load(image)[0])
    if llm:
        want = ref.inspect(x, class_name=class_name, question=pipe.question(class_name, None, None),
                           references=references)
        return want.anomaly_map, want.answer_ids, want.verdict
    _, amap, _ = ref.vision(x, class_name, references)
    return amap[0, 0].float().numpy(), None, None


class Agreement:
    """Counts and map errors, per class; ``summary()`` is the report's ``reference`` section."""

    def __init__(self):
        self._classes: dict[str, dict] = {}

    def add(self, class_name: str, image, got, want_map: np.ndarray, want_ids=None, want_verdict=None) -> None:
        c = self._classes.setdefault(class_name, {'images': 0, 'answers_compared': 0, 'identical_answers': 0,
                                                  'identical_verdicts': 0, 'max': 0.0, 'sum': 0.0, 'differ': []})
        err = np.abs(np.asarray(got.anomaly_map, np.float64) - np.asarray(want_map, np.float64))
        c['images'] += 1
        c['max'] = max(c['max'], float(err.max()))
        c['sum'] += float(err.mean())
        if want_ids is not None and got.answer is not None:
            c['answers_compared'] += 1
            same_ids, same_verdict = list(got.answer_ids) == list(want_ids), got.verdict == want_verdict
            c['identical_answers'] += same_ids
            c['identical_verdicts'] += same_verdict
            if not (same_ids and same_verdict):
                c['differ'].append({'image': str(image), 'runtime_verdict': got.verdict,
                                    'reference_verdict': want_verdict, 'identical_answer_ids': same_ids})

    @staticmethod
    def _row(images, compared, ids, verdicts, worst, total) -> dict:
        return {'images': images, 'answers_compared': compared,
                'identical_answers': ids if compared else None,
                'answer_agreement': ids / compared if compared else None,
                'identical_verdicts': verdicts if compared else None,
                'verdict_agreement': verdicts / compared if compared else None,
                'max_map_abs_error': worst, 'mean_map_abs_error': total / images if images else None}

    def summary(self) -> dict:
        cs = self._classes.values()
        overall = self._row(sum(c['images'] for c in cs), sum(c['answers_compared'] for c in cs),
                            sum(c['identical_answers'] for c in cs), sum(c['identical_verdicts'] for c in cs),
                            max((c['max'] for c in cs), default=0.0), sum(c['sum'] for c in cs))
        return {'overall': overall,
                'classes': {n: self._row(c['images'], c['answers_compared'], c['identical_answers'],
                                         c['identical_verdicts'], c['max'], c['sum']) for n, c in self._classes.items()},
                'differing': [d for c in cs for d in c['differ']]}


def markdown_line(section: dict) -> str:
    o = section['overall']
    ans = ('answers not compared (no LLM)' if not o['answers_compared'] else
           f"identical greedy answers {o['identical_answers']}/{o['answers_compared']}, "
           f"identical Yes/No verdicts {o['identical_verdicts']}/{o['answers_compared']}")
    return (f"Runtime vs PyTorch reference on {o['images']} images: {ans}; anomaly map abs error "
            f"max {o['max_map_abs_error']:.2e}, mean {o['mean_map_abs_error'] or 0.0:.2e}.")
