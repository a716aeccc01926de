"""`dda webhook`: the HTTPS server for the mutating admission webhook.

POST /mutate   AdmissionReview (admission.k8s.io/v1) -> AdmissionReview with a JSONPatch
GET  /healthz  liveness/readiness (200 "ok")
GET  /metrics  Prometheus text: dda_webhook_admissions_total{result}, ..._duration_seconds

Standard library only: `http.server` with a thread per connection; TLS is negotiated in that
thread (a slow client never holds the accept loop), the certificate files are re-read when
they change (cert-manager rotation) without a restart. Bad input never crashes the server:
a body that is no AdmissionReview gets HTTP 400, anything else an AdmissionReview answer.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..settings import add_arguments, flag_values, load_config, names
from .mutate import BadReview, WebhookConfig, mutate

log = logging.getLogger("dda.webhook")
MAX_BODY = 4 * 1024 * 1024        # the API server sends at most ~3 MiB
SOCKET_TIMEOUT = 15.0


class _Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.results: dict[str, int] = {}
        self.seconds_sum = 0.0
        self.count = 0

    def record(self, result: str, seconds: float) -> None:
        with self.lock:
            self.results[result] = self.results.get(result, 0) + 1
            self.seconds_sum += seconds
            self.count += 1

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP dda_webhook_admissions_total Admission reviews answered, by result.",
                     "# TYPE dda_webhook_admissions_total counter"]
            for result in ("skipped", "injected", "denied", "warned", "bad_request", "error"):
                lines.append(f'dda_webhook_admissions_total{{result="{result}"}} {self.results.get(result, 0)}')
            lines += ["# HELP dda_webhook_admission_duration_seconds Time to answer one review.",
                      "# TYPE dda_webhook_admission_duration_seconds summary",
                      f"dda_webhook_admission_duration_seconds_sum {self.seconds_sum:.6f}",
                      f"dda_webhook_admission_duration_seconds_count {self.count}"]
        return "\n".join(lines) + "\n"


class _TLSContext:
    """An SSLContext re-created when the certificate or key file changes."""

    def __init__(self, cert: Path, key: Path, check_every: float = 10.0):
        self.cert, self.key, self.check_every = Path(cert), Path(key), check_every
        self._stamp = self._mtimes()
        self.context = self._build()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _mtimes(self) -> tuple[float, float]:
        return (self.cert.stat().st_mtime, self.key.stat().st_mtime)

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def current(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked >= self.check_every:
            with self._lock:
                self._checked = now
                try:
                    stamp = self._mtimes()
                    if stamp != self._stamp:
                        self.context = self._build()
                        self._stamp = stamp
                        log.warning("reloaded the TLS certificate from %s", self.cert)
                except (OSError, ssl.SSLError) as err:   # half-written rotation: keep the old one
                    log.warning("TLS certificate reload failed, keeping the current one: %s", err)
        return self.context


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    server_version = "dda-webhook"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet access log
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self._send(code, json.dumps({"error": message}).encode())

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path in ("/healthz", "/readyz"):
            self._send(200, b"ok\n", "text/plain")
        elif path == "/metrics":
            self._send(200, self.server.metrics.render().encode(), "text/plain; version=0.0.4")
        else:
            self._error(404, "not found")

    def do_POST(self) -> None:  # noqa: N802
        started = time.monotonic()
        if self.path.split("?", 1)[0] != "/mutate":
            self._error(404, "not found (POST /mutate)")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._error(411, "Content-Length required")
            return
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._error(413, f"body larger than {MAX_BODY} bytes")
            return
        body = self.rfile.read(length)
        try:
            review = json.loads(body)
            answer = mutate(review, self.server.config)
        except (ValueError, BadReview) as err:   # json.JSONDecodeError is a ValueError
            self.server.metrics.record("bad_request", time.monotonic() - started)
            self._error(400, f"not an AdmissionReview: {str(err)[:300]}")
            return
        except Exception:   # mutate() answers every problem itself; this is the last net
            log.exception("unexpected failure")
            self.server.metrics.record("error", time.monotonic() - started)
            self._error(500, "internal error")
            return
        response = answer["response"]
        result = ("injected" if response.get("patch") else "denied" if not response["allowed"]
                  else "warned" if response.get("warnings") else "skipped")
        elapsed = time.monotonic() - started
        self.server.metrics.record(result, elapsed)
        request = review.get("request", {}) if isinstance(review, dict) else {}
        meta = request.get("object", {}).get("metadata", {}) if isinstance(request.get("object"), dict) else {}
        log.info("uid=%s namespace=%s pod=%s result=%s ms=%.1f%s", response["uid"], request.get("namespace"),
                 meta.get("name") or (str(meta.get("generateName", "")) + "*"), result, elapsed * 1000,
                 f" reason={response['status']['message']}" if not response["allowed"] else "")
        self._send(200, json.dumps(answer).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], tls: _TLSContext, config: WebhookConfig):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.tls, self.config, self.metrics = tls, config, _Metrics()
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS handshake here, in the connection's own thread, under a timeout.
        request.settimeout(SOCKET_TIMEOUT)
        try:
            tls_socket = self.tls.current().wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as err:
            log.debug("TLS handshake with %s failed: %s", client_address, err)
            return
        try:
            self.RequestHandlerClass(tls_socket, client_address, self)
        finally:
            try:
                tls_socket.close()
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class WebhookServer:
    """`with WebhookServer(config, cert, key, port=0) as srv:` serves on srv.port in a thread."""

    def __init__(self, config: WebhookConfig, cert: str | Path, key: str | Path, host: str = "0.0.0.0",
                 port: int = 8443, reload_every: float = 10.0):
        self.server = _Server((host, port), _TLSContext(Path(cert), Path(key), reload_every), config)
        self.port = self.server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> "WebhookServer":
        self._thread = threading.Thread(target=self.server.serve_forever, name="dda-webhook", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread:
            self._thread.join(10)

    def __enter__(self) -> "WebhookServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------- command line

def add_parser(sub: Any) -> None:
    """The `dda webhook` subcommand (called from sidecar/cli.py)."""
    p = sub.add_parser("webhook", help="serve the Kubernetes mutating admission webhook (HTTPS)",
                       description="Every flag also reads an environment variable (shown in brackets).")
    add_arguments(p, names("webhook"))    # flags, env names and defaults: sidecar.settings
    p.add_argument("-v", "--verbose", action="store_true")


def run(ns: argparse.Namespace) -> int:
    from ..errors import ConfigError

    logging.getLogger("dda").setLevel(logging.DEBUG if ns.verbose else logging.INFO)
    settings = load_config(flag_values(ns, names("webhook")), config_file=None)
    try:
        config = WebhookConfig.from_settings(settings)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    listen, cert, key = settings.webhook_listen, settings.webhook_tls_cert, settings.webhook_tls_key
    host, _, port = listen.rpartition(":")
    try:
        server = WebhookServer(config, cert, key, host.strip("[]") or "0.0.0.0", int(port))
    except (OSError, ssl.SSLError, ValueError) as err:
        raise ConfigError(f"webhook: cannot serve on {listen} with {cert}: {err}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    mode = f"csi mode, driver {config.csi_driver}" if config.mode == "csi" else "privileged mode"
    log.warning("dda webhook serving https://%s:%d/mutate (sidecar image %s, %s, %s, on invalid: %s)",
                host or "0.0.0.0", server.port, config.image, mode,
                "native sidecar" if config.native_sidecar else "fallback", config.on_invalid)
    stop.wait()
    server.stop()
    return 0
