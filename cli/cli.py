"""The ``anomalygpt-edge`` command: a thin layer over all parts.

Each subcommand lives in the part it belongs to, as a module with ``add_arguments(parser)``
and ``run(args) -> int``; it is imported only when chosen, so ``inspect`` never loads torch.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading

from . import __version__

# name -> (module, one-line help). Order is the order shown in --help.
SUBCOMMANDS = {
    'inspect': ('anomalygpt_edge.runtime.cmd_inspect', 'inspect images with a bundle: verdict, answer, map, location'),
    'chat': ('anomalygpt_edge.runtime.cmd_chat', 'multi-turn chat about one image'),
    'watch': ('anomalygpt_edge.runtime.cmd_watch', 'inspect frames from a camera, video, stream or folder; JSON lines'),
    'serve': ('anomalygpt_edge.runtime.cmd_serve', 'local HTTP service: POST /inspect, GET /health, GET /metrics'),
    'export': ('anomalygpt_edge.export.cmd_export', 'build a bundle (ONNX + GGUF) from checkpoints or a tiny random model'),
    'bench': ('anomalygpt_edge.benchmarks.cmd_bench', 'latency per stage vs the PyTorch baseline; decode vs the bandwidth ceiling'),
    'bench-verdict': ('anomalygpt_edge.benchmarks.cmd_bench_verdict', 'time to verdict: every speed lever vs PyTorch at its best, one run'),
    'eval': ('anomalygpt_edge.benchmarks.cmd_eval', 'accuracy on MVTec-AD/VisA-layout folders (AUROC, Yes/No, location)'),
    'compare': ('anomalygpt_edge.export.cmd_compare', "verify a bundle and compare its graphs with the PyTorch modules"),
    'build-engines': ('anomalygpt_edge.runtime.cmd_build_engines', 'build TensorRT engines for this GPU from a bundle (on the device)'),
    'calibrate': ('anomalygpt_edge.calibration.cmd_calibrate', 'INT8 (Q/DQ, accuracy-gated) and LLM-free score thresholds from normal images'),
}

# packages a subcommand may need that a runtime-only install lacks
OPTIONAL = {'torch', 'transformers', 'peft', 'onnx', 'onnxscript', 'sentencepiece', 'tensorrt', 'pycuda',
            'sklearn', 'matplotlib', 'PIL', 'ftfy', 'regex', 'fastapi', 'uvicorn', 'multipart', 'tqdm'}

EXIT_CODES = """exit codes:
  0  success
  1  the command ran but a check failed (e.g. compare out of tolerance)
  2  bad usage or bad input (missing file, corrupt image, invalid bundle, a file that cannot be written)
  3  a required optional dependency is missing (e.g. torch for export)
  130  interrupted (SIGINT/SIGTERM); nothing half-written is left at the output
"""

# how to get an optional package, by its import name; the rest are the training side's
INSTALL_HINTS = {
    'tensorrt': "TensorRT's Python bindings: on a Jetson they come with JetPack (docs/tensorrt.md)",
    'pycuda': "pycuda: on a Jetson build it against JetPack's CUDA (docs/tensorrt.md)",
    'fastapi': "pip install 'anomalygpt-edge[serve]'",
    'uvicorn': "pip install 'anomalygpt-edge[serve]'",
    'multipart': "pip install 'anomalygpt-edge[serve]'",
}
TRAINING_HINT = "training-side commands need: pip install torch==2.13.0 'anomalygpt-edge[export]'"


def _parser(available: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='anomalygpt-edge',
        description='AnomalyGPT on the edge: export the reference model to ONNX/GGUF bundles and run them '
                    'with ONNX Runtime / TensorRT and llama.cpp, offline.',
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--version', action='version', version=f'anomalygpt-edge {__version__}')
    sub = p.add_subparsers(dest='command', metavar='COMMAND')
    for name, (_, help_) in available.items():
        sub.add_parser(name, help=help_)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith('-')), None)
    if command not in SUBCOMMANDS:
        parser = _parser(SUBCOMMANDS)
        if command is None:
            parser.print_help() if not argv else parser.parse_args(argv)
            return 0 if argv else 2
        parser.error(f"unknown command {command!r}")
    with _sigterm_interrupts():
        return _run(command, argv)


def _run(command: str, argv: list[str]) -> int:
    module_name, help_ = SUBCOMMANDS[command]
    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f'anomalygpt-edge {command}', description=module.__doc__ or help_,
                                         epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        rest = argv[:]
        rest.remove(command)
        return int(module.run(parser.parse_args(rest)) or 0)
    except ModuleNotFoundError as e:
        package = (e.name or '').split('.')[0]
        if package not in OPTIONAL:
            raise
        print(f"anomalygpt-edge {command}: needs the package {e.name!r}, which is not installed "
              f"({INSTALL_HINTS.get(package, TRAINING_HINT)})", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"anomalygpt-edge {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"anomalygpt-edge {command}: {e}", file=sys.stderr)
        return code


def exit_code(error: BaseException) -> int | None:
    """The exit code of an error that is the user's input or environment, not a bug: the project's own error
    classes say theirs (``exit_code``); a file that cannot be read or written is bad input (2). None: a bug,
    whose traceback is shown."""
    code = getattr(error, 'exit_code', None)
    if isinstance(code, int):
        return code
    return 2 if isinstance(error, OSError) else None


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM interrupts as Ctrl-C does, so every ``with`` block cleans up (a partial bundle is removed); a command
    that stops cleanly on it (watch) installs its own handler. Only the main thread can set one."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
