"""Names-only walks of a big DVC tree through `dda mount` against ext4, several code versions
in one run (issue 11: `ls`/`find -type f` of 1M files <= 3x ext4, daemon RSS <= 200 MB).

    python bench/walk.py --workdir /tmp/walk --files 1000000 [--source before=/path/to/tree]... [--rounds 2]

The layout (tests/dvclayout.py: DVC-identical objects, .dir manifest and .dvc; 1M = 1,000 x
1,000; its checkout on the local disk is the ext4 baseline) is written once into --workdir and
reused by later runs. Each source is a tree holding a `sidecar` package (PYTHONPATH for the
daemon; default: this checkout as "this"); rounds interleave the sources. Per mount (fresh
cache, local remote): `ls` of the biggest folder, `find -type f` of the whole tree, the
daemon's CPU time for both (less noisy than wall time on a shared machine), then its VmRSS; ext4 is timed in the same round. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from dvclayout import write_layout   # noqa: E402
from scale import Mounted, timed     # noqa: E402


def layout_in(work: Path, n: int):
    """The layout of `n` files in `work` (written the first time)."""
    saved = work / "layout.pickle"
    if saved.exists():
        return pickle.loads(saved.read_bytes())
    folders, per = (1000, n // 1000) if n >= 1_000_000 else (1, n)
    started = time.perf_counter()
    layout = write_layout(work / "layout", folders=folders, per_folder=per, checkout=work / "ext4")
    saved.write_bytes(pickle.dumps(layout))
    print(f"layout of {n:,} files written in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return layout


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--source", action="append", help="NAME=PATH of a tree with a sidecar package")
    parser.add_argument("--rounds", type=int, default=1)
    ns = parser.parse_args()
    work = Path(ns.workdir).resolve() / f"n{ns.files}"
    work.mkdir(parents=True, exist_ok=True)
    # The daemon runs `python -m sidecar.fuse.daemon`, which imports from its working directory
    # first: from a checkout it would run that checkout's code whatever PYTHONPATH says.
    os.chdir(work)
    layout = layout_in(work, ns.files)
    sources = [(name, str(Path(path).resolve())) for name, path in
               (s.split("=", 1) for s in ns.source or [f"this={HERE.parent}"])]
    ext4 = work / "ext4"
    rows = []
    for r in range(ns.rounds):
        ls = timed(f"ls {ext4 / layout.biggest_folder} > /dev/null")[0]
        find, out = timed(f"find {ext4} -type f | wc -l")
        rows.append([str(r + 1), "ext4", "-", f"{ls:.2f}", f"{find:.2f}", out.strip(), "-", "-", "-"])
        for name, path in sources:
            cache = work / f"cache-{name}"
            shutil.rmtree(cache, ignore_errors=True)
            mp = work / "mnt"
            env = {"DDA_REMOTE_STORAGE_URL": str(layout.remote_root), "PYTHONPATH": path}
            with Mounted(layout.repo, mp, cache, env) as m:
                rss_mount = m.rss_mb()
                cpu = cpu_seconds(m.pid)
                ls = timed(f"ls {mp / layout.biggest_folder} > /dev/null")[0]
                find, out = timed(f"find {mp} -type f | wc -l")
                cpu = cpu_seconds(m.pid) - cpu
                rows.append([str(r + 1), name, f"{m.seconds:.1f}", f"{ls:.2f}", f"{find:.2f}", out.strip(),
                             f"{cpu:.2f}", f"{rss_mount:.0f}", f"{m.rss_mb():.0f}"])
            print(" | ".join(rows[-1]), file=sys.stderr)
    head = ["round", "where", "mount s", "ls biggest s", "find -type f s", "files found", "daemon CPU s (ls+find)", "RSS after mount MB",
            "RSS after find MB"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
