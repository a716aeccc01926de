"""Cold `find -printf %s` of one big folder over HTTP, several code versions in one run,
interleaved (issue 11: 100k files, no size index, <= 30 s).

    python bench/headab.py --workdir /tmp/headab --files 100000 --source base=/path/a --source new=/path/b [--rounds 3]

The pieces are bench/scale.py's: the same nginx (a first-byte delay per request via Lua), in
its own network namespace behind a tbf-shaped veth pair (--shape, default 200mbit; needs root),
the same DVC-identical layout (tests/dvclayout.py, one folder; written once into --workdir and
reused), the same steps on a fresh mount with a fresh cache and no size index: `ls`, `find
-type f`, then the timed `find -printf %s`. Per mount: wall seconds, the daemon's CPU seconds
for the cold walk (/proc/PID/stat; steadier than wall time on a shared machine), requests
nginx saw. ext4 (the same files checked out) is timed in every round. Prints a markdown table
and the ratios of each source to the first one and to ext4.
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

from dvclayout import write_layout                                    # noqa: E402
from scale import DDA, Mounted, Shaped, ShapedRemoteServer, slow_nginx, timed   # noqa: E402
from servers import HttpRemoteServer                                  # noqa: E402


class ProfiledMount(Mounted):
    """`dda mount` in the foreground under cProfile (written to `out` when it exits)."""

    def __init__(self, repo: Path, mp: Path, cache: Path, env: dict[str, str], out: Path):
        super().__init__(repo, mp, cache, env)
        self.out = out

    def __enter__(self) -> "ProfiledMount":
        import subprocess

        self.mp.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", str(self.out), DDA, "mount",
                                      str(self.repo), str(self.mp)],
                                     env={**os.environ, **self.env, "DDA_CACHE_DIR": str(self.cache)})
        started = time.perf_counter()
        while not os.path.ismount(self.mp):
            if self.proc.poll() is not None:
                raise RuntimeError("the profiled mount exited")
            time.sleep(0.1)
        self.seconds, self.pid = time.perf_counter() - started, self.proc.pid
        return self

    def __exit__(self, *exc: object) -> None:
        import subprocess

        subprocess.run(["fusermount3", "-u", str(self.mp)], capture_output=True)
        self.proc.wait(60)


def tree_cpu(pid: int) -> float:
    """CPU seconds of process `pid` and all its descendants (nginx's workers)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return total


def idle_seconds() -> float:
    """Idle CPU seconds of the whole machine so far (/proc/stat: idle + iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--source", action="append", help="NAME=PATH of a tree with a sidecar package")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttfb-ms", type=int, default=20)
    parser.add_argument("--profile", help="write a cProfile of each source's daemon into this folder")
    parser.add_argument("--shape", default="200mbit", help="tbf rate of the link to the remote ('' for loopback)")
    ns = parser.parse_args()
    work = Path(ns.workdir).resolve() / f"n{ns.files}"
    work.mkdir(parents=True, exist_ok=True)
    # `python -m sidecar.fuse.daemon` imports from its working directory first: run from here,
    # so PYTHONPATH alone picks the code under test.
    os.chdir(work)
    sources = [(name, str(Path(path).resolve())) for name, path in
               (s.split("=", 1) for s in ns.source or [f"this={HERE.parent}"])]
    rows: list[list[str]] = []
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in sources}
    ext4_times: list[float] = []
    shaped = Shaped(ns.shape) if ns.shape else None
    if shaped:
        shaped.__enter__()
    try:
        srv = ShapedRemoteServer(work / "nginx", shaped) if shaped else HttpRemoteServer(work / "nginx")
        slow_nginx(srv, ns.ttfb_ms)
        saved = work / "layout.pickle"
        if saved.exists():
            layout = pickle.loads(saved.read_bytes())
        else:
            started = time.perf_counter()
            layout = write_layout(work / "layout", folders=1, per_folder=ns.files, remote=srv.root,
                                  checkout=work / "ext4")
            saved.write_bytes(pickle.dumps(layout))
            print(f"layout of {ns.files:,} files written in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        ext4 = work / "ext4" / layout.biggest_folder
        srv.start()
        try:
            for r in range(ns.rounds):
                took, out = timed(f"find {ext4} -type f -printf '%f %s\\n'")
                expected = sorted(out.splitlines())
                ext4_times.append(took)
                rows.append([str(r + 1), "ext4", f"{took:.2f}", "-", "-", "-", "-", "-", f"{os.getloadavg()[0]:.1f}"])
                order = sources if r % 2 == 0 else sources[::-1]     # neither always goes first
                for name, path in order:
                    cache = work / f"cache-{name}"
                    shutil.rmtree(cache, ignore_errors=True)
                    mp = work / "mnt"
                    env = {"DDA_REMOTE_STORAGE_URL": srv.url, "DDA_REMOTE_STORAGE_USER": srv.user,
                           "DDA_REMOTE_STORAGE_PASSWORD": srv.password, "DDA_REMOTE_STORAGE_METHOD": "PUT",
                           "PYTHONPATH": path}
                    mounted = ProfiledMount(layout.repo, mp, cache, env, Path(ns.profile).resolve() / f"{name}-{r}.prof") \
                        if ns.profile else Mounted(layout.repo, mp, cache, env)
                    with mounted as m:
                        folder = mp / layout.biggest_folder
                        timed(f"ls {folder} > /dev/null")
                        timed(f"find {mp} -type f | wc -l")
                        mark = srv.mark()
                        cpu, ngx, idle = m.cpu_seconds(), tree_cpu(srv._nginx.proc.pid), idle_seconds()
                        took, out = timed(f"find {folder} -type f -printf '%f %s\\n'")
                        cpu = m.cpu_seconds() - cpu
                        ngx, idle = tree_cpu(srv._nginx.proc.pid) - ngx, idle_seconds() - idle
                        req = len(srv.requests_since(mark))
                    if sorted(out.splitlines()) != expected:    # sizes shown must be the files' own
                        raise SystemExit(f"{name}: sizes differ from the ext4 checkout's")
                    results[name].append((took, cpu))
                    rows.append([str(r + 1), name, f"{took:.2f}", f"{cpu:.2f}", f"{cpu / ns.files * 1e6:.0f}",
                                 str(req), f"{ngx:.2f}", f"{idle:.2f}", f"{os.getloadavg()[0]:.1f}"])
                    print(" | ".join(rows[-1]), file=sys.stderr)
        finally:
            srv.stop()
    finally:
        if shaped:
            shaped.__exit__()
    head = ["round", "where", "cold find -printf %s s", "daemon CPU s", "CPU us/file", "requests", "nginx CPU s",
            "machine idle CPU s", "load avg"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    first = sources[0][0]
    print()
    for name, _ in sources:
        walls = sorted(t for t, _ in results[name])
        cpus = sorted(c for _, c in results[name])
        line = (f"{name}: wall median {walls[len(walls) // 2]:.2f} s (min {walls[0]:.2f}), daemon CPU median "
                f"{cpus[len(cpus) // 2]:.2f} s, {walls[len(walls) // 2] / sorted(ext4_times)[len(ext4_times) // 2]:.0f}x ext4")
        if name != first:
            ratios = [a[0] / b[0] for a, b in zip(results[name], results[first])]
            cratios = [a[1] / b[1] for a, b in zip(results[name], results[first])]
            line += (f"; per round vs {first}: wall " + ", ".join(f"{x:.2f}x" for x in ratios)
                     + "; CPU " + ", ".join(f"{x:.2f}x" for x in cratios))
        print(line)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
