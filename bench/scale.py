"""Scale benchmark (issue 11, item 6): big DVC trees through `dda mount`, beside ext4, same run.

    python bench/scale.py --files 10000 --files 100000 [--million] [--ttfb-ms 20] [--kinds http,local]

Per size: a DVC-identical layout written directly (tests/dvclayout.py: objects, .dir manifest,
.dvc file exactly as DVC writes them; 10k and 100k in one folder, 1M as 1,000 x 1,000), the
same files checked out on the local disk (the ext4 baseline), and for each remote kind
(nginx over HTTP with a first-byte delay per request via Lua, or a local directory):

- mount time (`dda mount --daemon`, fresh cache), then `ls` of the biggest folder,
  `find -type f`, `find -printf %s` (cold), daemon RSS (VmRSS); 1,000 random reads on a fresh
  mount with a fresh cache (before any walk: no size known), beside the hooks' (fresh cache);
- a remount on the same cache: `find -printf %s` again (requests should be 0);
- HTTP only: `dda sizes publish`, then a fresh cache: `find -printf %s` with the index.

Requests are counted from nginx's access log. With --shape RATE (default 200mbit; "" for
none) nginx runs in its own network namespace behind a veth pair with a tbf qdisc of that
rate on both ends (needs root and iproute2), so the client reaches it over a link as slow as a
real one; everything started is stopped at the end. Results: a markdown table on stdout (and
bench/scale-results.md).
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
from servers import NGINX, HttpRemoteServer  # noqa: E402

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


class Shaped:
    """A network namespace holding the remote, reached over a veth pair shaped by tbf."""

    made = 0

    def __init__(self, rate: str):
        Shaped.made += 1
        tag = f"{os.getpid() % 10000}{Shaped.made}"
        self.rate, self.ns = rate, f"ddascale{tag}"
        self.host_if, self.ns_if = f"dsh{tag}", f"dsp{tag}"
        self.host_ip, self.ns_ip = "10.231.77.1", "10.231.77.2"

    def _sh(self, *cmd: str, ns: bool = False) -> None:
        subprocess.run((["ip", "netns", "exec", self.ns] if ns else []) + list(cmd), check=True, capture_output=True)

    def __enter__(self) -> "Shaped":
        self._sh("ip", "netns", "add", self.ns)
        try:
            self._sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._sh("ip", "link", "set", self.ns_if, "netns", self.ns)
            self._sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            self._sh("ip", "link", "set", self.host_if, "up")
            self._sh("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, ns=True)
            self._sh("ip", "link", "set", self.ns_if, "up", ns=True)
            self._sh("ip", "link", "set", "lo", "up", ns=True)
            for dev, ns in ((self.host_if, False), (self.ns_if, True)):
                self._sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate, "burst", "256kb",
                         "latency", "100ms", ns=ns)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)   # the pair goes with it
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


class ShapedRemoteServer(HttpRemoteServer):
    """The test nginx remote, started inside `shaped`'s namespace and reached at its address."""

    def __init__(self, workdir: Path, shaped: Shaped):
        super().__init__(workdir)
        self.shaped = shaped
        conf = self._nginx.conf.read_text()
        self._nginx.conf.write_text(conf.replace(f"listen 127.0.0.1:{self.port};", f"listen {shaped.ns_ip}:{self.port};"))

    @property
    def url(self) -> str:
        return f"http://{self.shaped.ns_ip}:{self.port}/dvc"

    def start(self) -> "ShapedRemoteServer":
        import socket

        n = self._nginx
        n._stderr = open(n.stderr_path, "ab")
        n.proc = subprocess.Popen(["ip", "netns", "exec", self.shaped.ns, NGINX, "-c", str(n.conf), "-p", str(n.workdir),
                                   "-e", str(n.error_log)], stdout=n._stderr, stderr=n._stderr,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        for _ in range(200):
            try:
                with socket.create_connection((self.shaped.ns_ip, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx in {self.shaped.ns} did not start: {n.error_log.read_text()[-500:]}")


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

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the daemon used so far (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mp)], capture_output=True)
        time.sleep(0.5)


def reads(root: Path, rels: list[str]) -> float:
    started = time.perf_counter()
    for rel in rels:
        with open(root / rel, "rb") as f:
            f.read()
    return time.perf_counter() - started


def hooks_reads(repo: Path, rels: list[str], cache: Path, env: dict[str, str], work: Path) -> float:
    """The same reads through the in-process hooks (`install_hooks()`, a fresh cache), in a
    child process: seconds for the reads alone (opening the repository is not counted)."""
    root = work / "hooks-root"
    root.mkdir(parents=True, exist_ok=True)
    sample = work / "sample.txt"
    sample.write_text("\n".join(rels))
    code = ("import sys, time\nfrom sidecar import install_hooks\n"
            f"install_hooks({str(repo)!r}, root={str(root)!r}, cache_dir={str(cache)!r})\n"
            f"rels = open({str(sample)!r}).read().split()\nt = time.perf_counter()\n"
            f"for r in rels:\n    f = open({str(root)!r} + '/' + r, 'rb'); f.read(); f.close()\n"
            "print(time.perf_counter() - t)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600,
                         env={**os.environ, **env, "DDA_CACHE_DIR": str(cache)})
    if out.returncode != 0:
        raise RuntimeError(f"hooks reads: {out.stderr.strip()[-500:]}")
    return float(out.stdout.split()[-1])


def bench_one(n: int, kinds: list[str], ttfb_ms: int, work: Path, rows: list[list[str]],
              shaped: Shaped | None = None) -> None:
    folders, per = (1000, n // 1000) if n >= 1_000_000 else (1, n)
    srv = ShapedRemoteServer(work / "nginx", shaped) if shaped else HttpRemoteServer(work / "nginx")
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
                 "-", "-", f"{base['reads']:.2f}", "-", "-"])
    srv.start()
    try:
        for kind in kinds:
            env = {"DDA_REMOTE_STORAGE_URL": srv.url, "DDA_REMOTE_STORAGE_USER": srv.user,
                   "DDA_REMOTE_STORAGE_PASSWORD": srv.password, "DDA_REMOTE_STORAGE_METHOD": "PUT"} \
                if kind == "http" else {"DDA_REMOTE_STORAGE_URL": str(srv.root)}
            cache = work / f"cache-{kind}"
            mp = work / f"mnt-{kind}"
            counted = kind == "http"
            # Random reads first, on a fresh mount with a fresh cache (no size known): what a
            # training reader meets, and what the hooks' reads (a fresh cache too) are held to.
            with Mounted(layout.repo, mp, work / f"cache-reads-{kind}", env):
                rd = reads(mp, sample)
            mark = srv.mark() if counted else 0
            with Mounted(layout.repo, mp, cache, env) as m:
                req_mount = len(srv.requests_since(mark)) if counted else 0
                mark = srv.mark() if counted else 0
                ls = timed(f"ls {mp / biggest} > /dev/null")[0]
                find = timed(f"find {mp} -type f | wc -l")[0]
                req_names = len(srv.requests_since(mark)) if counted else 0
                cpu = m.cpu_seconds()
                printf, out = timed(f"find {mp / biggest} -type f -printf '%s\\n' | wc -l")
                cpu = m.cpu_seconds() - cpu
                req_cold = (len(srv.requests_since(mark)) if counted else 0) - req_names
                # on a shared machine the wall time follows the load; the daemon's CPU does not
                print(f"[{n}] {kind} cold find -printf: {printf:.2f} s, daemon CPU {cpu:.2f} s "
                      f"({cpu / per * 1e6:.0f} us per file)", file=sys.stderr)
                rss = m.rss_mb()
                mount_s = m.seconds
            mark = srv.mark() if counted else 0
            with Mounted(layout.repo, mp, cache, env):
                again = timed(f"find {mp / biggest} -type f -printf '%s\\n' | wc -l")[0]
            req_again = len(srv.requests_since(mark)) if counted else 0
            hooks = hooks_reads(layout.repo, sample, work / f"cache-hooks-{kind}", env, work) if kind == "local" else None
            rows.append([f"{n:,}", kind, f"{mount_s:.2f} ({req_mount} req)", f"{ls:.2f}",
                         f"{find:.2f} ({req_names} req)", f"{printf:.2f} ({req_cold} req)",
                         f"{again:.2f} ({req_again} req)", "", f"{rd:.2f}",
                         f"{hooks:.2f}" if hooks is not None else "", f"{rss:.0f}"])
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
    parser.add_argument("--shape", default="200mbit", help="tbf rate of the link to the remote ('' for loopback)")
    ns = parser.parse_args()
    rows: list[list[str]] = []
    for n in ns.files or [10_000]:
        work = Path(ns.workdir or tempfile.mkdtemp(prefix="dda-scale-")) / f"n{n}"
        try:
            if ns.shape:
                with Shaped(ns.shape) as shaped:
                    bench_one(n, ns.kinds.split(","), ns.ttfb_ms, work, rows, shaped)
            else:
                bench_one(n, ns.kinds.split(","), ns.ttfb_ms, work, rows)
        finally:
            if not ns.workdir:
                shutil.rmtree(work.parent, ignore_errors=True)
    head = ["files", "where", "mount s", "ls biggest s", "find -type f s", "find -printf %s cold s",
            "after remount s", "with size index s", "1,000 reads s", "hooks: 1,000 reads s", "RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    link = f"a {ns.shape} tbf link in a network namespace" if ns.shape else "loopback"
    (HERE / "scale-results.md").write_text(
        f"# Scale benchmark (bench/scale.py)\n\nfirst byte {ns.ttfb_ms} ms (nginx, Lua) over {link}, "
        f"{os.cpu_count()} CPUs\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
