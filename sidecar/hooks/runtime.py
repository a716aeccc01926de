"""The runtime thread: the async engine and its file system on a private event loop.

Hook calls come from any thread of the program and wait for the loop
(`asyncio.run_coroutine_threadsafe`); the loop thread itself always gets the original
functions (see patching), so the engine can never call into itself.
"""
from __future__ import annotations

import threading
from typing import Any

# Loops of closed runtimes: never closed nor collected. asyncio subprocess transports left
# behind by the engine close themselves on the loop when collected, which fails on a closed loop.
_retired_loops: list[Any] = []


class Runtime:
    def __init__(self, config: Any):
        import asyncio

        from ..engine import Engine
        from ..fs import FileSystem

        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.ident: int | None = None
        self.thread = threading.Thread(target=self._run, name="dda-hooks-loop", daemon=True)
        self.thread.start()
        self.ready.wait()
        try:
            self.engine = self.call(Engine.open(config))
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self.fs = FileSystem(self.engine)

    def _run(self) -> None:
        self.ident = threading.get_ident()
        self._asyncio.set_event_loop(self.loop)
        self.ready.set()
        self.loop.run_forever()

    def pause(self) -> bool:
        """Before fork: stop the loop thread so that the child cannot inherit a lock it held
        (sqlite, ssl, malloc...). Pending calls wait and go on after resume()."""
        if threading.get_ident() == self.ident or not self.thread.is_alive():
            return False
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        return not self.thread.is_alive()

    def resume(self) -> None:
        self.ready.clear()
        self.thread = threading.Thread(target=self._run, name="dda-hooks-loop", daemon=True)
        self.thread.start()
        self.ready.wait()

    def call(self, coro: Any) -> Any:
        """Run `coro` on the loop and wait for its result (from any other thread)."""
        future = self._asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        async def shut() -> None:
            await self.engine.aclose()
            await self._asyncio.sleep(0.05)     # let subprocess exits and transports settle

        try:
            future = self._asyncio.run_coroutine_threadsafe(shut(), self.loop)
            future.result(timeout)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        finally:
            self.engine.forget_credentials()    # also when the close ran out of time
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
            _retired_loops.append(self.loop)
