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
    """`slots` requests at once; background work (readahead, prefetch) never takes the last
    `reserve` slots, so a reader's request starts at once instead of queueing behind it."""

    def __init__(self, slots: int, reserve: int | None = None):
        self._free = slots
        self.reserve = min(slots - 1, max(1, slots // 8)) if reserve is None else reserve
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def _can_take(self, priority: int) -> bool:
        return self._free > (0 if priority == DEMAND else self.reserve)

    @asynccontextmanager
    async def slot(self, priority: int | None = None) -> AsyncIterator[None]:
        priority = current_priority.get() if priority is None else priority
        if not self._waiters and self._can_take(priority):
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
        self._free += 1
        while self._waiters:
            priority, _, future = self._waiters[0]
            if future.done():            # cancelled while waiting
                heapq.heappop(self._waiters)
                continue
            if not self._can_take(priority):
                return
            heapq.heappop(self._waiters)
            self._free -= 1
            future.set_result(None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)
