"""AnomalyGPT Edge: run the AnomalyGPT vision-language anomaly detector on edge devices.

Subpackages: ``models`` (PyTorch reference, training side), ``export`` (ONNX / GGUF bundle),
``calibration`` (INT8, thresholds), ``runtime`` (device side, no torch), ``benchmarks``.
"""
__version__ = "0.1.0"
