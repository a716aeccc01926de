"""A counting semaphore that lets demand reads overtake readahead, and readahead prefetch."""
from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
from contextlib import asynccontextmanager
from typing import AsyncIterator

DEMAND, READAHEAD, PREFETCH = 0, 1, 2

# Set by whoever starts background work; tasks inherit it, so every request they make
# queues at that priority without threading a parameter through every call.
current_priority: contextvars.ContextVar[int] = contextvars.ContextVar("dda_priority", default=DEMAND)


class PriorityLimiter:
    def __init__(self, slots: int):
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @asynccontextmanager
    async def slot(self, priority: int | None = None) -> AsyncIterator[None]:
        priority = current_priority.get() if priority is None else priority
        if self._free > 0 and not self._waiters:
            self._free -= 1
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (priority, next(self._order), future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release()   # we were handed a slot as we were cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1

    @property
    def waiting(self) -> int:
        return len(self._waiters)
