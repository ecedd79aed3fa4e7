"""Merge a LoRA adapter into its base weights in HF layout (spec section 5.3).

``W' = W + scale * (B @ A)``, computed in fp32, before any llama.cpp q/k permutation. The merge
is a generator over ``(hf_name, tensor)`` so a converter can write each merged tensor and drop
it: a 13.5 GB model is never held twice.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping

import torch

# peft key of a LoRA factor, in any of the spellings met in practice:
#   base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight   (PEFT state dict)
#   llama_model.base_model.model.model.layers.0...lora_A.default.weight      (PandaGPT release)
#   ...q_proj.lora_A.weight                                                 (older PEFT)
_LORA_KEY = re.compile(r'^(?:llama_model\.)?(?:base_model\.model\.)?(?P<base>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$')


class LoraError(ValueError):
    """A LoRA adapter that does not fit its base model; the message names the tensor."""
    exit_code = 2  # bad input (cli.exit_code)


def merge_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 ``W + scale * (B @ A)``."""
    return weight.float() + scale * (lora_b.float() @ lora_a.float())


def split_lora_state(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA factors keyed by the HF base weight they apply to: ``{'model.layers.0.self_attn.q_proj.weight': (A, B)}``.
    Keys that are not LoRA factors are ignored."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _LORA_KEY.match(key)
        if m:
            found.setdefault(m['base'] + '.weight', {})[m['ab']] = value
    incomplete = sorted(k for k, ab in found.items() if set(ab) != {'A', 'B'})
    if incomplete:
        raise LoraError(f"LoRA factors without their pair (need lora_A and lora_B): {', '.join(incomplete[:8])}")
    return {k: (ab['A'], ab['B']) for k, ab in found.items()}


def check_lora(lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]], base_shapes: Mapping[str, tuple],
               rank: int | None = None, targets: Iterable[str] | None = None, source: str = 'LoRA') -> None:
    """Every factor pair fits its base weight (and the expected rank); with ``targets`` (e.g. q/k/v/o),
    every matching base weight has an adapter, so a naming mismatch cannot silently drop the LoRA."""
    problems = []
    for name, (a, b) in sorted(lora.items()):
        if name not in base_shapes:
            problems.append(f"{name}: no such weight in the base model")
            continue
        out_f, in_f = base_shapes[name]
        r = a.shape[0]
        if rank is not None and (r != rank or b.shape[1] != rank):
            problems.append(f"{name}: LoRA rank {r} (lora_A {list(a.shape)}, lora_B {list(b.shape)}), expected rank {rank}")
        elif tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            problems.append(f"{name}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the weight "
                            f"{[out_f, in_f]} (expected [r, {in_f}] and [{out_f}, r])")
    if targets is not None:
        pattern = re.compile(r'\.(' + '|'.join(map(re.escape, targets)) + r')\.weight$')
        missing = sorted(n for n in base_shapes if pattern.search(n) and n not in lora)
        if missing:
            problems.append(f"{len(missing)} target weight(s) have no LoRA factors: {', '.join(missing[:6])}"
                            + (' ...' if len(missing) > 6 else ''))
    if problems:
        raise LoraError(f"{source} does not fit the base model:\n  " + '\n  '.join(problems[:20]))


def iter_merged(base: Iterable[tuple[str, torch.Tensor]], lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                scale: float) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the base, with the LoRA merged (fp32) into the weights it targets.
    Untouched tensors are passed through as they are (no copy)."""
    used = set()
    for name, tensor in base:
        if name in lora:
            a, b = lora[name]
            used.add(name)
            yield name, merge_weight(tensor, a, b, scale)
        else:
            yield name, tensor
    unused = sorted(set(lora) - used)
    if unused:
        raise LoraError(f"LoRA factors for weights the base model does not have: {', '.join(unused[:8])}")


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def iter_merged_peft(peft_model, adapter: str = 'default') -> Iterator[tuple[str, torch.Tensor]]:
    """Merged ``(hf_name, tensor)`` of a PEFT-wrapped causal LM (``models.llm.add_lora`` output), in
    the order of the HF model's own state dict. The PEFT model is not modified. Scale is
    ``lora_alpha / r`` as PEFT stores it per layer."""
    base_model = peft_model.get_base_model() if hasattr(peft_model, 'get_base_model') else peft_model
    layers = dict(_lora_layers(peft_model)) if hasattr(peft_model, 'get_base_model') else {}
    for module in layers.values():
        if getattr(module, 'use_dora', {}).get(adapter) or getattr(module, 'fan_in_fan_out', False):
            raise LoraError("DoRA / fan_in_fan_out adapters are not supported by this merge")
    with torch.no_grad():
        for key, tensor in base_model.state_dict(keep_vars=False).items():
            if '.lora_' in key or 'lora_magnitude' in key:
                continue
            if key.endswith('.base_layer.weight'):
                mod_name = key[:-len('.base_layer.weight')]
                module = layers[mod_name]
                if adapter not in module.lora_A:
                    yield mod_name + '.weight', tensor
                    continue
                yield mod_name + '.weight', merge_weight(tensor, module.lora_A[adapter].weight,
                                                        module.lora_B[adapter].weight, module.scaling[adapter])
            else:
                yield key.replace('.base_layer.', '.'), tensor


def merged_state_dict(peft_model, adapter: str = 'default') -> dict[str, torch.Tensor]:
    """All merged tensors at once (for small models and tests; the exporter streams instead)."""
    return dict(iter_merged_peft(peft_model, adapter))


def merged_shapes(model) -> dict[str, tuple]:
    """``{hf_name: shape}`` of what ``iter_merged_peft`` yields, in the same order, without merging."""
    base_model = model.get_base_model() if hasattr(model, 'get_base_model') else model
    return {k.replace('.base_layer.', '.'): tuple(v.shape) for k, v in base_model.state_dict().items()
            if '.lora_' not in k and 'lora_magnitude' not in k}
