"""Scale benchmark (issue 11, item 6): big DVC trees through `dda mount`, beside ext4, same run.

    python bench/scale.py --files 10000 --files 100000 [--million] [--ttfb-ms 20] [--kinds http,local]

Per size: a DVC-identical layout written directly (tests/dvclayout.py: objects, .dir manifest,
.dvc file exactly as DVC writes them; 10k and 100k in one folder, 1M as 1,000 x 1,000), the
same files checked out on the local disk (the ext4 baseline), and for each remote kind
(nginx over HTTP with a first-byte delay per request via Lua, or a local directory):

- mount time (`dda mount --daemon`, fresh cache), then `ls` of the biggest folder,
  `find -type f`, `find -printf %s` (cold), 1,000 random reads, daemon RSS (VmRSS);
- a remount on the same cache: `find -printf %s` again (requests should be 0);
- HTTP only: `dda sizes publish`, then a fresh cache: `find -printf %s` with the index.

Requests are counted from nginx's access log. No namespace or traffic shaping here (the
first-byte delay is the dominant cost for small objects); everything started is stopped at
the end. Results: a markdown table on stdout (and bench/scale-results.md).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from dvclayout import write_layout          # noqa: E402
from mounting import daemon_pid             # noqa: E402
from servers import HttpRemoteServer         # noqa: E402

DDA = shutil.which("dda") or str(Path(sys.executable).parent / "dda")
LUA = ["/usr/lib/nginx/modules/ndk_http_module.so", "/usr/lib/nginx/modules/ngx_http_lua_module.so"]


def timed(cmd: str, cwd: Path | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=cwd, timeout=7200)
    took = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{cmd}: {out.stderr.strip()[:300]}")
    return took, out.stdout


def slow_nginx(srv: HttpRemoteServer, ttfb_ms: int) -> None:
    """Give the test nginx a first-byte delay on every request (Lua), before it starts."""
    conf = srv._nginx.conf.read_text()
    conf = "".join(f"load_module {m};\n" for m in LUA) + conf
    if ttfb_ms:
        conf = conf.replace("location /dvc/ {", f"location /dvc/ {{\n            access_by_lua_block "
                                                f"{{ ngx.sleep({ttfb_ms / 1000:.3f}) }}", 1)
    srv._nginx.conf.write_text(conf)


class Mounted:
    def __init__(self, repo: Path, mp: Path, cache: Path, env: dict[str, str]):
        self.repo, self.mp, self.cache, self.env = repo, mp, cache, env
        self.seconds = 0.0
        self.pid = 0

    def __enter__(self) -> "Mounted":
        self.mp.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        subprocess.run([DDA, "mount", str(self.repo), str(self.mp), "--daemon"], check=True,
                       env={**os.environ, **self.env, "DDA_CACHE_DIR": str(self.cache)}, timeout=3600,
                       capture_output=True)
        self.seconds = time.perf_counter() - started
        self.pid = daemon_pid(self.mp)
        return self

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (FileNotFoundError, ValueError):
            pass
        return float("nan")

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mp)], capture_output=True)
        time.sleep(0.5)


def reads(root: Path, rels: list[str]) -> float:
    started = time.perf_counter()
    for rel in rels:
        with open(root / rel, "rb") as f:
            f.read()
    return time.perf_counter() - started


def bench_one(n: int, kinds: list[str], ttfb_ms: int, work: Path, rows: list[list[str]]) -> None:
    folders, per = (1000, n // 1000) if n >= 1_000_000 else (1, n)
    srv = HttpRemoteServer(work / "nginx")
    slow_nginx(srv, ttfb_ms)
    t0 = time.perf_counter()
    layout = write_layout(work / "layout", folders=folders, per_folder=per, remote=srv.root,
                          checkout=work / "ext4")
    print(f"[{n}] layout written in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    ext4 = work / "ext4"
    biggest = layout.biggest_folder
    rng = random.Random(1)
    all_rels = [f"{biggest}/f{i:06d}.bin" for i in range(per)]
    sample = rng.sample(all_rels, min(1000, len(all_rels)))
    base = {
        "ls": timed(f"ls {ext4 / biggest} > /dev/null")[0],
        "find": timed(f"find {ext4} -type f | wc -l")[0],
        "printf": timed(f"find {ext4 / biggest} -type f -printf '%s\\n' | wc -l")[0],
        "reads": reads(ext4, sample),
    }
    rows.append([f"{n:,}", "ext4", "-", f"{base['ls']:.2f}", f"{base['find']:.2f}", f"{base['printf']:.2f}",
                 "-", "-", f"{base['reads']:.2f}", "-"])
    srv.start()
    try:
        for kind in kinds:
            env = {"DDA_REMOTE_STORAGE_URL": srv.url, "DDA_REMOTE_STORAGE_USER": srv.user,
                   "DDA_REMOTE_STORAGE_PASSWORD": srv.password, "DDA_REMOTE_STORAGE_METHOD": "PUT"} \
                if kind == "http" else {"DDA_REMOTE_STORAGE_URL": str(srv.root)}
            cache = work / f"cache-{kind}"
            mp = work / f"mnt-{kind}"
            counted = kind == "http"
            mark = srv.mark() if counted else 0
            with Mounted(layout.repo, mp, cache, env) as m:
                req_mount = len(srv.requests_since(mark)) if counted else 0
                mark = srv.mark() if counted else 0
                ls = timed(f"ls {mp / biggest} > /dev/null")[0]
                find = timed(f"find {mp} -type f | wc -l")[0]
                req_names = len(srv.requests_since(mark)) if counted else 0
                printf, out = timed(f"find {mp / biggest} -type f -printf '%s\\n' | wc -l")
                req_cold = (len(srv.requests_since(mark)) if counted else 0) - req_names
                rd = reads(mp, sample)
                rss = m.rss_mb()
                mount_s = m.seconds
            mark = srv.mark() if counted else 0
            with Mounted(layout.repo, mp, cache, env):
                again = timed(f"find {mp / biggest} -type f -printf '%s\\n' | wc -l")[0]
            req_again = len(srv.requests_since(mark)) if counted else 0
            rows.append([f"{n:,}", kind, f"{mount_s:.2f} ({req_mount} req)", f"{ls:.2f}",
                         f"{find:.2f} ({req_names} req)", f"{printf:.2f} ({req_cold} req)",
                         f"{again:.2f} ({req_again} req)", "", f"{rd:.2f}", f"{rss:.0f}"])
            if kind == "http":
                pub = subprocess.run([DDA, "sizes", "publish", str(layout.repo), "data"], capture_output=True,
                                     text=True, env={**os.environ, **env, "DDA_CACHE_DIR": str(cache)})
                if pub.returncode != 0:
                    raise RuntimeError(pub.stderr)
                mark = srv.mark()
                with Mounted(layout.repo, mp, work / "cache-indexed", env):
                    indexed = timed(f"find {mp / biggest} -type f -printf '%s\\n' | wc -l")[0]
                req_idx = len(srv.requests_since(mark))
                rows[-1][7] = f"{indexed:.2f} ({req_idx} req)"
            print(f"[{n}] {kind} done", file=sys.stderr)
    finally:
        srv.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, action="append", help="tree size (repeatable); 1000000 = 1,000 x 1,000")
    parser.add_argument("--kinds", default="http,local")
    parser.add_argument("--ttfb-ms", type=int, default=20)
    parser.add_argument("--workdir", help="keep the data here (default: a temporary directory)")
    ns = parser.parse_args()
    rows: list[list[str]] = []
    for n in ns.files or [10_000]:
        work = Path(ns.workdir or tempfile.mkdtemp(prefix="dda-scale-")) / f"n{n}"
        try:
            bench_one(n, ns.kinds.split(","), ns.ttfb_ms, work, rows)
        finally:
            if not ns.workdir:
                shutil.rmtree(work.parent, ignore_errors=True)
    head = ["files", "where", "mount s", "ls biggest s", "find -type f s", "find -printf %s cold s",
            "after remount s", "with size index s", "1,000 reads s", "RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    (HERE / "scale-results.md").write_text(
        f"# Scale benchmark\n\nfirst byte {ns.ttfb_ms} ms (nginx, Lua), {os.cpu_count()} CPUs\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
