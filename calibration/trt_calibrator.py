"""The legacy route: TensorRT's implicit INT8 calibration (IInt8EntropyCalibrator2) for TensorRT < 10.1.

For devices on JetPack 5 (TensorRT 8.5/8.6) where the Q/DQ graph is not wanted: TensorRT runs the
FP32 encoder on the calibration images itself and picks the ranges. Implicit calibrators are
deprecated since TensorRT 10.1 and removed in 11; prefer ``calibrate int8`` (explicit Q/DQ), which
also passes the accuracy gate. The calibration cache file makes later rebuilds skip the images.
tensorrt and pycuda are imported inside ``entropy_calibrator`` only.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data_reader import CalibrationError, ImageBatches


def legacy_supported(trt_version: str) -> bool:
    from ..runtime.engines import trt_major_minor
    return trt_major_minor(trt_version) < (11, 0)


def entropy_calibrator(batches: ImageBatches, cache_file, input_name: str = 'image'):
    """An ``IInt8EntropyCalibrator2`` over ``batches`` (drop_last batches of a fixed size, as
    TensorRT requires), reading and writing ``cache_file``."""
    import pycuda.driver as cuda
    import tensorrt as trt
    if not legacy_supported(trt.__version__):
        raise CalibrationError(f"TensorRT {trt.__version__} has no implicit INT8 calibration; use "
                               "`anomalygpt-edge calibrate int8` (Q/DQ)")
    if not batches.drop_last:
        raise CalibrationError("the legacy calibrator needs equal batches: build ImageBatches with drop_last=True")
    cache_file = Path(cache_file)

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._it = iter(batches)
            shape = (batches.batch_size, 3, batches.cfg['size'], batches.cfg['size'])
            self._host = cuda.pagelocked_empty(shape, np.float32)
            self._dev = cuda.mem_alloc(self._host.nbytes)

        def get_batch_size(self):
            return batches.batch_size

        def get_batch(self, names):
            if input_name not in names:
                raise CalibrationError(f"the network's inputs are {names}, not {input_name!r}")
            try:
                np.copyto(self._host, next(self._it))
            except StopIteration:
                return None
            cuda.memcpy_htod(self._dev, self._host)
            return [int(self._dev)]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            tmp = cache_file.with_name(f'.{cache_file.name}.tmp-{os.getpid()}')
            tmp.write_bytes(bytes(memoryview(cache)))
            os.replace(tmp, cache_file)

    return EntropyCalibrator()
