"""The HTTP service against a real uvicorn on a loopback port: results, 4xx for bad input while it
keeps serving, 413 for oversized bodies, one request at a time in the pipeline, health and metrics."""
import base64
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

pytest.importorskip('fastapi')
pytest.importorskip('uvicorn')
httpx = pytest.importorskip('httpx')

from anomalygpt_edge.runtime.fake import FakePipeline  # noqa: E402
from anomalygpt_edge.runtime.serve import BackgroundServer, create_app, is_loopback  # noqa: E402

LIMIT = 64 * 1024


def png(h=48, w=64, defect=False) -> bytes:
    img = np.full((h, w, 3), 40, np.uint8)
    if defect:
        img[:10, -12:] = 255
    return cv2.imencode('.png', img)[1].tobytes()


@pytest.fixture
def service():
    pipe = FakePipeline(delay=0.05)
    with BackgroundServer(create_app(pipe, max_upload_bytes=LIMIT)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        yield pipe, client


def post(client, data=png(), name='part.png', **fields):
    return client.post('/inspect', files={'image': (name, data, 'image/png')}, data=fields)


def test_good_image_with_heatmap(service):
    _, client = service
    r = post(client, png(defect=True), heatmap='true', **{'class': 'bottle'})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d['verdict'] == 'yes' and d['anomalous'] and d['class'] == 'bottle' and d['image'] == 'part.png'
    assert d['score'] == 1.0 and d['locations'] == ['top right'] and d['latency_ms']['inspect'] >= 50
    (region,) = d['regions']   # the white corner: columns 52-63 of 64, rows 0-9 of 48
    assert region['where'] == 'top right' and region['box'] == pytest.approx([52 / 64, 0, 1, 10 / 48], abs=0.03)
    heat = cv2.imdecode(np.frombuffer(base64.b64decode(d['heatmap_png_base64']), np.uint8), cv2.IMREAD_COLOR)
    assert heat.shape == (48, 64, 3)
    assert 'heatmap_png_base64' not in post(client).json()


def test_bad_inputs_get_clear_4xx_and_the_service_keeps_serving(service):
    _, client = service
    r = post(client, b'\x89PNG\r\n\x1a\n' + b'\0' * 100, name='scan-17.png')
    assert r.status_code == 422 and "scan-17.png" in r.json()['detail'] and 'truncated PNG' in r.json()['detail']
    assert post(client, b'').status_code == 422
    r = post(client, **{'class': 'spaceship'})
    assert r.status_code == 400 and "unknown class 'spaceship'" in r.json()['detail']
    r = client.post('/inspect', files={'image': ('a.png', png(), 'image/png'),
                                       'reference': ('good.png', b'garbage', 'image/png')})
    assert r.status_code == 422 and 'good.png' in r.json()['detail']
    assert client.post('/inspect', data={'question': 'x'}).status_code == 422  # no image field
    assert post(client).status_code == 200
    m = client.get('/metrics').json()['requests']
    assert m == {'ok': 1, 'bad_image': 3, 'bad_request': 1, 'invalid_request': 1, 'too_large': 0, 'busy': 0, 'error': 0}


def test_an_empty_class_is_an_unknown_class(service):
    _, client = service
    r = post(client, **{'class': ''})
    assert r.status_code == 400 and r.json()['detail'].startswith("unknown class ''"), r.text
    assert post(client, **{'class': 'bottle'}).json()['class'] == 'bottle'


def test_conflicting_or_missing_fields_are_named(service):
    _, client = service
    r = post(client, **{'class': 'bottle', 'describe': 'A round bottle.'})
    assert r.status_code == 400 and r.json()['detail'] == "give 'class' or 'describe', not both"
    for body in ({'data': {'question': 'x'}}, {'json': {'image': 'part.png'}}, {}):
        r = client.post('/inspect', **body)
        assert r.status_code == 422 and "missing field 'image'" in r.json()['detail'], r.text
    assert post(client).status_code == 200


def test_a_question_too_long_for_the_llm_context_gets_400_and_the_service_keeps_serving():
    from anomalygpt_edge.runtime.llama_session import ContextFullError

    class SmallContext(FakePipeline):
        def inspect(self, image, question=None, **kw):
            if question and len(question) > 100:
                raise ContextFullError('context full: 0 positions used + 300 new > n_ctx 256')
            return super().inspect(image, question=question, **kw)
    with BackgroundServer(create_app(SmallContext())) as server, httpx.Client(base_url=server.url) as client:
        r = post(client, question='Is it scratched? ' * 30)
        assert r.status_code == 400 and 'context full' in r.json()['detail'] and 'shorter' in r.json()['detail']
        assert post(client, question='Is it scratched?').status_code == 200
        assert client.get('/metrics').json()['requests']['bad_request'] == 1


def test_oversized_uploads_get_413(service):
    _, client = service
    r = post(client, b'\0' * (LIMIT + 1))
    assert r.status_code == 413 and str(LIMIT) in r.json()['detail']

    def chunks():  # no Content-Length: the limit must hold on the bytes actually received
        # a well-formed part header, so the parser keeps reading the oversized file body
        yield (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
               b'Content-Type: image/png\r\n\r\n')
        for _ in range(LIMIT // 8192 + 4):
            yield b'x' * 8192
    r = client.post('/inspect', content=chunks(), headers={'content-type': 'multipart/form-data; boundary=b'})
    assert r.status_code == 413
    assert post(client).status_code == 200
    assert client.get('/metrics').json()['requests']['too_large'] == 2


def test_concurrent_requests_are_serialised(service):
    pipe, client = service
    results = []

    def one(i):
        with httpx.Client(base_url=str(client.base_url), timeout=30) as c:
            results.append(post(c, png(defect=i % 2 == 0)).status_code)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 6
    assert pipe.violations == 0 and pipe.calls == 6
    assert time.monotonic() - t0 >= 6 * 0.05  # one at a time
    m = client.get('/metrics').json()
    assert m['requests']['ok'] == 6 and m['in_flight'] == 0 and m['latency_ms']['inspect']['n'] == 6
    assert max(m['latency_ms']['queue']['max'], 0) > 40  # someone waited for the pipeline


def test_max_pending_counts_the_requests_waiting_besides_the_one_inspected():
    pipe = FakePipeline(delay=0.5)
    with BackgroundServer(create_app(pipe, max_pending=1)) as server, httpx.Client(base_url=server.url) as client:
        codes = []

        def one():
            codes.append(post(client).status_code)

        def wait_for(in_flight):
            deadline = time.monotonic() + 5
            while client.get('/metrics').json()['in_flight'] < in_flight:
                assert time.monotonic() < deadline, f"{in_flight} requests never got past the 503 check: {codes}"
                time.sleep(0.01)
        threads = [threading.Thread(target=one) for _ in range(2)]
        threads[0].start()
        wait_for(1)  # the first is being inspected
        threads[1].start()
        wait_for(2)  # the second waits for it
        r = post(client)
        assert r.status_code == 503 and r.json()['detail'].startswith('1 requests already waiting besides the one')
        for t in threads:
            t.join(10)
    assert codes == [200, 200] and pipe.violations == 0


def test_health(service):
    _, client = service
    h = client.get('/health').json()
    assert h['ok'] is True and h['pipeline'] == 'FakePipeline' and h['classes'] == ['bottle', 'object']
    assert h['versions']['numpy'] == np.__version__ and 'fastapi' in h['versions']


def test_binds_loopback_by_default():
    import argparse
    from anomalygpt_edge.runtime import cmd_serve
    p = argparse.ArgumentParser()
    cmd_serve.add_arguments(p)
    assert p.parse_args(['--bundle', 'b']).host == '127.0.0.1'
    assert '[--bundle' not in p.format_usage() and '--bundle BUNDLE' in p.format_usage()
    assert is_loopback('127.0.0.1') and is_loopback('::1') and is_loopback('localhost')
    assert not is_loopback('0.0.0.0') and not is_loopback('192.168.1.20')
    with pytest.raises(ValueError):
        BackgroundServer(None, host='0.0.0.0')


@pytest.mark.parametrize('option', [('--max-pending', '0'), ('--max-upload-mb', '0'), ('--max-upload-mb', '-1'),
                                    ('--max-upload-mb', 'nan')])
def test_limits_that_would_refuse_every_request_are_usage_errors(option, capsys, monkeypatch):
    from anomalygpt_edge.cli import main
    from anomalygpt_edge.runtime import serve
    monkeypatch.setattr(serve, 'serve', lambda *a, **k: None)  # accepted by mistake: return, do not serve
    with pytest.raises(SystemExit) as e:
        main(['serve', '--fake-pipeline', '0', *option])
    assert e.value.code == 2 and f'argument {option[0]}' in capsys.readouterr().err


def test_runtime_imports_without_fastapi_and_serve_says_what_to_install():
    code = '''
import builtins, sys
real = builtins.__import__
def guard(name, *a, **k):
    if name.split('.')[0] in ('fastapi', 'uvicorn', 'starlette'):
        raise ModuleNotFoundError('blocked: ' + name, name=name)
    return real(name, *a, **k)
builtins.__import__ = guard
import anomalygpt_edge.runtime.serve, anomalygpt_edge.runtime.cmd_serve, anomalygpt_edge.runtime.watch
import anomalygpt_edge.runtime.cmd_watch, anomalygpt_edge.runtime.sources
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'fastapi', 'uvicorn')]
from anomalygpt_edge.cli import main
sys.exit(main(['serve', '--fake-pipeline', '0']))
'''
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "needs the package 'fastapi'" in r.stderr and '[serve]' in r.stderr


def test_soak_quick_run(capsys):
    import json
    from anomalygpt_edge.benchmarks import soak
    rc = soak.main(['--fake', '--fake-delay', '0', '--frames', '200', '--warmup', '20', '--drop-every', '60',
                    '--max-growth-pct', '50'])
    report = json.loads(capsys.readouterr().out)
    s = report['watch']['summary']
    assert rc == 0 and report['pass'], report['checks']
    assert s['inspected'] == 200 and s['reconnects'] == report['watch']['dropouts'] >= 3
    assert all(c['pass'] for c in report['serve']['cases']) and len(report['serve']['cases']) >= 12
