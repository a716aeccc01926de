"""pyfuse3's fd wait (sidecar/fuse/pyfuse3_fix.py): a request already queued is taken without
an epoll registration, and a steady stream of them still lets the loop run its other work."""
from __future__ import annotations

import asyncio
import os

import pytest

pyfuse3_asyncio = pytest.importorskip("pyfuse3.asyncio")

from sidecar.fuse import pyfuse3_fix  # noqa: E402


def test_a_ready_fd_is_taken_without_registering_and_the_loop_still_runs_other_work():
    """200 waits on an fd that is always readable (a pipe with a byte in it, like /dev/fuse
    under a burst of requests): before the fix every wait registered the fd with epoll and
    went through a loop iteration (200 add_reader calls); now at most one in YIELD_EVERY does,
    and a task beside it still gets the loop at least that often."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"x")

    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        added = 0
        original = loop.add_reader

        def counting_add_reader(fd, callback, *args):  # type: ignore[no-untyped-def]
            nonlocal added
            added += 1
            return original(fd, callback, *args)

        loop.add_reader = counting_add_reader  # type: ignore[method-assign]
        ticks = 0
        stop = asyncio.Event()

        async def other_work() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(other_work())
        await asyncio.sleep(0)
        ticks = 0
        for _ in range(200):
            await pyfuse3_fix.wait_readable(read_end)
        stop.set()
        await other
        return added, ticks

    try:
        added, ticks = asyncio.run(scenario())
    finally:
        pyfuse3_fix.notify_closing(read_end)
        os.close(read_end)
        os.close(write_end)
    bound = 200 // pyfuse3_fix.YIELD_EVERY + 1
    assert added <= bound, f"{added} epoll registrations for 200 ready waits"
    assert ticks >= bound - 2, f"the loop ran other work {ticks} times during 200 waits"


def test_a_wait_on_an_idle_fd_still_ends_when_it_becomes_readable_or_is_closed():
    """Nothing queued: the wait suspends until the fd is readable; notify_closing ends a
    pending wait with ClosedResourceError (pyfuse3's shutdown)."""
    read_end, write_end = os.pipe()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(pyfuse3_fix.wait_readable(read_end))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        loop.call_later(0.05, os.write, write_end, b"x")
        await asyncio.wait_for(waiting, 5)
        os.read(read_end, 1)
        pending = asyncio.ensure_future(pyfuse3_fix.wait_readable(read_end))
        await asyncio.sleep(0.05)
        pyfuse3_fix.notify_closing(read_end)
        with pytest.raises(pyfuse3_asyncio.ClosedResourceError):
            await asyncio.wait_for(pending, 5)

    try:
        asyncio.run(scenario())
    finally:
        os.close(read_end)
        os.close(write_end)
