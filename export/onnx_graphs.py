"""The four vision graphs as flat ``nn.Module``s (one tensor in, tensors out), in two forms each:

- the *export* form, rewritten with the exact simplifications of spec sections 2.1, 3.3 and 3.4
  (Conv3d stem folded to Conv2d; 2-way softmax as a sigmoid of the logit difference; cosine max
  as normalise + MatMul + max, with no [256, M, C] broadcast);
- the *reference* form, which calls the model's own code literally. Export verification and
  ``anomalygpt-edge compare`` check the first (through ONNX Runtime) against the second.

Graph interface (the runtime is written against these names):
  encoder         image [B,3,224,224] -> image_token [B,1,D_llm], taps [B,4,256,C]
  decoder         taps [B,4,256,C], text_features [2,E] -> anomaly_map [B,1,224,224]
  fewshot         taps [B,4,256,C], memory [4,M,C] -> anomaly_map [B,1,224,224]
  prompt_learner  anomaly_map [B,1,224,224] -> prompts [B,18,D_llm]
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models import spec
from ..models.anomalygpt import AnomalyGPT
from ..models.config import ModelConfig
from ..models.decoder import few_shot_map, upsample, zero_shot_map
from ..models.imagebind import fold_stem_to_conv2d


class Component(str, enum.Enum):
    ENCODER = 'encoder'
    DECODER = 'decoder'
    FEWSHOT = 'fewshot'
    PROMPT_LEARNER = 'prompt_learner'


class Precision(str, enum.Enum):
    """Export types of a vision graph: weights and compute precision; graph I/O is always float32."""
    FP32 = 'fp32'
    FP16 = 'fp16'


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or a string for a dynamic axis ('batch', 'M')
    dtype: str = 'float32'

    def to_dict(self) -> dict:
        return {'name': self.name, 'shape': list(self.shape), 'dtype': self.dtype}


@dataclass(frozen=True)
class ComponentSpec:
    component: Component
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # per precision, {'atol', 'rtol'} with numpy.allclose semantics against the PyTorch reference
    tolerance: dict = field(default_factory=dict)
    # FP16 policy (see export.fp16): whether every node downstream of an L2 normalisation, and of
    # the named graph inputs, stays FP32
    fp32_after_normalise: bool = False
    fp32_after_inputs: tuple[str, ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def file(self, precision: Precision | str) -> str:
        p = Precision(precision)
        return f'{self.component.value}.onnx' if p is Precision.FP32 else f'{self.component.value}-{p.value}.onnx'

    def dynamic_axes(self) -> dict:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in self.inputs + self.outputs}


def component_specs(cfg: ModelConfig) -> dict[Component, ComponentSpec]:
    n, c, e, d = len(cfg.vision.taps), cfg.vision.width, cfg.vision.embed_dim, cfg.llm.hidden
    s, p = cfg.vision.image_size, cfg.vision.n_patches
    amap = TensorSpec('anomaly_map', ('batch', 1, s, s))
    taps = TensorSpec('taps', ('batch', n, p, c))
    # The anomaly-map bounds are the project's parity targets. The encoder's taps are raw residual
    # streams whose magnitude grows with depth and with training (the demo model's reach 73), hence a
    # relative term and one scaled by the output's range (float32 summation order moved 4 of 262,144
    # near-zero tap values of the demo model by 7.9e-4: 1.1e-5 of its range); FP16 errors compound over
    # the blocks. FP16 maps: 100x-scaled cosines make the decoder the most sensitive graph (see fp16.py).
    return {
        Component.ENCODER: ComponentSpec(
            Component.ENCODER, (TensorSpec('image', ('batch', 3, s, s)),),
            (TensorSpec('image_token', ('batch', 1, d)), taps),
            {'fp32': {'atol': 1e-4, 'rtol': 1e-3, 'range_atol': 3e-5}, 'fp16': {'atol': 5e-2, 'rtol': 5e-2}},
            fp32_after_normalise=True),
        Component.DECODER: ComponentSpec(
            Component.DECODER, (taps, TensorSpec('text_features', (2, e))), (amap,),
            {'fp32': {'atol': 1e-4, 'rtol': 0.0}, 'fp16': {'atol': 5e-3, 'rtol': 0.0}},
            fp32_after_normalise=True, fp32_after_inputs=('text_features',)),
        Component.FEWSHOT: ComponentSpec(
            Component.FEWSHOT, (taps, TensorSpec('memory', (n, 'M', c))), (amap,),
            {'fp32': {'atol': 1e-4, 'rtol': 0.0}, 'fp16': {'atol': 5e-3, 'rtol': 0.0}}),
        Component.PROMPT_LEARNER: ComponentSpec(
            Component.PROMPT_LEARNER, (amap,), (TensorSpec('prompts', ('batch', spec.N_PROMPTS, d)),),
            {'fp32': {'atol': 1e-4, 'rtol': 1e-3}, 'fp16': {'atol': 1e-3, 'rtol': 1e-2}}),
    }


# -- export forms -------------------------------------------------------------------------------

class EncoderGraph(nn.Module):
    """Vision tower with the folded Conv2d stem, taps stacked on axis 1 and llama_proj folded in
    after the L2-normalised embedding. No 5-D tensor anywhere."""

    def __init__(self, model: AnomalyGPT):
        super().__init__()
        tower = model.visual_encoder
        self.tower = tower
        self.patch = tower.cfg.patch
        self.stem_weight = nn.Parameter(fold_stem_to_conv2d(tower.preprocessor.rgbt_stem.proj[1].weight.detach()),
                                        requires_grad=False)
        self.llama_proj = model.llama_proj

    def forward(self, image):
        patches = F.conv2d(image, self.stem_weight, stride=self.patch).flatten(2).transpose(1, 2)
        emb, taps = self.tower.forward_tokens(self.tower.preprocessor.add_cls_and_pos(patches))
        return self.llama_proj(emb).unsqueeze(1), torch.stack(taps, dim=1)


class DecoderGraph(nn.Module):
    """Zero-shot map: the 4 Linear layers as one batched MatMul, then
    sigmoid(upsample(100 (cos_abnormal - cos_normal))) averaged over layers (exact, spec 3.3; the sigmoid
    written out, see :func:`logistic`)."""

    def __init__(self, model: AnomalyGPT):
        super().__init__()
        fcs = model.image_decoder.fc
        self.weight = nn.Parameter(torch.stack([fc.weight.detach().T for fc in fcs]), requires_grad=False)  # [4,C,E]
        self.bias = nn.Parameter(torch.stack([fc.bias.detach() for fc in fcs]).unsqueeze(1), requires_grad=False)
        self.grid = model.cfg.vision.grid
        self.size = model.cfg.vision.image_size

    def forward(self, taps, text_features):
        feats = torch.matmul(taps, self.weight) + self.bias              # [B,4,256,E]
        feats = feats / feats.norm(dim=-1, keepdim=True)                 # no eps, as the reference
        direction = text_features[1] - text_features[0]                  # abnormal - normal
        logit = spec.LOGIT_SCALE * torch.matmul(feats, direction)        # [B,4,256]
        logit = logit.reshape(logit.shape[0], logit.shape[1], self.grid, self.grid)
        return logistic(upsample(logit, self.size)).mean(dim=1, keepdim=True)


def logistic(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(x) as 1 / (1 + exp(-x)). ONNX Runtime's CPU Sigmoid kernel loses the lower tail (measured:
    below -16 its values come in steps of 6e-8, below -18 they are 0), so the pixels of a
    saturated map (most of a trained model's normal surface) all tie and the map ranks them unlike the
    reference; this form is exact to float32 rounding down to 1e-38 (and 0, never NaN, below)."""
    return torch.reciprocal(1.0 + torch.exp(-x))


class FewShotGraph(nn.Module):
    """1 - upsample(mean over layers of max_M normalize(q) . normalize(mem)) (exact, spec 3.4)."""

    def __init__(self, model: AnomalyGPT):
        super().__init__()
        self.grid = model.cfg.vision.grid
        self.size = model.cfg.vision.image_size

    def forward(self, taps, memory):
        q = F.normalize(taps, dim=-1)                                    # [B,4,256,C]
        m = F.normalize(memory, dim=-1)                                  # [4,M,C]
        sim = torch.matmul(q, m.transpose(1, 2)).amax(dim=-1)            # [B,4,256]
        sim = sim.mean(dim=1).reshape(-1, 1, self.grid, self.grid)
        return 1.0 - upsample(sim, self.size)


class PromptLearnerGraph(nn.Module):
    def __init__(self, model: AnomalyGPT):
        super().__init__()
        self.prompt_learner = model.prompt_learner

    def forward(self, anomaly_map):
        return self.prompt_learner(anomaly_map)


# -- reference forms: the model's own code, same named interface --------------------------------

class ReferenceEncoder(nn.Module):
    def __init__(self, model: AnomalyGPT):
        super().__init__()
        self.model = model

    def forward(self, image):
        emb, taps = self.model.encode_image(image)
        return self.model.image_token(emb), torch.stack(taps, dim=1)


class ReferenceDecoder(nn.Module):
    def __init__(self, model: AnomalyGPT):
        super().__init__()
        self.model = model

    def forward(self, taps, text_features):
        return zero_shot_map(self.model.image_decoder, list(taps.unbind(1)), text_features)


class ReferenceFewShot(nn.Module):
    def forward(self, taps, memory):
        return few_shot_map(list(taps.unbind(1)), list(memory.unbind(0)))


class ReferencePromptLearner(nn.Module):
    def __init__(self, model: AnomalyGPT):
        super().__init__()
        self.prompt_learner = model.prompt_learner

    def forward(self, anomaly_map):
        return self.prompt_learner(anomaly_map)


def export_module(model: AnomalyGPT, component: Component | str) -> nn.Module:
    c = Component(component)
    cls = {Component.ENCODER: EncoderGraph, Component.DECODER: DecoderGraph,
           Component.FEWSHOT: FewShotGraph, Component.PROMPT_LEARNER: PromptLearnerGraph}[c]
    return cls(model).eval()


def reference_module(model: AnomalyGPT, component: Component | str) -> nn.Module:
    c = Component(component)
    if c is Component.FEWSHOT:
        return ReferenceFewShot().eval()
    cls = {Component.ENCODER: ReferenceEncoder, Component.DECODER: ReferenceDecoder,
           Component.PROMPT_LEARNER: ReferencePromptLearner}[c]
    return cls(model).eval()
