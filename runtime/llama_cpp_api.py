"""The few process-wide pieces of llama.cpp's low-level ctypes API: import, backend init, logging.

llama-cpp-python is imported on first use, so ``import anomalygpt_edge.runtime`` works without it.
"""
from __future__ import annotations

import ctypes
import threading

_lock = threading.Lock()
_lib = None
_log_callback = None  # ctypes keeps only a weak link to the callback: hold it for the process lifetime
_verbose = False
GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum ggml_log_level
_errors: list[str] = []   # llama.cpp's error lines since clear_errors(), so a failure can say why without its log
MAX_ERRORS = 16


def lib():
    """The ``llama_cpp`` module, with the backend initialised once and its log routed through us."""
    global _lib, _log_callback
    with _lock:
        if _lib is None:
            try:
                import llama_cpp
            except ImportError as e:
                raise ImportError("llama-cpp-python is required for the LLM (pip install llama-cpp-python)") from e

            @llama_cpp.llama_log_callback
            def _on_log(level, text, user_data):
                if level == GGML_LOG_LEVEL_ERROR and text and len(_errors) < MAX_ERRORS:
                    _errors.append(text.decode('utf-8', 'replace').strip())
                if _verbose and text:
                    import sys
                    sys.stderr.write(text.decode('utf-8', 'replace'))

            _log_callback = _on_log
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _lib = llama_cpp
    return _lib


def set_verbose(verbose: bool) -> None:
    """llama.cpp's own log (loader, warnings) to stderr, or silenced (the default)."""
    global _verbose
    _verbose = bool(verbose)


def clear_errors() -> None:
    """Forget llama.cpp's error lines so far (before a call whose failure ``first_error`` is to explain)."""
    _errors.clear()


def first_error() -> str | None:
    """The first error line llama.cpp logged since ``clear_errors``: the cause (later ones pass the failure up)."""
    return next((e for e in _errors if e), None)
