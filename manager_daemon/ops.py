"""The daemon's operations endpoints: ``/healthz``, ``/readyz`` and ``/metrics``.

A small HTTP server on a thread of its own, for Kubernetes' probes and Prometheus' scrapes.
The probes answer from what the daemon's ticks saw (never a tracker request per probe): 200
with one line saying why, or 503 with one line saying what is wrong.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from manager_daemon.metrics import DaemonMetrics

log = logging.getLogger(__name__)


class ProbeAnswer(Protocol):
    ok: bool
    detail: str


class OpsServer:
    """Serves a daemon's health, readiness and metrics on ``host:port``."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: DaemonMetrics,
        health: Callable[[], ProbeAnswer],
        ready: Callable[[], ProbeAnswer],
    ) -> None:
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/healthz": lambda: _probe(health()),
            "/readyz": lambda: _probe(ready()),
            "/metrics": lambda: (200, metrics.content_type, metrics.exposition()),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    status, kind, body = 404, "text/plain", b"try /healthz, /readyz, /metrics\n"
                else:
                    status, kind, body = route()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("ops %s: " + format, self.client_address[0], *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ValueError(
                f"cannot serve the operations endpoints on {host}:{port}: {exc.strerror}; "
                "choose another --ops-port"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="atm-ops", daemon=True
        )

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> OpsServer:
        self._thread.start()
        log.info("operations endpoints at %s (/healthz, /readyz, /metrics)", self.address)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _probe(answer: ProbeAnswer) -> tuple[int, str, bytes]:
    text = ("ok: " if answer.ok else "failing: ") + answer.detail + "\n"
    return (200 if answer.ok else 503), "text/plain; charset=utf-8", text.encode()
