"""FP16 variants of the exported graphs, with onnxruntime's float16 converter.

Graph inputs and outputs stay float32 (``keep_io_types``). These stay in FP32:
- LayerNormalization, Softmax, Sigmoid: reductions/exponentials that lose accuracy in half;
- every L2 normalisation (ReduceL2 and the nodes up to its Div, or Pow/ReduceSum/Sqrt): the taps are
  raw residual streams whose sum of squares can overflow 65504 in half precision;
- with ``after_normalise``, every node downstream of an L2 normalisation, and downstream of the
  inputs named in ``after_inputs``: the decoder multiplies cosines by 100 before the sigmoid, so a
  half-precision cosine or text direction (rel. error ~5e-4) would move the map by ~1e-2; the
  encoder's llama_proj after its normalised embedding is small and stays exact.
Constants that feed only FP32 nodes stay FP32 too (e.g. the normalisation eps, which half would
flush to its smallest subnormal).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import onnx

from .quiet_logs import quiet_logs

FP32_OPS = ('LayerNormalization', 'Softmax', 'Sigmoid', 'ReduceL2', 'ReduceSumSquare')
# nodes between a norm and the division that applies it (F.normalize: ReduceL2 -> Clip -> Expand -> Div)
_NORM_PATH = ('Clip', 'Max', 'Expand', 'Div', 'ReduceSum', 'Sqrt')
_NORM_START = ('ReduceL2', 'ReduceSumSquare', 'Pow')


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def fp32_node_names(model: onnx.ModelProto, after_normalise: bool = False,
                    after_inputs: tuple[str, ...] = ()) -> set[str]:
    """Names of the nodes to keep in FP32 (nodes must be named, as the exporters do).
    ``after_inputs``: graph inputs whose every downstream node stays FP32 too."""
    graph = model.graph
    consumers = _consumers(graph)
    keep = {n.name for n in graph.node if n.op_type in FP32_OPS}

    def walk(outputs, everything):
        stack, seen = list(outputs), set()
        while stack:
            for nxt in consumers.get(stack.pop(), ()):
                if nxt.name in seen or not (everything or nxt.op_type in _NORM_PATH):
                    continue
                seen.add(nxt.name)
                keep.add(nxt.name)
                if everything or nxt.op_type != 'Div':  # the Div applies the norm: stop there
                    stack.extend(nxt.output)

    for node in graph.node:
        if node.op_type in _NORM_START:
            keep.add(node.name)
            walk(node.output, after_normalise)
    walk(after_inputs, True)
    # Constants feeding only FP32 nodes (shapes and ints are unaffected by the converter anyway)
    for node in graph.node:
        if node.op_type == 'Constant' and node.output:
            users = consumers.get(node.output[0], ())
            if users and all(u.name in keep for u in users):
                keep.add(node.name)
    return keep


def name_nodes(model: onnx.ModelProto) -> None:
    """The block list works by node name: give every unnamed node one."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f'{node.op_type}_{i}'


def to_fp16(model: onnx.ModelProto, work_dir, after_normalise: bool = False,
            after_inputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """An FP16 copy of an FP32 graph: float32 inputs/outputs, the sensitive nodes kept FP32.

    The converter needs ONNX shape inference, which cannot run on an in-memory proto over 2 GB
    (the FP32 ImageBind-Huge tower is 2.5 GB), so the graph goes through a file with external data
    in ``work_dir``, where ``infer_shapes_path`` works at any size."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel
    name_nodes(model)
    block = fp32_node_names(model, after_normalise, after_inputs)
    path = Path(work_dir) / 'fp32-for-fp16.onnx'
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + '.data', size_threshold=1024)
    onnx.load_external_data_for_model(model, str(work_dir))  # saving moved the caller's weights out
    # its INFO log dumps whole node lists for each initializer an FP32 island shares with FP16 nodes (a random
    # model's all-ones LayerNorm weights, deduplicated by the exporter): the export's own verification judges them
    with quiet_logs('onnxruntime.transformers.float16', level=logging.WARNING):
        half = convert_float_to_float16(str(path), keep_io_types=True, op_block_list=list(FP32_OPS),
                                        node_block_list=sorted(block))
    OnnxModel.graph_topological_sort(half.graph)  # the converter appends its I/O casts at the end
    return half
