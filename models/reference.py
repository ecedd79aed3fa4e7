"""The PyTorch reference pipeline: the baseline every exported path is compared with.

image (+ class or description, + optional normal references) -> anomaly map, image score
(max of the map), the LLM's answer and the verdict, exactly as the reference code computes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..runtime.answers import locations, parse_verdict
from . import spec
from .anomalygpt import AnomalyGPT
from .generation import greedy_generate, prompt_text
from .preprocess import pil_preprocess


@dataclass
class ReferenceResult:
    anomaly_map: np.ndarray          # [224,224] float32
    score: float                     # max of the map
    answer: str
    answer_ids: list[int]
    verdict: str                     # 'yes' | 'no' | 'unclear'
    class_name: str
    locations: list[str]             # 3x3 words of the map's hot regions, largest first, as the runtime reads them
    image_token: np.ndarray = field(repr=False)   # [1,D]
    prompts: np.ndarray = field(repr=False)       # [18,D]


class ReferencePipeline:
    def __init__(self, model: AnomalyGPT, tokenizer, text_features: dict[str, torch.Tensor],
                 bos_id: int | None = None, max_new_tokens: int = 128):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.text_features = text_features
        self.bos_id = tokenizer.bos_token_id if bos_id is None else bos_id
        self.eos_id = tokenizer.eos_token_id
        self.max_new_tokens = max_new_tokens

    def _image(self, image, mode='squash') -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image if image.dim() == 4 else image.unsqueeze(0)
        return pil_preprocess(image, mode)

    def features_for(self, class_name: str) -> torch.Tensor:
        key = class_name.replace('_', ' ')
        if key not in self.text_features:
            raise KeyError(f"no text features for class {class_name!r}; known: {sorted(self.text_features)}")
        return self.text_features[key]

    @torch.no_grad()
    def vision(self, image, class_name: str, references=None):
        """-> (image_token [1,1,D], anomaly map [1,1,224,224], prompts [1,18,D])."""
        x = self._image(image)
        emb, taps = self.model.encode_image(x)
        memory = None
        if references is not None:
            refs = references if isinstance(references, torch.Tensor) else torch.cat(
                [self._image(r, 'center_crop') for r in references])
            memory = self.model.memory(refs)
        amap = self.model.anomaly_map(taps, self.features_for(class_name), memory)
        return self.model.image_token(emb), amap, self.model.prompt_learner(amap)

    def locations(self, anomaly_map: np.ndarray) -> list[str]:
        return locations(anomaly_map, spec.POSITION_WORDS, grid=self.model.cfg.vision.grid)

    @torch.no_grad()
    def inspect(self, image, class_name: str | None = None, question: str | None = None, references=None,
                history=()) -> ReferenceResult:
        if class_name is None:
            class_name = spec.resolve_class(question or '')
        if question is None:
            question = spec.question_for(class_name)
        token, amap, prompts = self.vision(image, class_name, references)
        embeds = self.model.prompt_embeds(self.tokenizer, token, prompts, prompt_text(question, history), self.bos_id)
        ids, answer = greedy_generate(self.model.llama_model, embeds, self.tokenizer, self.eos_id, self.max_new_tokens)
        m = amap[0, 0].float().numpy()
        return ReferenceResult(anomaly_map=m, score=float(m.max()), answer=answer, answer_ids=ids,
                               verdict=parse_verdict(answer), class_name=class_name, locations=self.locations(m),
                               image_token=token[0].float().numpy(), prompts=prompts[0].float().numpy())
