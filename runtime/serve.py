"""A local HTTP service for plant systems: ``create_app(pipeline)`` -> FastAPI app.

  POST /inspect   multipart: ``image`` (file); optional ``class``, ``describe``, ``question``,
                  ``reference`` (normal images, repeatable: few-shot), ``heatmap=true`` (the overlay
                  PNG as base64), ``verdict_first=true``. -> the result as JSON.
                  413 body too large, 422 unusable image (message names it) or a missing field, 400 unknown
                  class (an empty ``class`` too), both class and describe, or a question too long for the LLM
                  context, 503 when ``max_pending`` requests already wait besides the one being inspected,
                  500 inspection failed (the service keeps serving).
  GET  /health    bundle, backends, versions, ok
  GET  /metrics   request counts by outcome, latency percentiles

One pipeline serves every request, one request at a time (the LLM session is not re-entrant).
fastapi is imported here only, so the runtime imports without the [serve] extra. (No
``from __future__ import annotations``: FastAPI reads the endpoint annotations at runtime.)
"""
import base64
import collections
import platform
import threading
import time

import numpy as np

from .watch import percentiles

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PENDING = 8
LATENCY_WINDOW = 10_000
OUTCOMES = ('ok', 'bad_image', 'bad_request', 'invalid_request', 'too_large', 'busy', 'error')
VERSIONED = ('anomalygpt-edge', 'numpy', 'opencv-python-headless', 'onnxruntime', 'onnxruntime-gpu',
             'llama-cpp-python', 'fastapi', 'uvicorn')


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.latency = {k: collections.deque(maxlen=LATENCY_WINDOW) for k in ('queue', 'inspect', 'request')}
        self.consecutive_errors = 0
        self.started = time.time()

    def count(self, outcome: str, **latency_ms) -> None:
        with self.lock:
            self.counts[outcome] += 1
            self.consecutive_errors = self.consecutive_errors + 1 if outcome == 'error' else 0 if outcome == 'ok' \
                else self.consecutive_errors
            for k, v in latency_ms.items():
                self.latency[k].append(v)

    def snapshot(self) -> dict:
        with self.lock:
            return {'requests': dict(self.counts), 'total': sum(self.counts.values()),
                    'latency_ms': {k: {'n': len(v)} | percentiles(v, (50, 90, 99)) for k, v in self.latency.items()},
                    'uptime_s': round(time.time() - self.started, 3)}


def versions() -> dict:
    from importlib import metadata
    out = {'python': platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def describe_pipeline(pipeline) -> dict:
    bundle = getattr(pipeline, 'bundle', None)
    backends = {name: {'runner': type(r).__name__, 'providers': getattr(r, 'providers', None)}
                for name, r in (getattr(pipeline, 'runners', None) or {}).items()}
    session = getattr(pipeline, 'session', None)
    return {'bundle': str(bundle.root) if bundle is not None else None,
            'pipeline': type(pipeline).__name__,
            'backends': backends,
            'llm': str(session.path) if session is not None and hasattr(session, 'path') else None,
            'classes': list(getattr(pipeline, 'classes', {}) or {})}


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: answer 413 for a body over ``max_bytes``, by its Content-Length before any
    of it is read, or (chunked uploads) as soon as the running count passes the limit."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def _reject(self, send) -> None:
        from starlette.responses import JSONResponse
        self.metrics.count('too_large')
        resp = JSONResponse({'detail': f'request body larger than the limit of {self.max_bytes} bytes'}, status_code=413)
        await resp({'type': 'http'}, None, send)

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        length = dict(scope['headers']).get(b'content-length')
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        state = {'seen': 0, 'rejected': False}

        async def limited_receive():
            msg = await receive()
            if msg['type'] == 'http.request':
                state['seen'] += len(msg.get('body', b''))
                if state['seen'] > self.max_bytes and not state['rejected']:
                    state['rejected'] = True
                    await self._reject(send)
                    raise _TooLarge
            return msg

        async def guarded_send(msg):
            if not state['rejected']:  # the framework may turn _TooLarge into its own error response
                await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass


def create_app(pipeline, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pending: int = MAX_PENDING, llm: bool = True):
    """``max_pending``: requests allowed to wait while one is being inspected; one more gets 503."""
    from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.exception_handlers import request_validation_exception_handler
    from fastapi.responses import JSONResponse

    from .llama_session import ContextFullError
    from .preprocess import ImageError, decode_image

    metrics = Metrics()
    lock = threading.Lock()
    in_flight = {'n': 0}  # past the 503 check: the one being inspected and those waiting for it
    in_flight_lock = threading.Lock()
    info = describe_pipeline(pipeline)

    app = FastAPI(title='AnomalyGPT Edge', description='Industrial anomaly inspection, offline.')
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes, metrics=metrics)
    app.state.pipeline, app.state.metrics = pipeline, metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc):
        metrics.count('invalid_request')
        missing = [str(e['loc'][-1]) for e in exc.errors() if e.get('type') == 'missing' and e.get('loc')]
        if missing:
            return JSONResponse({'detail': f"missing field {', '.join(map(repr, missing))}: POST a multipart/form-data "
                                           "body with the image file, e.g. curl -F image=@part.png"}, status_code=422)
        return await request_validation_exception_handler(request, exc)

    def fail(outcome: str, status: int, detail: str):
        metrics.count(outcome)
        raise HTTPException(status_code=status, detail=detail)

    def decode(upload, what: str) -> np.ndarray:
        name = f"{what} {upload.filename!r}" if upload.filename else what
        try:
            return decode_image(upload.file.read(), name)
        except ImageError as e:
            fail('bad_image', 422, str(e))

    async def form_fields(request: Request):
        return await request.form()  # parsed once and cached by the request

    @app.post('/inspect')
    def inspect(image: UploadFile = File(..., description='the image to inspect'),
                class_name: str | None = Form(None, alias='class'), describe: str | None = Form(None),
                question: str | None = Form(None), heatmap: bool = Form(False), verdict_first: bool = Form(False),
                reference: list[UploadFile] | None = File(None, description='normal images (few-shot)'),
                fields=Depends(form_fields)):
        t0 = time.perf_counter()
        if class_name is None and fields.get('class') == '':
            class_name = ''  # FastAPI reads an empty field as absent; an empty class is an unknown one
        if class_name is not None and describe is not None:
            fail('bad_request', 400, "give 'class' or 'describe', not both")
        rgb = decode(image, 'image')
        refs = [decode(r, 'reference') for r in reference] if reference else None
        try:
            pipeline.resolve_class(class_name, describe)
        except KeyError as e:
            fail('bad_request', 400, e.args[0])
        with in_flight_lock:
            if in_flight['n'] > max_pending:
                metrics.count('busy')
                raise HTTPException(503, f'{max_pending} requests already waiting besides the one being inspected; '
                                         'retry later', headers={'Retry-After': '1'})
            in_flight['n'] += 1
        tq = time.perf_counter()
        try:
            with lock:
                t1 = time.perf_counter()
                try:
                    res = pipeline.inspect(rgb, class_name=class_name, describe=describe, question=question,
                                           references=refs, llm=llm, verdict_first=verdict_first)
                except ImageError as e:
                    fail('bad_image', 422, str(e))
                except KeyError as e:
                    fail('bad_request', 400, e.args[0] if e.args else str(e))
                except ContextFullError as e:
                    fail('bad_request', 400, f"{e}; ask a shorter question")
                except Exception as e:
                    fail('error', 500, f'inspection failed: {type(e).__name__}: {e}')
                t2 = time.perf_counter()
        finally:
            with in_flight_lock:
                in_flight['n'] -= 1
        out = res.to_dict()
        out['image'] = image.filename or out.get('image')
        out['anomalous'] = bool(res.verdict == 'yes' if res.verdict is not None else res.score >= 0.5)
        if heatmap:
            import cv2
            from .overlay import overlay
            ok, png = cv2.imencode('.png', overlay(rgb, res.anomaly_map, grid=res.token_grid, regions=res.regions))
            out['heatmap_png_base64'] = base64.b64encode(png.tobytes()).decode('ascii') if ok else None
        t3 = time.perf_counter()
        out['latency_ms'] = {'queue': round((t1 - tq) * 1e3, 3), 'inspect': round((t2 - t1) * 1e3, 3),
                             'request': round((t3 - t0) * 1e3, 3)}
        metrics.count('ok', queue=(t1 - tq) * 1e3, inspect=(t2 - t1) * 1e3, request=(t3 - t0) * 1e3)
        return out

    @app.get('/health')
    def health():
        return {'ok': metrics.consecutive_errors < 5, **info, 'versions': versions(),
                'uptime_s': round(time.time() - metrics.started, 3)}

    @app.get('/metrics')
    def get_metrics():
        with in_flight_lock:
            n = in_flight['n']
        return metrics.snapshot() | {'in_flight': n}

    return app


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(app, host: str = '127.0.0.1', port: int = 8080, log_level: str = 'info') -> None:
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """``with BackgroundServer(app) as s: s.url``: uvicorn serving from a thread on a free loopback
    port (tests and the soak benchmark); stops on exit."""

    def __init__(self, app, host: str = '127.0.0.1', start_timeout: float = 10.0):
        if not is_loopback(host):
            raise ValueError(f"{host}: BackgroundServer binds loopback addresses only")
        self.app, self.host, self.start_timeout = app, host, start_timeout

    def __enter__(self):
        import socket
        import uvicorn
        sock = socket.socket(socket.AF_INET6 if ':' in self.host else socket.AF_INET)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level='warning', lifespan='off'))
        self.thread = threading.Thread(target=self.server.run, kwargs={'sockets': [sock]}, name='uvicorn', daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
