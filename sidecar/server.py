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

Exposure: the app container shares the pod's network namespace, so the loader API (/v1/...)
answers only connections that arrived on a loopback address; on the pod IP only the read-only
GET endpoints answer (anything else gets 403). Every input is bounded and answered with a 4xx:
header and body sizes (by Content-Length and by bytes actually read), bytes buffered across all
connections at once, open connections, JSON nesting, number length and path counts.
"""
from __future__ import annotations

import asyncio
import ipaddress
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
MAX_BODY = 32 * 1024 * 1024         # a hint list of about a million paths
MAX_BUFFERED = 64 * 1024 * 1024     # request bodies held at once, all connections together
MAX_CONNECTIONS = 128               # more are closed at once: a flood cannot pile up buffers
MAX_PATHS = 1_000_000               # paths in one hint
MAX_JSON_DEPTH = 32
MAX_NUMBER_DIGITS = 32              # a wait in seconds never needs more; a 400-digit number is an attack
_READ_PIECE = 256 * 1024
IDLE_TIMEOUT = 75.0
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large",
            415: "Unsupported Media Type", 500: "Internal Server Error", 501: "Not Implemented",
            503: "Service Unavailable"}
_READ_ONLY = ("/metrics", "/healthz", "/readyz")


class BadJSON(ValueError):
    """A body that is not JSON we accept (answered 400 with this message)."""


def _number(text: str) -> int | float:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise BadJSON(f"a number longer than {MAX_NUMBER_DIGITS} characters")
    value = float(text) if any(c in text for c in ".eE") else int(text)
    return value


def _depth(doc: Any) -> int:
    """How deeply lists and objects nest in a parsed document (iterative: no recursion)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_json(body: bytes | bytearray) -> Any:
    """A request body as JSON; BadJSON (never RecursionError or OverflowError) when it is not
    UTF-8 JSON, nests deeper than MAX_JSON_DEPTH or holds a number longer than MAX_NUMBER_DIGITS."""
    try:
        doc = json.loads(body, parse_int=_number, parse_float=_number, parse_constant=_no_constant)
    except BadJSON:
        raise
    except RecursionError:
        raise BadJSON(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        raise BadJSON("body is not JSON") from None
    # Counting brackets runs at C speed; only a body with many of them needs the walk.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _depth(doc) > MAX_JSON_DEPTH:
        raise BadJSON(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return doc


def _no_constant(name: str) -> float:
    raise BadJSON(f"{name} is not a number")


def is_loopback(sockname: Any) -> bool:
    """Whether a connection's local address (asyncio 'sockname') is a loopback address."""
    try:
        host = sockname[0] if isinstance(sockname, tuple) else str(sockname)
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except (ValueError, IndexError, TypeError):
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


class Health:
    """Whether the mount answers: a stat and a getxattr of the mountpoint, which our own FUSE
    daemon must answer (xattrs are never cached by the kernel), from a separate thread so a
    hung mount cannot block the event loop, with a timeout. One probe at a time: while one
    is stuck, the mount is reported unhealthy."""

    def __init__(self, mountpoint: Path | None, timeout: float = 2.0):
        self.mountpoint = mountpoint
        self.timeout = timeout
        self.commit: str | None = None      # set once mounted
        self.last_ok = False
        self.last_reason = "not mounted yet"
        self._checked_at = 0.0
        self._pending: threading.Thread | None = None

    def _probe(self) -> str | None:
        """None when healthy, else why not (runs in a thread). Without a mountpoint (CSI mode,
        the volume not mounted in this container) the live FUSE session is all we can know:
        the process exits when it ends."""
        if self.mountpoint is None:
            return None
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
        self._servers: list[asyncio.base_events.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._buffered = 0                  # body bytes held by all connections now
        self._parse = asyncio.Semaphore(1)  # one big JSON parse at a time: peaks do not stack

    async def start(self) -> int:
        """Listen on host:port; when host is a specific non-loopback address (the pod IP), also on
        127.0.0.1:port for the loader API. Returns the port (picked when 0)."""
        server = await asyncio.start_server(self._client, self.host, self.port, limit=MAX_HEADER,
                                            reuse_address=True)
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        wildcard = self.host in ("", "0.0.0.0", "::")
        if not wildcard and not is_loopback((self.host,)):
            self._servers.append(await asyncio.start_server(self._client, "127.0.0.1", self.port,
                                                            limit=MAX_HEADER, reuse_address=True))
        return self.port

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    # -- HTTP/1.1 ----------------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS:
            writer.close()   # a flood of connections: refuse, do not queue
            return
        self._writers.add(writer)
        local = is_loopback(writer.get_extra_info("sockname"))
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
                path = target.split("?", 1)[0]
                if not local and not (path in _READ_ONLY and method in ("GET", "HEAD")):
                    # The pod IP: read-only. Refused before reading any body.
                    await _respond(writer, 403, b"only GET /metrics, /healthz and /readyz answer on this address; "
                                                b"the loader API listens on 127.0.0.1\n", keep=False)
                    return
                if length > MAX_BODY:
                    await _respond(writer, 413, f"body too large (at most {MAX_BODY} bytes)\n".encode(), keep=False)
                    return
                if self._buffered + length > MAX_BUFFERED:
                    await _respond(writer, 503, b"too many large requests at once; retry later\n", keep=False)
                    return
                # The budget is held until the body (and what was parsed from it) is dropped.
                self._buffered += length
                try:
                    try:
                        body = await self._read_body(reader, length)
                    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                        return
                    try:
                        status, ctype, payload = await self._route(method, path, body)
                    except Exception:
                        log.exception("internal error serving %s %s", method, path)
                        status, ctype, payload = 500, "text/plain; charset=utf-8", b"internal error\n"
                    del body
                finally:
                    self._buffered -= length
                connection = headers.get("connection", "").lower()
                keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
                await _respond(writer, status, payload, ctype, keep=keep and not self.stopping,
                               head_only=method == "HEAD")
                if not keep:
                    return
        except ConnectionError:
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, length: int) -> bytearray:
        """Exactly `length` bytes, read in pieces as they arrive (each piece within IDLE_TIMEOUT):
        memory grows with what was sent, not with what was announced."""
        body = bytearray()
        while len(body) < length:
            piece = await asyncio.wait_for(reader.read(min(length - len(body), _READ_PIECE)), IDLE_TIMEOUT)
            if not piece:
                raise asyncio.IncompleteReadError(bytes(body), length)
            body += piece
        return body

    async def _route(self, method: str, path: str, body: bytes | bytearray) -> tuple[int, str, bytes]:
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

    async def _json(self, body: bytes | bytearray) -> Any:
        if len(body) > 64 * 1024:   # a long hint list: do not stall the file system meanwhile
            async with self._parse:
                return await asyncio.to_thread(parse_json, body)
        return parse_json(body)

    async def _hints(self, body: bytes | bytearray) -> tuple[int, str, bytes]:
        if self.mount is None:
            return _error(503, "the mount is not up yet")
        try:
            doc = await self._json(body)
        except BadJSON as err:
            return _error(400, str(err))
        paths = doc.get("paths") if isinstance(doc, dict) else None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            return _error(400, 'expected {"paths": ["a/b.jpg", ...]}')
        if len(paths) > MAX_PATHS:
            return _error(413, f"{len(paths)} paths in one hint; send at most {MAX_PATHS} at a time")
        if any(len(p) > 4096 or "\0" in p for p in paths):
            return _error(400, "a path longer than 4096 characters or with a NUL byte")
        mount = self.mount
        mapped = [repo_path(p, str(mount.mountpoint), mount.ops.root) for p in paths]
        accepted, missing = mount.prefetcher.hint([rp for rp in mapped if rp is not None])
        absent = set(missing)
        unknown = [p for p, rp in zip(paths, mapped) if rp is None or rp in absent]   # as sent, in order
        self.metrics.hint_posts += 1
        self.metrics.hinted_paths += len(paths)
        self.metrics.hinted_unknown += len(unknown)
        return 200, "application/json", json.dumps({"accepted": accepted, "unknown": unknown}).encode()

    async def _batch_wait(self, body: bytes | bytearray) -> tuple[int, str, bytes]:
        try:
            doc = await self._json(body)
        except BadJSON as err:
            return _error(400, str(err))
        values = doc.get("seconds") if isinstance(doc, dict) else None
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, list):
            return _error(400, 'expected {"seconds": [0.012, ...]}')
        if len(values) > MAX_PATHS:
            return _error(413, f"{len(values)} observations in one post; send at most {MAX_PATHS}")
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
