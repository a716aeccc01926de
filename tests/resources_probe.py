"""Measure `dda sidecar`'s memory and CPU while an epoch is read through it (the benchmark's
epoch shape: 2000 files of 80-120 KB, 4 readers, shuffled, whole files, from an HTTP remote).

    python tests/resources_probe.py [--images 2000] [--readers 4]

prints one JSON object: peak RSS of the sidecar's process tree (sampled every 50 ms), the main
process's VmHWM, CPU seconds and the average cores used over the epoch. The chart's
`sidecar.resources` are set from these numbers (helm/dda-sidecar/README.md); tests/
test_sidecar_resources.py runs it and checks the chart still fits.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import HttpRemoteServer  # noqa: E402
from sidecar_util import Sidecar  # noqa: E402

from sidecar.sample import make_sample_repo  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree(pid: int) -> list[int]:
    """pid and its descendants (git cat-file children count against the container too)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """user + system of the process and its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK


def hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(workdir: Path, images: int = 2000, readers: int = 4) -> dict:
    repo, storage = make_sample_repo(workdir / "sample", images=images, sizes=(80_000, 120_000))
    server = HttpRemoteServer(workdir / "remote")
    shutil.rmtree(server.root)
    shutil.move(str(storage), server.root)
    server.start()
    mp = workdir / "mnt"
    mp.mkdir()
    env = {"DDA_REMOTE_STORAGE_URL": server.url, "DDA_REMOTE_STORAGE_USER": server.user,
           "DDA_REMOTE_STORAGE_PASSWORD": server.password}
    try:
        with Sidecar(str(repo), mp, workdir / "cache", env=env) as sc:
            assert sc.proc is not None
            pid = sc.proc.pid
            files = sorted(str(p) for p in (mp / "data" / "images").rglob("*.jpg"))
            random.Random(1).shuffle(files)
            idle_rss = rss(tree(pid))
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            peak, stop = [idle_rss], threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss(tree(pid)))
                    time.sleep(0.05)

            def read(share: list[str]) -> int:
                n = 0
                for f in share:
                    with open(f, "rb") as fh:
                        while chunk := fh.read(1 << 20):
                            n += len(chunk)
                return n

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            with ThreadPoolExecutor(readers) as pool:
                total = sum(pool.map(read, [files[i::readers] for i in range(readers)]))
            seconds = time.monotonic() - t0
            cpu = cpu_seconds(pid) - cpu0
            stop.set()
            sampler.join()
            result = {"files": len(files), "bytes": total, "readers": readers, "seconds": round(seconds, 2),
                      "idle_rss_mib": round(idle_rss / 2**20, 1), "peak_rss_mib": round(peak[0] / 2**20, 1),
                      "main_vmhwm_mib": round(hwm(pid) / 2**20, 1), "cpu_seconds": round(cpu, 2),
                      "avg_cores": round(cpu / seconds, 3)}
            rc, _ = sc.stop()
            assert rc == 0, sc.output()
            return result
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--readers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dda-resources-") as tmp:
        print(json.dumps(measure(Path(tmp), args.images, args.readers), indent=1))


if __name__ == "__main__":
    main()
