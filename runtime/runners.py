"""Vision runners: one protocol, one implementation per backend (Polygraphy style).

``OrtRunner`` runs an ``.onnx`` graph with ONNX Runtime: TensorRT / CUDA execution providers when
the installed onnxruntime(-gpu) offers them, else CPU. ONNX Runtime is imported when a runner is
built, so importing this module costs nothing. The PyTorch reference runner lives in
``runtime.torch_runner`` (parity and baselines only); no module of ``runtime`` imports torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

# Preference order for providers='auto'.
AUTO_PROVIDERS = ('TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider')

_ORT_DTYPES = {'tensor(float)': np.float32, 'tensor(float16)': np.float16, 'tensor(double)': np.float64,
               'tensor(int64)': np.int64, 'tensor(int32)': np.int32, 'tensor(int8)': np.int8,
               'tensor(uint8)': np.uint8, 'tensor(bool)': np.bool_}


class RunnerError(ValueError):
    """A graph that cannot be loaded or inputs that do not fit it; the message names the file."""
    exit_code = 2  # bad input (cli.exit_code)


@runtime_checkable
class VisionRunner(Protocol):
    name: str

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def available_providers() -> list[str]:
    import onnxruntime as ort
    return list(ort.get_available_providers())


def resolve_providers(providers='auto', available: Sequence[str] | None = None) -> list:
    """'auto' -> TensorRT, CUDA (when this onnxruntime build has them) then CPU; a list is checked
    against what is available. Entries may be names or ``(name, options)`` pairs, as in onnxruntime."""
    available = list(available_providers() if available is None else available)
    if providers == 'auto':
        return [p for p in AUTO_PROVIDERS if p in available]
    if isinstance(providers, str):
        providers = [providers]
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise RunnerError(f"execution provider(s) {unknown} not available in this onnxruntime build "
                          f"(available: {available}); for CUDA/TensorRT install onnxruntime-gpu")
    return list(providers)


def _dim(d):
    """ONNX Runtime shape entry -> int (static) or str (symbolic; None becomes '?')."""
    return d if isinstance(d, int) else (d or '?')


class NamedIO:
    """Runners whose ``inputs``/``outputs`` map tensor names to (shape, dtype)."""
    inputs: dict
    outputs: dict

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)


def check_feeds(where: str, inputs: dict, feeds: dict, kind: str = 'graph') -> dict:
    """Feeds checked against ``inputs`` (name -> (shape, dtype); a dim is an int, -1 or a symbol such as
    'batch' that must agree across inputs): names, ranks and static dims; float arrays cast to the
    expected float type. Returns contiguous arrays ready to run."""
    missing = [n for n in inputs if n not in feeds]
    unknown = [n for n in feeds if n not in inputs]
    if missing or unknown:
        takes = ', '.join(f"{n} {list(s)}" for n, (s, _) in inputs.items())
        raise RunnerError(f"{where}: inputs do not match the {kind}: missing {missing}, unknown {unknown} "
                          f"(the {kind} takes {takes})")
    ready, symbols = {}, {}
    for name, (shape, dtype) in inputs.items():
        arr = np.asarray(feeds[name])
        if arr.ndim != len(shape) or any(isinstance(d, int) and d >= 0 and d != n for d, n in zip(shape, arr.shape)):
            raise RunnerError(f"{where}: input {name!r} has shape {list(arr.shape)}, the {kind} expects {list(shape)}")
        for d, n in zip(shape, arr.shape):
            if isinstance(d, str) and d != '?' and symbols.setdefault(d, (n, name))[0] != n:
                raise RunnerError(f"{where}: dimension {d!r} is {symbols[d][0]} in input {symbols[d][1]!r} "
                                  f"but {n} in input {name!r}")
        if arr.dtype != dtype:
            if not (np.issubdtype(arr.dtype, np.floating) and np.issubdtype(np.dtype(dtype), np.floating)):
                raise RunnerError(f"{where}: input {name!r} is {arr.dtype}, the {kind} expects {np.dtype(dtype).name}")
            arr = arr.astype(dtype)
        ready[name] = np.ascontiguousarray(arr)
    return ready


class OrtRunner(NamedIO):
    """Run one ONNX graph with ONNX Runtime behind the ``VisionRunner`` protocol.

    ``intra_op_threads`` / ``inter_op_threads``: ONNX Runtime thread pools (None = its default);
    ``spin``: whether idle pool threads busy-wait after a call. Off by default: the chain runs several
    sessions back to back, and on a small CPU each session's spinning threads take the cores from the
    next one (ImageBind-Huge INT8 chain on 2 cores: 0.88 s with spinning, 0.62 s without;
    benchmarks/README.md). None leaves ONNX Runtime's own default (spinning).

    ``arena`` / ``mem_pattern``: ONNX Runtime's CPU memory arena and memory-pattern planning (its
    defaults, on); benchmarks/README.md ("Time to verdict") has their effect on resident memory."""

    def __init__(self, path, providers='auto', intra_op_threads: int | None = None,
                 inter_op_threads: int | None = None, spin: bool | None = False,
                 optimization: str = 'all', name: str | None = None, arena: bool = True,
                 mem_pattern: bool = True):
        import onnxruntime as ort
        self.path = Path(path)
        self.name = name or f'onnxruntime:{self.path.name}'
        if not self.path.is_file():
            raise RunnerError(f"{self.path}: no such ONNX file")
        so = ort.SessionOptions()
        if intra_op_threads is not None:
            so.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads is not None:
            so.inter_op_num_threads = int(inter_op_threads)
        if spin is not None:
            so.add_session_config_entry('session.intra_op.allow_spinning', '1' if spin else '0')
            so.add_session_config_entry('session.inter_op.allow_spinning', '1' if spin else '0')
        levels = {'disable': ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise ValueError(f"optimization must be one of {sorted(levels)}, not {optimization!r}")
        so.graph_optimization_level = levels[optimization]
        so.enable_cpu_mem_arena = bool(arena)
        so.enable_mem_pattern = bool(mem_pattern)
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=resolve_providers(providers))
        except RunnerError:
            raise
        except Exception as e:  # onnxruntime raises its own pybind exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunnerError(f"{self.path}: ONNX Runtime cannot load this graph (corrupt, truncated or "
                              f"missing its external data file?): {first}") from None
        self.providers = self.session.get_providers()
        self.inputs = {i.name: (tuple(_dim(d) for d in i.shape), _ORT_DTYPES.get(i.type, i.type))
                       for i in self.session.get_inputs()}
        self.outputs = {o.name: (tuple(_dim(d) for d in o.shape), _ORT_DTYPES.get(o.type, o.type))
                        for o in self.session.get_outputs()}

    def check_feeds(self, feeds: dict) -> dict:
        return check_feeds(f"{self.path}", self.inputs, feeds, 'graph')

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ready = self.check_feeds(feeds)
        out = self.session.run(self.output_names, ready)
        return dict(zip(self.output_names, out))

    def __repr__(self) -> str:
        return f'OrtRunner({str(self.path)!r}, providers={self.providers})'
