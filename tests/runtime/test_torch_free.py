"""The device side imports and runs with torch and transformers made unimportable."""
import subprocess
import sys
import textwrap

GUARD = textwrap.dedent('''
    import builtins, sys
    real = builtins.__import__
    def guard(name, *a, **k):
        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'sentencepiece'):
            raise ModuleNotFoundError('blocked: ' + name, name=name)
        return real(name, *a, **k)
    builtins.__import__ = guard
''')


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', GUARD + textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_runtime_modules_import_without_torch():
    r = run_blocked('''
        import anomalygpt_edge.runtime
        import anomalygpt_edge.runtime.pipeline, anomalygpt_edge.runtime.bundle, anomalygpt_edge.runtime.preprocess
        import anomalygpt_edge.runtime.answers, anomalygpt_edge.runtime.cmd_inspect, anomalygpt_edge.runtime.cmd_chat
        import anomalygpt_edge.runtime.runners, anomalygpt_edge.runtime.compare, anomalygpt_edge.runtime.llama_session
        bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]
        print('loaded:', bad)
        assert not bad
    ''')
    assert r.returncode == 0, r.stderr


def test_cli_help_and_inspect_help_without_torch():
    r = run_blocked('''
        from anomalygpt_edge.cli import main
        try:
            main(['inspect', '--help'])
        except SystemExit as e:
            assert e.code == 0
        assert not [m for m in sys.modules if m.startswith('torch')]
    ''')
    assert r.returncode == 0, r.stderr
    assert '--bundle' in r.stdout


def test_training_command_without_torch_says_what_to_install():
    r = run_blocked('''
        from anomalygpt_edge.cli import main
        sys.exit(main(['export', 'tiny', '--out', '/tmp/never']))
    ''')
    assert r.returncode == 3
    assert "needs the package 'torch'" in r.stderr
