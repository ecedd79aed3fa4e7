"""One architecture, several sizes. A config picks the sizes; the modules are defined once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class VisionConfig:
    width: int
    blocks: int
    heads: int
    taps: tuple[int, ...]
    embed_dim: int  # output of the head; also the decoder's and text features' width
    mlp_ratio: int = 4
    patch: int = 14
    image_size: int = 224
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class TextConfig:
    width: int
    blocks: int
    heads: int
    embed_dim: int
    context: int = 77
    vocab: int = 49408
    eps: float = 1e-6


@dataclass(frozen=True)
class LLMConfig:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    kv_heads: int | None = None
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048
    lora_r: int = 32
    lora_alpha: int = 32
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vision: VisionConfig
    text: TextConfig
    llm: LLMConfig
    # prompt learner conv widths; the last conv (k5, no pad) maps the 7x7 map to the LLM width
    pl_channels: tuple[int, ...] = (4, 16, 64, 256, 1024)
    n_base_prompts: int = 9

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(name=d['name'],
                   vision=VisionConfig(**{**d['vision'], 'taps': tuple(d['vision']['taps'])}),
                   text=TextConfig(**d['text']),
                   llm=LLMConfig(**d['llm']),
                   pl_channels=tuple(d['pl_channels']),
                   n_base_prompts=d['n_base_prompts'])


HUGE = ModelConfig(
    name='huge',
    vision=VisionConfig(width=1280, blocks=32, heads=16, taps=(7, 15, 23, 31), embed_dim=1024),
    text=TextConfig(width=1024, blocks=24, heads=16, embed_dim=1024),
    llm=LLMConfig(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32001),
)

TINY = ModelConfig(
    name='tiny',
    vision=VisionConfig(width=64, blocks=8, heads=4, taps=(1, 3, 5, 7), embed_dim=32),
    text=TextConfig(width=64, blocks=2, heads=4, embed_dim=32),
    # vocab is set from the tokenizer the tiny model is built with (see models.tokenizer)
    llm=LLMConfig(hidden=64, intermediate=128, layers=2, heads=4, vocab=0, max_positions=512,
                  lora_r=4, lora_alpha=8),
    pl_channels=(4, 8, 8, 16, 16),
)

# The demo model trained here (see models.train). Sized to train on 2 CPU cores in minutes.
SMALL = ModelConfig(
    name='small',
    vision=VisionConfig(width=128, blocks=8, heads=4, taps=(1, 3, 5, 7), embed_dim=64),
    text=TextConfig(width=64, blocks=2, heads=4, embed_dim=64),
    llm=LLMConfig(hidden=128, intermediate=256, layers=2, heads=4, vocab=0, max_positions=512,
                  lora_r=4, lora_alpha=8),
    pl_channels=(4, 8, 16, 16, 32),
)

# SMALL with 16-pixel patches: a 14x14 grid, 196 tokens instead of 256, a stage-1 step 1.24x faster
# (benchmarks/bench_train_step.py). Seed 0, validation set: 4000 steps measured Yes/No 0.847 against SMALL's
# 0.860 at 3500 (AUROCs 0.911 / 0.875 vs 0.904 / 0.871); 3500 steps, maps only, 0.851 / 0.846 (the model
# card's recipe ablations)
SMALL_P16 = dataclasses.replace(SMALL, name='small-p16', vision=dataclasses.replace(SMALL.vision, patch=16))

# SMALL with its four taps in the tower's deeper half (blocks 4, 6, 7, 8 instead of 2, 4, 6, 8). The reference's
# first tap has 8 blocks of a pretrained tower under it; SMALL's has 2 of a tower trained from scratch, and on the
# validation set its layer alone ranks images worst (seed 0: image AUROC 0.883 from the first tap's map, 0.939
# / 0.964 / 0.961 from the others', 0.941 from their mean, the decoder's map)
SMALL_DEEP = dataclasses.replace(SMALL, name='small-deep', vision=dataclasses.replace(SMALL.vision, taps=(3, 5, 6, 7)))

CONFIGS = {c.name: c for c in (HUGE, TINY, SMALL, SMALL_P16, SMALL_DEEP)}


def get_config(name: str, **llm_overrides) -> ModelConfig:
    try:
        cfg = CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}") from None
    if llm_overrides:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **llm_overrides))
    return cfg
