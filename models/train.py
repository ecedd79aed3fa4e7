"""Train the small demo model with AnomalyGPT's recipe on simulated anomalies, then export its bundle.

  python -m anomalygpt_edge.models.train --work DIR --bundle OUT [--vision-steps N] [--lm-steps N]

Stage 1 (vision): ImageBind-style tower + decoder + text tower, focal + dice on the 4 layer maps
(spec 7.5), on normal images and NSA-simulated anomalies. Stage 2 (language): vision frozen;
prompt learner, llama_proj and the small LLaMA trained with the LM loss on the answers only.
Seeds are fixed; checkpoints are written atomically every few hundred steps and resumed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import random
import time
from pathlib import Path

import torch

from . import spec
from .anomalygpt import AnomalyGPT
from .config import ModelConfig, get_config
from .decoder import layer_logits
from .imagebind import TextTower, init_random
from .losses import pixel_loss
from .text_features import class_text_features

log = logging.getLogger(__name__)
_MEAN = torch.tensor(spec.CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(spec.CLIP_STD).view(3, 1, 1)


@dataclasses.dataclass
class TrainSettings:
    seed: int = 0
    batch: int = 8
    vision_steps: int = 1500
    lm_steps: int = 800
    lr_vision: float = 1e-3
    lr_lm: float = 1e-3
    threads: int = 2
    checkpoint_every: int = 200
    separation_weight: float = 1.0
    few_shot_fraction: float = 0.5


# -- checkpoints ------------------------------------------------------------------------------------
def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_name(path.name + '.partial')
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location='cpu', weights_only=True)


def _schedule(opt, step: int, total: int, base_lr: float) -> None:
    """Linear warm-up over max(10, 10 %) of the steps, then linear decay, as the reference's WarmupDecayLR."""
    warm = max(10, total // 10)
    scale = (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))
    for g in opt.param_groups:
        g['lr'] = base_lr * scale


def _batches(dataset, batch: int, seed: int, start: int = 0, workers: int = 1):
    """Endless deterministic batches of ``batch`` images: batch/2 (normal, simulated) pairs, as the
    reference's collate; each epoch re-simulates the anomalies on the same normal images."""
    from torch.utils.data import DataLoader
    from .synthetic_dataset import collate_pairs
    pairs = max(1, batch // 2)
    epoch = start * pairs // len(dataset)
    while True:
        dataset.set_epoch(epoch)
        g = torch.Generator().manual_seed(seed + epoch)
        yield from DataLoader(dataset, batch_size=pairs, shuffle=True, generator=g, drop_last=True,
                              collate_fn=collate_pairs, num_workers=workers)
        epoch += 1


def _fit(name: str, steps: int, base_lr: float, start: int, batches, step_loss, params, opt, every: int, save) -> None:
    """The optimisation loop of both stages: schedule, clipped step, progress bar, periodic checkpoint."""
    from tqdm import tqdm
    bar = tqdm(total=steps, initial=start, desc=name, unit='step', dynamic_ncols=True)
    for step in range(start, steps):
        _schedule(opt, step, steps, base_lr)
        loss = step_loss(next(batches), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % every == 0 or step + 1 == steps:
            save(step + 1)
    bar.close()


# -- stage 1 -----------------------------------------------------------------------------------
def train_vision(model: AnomalyGPT, text: TextTower, dataset, s: TrainSettings, ckpt: Path) -> None:
    params = [*model.visual_encoder.parameters(), *model.image_decoder.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=s.lr_vision, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-3)
    start = 0
    if (state := load_checkpoint(ckpt)) is not None:
        model.load_state_dict(state['model'], strict=False)
        text.load_state_dict(state['text'])
        opt.load_state_dict(state['opt'])
        start = int(state['step'])
        log.info("resumed vision training at step %d", start)
    model.visual_encoder.train(), model.image_decoder.train(), text.train()
    def step_loss(b, step):
        feats = {c: class_text_features(text, c) for c in set(b['categories'])}
        tf = torch.stack([feats[c] for c in b['categories']])
        _, taps = model.visual_encoder(b['images'])
        loss = pixel_loss(layer_logits(model.image_decoder, taps, tf), b['masks'])
        # From random weights the normal and abnormal sentences embed almost identically (cos ~0.999),
        # which caps the decoder's logit gap at a few units; keep the two states apart.
        separation = torch.stack([f[0] @ f[1] for f in feats.values()]).clamp(min=0).mean()
        return loss + s.separation_weight * separation

    _fit('vision', s.vision_steps, s.lr_vision, start, _batches(dataset, s.batch, s.seed, start), step_loss,
         params, opt, s.checkpoint_every,
         lambda step: save_checkpoint(ckpt, model=_vision_state(model), text=text.state_dict(),
                                      opt=opt.state_dict(), step=step))
    model.eval(), text.eval()


def _vision_state(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith(('visual_encoder.', 'image_decoder.'))}


# -- stage 2 -----------------------------------------------------------------------------------
def lm_batch(model: AnomalyGPT, tokenizer, token, prompts, questions, answers):
    """Reference training layout: [BOS, PROMPT_START, IMG, IMAGE_END, 18 prompts, question + ASSISTANT,
    answer + '\\n###'], each text segment tokenised alone; labels only on the answer tokens."""
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    emb = model.llama_model.get_input_embeddings()
    start, end = enc(spec.PROMPT_START), enc(spec.IMAGE_END)
    rows, labels = [], []
    for i, (q, a) in enumerate(zip(questions, answers)):
        q_ids, a_ids = enc(q + spec.ASSISTANT), enc(a + '\n' + spec.TURN_SEPARATOR)
        ids_before = [tokenizer.bos_token_id] + start
        parts = [emb(torch.tensor(ids_before)), token[i], emb(torch.tensor(end)), prompts[i],
                 emb(torch.tensor(q_ids + a_ids))]
        rows.append(torch.cat(parts))
        n_prefix = len(ids_before) + 1 + len(end) + prompts.shape[1] + len(q_ids)
        labels.append([-100] * n_prefix + a_ids)
    n = max(r.shape[0] for r in rows)
    x = torch.zeros(len(rows), n, rows[0].shape[1])
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    y = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        x[i, :len(r)], mask[i, :len(r)], y[i, :len(lab)] = r, 1, torch.tensor(lab)
    return x, mask, y


def train_language(model: AnomalyGPT, text: TextTower, tokenizer, dataset, s: TrainSettings, ckpt: Path) -> None:
    lm = model.llama_model
    params = [*model.prompt_learner.parameters(), *model.llama_proj.parameters(),
              *(p for p in lm.parameters())]
    for p in lm.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=s.lr_lm, betas=(0.9, 0.95), weight_decay=1e-3)
    start = 0
    if (state := load_checkpoint(ckpt)) is not None:
        model.load_state_dict(state['model'])
        opt.load_state_dict(state['opt'])
        start = int(state['step'])
        log.info("resumed language training at step %d", start)
    with torch.no_grad():
        feats = {c: class_text_features(text, c) for c in dataset.categories}
    model.prompt_learner.train(), model.llama_proj.train(), lm.train()
    few_shot_rng = random.Random(s.seed + 7)

    @functools.lru_cache(maxsize=8)
    def memories(category: str, step: int):
        from .synthetic import normal_image
        img = normal_image(category, [s.seed, 9, step])
        x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - _MEAN) / _STD
        return model.memory(x[None])

    def step_loss(b, step):
        with torch.no_grad():
            emb, taps = model.visual_encoder(b['images'])
            if few_shot_rng.random() < s.few_shot_fraction:
                # as the reference: half the batches see the few-shot map (one normal image per class)
                amap = torch.cat([model.anomaly_map([t[i:i + 1] for t in taps], memory=memories(c, step))
                                  for i, c in enumerate(b['categories'])])
            else:
                amap = model.anomaly_map(taps, torch.stack([feats[c] for c in b['categories']]))
        x, mask, y = lm_batch(model, tokenizer, model.image_token(emb), model.prompt_learner(amap),
                              b['questions'], b['answers'])
        return lm(inputs_embeds=x, attention_mask=mask, labels=y).loss

    _fit('language', s.lm_steps, s.lr_lm, start, _batches(dataset, s.batch, s.seed + 1, start), step_loss,
         params, opt, s.checkpoint_every,
         lambda step: save_checkpoint(ckpt, model=model.state_dict(), opt=opt.state_dict(), step=step))
    model.eval()


# -- the whole recipe --------------------------------------------------------------------------
def build_small(tokenizer_dir, seed: int, config: str = 'small') -> tuple[AnomalyGPT, TextTower]:
    from .tokenizer import vocab_size
    cfg: ModelConfig = get_config(config, vocab=vocab_size(tokenizer_dir))
    model = AnomalyGPT.random(cfg, seed=seed)
    with torch.no_grad():  # LoRA stays in the architecture; trained weights live in the base model
        for name, p in model.llama_model.named_parameters():
            if 'lora_B' in name:
                p.zero_()
    # PyTorch's default (Kaiming) init for the prompt learner's convs: with std-0.02 weights the map's
    # signal dies out over six convs, the derived prompts are constant, and the LLM learns to ignore them.
    torch.manual_seed(seed + 3)
    for m in model.prompt_learner.meta_net:
        if isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()
    text = TextTower(cfg.text)
    init_random(text, seed + 2)
    return model, text


def load_trained(work, model: AnomalyGPT, text: TextTower) -> dict:
    """Load ``<work>/final.pt`` (written by :func:`main`) into a model built by :func:`build_small`."""
    state = load_checkpoint(Path(work) / 'final.pt')
    if state is None:
        raise FileNotFoundError(f"{Path(work) / 'final.pt'}: no trained model (run the training first)")
    model.load_state_dict(state['model'])
    text.load_state_dict(state['text'])
    model.eval(), text.eval()
    return state


def demo_corpus(categories) -> list[str]:
    from .tokenizer import reference_corpus
    return reference_corpus() + [categories[c].question for c in categories] * 4


def main(argv=None) -> int:
    from .synthetic import CATEGORIES
    from .synthetic_dataset import SyntheticAnomalyDataset
    from .tokenizer import load_tokenizer, train_sentencepiece
    ap = argparse.ArgumentParser(prog='python -m anomalygpt_edge.models.train', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--work', required=True, help='working directory: tokenizer, checkpoints (resumable)')
    ap.add_argument('--bundle', help='export the trained model as a bundle here')
    ap.add_argument('--config', default='small')
    for f in dataclasses.fields(TrainSettings):
        ap.add_argument('--' + f.name.replace('_', '-'), type=type(f.default), default=f.default)
    ap.add_argument('--samples', type=int, default=4000, help='simulated training samples per epoch')
    ap.add_argument('--quant', default='f32,q8_0', help='GGUF type(s) for the bundle, the first is the default')
    ap.add_argument('--export-only', action='store_true', help='skip training: export <work>/final.pt')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    s = TrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)})
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / 'tokenizer'
    if not (tok_dir / 'tokenizer.model').is_file():
        train_sentencepiece(tok_dir, demo_corpus(CATEGORIES), vocab_size=600)
    tokenizer = load_tokenizer(tok_dir)
    model, text = build_small(tok_dir, s.seed, args.config)
    if args.export_only:
        load_trained(work, model, text)
    else:
        dataset = SyntheticAnomalyDataset(args.samples, seed=s.seed, cache_normals=True)
        t0 = time.time()
        train_vision(model, text, dataset, s, work / 'vision.pt')
        log.info("vision stage done in %.1f min", (time.time() - t0) / 60)
        t1 = time.time()
        train_language(model, text, tokenizer, dataset, s, work / 'language.pt')
        log.info("language stage done in %.1f min", (time.time() - t1) / 60)
        save_checkpoint(work / 'final.pt', model=model.state_dict(), text=text.state_dict(),
                        minutes={'vision': (t1 - t0) / 60, 'language': (time.time() - t1) / 60})
    if args.bundle:
        from ..export.bundle_export import write_bundle
        extra = spec.SYNTHETIC_DESCRIPTIONS
        write_bundle(args.bundle, model, text, tok_dir,
                     {'kind': 'trained', 'recipe': 'models/train.py', 'seed': s.seed,
                      'settings': dataclasses.asdict(s), 'samples': args.samples},
                     precisions=('fp32',), quants=tuple(q.strip() for q in args.quant.split(',')),
                     extra_classes=extra, overwrite=True)
        log.info("bundle written to %s", args.bundle)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
