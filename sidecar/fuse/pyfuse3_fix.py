"""Race-free readiness waits for pyfuse3's asyncio mode (pyfuse3 3.5).

pyfuse3.asyncio.wait_readable() registers `future.set_result` as the fd's reader callback and
removes it only in a done-callback, which runs one loop iteration later; terminate() calls
notify_closing(), which sets an exception on every waiting future without checking whether it is
already done. Under load the fd is often readable at the moment we stop, so either call can hit
a finished future: an `InvalidStateError` traceback from the loop (the reader fires after
notify_closing), or one raised inside pyfuse3.terminate() itself (notify_closing after the
reader fired), which left our shutdown half done and the session freed under live workers
(the segfaults in libfuse3). Both callbacks below act only on a pending future.

It also made every FUSE request cost an epoll_ctl add and delete and a loop iteration (~7% of
the daemon's CPU in a walk of 1M files). A request already queued on /dev/fuse is now seen
with one zero-timeout poll(2) and taken at once; every YIELD_EVERY such requests in a row the
wait goes through the loop anyway, so a steady stream of requests answered without awaiting
can never starve the loop's other work (HEAD replies, timers).
"""
from __future__ import annotations

import asyncio
import select
from typing import Any

import pyfuse3.asyncio as _pa

_installed = False
YIELD_EVERY = 16                 # requests taken without a loop iteration, at most, in a row
_pollers: dict[Any, "select.poll"] = {}
_in_a_row = 0


def _resolve(future: "asyncio.Future[Any]") -> None:
    if not future.done():
        future.set_result(None)


async def wait_readable(fd: Any) -> None:
    """Until `fd` is readable; raises ClosedResourceError when notify_closing(fd) comes first.
    Returns without suspending when a request is already there (YIELD_EVERY times in a row)."""
    global _in_a_row
    if _in_a_row < YIELD_EVERY:
        poller = _pollers.get(fd)
        if poller is None:
            poller = _pollers[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        if poller.poll(0):
            _in_a_row += 1
            return
    _in_a_row = 0
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
    _pollers.pop(fd, None)       # fd numbers are reused after close
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
