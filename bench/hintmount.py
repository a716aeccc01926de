"""An in-process mount for the prefetch-hint case of bench/run.py.

    python bench/hintmount.py REPO MOUNTPOINT CACHE_DIR

Mounts with `Mount.start` + `serve(handle_signals=False)` on a thread (as tests/mounting.py
does) and takes JSON commands on stdin, one a line, answering one JSON line each:
  {"cmd": "hint", "paths": [...]}   -> Prefetcher.hint(paths) on the mount's loop
  {"cmd": "status"}                 -> the mount's status (counters)
  {"cmd": "stop"}                   -> unmount and exit
Readers are other processes: this one only serves the mount and makes the hint call.
"""
from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
from pathlib import Path


def main() -> int:
    repo, mountpoint, cache_dir = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    from sidecar.config import load_config
    from sidecar.fuse.mount import Mount

    config = load_config({"repo": repo, "cache_dir": cache_dir})
    state: dict = {}
    ready = threading.Event()

    def serve() -> None:
        async def go() -> None:
            state["loop"] = asyncio.get_running_loop()
            try:
                state["mount"] = await Mount.start(config, mountpoint)
            except BaseException as err:  # report, then exit
                state["error"] = f"{type(err).__name__}: {err}"
                ready.set()
                return
            ready.set()
            await state["mount"].serve(handle_signals=False)

        try:
            asyncio.run(go())
        finally:
            state["done"] = True

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(300)
    if "error" in state or "mount" not in state:
        print(json.dumps({"ok": False, "error": state.get("error", "mount did not start")}), flush=True)
        return 1
    mount, loop = state["mount"], state["loop"]

    def stop(*_args: object) -> None:
        loop.call_soon_threadsafe(mount.terminate)

    signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(0)))
    print(json.dumps({"ok": True}), flush=True)

    async def do_hint(paths: list[str]) -> dict:
        accepted, unknown = mount.prefetcher.hint(paths)
        return {"ok": True, "accepted": accepted, "unknown": len(unknown)}

    async def do_status() -> dict:
        return {"ok": True, "status": mount.ops.status()}

    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd["cmd"] == "hint":
                reply = asyncio.run_coroutine_threadsafe(do_hint(cmd["paths"]), loop).result(60)
            elif cmd["cmd"] == "status":
                reply = asyncio.run_coroutine_threadsafe(do_status(), loop).result(60)
            elif cmd["cmd"] == "stop":
                break
            else:
                reply = {"ok": False, "error": f"unknown command {cmd['cmd']}"}
            print(json.dumps(reply, default=str), flush=True)
    finally:
        stop()
        thread.join(60)
    print(json.dumps({"ok": True, "stopped": not thread.is_alive()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
