"""Serve a bundle over HTTP on this machine for plant systems (MES, PLC gateways, HMIs).

  POST /inspect   multipart upload: image=@part.png [class=bottle] [describe=...] [question=...]
                  [reference=@good1.png ...] [heatmap=true] [verdict_first=true]  -> JSON result
  GET  /health    bundle, backends, versions, ok
  GET  /metrics   request counts by outcome, latency percentiles
  GET  /docs      the interactive API description

  curl -F image=@part.png -F class=bottle http://127.0.0.1:8080/inspect

Binds to 127.0.0.1 unless --host says otherwise; there is no authentication, so expose it to a
network only behind something that provides it. Requests are inspected one at a time.
Needs the [serve] extra: pip install 'anomalygpt-edge[serve]'.
"""
from __future__ import annotations

import sys

from ..arguments import positive_float, positive_int
from .cli_options import add_backend_arguments, add_bundle_argument


def add_arguments(p) -> None:
    add_bundle_argument(p)
    p.add_argument('--host', default='127.0.0.1', help='address to bind (default: %(default)s, this machine only)')
    p.add_argument('--port', type=int, default=8080, help='port (default: %(default)s)')
    p.add_argument('--max-upload-mb', type=positive_float, default=20.0,
                   help='largest request body (default: %(default)s MB)')
    p.add_argument('--max-pending', type=positive_int, default=8,
                   help='requests allowed to wait while one is being inspected; one more is answered 503 '
                        '(default: %(default)s)')
    p.add_argument('--no-llm', action='store_true', help='map, score and locations only (no LLM loaded)')
    add_backend_arguments(p)
    p.add_argument('--log-level', default='info', choices=('critical', 'error', 'warning', 'info', 'debug'),
                   help="the server's log level (default: %(default)s)")


def run(args) -> int:
    from .bundle import BundleError
    from .cmd_watch import build_pipeline
    from .serve import create_app, is_loopback, serve

    def fail(msg):
        print(f"anomalygpt-edge serve: {msg}", file=sys.stderr)
        return 2

    if not 0 < args.port < 65536:
        return fail(f"--port {args.port}: not a TCP port")
    try:  # before loading a bundle
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        print(f"anomalygpt-edge serve: needs the package {e.name!r}, which is not installed "
              f"(pip install 'anomalygpt-edge[serve]')", file=sys.stderr)
        return 3
    if not is_loopback(args.host):
        print(f"anomalygpt-edge serve: warning: binding to {args.host} exposes the service (no authentication) "
              f"to the network", file=sys.stderr)
    try:
        pipe = build_pipeline(args)
    except (BundleError, OSError, ValueError) as e:
        return fail(e)
    with pipe:
        app = create_app(pipe, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pending=args.max_pending,
                         llm=not args.no_llm)
        serve(app, args.host, args.port, args.log_level)
    return 0
