"""The sidecar's local HTTP endpoint, served on the mount's own event loop:

  GET  /metrics         Prometheus text exposition
  GET  /healthz         200 while the FUSE mount answers (probed from a thread, with a timeout)
  GET  /readyz          200 once the snapshot is resolved and the mount is live
  POST /v1/hints        {"paths": [...]} an ordered path list (a shuffled epoch) to prefetch
                        -> {"accepted": n, "unknown": [...]}
  POST /v1/batch-wait   {"seconds": [...]} batch wait observations from sidecar.loader
                        -> {"observed": n, "rejected": k}

A deliberately small HTTP/1.1 server (asyncio streams, Content-Length bodies, keep-alive):
hints call the Prefetcher directly, so it must share the loop with the mount.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import posixpath
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .metrics import CONTENT_TYPE, MAX_BATCH_WAIT, Metrics

if TYPE_CHECKING:
    from .fuse.mount import Mount

log = logging.getLogger(__name__)

MAX_HEADER = 64 * 1024
MAX_BODY = 256 * 1024 * 1024        # a hint list of a few million paths
IDLE_TIMEOUT = 75.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            411: "Length Required", 413: "Payload Too Large", 415: "Unsupported Media Type",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}


class Health:
    """Whether the mount answers: a stat and a getxattr of the mountpoint, which our own FUSE
    daemon must answer (xattrs are never cached by the kernel), from a separate thread so a
    hung mount cannot block the event loop, with a timeout. One probe at a time: while one
    is stuck, the mount is reported unhealthy."""

    def __init__(self, mountpoint: Path, timeout: float = 2.0):
        self.mountpoint = mountpoint
        self.timeout = timeout
        self.commit: str | None = None      # set once mounted
        self.last_ok = False
        self.last_reason = "not mounted yet"
        self._checked_at = 0.0
        self._pending: threading.Thread | None = None

    def _probe(self) -> str | None:
        """None when healthy, else why not (runs in a thread)."""
        try:
            os.stat(self.mountpoint)
            got = os.getxattr(self.mountpoint, "user.dda.commit").decode()
        except OSError as err:
            return f"mountpoint {self.mountpoint}: {err.strerror or err}"
        if got != self.commit:
            return f"mountpoint {self.mountpoint}: serves commit {got!r}, expected {self.commit!r}"
        return None

    async def check(self, max_age: float = 0.0) -> tuple[bool, str]:
        if self.commit is None:
            return False, self.last_reason
        if max_age and time.monotonic() - self._checked_at < max_age:
            return self.last_ok, self.last_reason
        if self._pending is not None and self._pending.is_alive():
            self.last_ok, self.last_reason = False, "a previous probe of the mount is still blocked"
            return self.last_ok, self.last_reason
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str | None] = loop.create_future()

        def run() -> None:
            try:
                result: str | None = self._probe()
            except BaseException as err:  # never lose the answer
                result = f"probe failed: {err!r}"
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))
            except RuntimeError:
                pass   # the loop closed meanwhile

        self._pending = threading.Thread(target=run, name="dda-health-probe", daemon=True)
        self._pending.start()
        try:
            reason = await asyncio.wait_for(asyncio.shield(done), self.timeout)
        except TimeoutError:
            reason = f"mountpoint {self.mountpoint}: no answer within {self.timeout:g}s"
        self._checked_at = time.monotonic()
        self.last_ok, self.last_reason = reason is None, reason or "ok"
        return self.last_ok, self.last_reason

    def mark_down(self, reason: str) -> None:
        self.commit = None
        self.last_ok, self.last_reason = False, reason


def repo_path(path: str, mountpoint: str, root: str) -> str | None:
    """A hinted path (absolute under the mountpoint, or relative to the mount's root) as a
    repository path; None when it points outside the mount."""
    if path.startswith("/"):
        if path != mountpoint and not path.startswith(mountpoint.rstrip("/") + "/"):
            return None
        path = path[len(mountpoint):]
    full = posixpath.normpath("/" + posixpath.join(root, path.lstrip("/"))).lstrip("/")
    full = "" if full == "." else full
    if root and full != root and not full.startswith(root + "/"):
        return None
    return full


class LocalServer:
    def __init__(self, metrics: Metrics, health: Health, host: str, port: int):
        self.metrics = metrics
        self.health = health
        self.host = host
        self.port = port
        self.mount: "Mount | None" = None
        self.stopping = False
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, self.host, self.port, limit=MAX_HEADER,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    # -- HTTP/1.1 ----------------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while not self.stopping:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                    return
                try:
                    method, target, version, headers = _parse_head(head)
                except ValueError:
                    await _respond(writer, 400, b"bad request\n", keep=False)
                    return
                if "transfer-encoding" in headers:
                    await _respond(writer, 411, b"send a Content-Length body\n", keep=False)
                    return
                try:
                    length = int(headers.get("content-length", "0"))
                    if length < 0:
                        raise ValueError
                except ValueError:
                    await _respond(writer, 400, b"bad Content-Length\n", keep=False)
                    return
                if length > MAX_BODY:
                    await _respond(writer, 413, b"body too large\n", keep=False)
                    return
                try:
                    body = await asyncio.wait_for(reader.readexactly(length), IDLE_TIMEOUT) if length else b""
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                connection = headers.get("connection", "").lower()
                keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
                try:
                    status, ctype, payload = await self._route(method, target.split("?", 1)[0], body)
                except Exception:
                    log.exception("internal error serving %s %s", method, target.split("?", 1)[0])
                    status, ctype, payload = 500, "text/plain; charset=utf-8", b"internal error\n"
                await _respond(writer, status, payload, ctype, keep=keep and not self.stopping,
                               head_only=method == "HEAD")
                if not keep:
                    return
        except ConnectionError:
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        get = method in ("GET", "HEAD")
        if path == "/metrics" and get:
            if self.mount is not None:
                await self.health.check(max_age=1.0)
            return 200, CONTENT_TYPE, self.metrics.render()
        if path == "/healthz" and get:
            if self.mount is None:
                return 503, text, b"starting: the mount is not up yet\n"
            ok, why = await self.health.check()
            return (200, text, b"ok\n") if ok else (503, text, f"unhealthy: {why}\n".encode())
        if path == "/readyz" and get:
            if self.stopping:
                return 503, text, b"stopping\n"
            if self.mount is None or self.mount.engine.info is None:
                return 503, text, b"not ready: resolving the snapshot and mounting\n"
            ok, why = await self.health.check(max_age=0.5)
            return (200, text, b"ready\n") if ok else (503, text, f"not ready: {why}\n".encode())
        if path == "/v1/hints" and method == "POST":
            return await self._hints(body)
        if path == "/v1/batch-wait" and method == "POST":
            return await self._batch_wait(body)
        if path in ("/metrics", "/healthz", "/readyz", "/v1/hints", "/v1/batch-wait"):
            return 405, text, b"method not allowed\n"
        return 404, text, b"not found\n"

    async def _json(self, body: bytes) -> Any:
        if len(body) > 1024 * 1024:   # a long hint list: do not stall the file system meanwhile
            return await asyncio.to_thread(json.loads, body)
        return json.loads(body)

    async def _hints(self, body: bytes) -> tuple[int, str, bytes]:
        if self.mount is None:
            return _error(503, "the mount is not up yet")
        try:
            doc = await self._json(body)
        except ValueError:
            return _error(400, "body is not JSON")
        paths = doc.get("paths") if isinstance(doc, dict) else None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            return _error(400, 'expected {"paths": ["a/b.jpg", ...]}')
        mount = self.mount
        mapped = [repo_path(p, str(mount.mountpoint), mount.ops.root) for p in paths]
        accepted, missing = mount.prefetcher.hint([rp for rp in mapped if rp is not None])
        absent = set(missing)
        unknown = [p for p, rp in zip(paths, mapped) if rp is None or rp in absent]   # as sent, in order
        self.metrics.hint_posts += 1
        self.metrics.hinted_paths += len(paths)
        self.metrics.hinted_unknown += len(unknown)
        return 200, "application/json", json.dumps({"accepted": accepted, "unknown": unknown}).encode()

    async def _batch_wait(self, body: bytes) -> tuple[int, str, bytes]:
        try:
            doc = await self._json(body)
        except ValueError:
            return _error(400, "body is not JSON")
        values = doc.get("seconds") if isinstance(doc, dict) else None
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, list):
            return _error(400, 'expected {"seconds": [0.012, ...]}')
        good = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and 0 <= v <= MAX_BATCH_WAIT]
        if self.mount is None:
            return _error(503, "the mount is not up yet")
        observed = self.metrics.observe_batch_waits(good)
        return 200, "application/json", json.dumps({"observed": observed,
                                                    "rejected": len(values) - len(good)}).encode()


def _error(status: int, message: str) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps({"error": message}).encode()


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ")
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        raise ValueError(lines[0])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(line)
        headers[name.strip().lower()] = value.strip()
    return method.upper(), target, version, headers


async def _respond(writer: asyncio.StreamWriter, status: int, payload: bytes,
                   ctype: str = "text/plain; charset=utf-8", keep: bool = True, head_only: bool = False) -> None:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(payload)}\r\nCache-Control: no-store\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode("latin-1")
    writer.write(head if head_only else head + payload)
    await writer.drain()
