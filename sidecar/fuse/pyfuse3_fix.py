"""Race-free readiness waits for pyfuse3's asyncio mode (pyfuse3 3.5).

pyfuse3.asyncio.wait_readable() registers `future.set_result` as the fd's reader callback and
removes it only in a done-callback, which runs one loop iteration later; terminate() calls
notify_closing(), which sets an exception on every waiting future without checking whether it is
already done. Under load the fd is often readable at the moment we stop, so either call can hit
a finished future: an `InvalidStateError` traceback from the loop (the reader fires after
notify_closing), or one raised inside pyfuse3.terminate() itself (notify_closing after the
reader fired), which left our shutdown half done and the session freed under live workers
(the segfaults in libfuse3). Both callbacks below act only on a pending future.
"""
from __future__ import annotations

import asyncio
from typing import Any

import pyfuse3.asyncio as _pa

_installed = False


def _resolve(future: "asyncio.Future[Any]") -> None:
    if not future.done():
        future.set_result(None)


async def wait_readable(fd: Any) -> None:
    """Until `fd` is readable; raises ClosedResourceError when notify_closing(fd) comes first."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    _pa._read_futures[fd].add(future)
    loop.add_reader(fd, _resolve, future)
    try:
        await future
    finally:
        loop.remove_reader(fd)      # now, not a loop iteration later
        waiting = _pa._read_futures.get(fd)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del _pa._read_futures[fd]


def notify_closing(fd: Any) -> None:
    """Wake every task waiting on `fd` with ClosedResourceError (those already woken keep their result)."""
    for future in list(_pa._read_futures.get(fd, ())):
        if not future.done():
            future.set_exception(_pa.ClosedResourceError())


def install() -> None:
    """Replace the two functions in pyfuse3's asyncio shim (pyfuse3 looks them up on each call)."""
    global _installed
    if not _installed:
        _pa.wait_readable = wait_readable      # type: ignore[assignment]
        _pa.notify_closing = notify_closing    # type: ignore[assignment]
        _installed = True
