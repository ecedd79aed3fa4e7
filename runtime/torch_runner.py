"""PyTorch reference runner: an ``nn.Module`` with named inputs and outputs behind the
``VisionRunner`` protocol, for parity checks and baselines only.

torch is imported when a runner is built, never when this module is imported, so the runtime
stays torch-free unless a caller asks for the reference explicitly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class TorchRunner:
    """``module(*inputs in input_names order)`` -> a tensor or a tuple, named by ``output_names``."""

    def __init__(self, module, input_names: Sequence[str], output_names: Sequence[str],
                 device: str = 'cpu', dtype=None, name: str | None = None):
        import torch
        self._torch = torch
        self.module = module.eval().to(device)
        self.device = device
        self.dtype = dtype  # e.g. torch.bfloat16 for a baseline; outputs always come back float32
        self._inputs = list(input_names)
        self._outputs = list(output_names)
        self.name = name or f'torch:{type(module).__name__}'

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise ValueError(f"{self.name}: missing inputs {missing} (takes {self._inputs})")
        args = []
        for n in self._inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
            if self.dtype is not None and t.is_floating_point():
                t = t.to(self.dtype)
            args.append(t)
        with torch.inference_mode():
            out = self.module(*args)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        if len(out) != len(self._outputs):
            raise ValueError(f"{self.name}: module returned {len(out)} outputs, expected {self._outputs}")
        return {n: o.detach().to('cpu', torch.float32).numpy() for n, o in zip(self._outputs, out)}
