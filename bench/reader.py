"""Reader worker for bench/run.py (a separate process: never the process serving a mount).

    python bench/reader.py MODE LISTFILE

LISTFILE holds absolute paths, one a line. The worker loads it, prints "ready", waits for a
line on stdin ("go"), then works and prints one JSON line with its results.

MODE "read": read every file whole with 1 MiB reads (unbuffered), in list order.
MODE "ttfb": per file, open + read the first 4 KiB; records open and first-read latency.
Times are CLOCK_MONOTONIC (system-wide on Linux), so the parent can combine workers.
"""
from __future__ import annotations

import json
import os
import sys
import time

BLOCK = 1024 * 1024


def read_all(paths: list[str]) -> dict:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = files = 0
    errors: list[str] = []
    slowest = (0.0, "")
    start = time.monotonic()
    for path in paths:
        t0 = time.monotonic()
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                while True:
                    n = os.readv(fd, [view])
                    if n <= 0:
                        break
                    total += n
            finally:
                os.close(fd)
            files += 1
        except OSError as err:
            errors.append(f"{path}: {err}")
        dt = time.monotonic() - t0
        if dt > slowest[0]:
            slowest = (dt, path)
    end = time.monotonic()
    return {"start": start, "end": end, "bytes": total, "files": files, "errors": errors[:20],
            "n_errors": len(errors), "slowest_s": slowest[0], "slowest": slowest[1]}


def ttfb(paths: list[str]) -> dict:
    samples = []
    errors: list[str] = []
    start = time.monotonic()
    for path in paths:
        try:
            t0 = time.monotonic()
            fd = os.open(path, os.O_RDONLY)
            t1 = time.monotonic()
            data = os.read(fd, 4096)
            t2 = time.monotonic()
            os.close(fd)
            samples.append({"path": path, "open_s": t1 - t0, "read_s": t2 - t1, "total_s": t2 - t0,
                            "bytes": len(data)})
        except OSError as err:
            errors.append(f"{path}: {err}")
    return {"start": start, "end": time.monotonic(), "samples": samples, "errors": errors[:20],
            "n_errors": len(errors)}


def main() -> int:
    mode, listfile = sys.argv[1], sys.argv[2]
    with open(listfile) as f:
        paths = [line.rstrip("\n") for line in f if line.strip()]
    print("ready", flush=True)
    if not sys.stdin.readline():
        return 1
    result = read_all(paths) if mode == "read" else ttfb(paths)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
