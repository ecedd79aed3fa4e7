"""Quantize an F32/F16 GGUF with llama.cpp's own ``llama_model_quantize`` (K-quants included)."""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from ..runtime import llama_cpp_api

log = logging.getLogger(__name__)

# our names -> llama_ftype (llama.h)
QUANT_TYPES = {'f32': 0, 'f16': 1, 'q4_0': 2, 'q8_0': 7, 'q4_k_s': 14, 'q4_k_m': 15, 'iq4_xs': 30, 'bf16': 32}


class QuantizeError(ValueError):
    """An unknown quantization type or a failed quantization; the message names the file."""
    exit_code = 2  # bad input (cli.exit_code)


def ftype_of(name: str) -> int:
    key = name.lower().replace('-', '_')
    if key not in QUANT_TYPES:
        raise QuantizeError(f"unknown quantization type {name!r}; choose one of {sorted(QUANT_TYPES)}")
    return QUANT_TYPES[key]


def quantize_gguf(src, dst, qtype: str, n_threads: int = 0) -> Path:
    """``src`` (F32/F16 GGUF) -> ``dst`` in ``qtype``, written atomically (temp file, then rename)."""
    ftype = ftype_of(qtype)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise QuantizeError(f"{src}: no such GGUF file")
    L = llama_cpp_api.lib()
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    tmp = dst.parent / f'.{dst.name}.tmp-{os.getpid()}'
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        rc = L.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise QuantizeError(f"{src}: llama_model_quantize to {qtype} failed (code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("quantized %s -> %s (%s, %.1f MB)", src.name, dst, qtype, dst.stat().st_size / 1e6)
    return dst
