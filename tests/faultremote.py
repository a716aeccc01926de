"""A fault-injecting HTTP remote for tests: a small real HTTP/1.1 server on 127.0.0.1 that
serves a DVC remote folder (GET with Range, HEAD) and answers chosen requests wrongly.

Written on asyncio streams rather than a server library on purpose: the faults live below
what a library lets a handler do (a body shorter than its Content-Length, a close-delimited
body, headers trickled a byte at a time, a TCP reset instead of an answer).

    remote = FaultRemote(folder).start()
    remote.fault("wrong", path="files/md5/ab/", times=3)        # same-length wrong bytes
    remote.fault("status", status=429, retry_after=1)
    ... remote.requests (what was asked and what it got) ...
    remote.stop()

Faults (keyword parameters in brackets):
  wrong            same length, wrong bytes (every byte xor 0x5A) [from_offset: only bytes at
                   or past this object offset are wrong]
  truncate         full Content-Length, half the body, then close (the client sees the cut)
  truncate_nolen   no Content-Length, Connection: close, half the body (looks complete)
  bad_range        Content-Range starting one byte after what was asked (body as asked)
  range_total      Content-Range total off by [delta=1]
  lie_length       HEAD (or a 200 GET) says Content-Length: [value=1234]
  reset            TCP reset instead of an answer
  stall            wait [seconds=5] before answering (then answer right)
  trickle          headers and body a few bytes at a time, [delay=0.01] s apart
  status           answer HTTP [status=503] with an empty body [retry_after: Retry-After seconds]
  ignore_range     answer 200 with the whole object (a legitimate server behaviour)
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Fault:
    action: str
    method: str | None = "GET"          # None: any method
    path: str | None = None             # substring of the request path; None: any
    start: int | None = None            # only ranged requests starting at this offset
    times: int | None = 1               # None: forever
    params: dict = field(default_factory=dict)

    def matches(self, method: str, path: str, start: int | None) -> bool:
        return ((self.method is None or self.method == method) and (self.path is None or self.path in path)
                and (self.start is None or self.start == start) and (self.times is None or self.times > 0))


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    action: str
    at: float


class FaultRemote:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.faults: list[Fault] = []
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- control ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fault(self, action: str, *, method: str | None = "GET", path: str | None = None,
              start: int | None = None, times: int | None = 1, **params: object) -> Fault:
        """Answer the next `times` matching requests with `action` (see the module docstring)."""
        if action == "lie_length" and method == "GET":
            method = "HEAD"
        rule = Fault(action, method, path, start, times, dict(params))
        with self._lock:
            self.faults.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def start(self) -> "FaultRemote":
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._connection, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._server.close()
            pending = asyncio.all_tasks(self._loop)     # connections still open: end them
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

        self._thread = threading.Thread(target=main, daemon=True, name="fault-remote")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "FaultRemote":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving ---------------------------------------------------------------------------------
    def _take(self, method: str, path: str, start: int | None) -> Fault | None:
        with self._lock:
            for rule in self.faults:
                if rule.matches(method, path, start):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
                if int(headers.get("content-length", "0") or 0):
                    await reader.readexactly(int(headers["content-length"]))
                keep = await self._answer(method, target.split("?", 1)[0].lstrip("/"), headers, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def _answer(self, method: str, path: str, headers: dict[str, str], writer: asyncio.StreamWriter) -> bool:
        rng = headers.get("range")
        start: int | None = None
        end: int | None = None
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a), (int(b) + 1 if b else None)
        rule = self._take(method, path, start)
        action = rule.action if rule else "ok"
        params = rule.params if rule else {}
        self.requests.append(Seen(method, path, rng, action, time.monotonic()))

        if action == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if action == "stall":
            await asyncio.sleep(float(params.get("seconds", 5)))
        if action == "status":
            extra = {"Retry-After": str(params["retry_after"])} if "retry_after" in params else {}
            await self._send(writer, int(params.get("status", 503)), {"Content-Length": "0", **extra}, b"")
            return True

        file = (self.root / path).resolve()
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, {"Content-Length": "0"}, b"")
            return True
        if not file.is_relative_to(self.root) or not file.is_file():
            await self._send(writer, 404, {"Content-Length": "0"}, b"")
            return True
        data = file.read_bytes()
        total = len(data)
        if method == "HEAD":
            length = params.get("value", 1234) if action == "lie_length" else total
            await self._send(writer, 200, {"Content-Length": str(length), "Accept-Ranges": "bytes"}, b"")
            return True

        if start is None or action == "ignore_range":
            status, first, body = 200, 0, data
            hdrs = {"Content-Length": str(total)}
        else:
            if start >= total:
                await self._send(writer, 416, {"Content-Range": f"bytes */{total}", "Content-Length": "0"}, b"")
                return True
            stop = min(total, end if end is not None else total)
            status, first, body = 206, start, data[start:stop]
            hdrs = {"Content-Length": str(len(body))}
            shown_start = start + 1 if action == "bad_range" else start
            shown_total = total + int(params.get("delta", 1)) if action == "range_total" else total
            hdrs["Content-Range"] = f"bytes {shown_start}-{stop - 1}/{shown_total}"
        if action == "wrong":
            cut = max(0, int(params.get("from_offset", 0)) - first)
            body = body[:cut] + bytes(b ^ 0x5A for b in body[cut:])
        if action == "lie_length" and status == 200:
            hdrs["Content-Length"] = str(params.get("value", 1234))
        if action == "truncate":
            await self._send(writer, status, hdrs, body[:len(body) // 2])
            writer.transport.abort()
            return False
        if action == "truncate_nolen":
            hdrs.pop("Content-Length")
            hdrs["Connection"] = "close"
            await self._send(writer, status, hdrs, body[:len(body) // 2])
            await writer.drain()
            return False
        delay = float(params.get("delay", 0.01)) if action == "trickle" else 0.0
        await self._send(writer, status, hdrs, body, delay)
        return True

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, headers: dict[str, str], body: bytes,
                    delay: float = 0.0) -> None:
        reason = {200: "OK", 206: "Partial Content", 404: "Not Found", 405: "Method Not Allowed",
                  416: "Range Not Satisfiable", 429: "Too Many Requests"}.get(status, "Error")
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        if not delay:
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
            return
        for i in range(0, len(head), 8):            # trickled: headers a few bytes at a time
            writer.write(head[i:i + 8].encode("latin-1"))
            await writer.drain()
            await asyncio.sleep(delay)
        piece = max(1024, len(body) // 20)
        for i in range(0, len(body), piece):
            writer.write(body[i:i + piece])
            await writer.drain()
            await asyncio.sleep(delay)
