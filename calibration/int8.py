"""INT8 graphs with explicit quantization (Q/DQ), calibrated on normal images with ONNX Runtime.

The Q/DQ form is the one both devices read: ONNX Runtime runs it directly (CPU: integer kernels)
and TensorRT builds an INT8 engine from it with no calibrator (the only INT8 route left in
TensorRT 11, and the recommended one since 10.1). What TensorRT requires, and so what is written:
- activations INT8 and *symmetric* (zero point 0), weights INT8 symmetric *per channel*;
- for ``target='tensorrt'`` the weights stay FP32 behind a Q/DQ pair (TensorRT 8.6 accepts only
  FP32 weights in Q/DQ graphs; 10.x quantizes them at build time), biases stay FP32 and every
  consumer gets its own Q/DQ pair (TensorRT fuses per consumer). ``target='onnxruntime'`` stores
  INT8 weights (a quarter of the file) for CPU-only bundles.
Only the matrix products are quantized (Conv, MatMul, Gemm: where INT8 pays); LayerNorm, Softmax,
Sigmoid, the L2 normalisations and everything after the encoder's normalised embedding stay FP32
(the same islands as the FP16 export, ``export.fp16.fp32_node_names``).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from .data_reader import CalibrationError, ImageBatches, ort_reader

log = logging.getLogger(__name__)

METHODS = ('minmax', 'entropy', 'percentile', 'dynamic')  # dynamic: ONNX Runtime only, no calibration images
TARGETS = ('tensorrt', 'onnxruntime')
EXTERNAL_DATA_OVER = 2**31 - 2**26  # bytes of weights past which a graph keeps them in one .data file
QUANTIZED_OPS = ('Conv', 'MatMul', 'Gemm')
# Per component: whether every node after an L2 normalisation stays FP32 (as the FP16 policy)
AFTER_NORMALISE = {'encoder': True, 'decoder': True, 'fewshot': False, 'prompt_learner': False}
# Components whose large convolutions go to INT8 in the MatMul form (``conv_as_matmul``) with method 'dynamic'
CONV_AS_MATMUL = ('prompt_learner',)
# Default tolerance of an INT8 variant against FP32, recorded in the manifest; the accuracy gate
# (calibration.gate) is what decides whether a calibration is kept.
INT8_TOLERANCE = {'encoder': {'atol': 1.0, 'rtol': 0.25}, 'prompt_learner': {'atol': 5e-2, 'rtol': 5e-2}}


def int8_file(component: str) -> str:
    return f'{component}-int8.onnx'


@dataclass
class QuantizeOptions:
    method: str = 'minmax'
    percentile: float = 99.999
    target: str = 'tensorrt'
    op_types: tuple[str, ...] = QUANTIZED_OPS
    exclude: tuple[str, ...] = ()        # more node names to keep FP32
    quantize_attention: bool = True      # MatMuls between two activations (Q.K^T, attn.V)

    def __post_init__(self):
        if self.method not in METHODS:
            raise CalibrationError(f"unknown calibration method {self.method!r}; choose one of {METHODS}")
        if self.target not in TARGETS:
            raise CalibrationError(f"unknown INT8 target {self.target!r}; choose one of {TARGETS}")
        if not 0 < self.percentile <= 100:
            raise CalibrationError(f"percentile must be in (0, 100], not {self.percentile}")
        if self.method == 'dynamic' and self.target != 'onnxruntime':
            raise CalibrationError("dynamic quantization (activation scales computed per inference) is an ONNX "
                                   "Runtime graph; TensorRT needs a calibrated Q/DQ graph (--target onnxruntime, "
                                   "or --method minmax|entropy|percentile)")

    def to_dict(self) -> dict:
        return {'method': self.method, 'percentile': self.percentile if self.method == 'percentile' else None,
                'target': self.target, 'op_types': list(self.op_types),
                'quantize_attention': self.quantize_attention,
                'activations': ('uint8 asymmetric, per-tensor scales computed at run time' if self.method == 'dynamic'
                                else 'int8 symmetric per-tensor'),
                'weights': 'int8 symmetric per-channel'}


def fp32_nodes(model: onnx.ModelProto, component: str) -> set[str]:
    """Nodes that stay FP32: the FP16 export's islands (LayerNorm, Softmax, Sigmoid, L2 norms, ...),
    and a projection whose output is L2-normalised (the encoder's head: one token, so nothing to gain
    in INT8, and the image token given to the LLM hangs on it directly)."""
    from ..export.fp16 import fp32_node_names, name_nodes
    name_nodes(model)
    keep = fp32_node_names(model, after_normalise=AFTER_NORMALISE.get(component, False))
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ('ReduceL2', 'ReduceSumSquare') and n.input[0] in producers:
            src = producers[n.input[0]]
            if src.op_type in QUANTIZED_OPS:
                keep.add(src.name)
    return keep


def conv_as_matmul(model: onnx.ModelProto, min_weights: int = 0) -> list[str]:
    """Rewrite in place every Conv that is stride 1, unpadded, undilated and ungrouped, with a constant
    weight of at least ``min_weights`` values, into an exactly equal MatMul form: the k x k patches
    sliced out of its input and flattened in the weight's (c, kh, kw) order, [B, h w, C k k] @ [C k k, D]
    + bias, back to [B, D, h, w]. The prompt learner's last conv (1024 -> 4096, 5x5 on a 7x7 map: 105M
    of its 107M parameters) is one: ONNX Runtime's dynamic INT8 MatMul is fast where its integer Conv
    is slower than FP32. Needs the input's spatial size to be static. Returns the rewritten node names."""
    from onnx import helper, numpy_helper
    import numpy as np
    inits = {t.name: t for t in model.graph.initializer}
    shapes = {v.name: [d.dim_value if d.HasField('dim_value') else None for d in v.type.tensor_type.shape.dim]
              for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    shapes.update({v.name: [d.dim_value if d.HasField('dim_value') else None for d in v.type.tensor_type.shape.dim]
                   for v in model.graph.input})
    done, nodes = [], []
    for node in model.graph.node:
        if node.op_type != 'Conv' or len(node.input) < 2:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w_init = inits.get(node.input[1])
        spatial = (shapes.get(node.input[0]) or [None] * 4)[2:]
        if (w_init is None or len(w_init.dims) != 4 or int(np.prod(w_init.dims)) < min_weights
                or any(attrs.get('pads', [0])) or any(v != 1 for v in attrs.get('strides', [1]))
                or any(v != 1 for v in attrs.get('dilations', [1])) or attrs.get('group', 1) != 1
                or attrs.get('auto_pad', b'NOTSET') not in (b'NOTSET', 'NOTSET', b'VALID', 'VALID')
                or len(spatial) != 2 or None in spatial or (len(node.input) > 2 and node.input[2] not in inits)):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(w_init)
        d, c, kh, kw = w.shape
        h, wd = spatial[0] - kh + 1, spatial[1] - kw + 1
        p = f'{node.name or node.output[0]}/matmul'

        def const(name, value):
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), f'{p}/{name}'))
            return f'{p}/{name}'
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.reshape(d, -1).T), f'{p}/weight'))
        axes, row = const('axes', [2, 3]), const('row', [0, 1, c * kh * kw])
        rows = []
        for i in range(h):
            for j in range(wd):
                sl, rs = f'{p}/slice_{i}_{j}', f'{p}/row_{i}_{j}'
                nodes.append(helper.make_node('Slice', [node.input[0], const(f's{i}_{j}', [i, j]),
                                                        const(f'e{i}_{j}', [i + kh, j + kw]), axes], [sl], name=sl))
                nodes.append(helper.make_node('Reshape', [sl, row], [rs], name=rs))
                rows.append(rs)
        nodes.append(helper.make_node('Concat', rows, [f'{p}/patches'], name=f'{p}/patches', axis=1))
        out = f'{p}/product'
        nodes.append(helper.make_node('MatMul', [f'{p}/patches', f'{p}/weight'], [out], name=out))
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node('Add', [out, node.input[2]], [f'{p}/biased'], name=f'{p}/biased'))
            out = f'{p}/biased'
        nodes.append(helper.make_node('Transpose', [out], [f'{p}/t'], name=f'{p}/t', perm=[0, 2, 1]))
        nodes.append(helper.make_node('Reshape', [f'{p}/t', const('shape', [0, d, h, wd])], [node.output[0]],
                                      name=f'{p}/map'))
        done.append(node.name)
    if done:
        used = {i for n in nodes for i in n.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return done


def _activation_matmuls(model: onnx.ModelProto) -> set[str]:
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == 'Constant' for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == 'MatMul' and not (set(n.input) & consts)}


def _extra_options(opts: QuantizeOptions) -> dict:
    # Q/DQ on the inputs of the matrix products only (TensorRT's placement: it fuses an output
    # quantization itself when the consumer is quantized); a quantized MatMul *output* would push
    # attention logits and residual-stream values through INT8 before Softmax / LayerNorm
    extra = {'ActivationSymmetric': True, 'WeightSymmetric': True, 'CalibMaxIntermediateOutputs': 16,
             'QDQOpTypePerChannelSupportToAxis': {'MatMul': 1},
             'OpTypesToExcludeOutputQuantization': list(opts.op_types)}
    if opts.method == 'percentile':
        extra['CalibPercentile'] = opts.percentile
    if opts.target == 'tensorrt':
        extra.update({'AddQDQPairToWeight': True, 'QuantizeBias': False, 'DedicatedQDQPair': True})
    return extra


def quantize_onnx(src, dst, batches: ImageBatches | None, component: str = 'encoder', input_name: str = 'image',
                  options: QuantizeOptions | None = None) -> dict:
    """FP32 ``src`` -> INT8 ``dst``: Q/DQ calibrated on ``batches``, or (method 'dynamic', ``batches``
    unused) MatMuls with INT8 weights and activation scales computed per inference, which ONNX Runtime
    fuses into its integer kernels (VNNI where the CPU has it). Written atomically (temp dir, rename).
    Returns what was done, for the manifest."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    opts = options or QuantizeOptions()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CalibrationError(f"{src}: no such ONNX file")
    if opts.method != 'dynamic' and batches is None:
        raise CalibrationError(f"{opts.method} calibration needs calibration images")
    model = onnx.load(str(src), load_external_data=False)
    exclude = fp32_nodes(model, component) | set(opts.exclude)
    if not opts.quantize_attention:
        exclude |= _activation_matmuls(model)
    weights = sum(os.path.getsize(p) for p in src.parent.glob(src.name + '*'))
    staging = Path(tempfile.mkdtemp(prefix=f'.{dst.name}.', dir=dst.parent))
    try:
        # quantization reads the graph by path (keeps external data working); unnamed nodes got
        # names above, so the block list needs the named copy
        named = staging / 'named.onnx'
        big = weights > EXTERNAL_DATA_OVER
        model = onnx.load(str(src))
        fp32_nodes(model, component)
        rewritten = conv_as_matmul(model) if opts.method == 'dynamic' and component in CONV_AS_MATMUL else []
        if big:
            onnx.save_model(model, str(named), save_as_external_data=True, all_tensors_to_one_file=True,
                            location='named.onnx.data')
        else:
            onnx.save_model(model, str(named))
        del model
        out = staging / dst.name
        if opts.method == 'dynamic':
            # MatMul only: ONNX Runtime's dynamic Conv path is slower than FP32 (the patch embedding
            # is one Conv); weights symmetric per channel, in 7 bits: a CPU with AVX2 but no VNNI multiplies
            # the uint8 activations by int8 weights with VPMADDUBSW, whose 16-bit pair sums saturate with full
            # 8-bit weights (on such a CPU the tiny encoder's image token fell to cosine 0.987 against FP32)
            quantize_dynamic(str(named), str(out), op_types_to_quantize=[t for t in opts.op_types if t != 'Conv'],
                             per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                             nodes_to_exclude=sorted(exclude), use_external_data_format=big,
                             extra_options={'MatMulConstBOnly': True})
            marker = ('DynamicQuantizeLinear', 'MatMulInteger', 'DynamicQuantizeMatMul')
        else:
            method = {'minmax': CalibrationMethod.MinMax, 'entropy': CalibrationMethod.Entropy,
                      'percentile': CalibrationMethod.Percentile}[opts.method]
            quantize_static(str(named), str(out), ort_reader(batches, input_name), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(opts.op_types), per_channel=True, reduce_range=False,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=sorted(exclude), use_external_data_format=big,
                            calibrate_method=method, extra_options=_extra_options(opts))
            marker = ('QuantizeLinear',)
        q = onnx.load(str(out), load_external_data=False)
        n_q = sum(n.op_type in marker for n in q.graph.node)
        if n_q == 0:
            raise CalibrationError(f"{src}: quantization inserted no INT8 nodes (nothing of {list(opts.op_types)} "
                                   "outside the FP32 islands?)")
        data = None
        if big:
            # re-saved into one data file of its own name, in a folder of its own: the quantizer's
            # data file may carry that name already, and onnx appends to an existing file
            data = dst.name + '.data'
            final = staging / 'final'
            final.mkdir()
            onnx.save_model(onnx.load(str(out)), str(final / dst.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data)
            os.replace(final / data, dst.parent / data)
            os.replace(final / dst.name, dst)
        else:
            os.replace(out, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s -> %s: %d INT8 nodes (%s), %d nodes kept FP32", src.name, dst.name, n_q, opts.method, len(exclude))
    calib = opts.to_dict()
    if batches is not None and opts.method != 'dynamic':
        calib.update(n_images=batches.n_used, batch_size=batches.batch_size)
    out = {'external_data': data, 'quantize_nodes': n_q, 'fp32_nodes': len(exclude), 'calibration': calib}
    if rewritten:
        out['conv_as_matmul'] = rewritten
    return out
