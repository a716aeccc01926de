"""The mount daemon asks glibc for two malloc arenas (sidecar/fuse/memory.py): freed memory
spread over one arena per worker thread kept ~30 MB more RSS at 1M files."""
from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import ctypes, sys, threading
from sidecar.fuse.memory import limit_malloc_arenas
took = limit_malloc_arenas() if sys.argv[1] == "limit" else None
start = threading.Barrier(8)
def work():
    start.wait()
    keep = [bytearray(4096) for _ in range(2000)]   # each new thread mallocs at once
    start.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(took, flush=True)
ctypes.CDLL(None).malloc_stats()                    # one "Arena N:" block per arena, on stderr
"""


def _arenas(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), sum(1 for line in proc.stderr.splitlines() if line.startswith("Arena "))


def test_daemon_threads_share_two_malloc_arenas():
    took, limited = _arenas("limit")
    assert took == "True" and limited <= 2
    _, free = _arenas("none")
    assert free > 2          # without it each thread gets its own (what the limit is for)


def test_a_users_malloc_arena_max_wins():
    took, arenas = _arenas("limit", {"MALLOC_ARENA_MAX": "4"})
    assert took == "False" and arenas <= 4
