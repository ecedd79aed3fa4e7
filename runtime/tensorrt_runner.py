"""TensorRT behind the ``VisionRunner`` protocol, and the engine builder, with pycuda.

tensorrt and pycuda are imported inside functions only: importing this module costs nothing and
works without them. Every difference between TensorRT versions is handled in this file:
- running: the named-tensor API of TensorRT >= 8.5 (``set_input_shape`` / ``set_tensor_address`` /
  ``execute_async_v3``: 8.5, 8.6, 10.x, 11) or the binding API of older releases
  (``set_binding_shape`` / ``execute_async_v2``);
- building: the explicit-batch flag before 10 (implicit batch is gone in 10), strongly typed
  networks from 10 on (the ONNX types decide every precision; 11 has no FP16/INT8 builder flags),
  per-layer FP32 constraints for weakly typed FP16 builds, the implicit INT8 calibrator only
  where it still exists (< 10.1 recommended; removed in 11).

The runner uses the device's primary CUDA context (the one TensorRT's runtime API uses), pinned
host buffers and device buffers allocated once per input-shape signature, one stream, and
asynchronous copies around one enqueue.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .runners import NamedIO, RunnerError, check_feeds

MAX_SHAPE_SETS = 8   # buffer sets kept (one per distinct input shapes: batch sizes, few-shot k)


def _version(trt) -> tuple[int, int]:
    from .engines import trt_major_minor
    return trt_major_minor(trt.__version__)


class TrtRunner(NamedIO):
    """``TrtRunner('bundle/engines/<set>/encoder.engine').infer({'image': x})``."""

    def __init__(self, engine_path, device_id: int = 0, name: str | None = None):
        import pycuda.driver as cuda
        import tensorrt as trt
        self.path = Path(engine_path)
        self.name = name or f'tensorrt:{self.path.name}'
        if not self.path.is_file():
            raise RunnerError(f"{self.path}: no such engine file")
        self._cuda, self._trt = cuda, trt
        cuda.init()
        self._ctx = cuda.Device(device_id).retain_primary_context()
        self._ctx.push()
        try:
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise RunnerError(f"{self.path}: TensorRT {trt.__version__} cannot deserialize this engine "
                                  "(built with another TensorRT version or GPU, or truncated); rebuild it with "
                                  "anomalygpt-edge build-engines")
            self.context = self.engine.create_execution_context()
            self.stream = cuda.Stream()
            self._named = hasattr(self.engine, 'num_io_tensors')
            self.inputs, self.outputs = OrderedDict(), OrderedDict()
            if self._named:
                for i in range(self.engine.num_io_tensors):
                    n = self.engine.get_tensor_name(i)
                    spec = (tuple(self.engine.get_tensor_shape(n)), np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))))
                    (self.inputs if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else self.outputs)[n] = spec
            else:
                for i in range(self.engine.num_bindings):
                    n = self.engine.get_binding_name(i)
                    spec = (tuple(self.engine.get_binding_shape(i)), np.dtype(trt.nptype(self.engine.get_binding_dtype(i))))
                    (self.inputs if self.engine.binding_is_input(i) else self.outputs)[n] = spec
        finally:
            self._ctx.pop()
        self._sets: OrderedDict = OrderedDict()

    def check_feeds(self, feeds: dict) -> dict:
        return check_feeds(f"{self.path}", self.inputs, feeds, 'engine')

    # -- buffers ------------------------------------------------------------------------------
    def _set_shapes(self, shapes: dict) -> None:
        for n, shape in shapes.items():
            ok = (self.context.set_input_shape(n, shape) if self._named
                  else self.context.set_binding_shape(self.engine.get_binding_index(n), shape))
            if ok is False:
                raise RunnerError(f"{self.path}: input {n!r} shape {list(shape)} is outside the engine's optimisation "
                                  f"profile {self._profile(n)}; rebuild with a wider --max-batch / --shots")

    def _profile(self, n: str) -> str:
        try:
            lo, opt, hi = (self.engine.get_tensor_profile_shape(n, 0) if self._named
                           else self.engine.get_profile_shape(0, n))
            return f"min {list(lo)} opt {list(opt)} max {list(hi)}"
        except Exception:
            return '(unknown)'

    def _output_shape(self, n: str) -> tuple:
        shape = tuple(self.context.get_tensor_shape(n) if self._named
                      else self.context.get_binding_shape(self.engine.get_binding_index(n)))
        if any(d < 0 for d in shape):
            raise RunnerError(f"{self.path}: output {n!r} shape {list(shape)} is unresolved after setting the inputs")
        return shape

    def _buffers(self, shapes: dict):
        key = tuple(shapes.items())
        if key in self._sets:
            self._sets.move_to_end(key)
            return self._sets[key]
        cuda = self._cuda
        self._set_shapes(shapes)
        host, dev = {}, {}
        for n, shape in list(shapes.items()) + [(o, self._output_shape(o)) for o in self.outputs]:
            dtype = (self.inputs.get(n) or self.outputs[n])[1]
            host[n] = cuda.pagelocked_empty(shape, dtype)
            dev[n] = cuda.mem_alloc(max(host[n].nbytes, 1))
        self._sets[key] = (host, dev)
        while len(self._sets) > MAX_SHAPE_SETS:
            _, (_, old) = self._sets.popitem(last=False)
            for d in old.values():
                d.free()
        return host, dev

    # -- inference ----------------------------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ready = self.check_feeds(feeds)
        cuda = self._cuda
        self._ctx.push()
        try:
            shapes = {n: tuple(a.shape) for n, a in ready.items()}
            host, dev = self._buffers(shapes)
            self._set_shapes(shapes)   # the context is shared by every buffer set
            for n, arr in ready.items():
                np.copyto(host[n], arr)
                cuda.memcpy_htod_async(dev[n], host[n], self.stream)
            if self._named:
                for n, d in dev.items():
                    self.context.set_tensor_address(n, int(d))
                ok = self.context.execute_async_v3(self.stream.handle)
            else:
                bindings = [0] * self.engine.num_bindings
                for n, d in dev.items():
                    bindings[self.engine.get_binding_index(n)] = int(d)
                ok = self.context.execute_async_v2(bindings, self.stream.handle)
            if not ok:
                raise RunnerError(f"{self.path}: TensorRT failed to enqueue the inference")
            for n in self.outputs:
                cuda.memcpy_dtoh_async(host[n], dev[n], self.stream)
            self.stream.synchronize()
            return {n: np.array(host[n]) for n in self.outputs}
        finally:
            self._ctx.pop()

    def close(self) -> None:
        if getattr(self, '_ctx', None) is None:
            return
        self._ctx.push()
        try:
            for _, dev in self._sets.values():
                for d in dev.values():
                    d.free()
            self._sets.clear()
            self.context = self.engine = None
        finally:
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None

    def __repr__(self) -> str:
        return f'TrtRunner({str(self.path)!r})'


# -- building -----------------------------------------------------------------------------------
def _pin_fp32_layers(network, trt) -> int:
    """Weakly typed FP16 builds: LayerNorm, Softmax, Sigmoid, reductions, sqrt/exp and pow/div stay FP32
    (the same islands as the bundle's FP16 graphs). Returns how many layers were pinned."""
    L = trt.LayerType
    whole = {getattr(L, t) for t in ('NORMALIZATION', 'SOFTMAX', 'REDUCE') if hasattr(L, t)}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = layer.type
        keep = kind in whole
        if kind == L.ACTIVATION:
            layer.__class__ = trt.IActivationLayer      # the Python bindings need the subclass for .type
            keep = layer.type == trt.ActivationType.SIGMOID
        elif kind == L.UNARY:
            layer.__class__ = trt.IUnaryLayer
            keep = layer.op in (trt.UnaryOperation.SQRT, trt.UnaryOperation.EXP)
        elif kind == L.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
            keep = layer.op in (trt.ElementWiseOperation.POW, trt.ElementWiseOperation.DIV)
        floats = all(layer.get_output(j).dtype in (trt.float32, trt.float16) for j in range(layer.num_outputs))
        if keep and floats:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_serialized(onnx_path, item, profiles: dict, workspace_mb: int | None = None, timing_cache=None,
                     calibrator=None, log=print) -> bytes:
    """One engine from one ONNX file following a ``engines.BuildItem``; returns the plan bytes.
    ``timing_cache``: a file read before and written (atomically) after the build."""
    import tensorrt as trt
    major, minor = _version(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if item.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):   # by path: external data resolves beside the file
        errors = '; '.join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RunnerError(f"{onnx_path}: the TensorRT ONNX parser rejects this graph: {errors}")
    config = builder.create_builder_config()
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if item.flags and major >= 11:
        raise RunnerError(f"{onnx_path}: TensorRT {trt.__version__} has no precision flags ({item.flags})")
    for f in item.flags:
        config.set_flag(getattr(trt.BuilderFlag, f.upper()))
    if item.fp32_layers:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log(f"  {_pin_fp32_layers(network, trt)} layers pinned to FP32")
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if calibrator is not None:
        if (major, minor) >= (11, 0):
            raise RunnerError("TensorRT 11 removed implicit INT8 calibration; use the Q/DQ graph (calibrate int8)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b''
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RunnerError(f"{onnx_path}: TensorRT failed to build an engine (see the messages above; "
                          "a larger --workspace may help)")
    if cache is not None:
        _write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
