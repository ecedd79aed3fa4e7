"""The LLM side: HF LLaMA (Vicuna-7B v0 at the ``huge`` size) with the PandaGPT LoRA, spec section 5."""
from __future__ import annotations

import torch

from .config import LLMConfig

LORA_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj')


def llama_config(cfg: LLMConfig):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads or cfg.heads, rms_norm_eps=cfg.rms_eps,
        max_position_embeddings=cfg.max_positions,
        rope_parameters={'rope_type': 'default', 'rope_theta': cfg.rope_theta},
        bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id,
        tie_word_embeddings=False, hidden_act='silu')


def build_llama(cfg: LLMConfig, seed: int | None = None):
    """A randomly initialised (seeded) ``LlamaForCausalLM``; on the meta device if created under it."""
    from transformers import LlamaForCausalLM
    if seed is not None:
        torch.manual_seed(seed)
    config = llama_config(cfg)
    config._attn_implementation = 'eager'
    return LlamaForCausalLM(config).eval()


def lora_config(cfg: LLMConfig, inference: bool = True):
    from peft import LoraConfig
    return LoraConfig(task_type='CAUSAL_LM', inference_mode=inference, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=0.1, target_modules=list(LORA_TARGETS))


def add_lora(model, cfg: LLMConfig, seed: int | None = None):
    """Wrap with PEFT LoRA (r, alpha from cfg). With a seed, lora_B is randomised too, so the
    adapter changes the outputs (PEFT initialises lora_B to zero)."""
    from peft import get_peft_model
    peft_model = get_peft_model(model, lora_config(cfg))
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if 'lora_' in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model.eval()
