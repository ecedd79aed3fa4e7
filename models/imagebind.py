"""ImageBind-Huge vision and text towers as AnomalyGPT uses them.

Attribute names reproduce the released ``imagebind_huge.pth`` keys exactly
(``modality_trunks.vision.blocks.0.attn.in_proj_weight`` ...), so the released state dict
loads strictly into these modules.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig, VisionConfig


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()  # exact erf GELU
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block on sequence-first input [L, B, C]."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, bias=True, add_bias_kv=False)
        self.norm_1 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, width * mlp_ratio)
        self.norm_2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x, attn_mask=None):
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.norm_2(x))


class PadIm2Video(nn.Module):
    """Repeat a still image as 2 video frames: [B,3,H,W] -> [B,3,2,H,W]."""

    def forward(self, x):
        return x.unsqueeze(2).repeat(1, 1, 2, 1, 1)


class _Stem(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Sequential(PadIm2Video(), nn.Conv3d(3, width, (2, patch, patch), (2, patch, patch), bias=False))


class _PosEmbed(nn.Module):
    def __init__(self, n_tokens: int, width: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, width))


class VisionPreprocessor(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.rgbt_stem = _Stem(cfg.width, cfg.patch)
        self.pos_embedding_helper = _PosEmbed(cfg.n_patches + 1, cfg.width)

    def add_cls_and_pos(self, patches):
        """patches [B,N,C] -> tokens [B,N+1,C]."""
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embedding_helper.pos_embed

    def forward(self, image):
        patches = self.rgbt_stem.proj(image).flatten(2).transpose(1, 2)
        return self.add_cls_and_pos(patches)


class Trunk(nn.Module):
    def __init__(self, width: int, blocks: int, heads: int, mlp_ratio: int, eps: float, pre_ln: bool):
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(width, eps=eps) if pre_ln else nn.Identity())
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, eps) for _ in range(blocks))

    def forward(self, tokens, taps=(), attn_mask=None):
        """tokens [B,L,C] -> (final [B,L,C], raw residual outputs of the tapped blocks, each [B,L,C])."""
        x = self.pre_transformer_layer(tokens).transpose(0, 1)  # sequence-first, as the reference
        collected = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn_mask=attn_mask)
            if i in taps:
                collected.append(x.transpose(0, 1))
        return x.transpose(0, 1), collected


class SelectElement(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, x):
        return x[:, self.index, ...]


class VisionTower(nn.Module):
    """image [B,3,224,224] -> (L2-normalised embedding [B,E], 4 taps each [B,256,C], CLS dropped)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.modality_preprocessors = nn.ModuleDict({'vision': VisionPreprocessor(cfg)})
        self.modality_trunks = nn.ModuleDict({'vision': Trunk(cfg.width, cfg.blocks, cfg.heads, cfg.mlp_ratio,
                                                              cfg.eps, pre_ln=True)})
        self.modality_heads = nn.ModuleDict({'vision': nn.Sequential(
            nn.LayerNorm(cfg.width, eps=cfg.eps), SelectElement(0), nn.Linear(cfg.width, cfg.embed_dim, bias=False))})

    @property
    def preprocessor(self) -> VisionPreprocessor:
        return self.modality_preprocessors['vision']

    def forward_tokens(self, tokens):
        final, taps = self.modality_trunks['vision'](tokens, taps=self.cfg.taps)
        emb = F.normalize(self.modality_heads['vision'](final), dim=-1)
        return emb, [t[:, 1:, :] for t in taps]

    def forward(self, image):
        return self.forward_tokens(self.preprocessor(image))


def fold_stem_to_conv2d(conv3d_weight: torch.Tensor) -> torch.Tensor:
    """Both time frames are the same image, so Conv3d(k=(2,p,p)) == Conv2d(k=p) with summed kernels."""
    return conv3d_weight.sum(dim=2)


class TextPreprocessor(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context, cfg.width))
        self.register_buffer('mask', torch.full((cfg.context, cfg.context), float('-inf')).triu_(1))

    def forward(self, tokens):
        return self.token_embedding(tokens) + self.pos_embed[:, :tokens.shape[1]]


class TextHead(nn.Module):
    """Take the token at the end-of-text position (argmax id), then LayerNorm + Linear."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(cfg.width, eps=cfg.eps), nn.Linear(cfg.width, cfg.embed_dim, bias=False))

    def forward(self, x, tokens):
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return self.proj(eot)


class LogitScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x):
        return x * torch.clamp(self.log_logit_scale.exp(), max=100)


class TextTower(nn.Module):
    """CLIP-BPE token ids [N,L] (L <= 77) -> unit-norm text embedding x logit scale, [N,E]. The attention is
    causal and the head reads the end-of-text token, so ids cut after the last end-of-text give the
    embeddings of the full 77 (training cuts them: the text tower runs every step)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.modality_preprocessors = nn.ModuleDict({'text': TextPreprocessor(cfg)})
        self.modality_trunks = nn.ModuleDict({'text': Trunk(cfg.width, cfg.blocks, cfg.heads, 4, cfg.eps, pre_ln=False)})
        self.modality_heads = nn.ModuleDict({'text': TextHead(cfg)})
        self.modality_postprocessors = nn.ModuleDict({'text': nn.Sequential(nn.Identity(), LogitScale())})

    def forward(self, tokens):
        pre = self.modality_preprocessors['text']
        n = tokens.shape[1]
        x, _ = self.modality_trunks['text'](pre(tokens), attn_mask=pre.mask[:n, :n])
        emb = F.normalize(self.modality_heads['text'](x, tokens), dim=-1)
        return self.modality_postprocessors['text'](emb)


def init_random(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """Seeded random weights with transformer-like magnitudes (tiny test models, real-shape benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, LogitScale):
                m.log_logit_scale.fill_(math.log(1 / 0.07))
