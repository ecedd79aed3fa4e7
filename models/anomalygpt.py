"""The AnomalyGPT model: vision tower, decoder, prompt learner, llama_proj and the LLM.

Attribute names follow the reference ``OpenLLAMAPEFTModel`` so that the released delta keys
(``image_decoder.fc.0.weight``, ``llama_model.base_model.model...lora_A.default.weight``) apply
to ``state_dict()`` names directly.
"""
from __future__ import annotations

import torch
from torch import nn

from . import spec
from .config import ModelConfig
from .decoder import LinearLayer, build_memory, few_shot_map, zero_shot_map
from .imagebind import VisionTower, init_random
from .prompt_learner import PromptLearner


class AnomalyGPT(nn.Module):
    def __init__(self, cfg: ModelConfig, llama_model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = VisionTower(cfg.vision)
        self.image_decoder = LinearLayer(cfg.vision.width, cfg.vision.embed_dim, len(cfg.vision.taps))
        self.prompt_learner = PromptLearner(cfg.pl_channels, cfg.llm.hidden, cfg.n_base_prompts)
        self.llama_proj = nn.Linear(cfg.vision.embed_dim, cfg.llm.hidden)
        self.llama_model = llama_model

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, with_llm: bool = True) -> "AnomalyGPT":
        """Seeded random weights, exact architecture (tests, benchmarks, the tiny bundle)."""
        from .llm import add_lora, build_llama
        llm = add_lora(build_llama(cfg.llm, seed=seed), cfg.llm, seed=seed + 1) if with_llm else None
        model = cls(cfg, llm)
        for part in (model.visual_encoder, model.image_decoder, model.prompt_learner, model.llama_proj):
            init_random(part, seed)
        return model.eval()

    def vision_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({'visual_encoder': self.visual_encoder, 'image_decoder': self.image_decoder,
                              'prompt_learner': self.prompt_learner, 'llama_proj': self.llama_proj})

    def encode_image(self, image: torch.Tensor):
        """image [B,3,224,224] -> (embedding [B,E], taps 4 x [B,256,C])."""
        return self.visual_encoder(image)

    def image_token(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.llama_proj(embedding).unsqueeze(1)

    def memory(self, normal_images: torch.Tensor) -> list[torch.Tensor]:
        return build_memory(self.encode_image(normal_images)[1])

    def anomaly_map(self, taps, text_features=None, memory=None) -> torch.Tensor:
        """Few-shot map when a normal memory is given (it replaces the text map), else zero-shot."""
        if memory is not None:
            return few_shot_map(taps, memory)
        if text_features is None:
            raise ValueError("anomaly_map needs text_features (zero-shot) or a normal memory (few-shot)")
        return zero_shot_map(self.image_decoder, taps, text_features)

    def embed_tokens(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        return self.llama_model.get_input_embeddings()(ids)

    def prompt_embeds(self, tokenizer, image_token, prompts, prompt_text: str, bos_id: int) -> torch.Tensor:
        """The reference's ``inputs_embeds`` (spec 6.1) for one image: [1, N, D]."""
        parts = [self.embed_tokens([bos_id]),
                 self.embed_tokens(tokenizer.encode(spec.PROMPT_START, add_special_tokens=False)),
                 image_token,
                 self.embed_tokens(tokenizer.encode(spec.IMAGE_END, add_special_tokens=False)),
                 prompts,
                 self.embed_tokens(tokenizer.encode(prompt_text + spec.ASSISTANT, add_special_tokens=False))]
        return torch.cat([p.to(parts[0].dtype) for p in parts], dim=1)
