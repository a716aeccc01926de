"""The one retry policy of every remote request: exponential backoff with full jitter."""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` retries after the first try; before retry n, sleep a uniform random time in
    [0, min(cap, base * 2**n)] seconds (AWS's "full jitter": clients that failed together do
    not come back together)."""

    retries: int = 5
    base: float = 0.2
    cap: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds to sleep before retry `attempt` (1-based)."""
        return random.uniform(0, min(self.cap, self.base * 2 ** attempt))

    def gives_up(self, attempt: int) -> bool:
        return attempt > self.retries

    async def sleep(self, attempt: int) -> None:
        await asyncio.sleep(self.delay(attempt))
