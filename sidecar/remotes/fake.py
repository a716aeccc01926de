"""An in-memory DVC remote for tests: the Remote interface of http/s3/local over a dict, with
scripted faults (delays, failures, hangs, wrong bytes), the way mountpoint-s3 tests its file
system with mock and failure clients.

A test registers one under a name and points a DVC remote at `fake://<name>`
(e.g. `DDA_REMOTE_DEFAULT_URL=fake://t1`, or Config.remotes). It lives in this process only.
"""
from __future__ import annotations

import asyncio
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, ObjectMissing, RemoteError, RemoteUnavailable
from .base import Range, Remote

_registry: dict[str, "FakeRemote"] = {}


@dataclass
class Fault:
    """What happens to the requests that match: `op` (read, size, list, write or None for
    all) and `pattern` (fnmatch on the object path). Applied in order: delay, then hang, then
    error (`times` requests; None: every one), then wrong bytes in place of the content."""

    op: str | None = None
    pattern: str = "*"
    delay: float = 0.0
    hang: bool = False
    error: Callable[[str], RemoteError] | None = None
    times: int | None = None
    data: bytes | None = None

    def matches(self, op: str, path: str) -> bool:
        return (self.op is None or self.op == op) and fnmatch.fnmatchcase(path, self.pattern)


@dataclass
class Call:
    op: str
    path: str
    start: int | None = None
    end: int | None = None


@dataclass(eq=False)
class FakeRemote(Remote):
    name: str = "fake"
    objects: dict[str, bytes] = field(default_factory=dict)
    can_list: bool = True
    faults: list[Fault] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    hung: list[asyncio.Event] = field(default_factory=list)    # requests waiting in a `hang` fault
    sizing: int = 0            # size requests under way now
    most_sizing: int = 0       # the most size requests ever under way at once

    def __post_init__(self) -> None:
        self.display_url = f"fake://{self.name}"

    # -- building and scripting ------------------------------------------------------------------
    @classmethod
    def register(cls, name: str, root: Path | None = None, **kwargs: object) -> "FakeRemote":
        """A fake remote reachable as fake://<name>, holding the files under `root` (a local
        DVC remote folder, e.g. one sidecar.sample wrote) if given."""
        remote = cls(name=name, **kwargs)  # type: ignore[arg-type]
        if root is not None:
            for path in sorted(Path(root).rglob("*")):
                if path.is_file():
                    remote.objects[path.relative_to(root).as_posix()] = path.read_bytes()
        _registry[name] = remote
        return remote

    @classmethod
    def lookup(cls, name: str) -> "FakeRemote":
        try:
            return _registry[name]
        except KeyError:
            raise ConfigError(f"fake remote {name!r} is not registered in this process") from None

    @classmethod
    def unregister(cls, name: str) -> None:
        _registry.pop(name, None)

    def script(self, **kwargs: object) -> Fault:
        """Add a fault (see Fault); returns it so a test can remove it later."""
        fault = Fault(**kwargs)  # type: ignore[arg-type]
        self.faults.append(fault)
        return fault

    def heal(self) -> None:
        """Remove every fault and let hung requests go on (call it on their loop)."""
        self.faults.clear()
        for event in list(self.hung):
            event.set()

    def count(self, op: str | None = None, pattern: str = "*") -> int:
        return sum(1 for c in self.calls if (op is None or c.op == op) and fnmatch.fnmatchcase(c.path, pattern))

    async def _apply(self, op: str, path: str) -> bytes | None:
        wrong: bytes | None = None
        for fault in list(self.faults):
            if not fault.matches(op, path):
                continue
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.hang:
                event = asyncio.Event()
                self.hung.append(event)
                try:
                    await event.wait()
                finally:
                    self.hung.remove(event)
            if fault.error is not None and (fault.times is None or fault.times > 0):
                if fault.times is not None:
                    fault.times -= 1
                raise fault.error(f"remote {self.name!r}: scripted failure of {op} {path}")
            if fault.data is not None:
                wrong = fault.data
        return wrong

    def _object(self, path: str) -> bytes:
        try:
            return self.objects[path]
        except KeyError:
            raise ObjectMissing(f"remote {self.name!r} ({self.display_url}): object {path} is missing") from None

    # -- the Remote interface ------------------------------------------------------------------------
    async def read(self, path: str, start: int, end: int | None) -> Range:
        self.calls.append(Call("read", path, start, end))
        wrong = await self._apply("read", path)
        data = self._object(path) if wrong is None else wrong
        stop = len(data) if end is None else min(end, len(data))
        return Range(data[start:stop], len(data))

    async def size(self, path: str) -> int:
        self.calls.append(Call("size", path))
        self.sizing += 1
        self.most_sizing = max(self.most_sizing, self.sizing)
        try:
            wrong = await self._apply("size", path)
        finally:
            self.sizing -= 1
        return len(self._object(path) if wrong is None else wrong)

    async def list_sizes(self, prefix: str) -> dict[str, int] | None:
        if not self.can_list:
            return None
        self.calls.append(Call("list", prefix))
        await self._apply("list", prefix)
        return {p: len(d) for p, d in self.objects.items() if p.startswith(prefix)}

    async def write(self, path: str, data: bytes) -> None:
        self.calls.append(Call("write", path))
        await self._apply("write", path)
        self.objects[path] = bytes(data)


def unavailable(message: str) -> RemoteError:
    return RemoteUnavailable(message)
