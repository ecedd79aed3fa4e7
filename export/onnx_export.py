"""Export the vision side (encoder, decoder, few-shot, prompt learner) to ONNX, FP32 and FP16.

Each graph is traced with the TorchScript exporter (``dynamo=False``: it honours opset 17, which
TensorRT 8.5/8.6 on JetPack 5 needs), with a dynamic batch axis (and a dynamic memory size M for
few-shot), checked with ``onnx.checker``, saved atomically (one external data file beside the
``.onnx`` when the weights pass ``external_data_threshold``), then run in ONNX Runtime and compared
with the PyTorch reference on sample inputs against the component's declared tolerance.
``export_vision`` returns the manifest's ``components`` section.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from ..models.anomalygpt import AnomalyGPT
from ..runtime.compare import ComparisonReport, compare_outputs
from ..runtime.runners import OrtRunner
from ..runtime.torch_runner import TorchRunner
from . import fp16
from .onnx_graphs import Component, ComponentSpec, Precision, component_specs, export_module, reference_module
from .samples import verification_cases

DEFAULT_OPSET = 17
MIN_OPSET = 14   # the towers' scaled_dot_product_attention has no ONNX form below it
try:   # the highest opset this torch's exporter writes (a private constant: 23 in torch 2.13)
    from torch.onnx._constants import ONNX_MAX_OPSET as MAX_OPSET
except ImportError:
    MAX_OPSET = 23
# protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


class ExportError(RuntimeError):
    """An export that failed; the message names the file and the problem."""


class ExportVerificationError(ExportError):
    """An exported graph whose ONNX Runtime outputs are outside the component's tolerance."""
    exit_code = 1  # a check failed (cli.exit_code)


@contextlib.contextmanager
def _mha_fastpath_disabled():
    # the TorchScript exporter cannot export MultiheadAttention's fused inference fast path
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _trace_inputs(spec: ComponentSpec, model: AnomalyGPT) -> tuple:
    """Batch 1 and M = one image's patches: verification then runs other sizes."""
    g = torch.Generator().manual_seed(0)
    sizes = {'batch': 1, 'M': model.cfg.vision.n_patches}
    out = []
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        x = torch.randn(shape, generator=g)
        if t.name == 'text_features':
            x = x / x.norm(dim=-1, keepdim=True)
        elif t.name == 'anomaly_map':
            x = torch.rand(shape, generator=g)
        out.append(x)
    return tuple(out)


def trace_to_onnx(module: torch.nn.Module, spec: ComponentSpec, model: AnomalyGPT, opset: int,
                  work_dir: Path) -> onnx.ModelProto:
    """Trace one graph; returns the proto with its weights loaded (whatever files the exporter wrote)."""
    path = work_dir / f'{spec.component.value}.trace.onnx'
    with _mha_fastpath_disabled(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TracerWarnings on constant shapes, the exporter's deprecation notice
        torch.onnx.export(module, _trace_inputs(spec, model), str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))  # pulls in any external data files (a > 2 GB trace writes one per tensor)
    got = next((o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')), None)
    if got != opset:
        raise ExportError(f"{spec.component.value}: the exporter wrote opset {got}, not the requested {opset}")
    _stamp_interface(proto, spec)
    fp16.name_nodes(proto)
    return proto


def _stamp_interface(proto: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Write the contract's shapes on the graph's inputs/outputs. Shape inference cannot see
    through the exporter's dynamic Resize sizes, but TensorRT profiles and the runtime read these;
    verification then checks the real output shapes against them."""
    for values, tensors in ((proto.graph.input, spec.inputs), (proto.graph.output, spec.outputs)):
        by_name = {v.name: v for v in values}
        for t in tensors:
            dims = by_name[t.name].type.tensor_type.shape.dim
            del dims[:]
            for d in t.shape:
                dim = dims.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = d


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def weight_bytes(proto: onnx.ModelProto) -> int:
    return sum(_tensor_bytes(t) for t in proto.graph.initializer)


def save_onnx(proto: onnx.ModelProto, path: Path, external_data_threshold: int) -> str | None:
    """Save atomically; weights over the threshold go to ONE ``<name>.data`` file beside it.
    Returns the external data file name, or None."""
    path = Path(path)
    data_name = path.name + '.data' if weight_bytes(proto) > external_data_threshold else None
    staging = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', dir=path.parent))
    try:
        if data_name:
            onnx.save_model(proto, str(staging / path.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            # saving moved the weights out of the in-memory proto: read them back for the caller
            onnx.load_external_data_for_model(proto, str(staging))
        else:
            onnx.save_model(proto, str(staging / path.name))
        try:
            onnx.checker.check_model(str(staging / path.name))  # the path form handles external data
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{path}: onnx.checker rejects the exported graph: {str(e).splitlines()[0]}") from None
        if data_name:
            # onnx creates the data file owner-only; give it the graph file's (umask) permissions
            os.chmod(staging / data_name, stat.S_IMODE((staging / path.name).stat().st_mode))
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data_name


def _interface_problems(runner: OrtRunner, spec: ComponentSpec) -> list[str]:
    problems = []
    for kind, got, want in (('inputs', runner.inputs, spec.inputs), ('outputs', runner.outputs, spec.outputs)):
        if list(got) != [t.name for t in want]:
            problems.append(f"{kind} {list(got)} instead of {[t.name for t in want]}")
            continue
        for t in want:
            shape = got[t.name][0]
            if len(shape) != len(t.shape) or any(isinstance(d, int) and d != s for d, s in zip(t.shape, shape)):
                problems.append(f"{t.name} has shape {list(shape)}, expected {list(t.shape)}")
    return problems


def verify_graph(path: Path, spec: ComponentSpec, precision: Precision | str, cases,
                 expected: list[dict]) -> ComparisonReport:
    """ONNX Runtime (CPU) on ``cases`` against the reference outputs ``expected``; raises past tolerance."""
    precision = Precision(precision)
    runner = OrtRunner(path, providers=['CPUExecutionProvider'])
    problems = _interface_problems(runner, spec)
    if problems:
        raise ExportError(f"{path}: graph interface differs from the {spec.component.value} contract: "
                          + '; '.join(problems))
    tol = spec.tolerance[precision.value]
    report = ComparisonReport(f'onnxruntime:{path.name}', f'torch:{spec.component.value}')
    for (case, feeds), ref in zip(cases, expected):
        report.extend(compare_outputs(runner.infer(feeds), ref, tol, case))
    if not report.passed:
        raise ExportVerificationError(
            f"{path}: {spec.component.value} ({precision.value}) differs from the PyTorch reference beyond "
            f"atol={tol['atol']} rtol={tol['rtol']}:\n{report.table()}")
    return report


def _json_number(v):
    return v if v is None or math.isfinite(v) else str(v)  # a zero reference gives an infinite rel. error


def verified_summary(report: ComparisonReport, spec: ComponentSpec, cases) -> dict:
    batched = next(t.name for t in spec.inputs if t.shape[0] == 'batch')
    names = dict.fromkeys(r.name for r in report.results)
    return {'cases': [c for c, _ in cases], 'batch': int(cases[0][1][batched].shape[0]),
            **{k: _json_number(v) for k, v in report.worst().items()},
            'outputs': {n: {k: _json_number(v) for k, v in report.worst(n).items()} for n in names}}


def export_vision(model: AnomalyGPT, out_dir, precisions=('fp32',), opset: int = DEFAULT_OPSET,
                  external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD, verify: bool = True,
                  components=tuple(Component), verify_batch: int = 2, seed: int = 0) -> dict:
    """Export the vision graphs into ``out_dir``; return the manifest's ``components`` section.

    ``out_dir`` is normally a ``BundleWriter`` staging directory. With ``verify`` every variant is
    run in ONNX Runtime (CPU) on random and textured images (batch ``verify_batch``; few-shot with
    2 normal images) and compared with the PyTorch reference; past tolerance it raises
    ``ExportVerificationError``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    precisions = [Precision(p) for p in precisions]
    if not precisions:
        raise ValueError("export_vision needs at least one precision")
    specs = component_specs(model.cfg)
    model = model.eval()
    section = {}
    for comp in (Component(c) for c in components):
        spec = specs[comp]
        if verify:
            cases = verification_cases(model, comp, batch=verify_batch, seed=seed)
            ref = TorchRunner(reference_module(model, comp), spec.input_names, spec.output_names)
            expected = [ref.infer(feeds) for _, feeds in cases]
        variants = {}
        with tempfile.TemporaryDirectory(prefix=f'.{comp.value}-work-', dir=out_dir) as work:
            fp32_proto = trace_to_onnx(export_module(model, comp), spec, model, opset, Path(work))
            protos = {}
            for precision in precisions:
                protos[precision] = fp32_proto if precision is Precision.FP32 else \
                    fp16.to_fp16(fp32_proto, work, spec.fp32_after_normalise, spec.fp32_after_inputs)
        for precision, proto in protos.items():
            path = out_dir / spec.file(precision)
            data_file = save_onnx(proto, path, external_data_threshold)
            entry = {'file': path.name, 'external_data': data_file, 'precision': precision.value, 'opset': opset,
                     'inputs': [t.to_dict() for t in spec.inputs], 'outputs': [t.to_dict() for t in spec.outputs],
                     'tolerance': dict(spec.tolerance[precision.value]), 'verified': None}
            if verify:
                report = verify_graph(path, spec, precision, cases, expected)
                entry['verified'] = verified_summary(report, spec, cases)
            variants[precision.value] = entry
        section[comp.value] = variants
        del fp32_proto, protos
    return section
