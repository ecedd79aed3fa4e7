"""The root command's handling of what a subcommand raises: bad input is an exit code and one line, not a traceback."""
import os
import signal
import sys
import time
import types

import pytest

from anomalygpt_edge import cli
from anomalygpt_edge.runtime.bundle import BundleError
from anomalygpt_edge.runtime.llama_session import LlamaError
from anomalygpt_edge.runtime.runners import RunnerError


@pytest.fixture
def command(monkeypatch):
    """Registers a subcommand 'probe' whose run() calls the function the test sets."""
    module = types.ModuleType('probe_command')
    module.add_arguments = lambda p: None
    module.run = None
    monkeypatch.setitem(sys.modules, 'probe_command', module)
    monkeypatch.setitem(cli.SUBCOMMANDS, 'probe', ('probe_command', 'a test command'))
    return module


@pytest.mark.parametrize('error, code', [
    (BundleError('b/manifest.json: not JSON'), 2),
    (RunnerError('b/decoder.onnx: ONNX Runtime cannot load this graph'), 2),
    (LlamaError('context full: 250 positions used + 40 new > n_ctx 256'), 2),
    (PermissionError(13, 'Permission denied', 'out/manifest.json'), 2),
])
def test_input_errors_exit_with_their_code_and_message(command, capsys, error, code):
    def run(args):
        raise error
    command.run = run
    assert cli.main(['probe']) == code
    err = capsys.readouterr().err
    assert err.startswith('anomalygpt-edge probe: ') and str(error) in err
    assert 'Traceback' not in err


def test_a_bug_keeps_its_traceback(command):
    def run(args):
        raise ZeroDivisionError('a bug')
    command.run = run
    with pytest.raises(ZeroDivisionError):
        cli.main(['probe'])


def test_a_verification_failure_is_a_failed_check():
    from anomalygpt_edge.export.onnx_export import ExportVerificationError
    assert cli.exit_code(ExportVerificationError('decoder: max abs err 1e-2 > 1e-4')) == 1


def test_sigterm_cleans_up_like_ctrl_c(command, capsys):
    cleaned = []

    def run(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
            raise AssertionError('SIGTERM did not interrupt')
        finally:
            cleaned.append(True)
    command.run = run
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(['probe']) == 130
    assert cleaned == [True]
    assert 'interrupted' in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_missing_tensorrt_names_jetpack_not_the_training_install(command, capsys):
    def run(args):
        raise ModuleNotFoundError("No module named 'tensorrt'", name='tensorrt')
    command.run = run
    assert cli.main(['probe']) == 3
    err = capsys.readouterr().err
    assert 'JetPack' in err and 'torch' not in err
