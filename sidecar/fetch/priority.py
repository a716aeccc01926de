"""A counting semaphore that lets demand reads overtake readahead, and readahead prefetch."""
from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools

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

    def slot(self, priority: int | None = None) -> "_Slot":
        """`async with limiter.slot():` holds one slot (`priority`: default the context's).
        A plain class, not a generator context manager: every request takes one (a 100k
        stat-ahead is 100k of them)."""
        return _Slot(self, current_priority.get() if priority is None else priority)

    def _may_take_now(self, priority: int) -> bool:
        """A free slot for `priority`, and no one waiting who is as urgent (a demand request
        passes background work that waits for more than the reserve)."""
        return self._can_take(priority) and (not self._waiters or priority < self._waiters[0][0])

    async def _take(self, priority: int) -> None:
        if self._may_take_now(priority):
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()   # we were handed a slot as we were cancelled: pass it on
            raise

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


class _Slot:
    """One slot of a PriorityLimiter, held for an `async with` block."""

    __slots__ = ("limiter", "priority")

    def __init__(self, limiter: PriorityLimiter, priority: int):
        self.limiter, self.priority = limiter, priority

    async def __aenter__(self) -> None:
        limiter = self.limiter
        if limiter._may_take_now(self.priority):
            limiter._free -= 1      # the common case: no await, no future
        else:
            await limiter._take(self.priority)

    async def __aexit__(self, *exc: object) -> None:
        self.limiter._release()
