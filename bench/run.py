"""Benchmark of `dda mount` over an emulated WAN link, with baselines in the same run.

    bench/run.sh [--quick] [--rate-mbit 200] [--ttfb-ms 20] [--images 2000] [--large-mb 1024] ...

Network: a namespace `ddabench` joined to the host by a veth pair (host 169.254.231.1/30,
namespace 169.254.231.2/30), both ends shaped with `tbf rate R burst 256kb latency 50ms`.
nginx runs inside the namespace and serves the data sets (DVC remote layout and a by-path
tree for rclone) with a Lua first-byte delay on every request and Range support; its access
log counts requests and body bytes per case.

Everything started here (namespace, nginx, mounts, rclone, helper processes) is removed at
the end, also on errors and Ctrl-C. Results: a table on stdout and bench/results.md.
"""
from __future__ import annotations

import argparse
import atexit
import datetime as dt
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = ROOT / ".venv" / "bin"
PY = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
DDA = str(VENV_BIN / "dda")
DVC = str(VENV_BIN / "dvc")
RCLONE = str(VENV_BIN / "rclone") if (VENV_BIN / "rclone").exists() else (shutil.which("rclone") or "rclone")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
FUSERMOUNT = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
LUA_MODULES = ["/usr/lib/nginx/modules/ndk_http_module.so", "/usr/lib/nginx/modules/ngx_http_lua_module.so"]

NS = "ddabench"
VETH_HOST, VETH_NS = "ddab0", "ddab1"
HOST_IP, NS_IP = "169.254.231.1", "169.254.231.2"
MB = 1_000_000

# --------------------------------------------------------------------------- cleanup registry

_CLEANUPS: list[tuple[str, object]] = []   # LIFO


def on_cleanup(name: str, fn) -> None:  # type: ignore[no-untyped-def]
    _CLEANUPS.append((name, fn))


def cleanup_all() -> None:
    while _CLEANUPS:
        name, fn = _CLEANUPS.pop()
        try:
            fn()  # type: ignore[operator]
        except Exception as err:  # keep going: everything else must still go
            print(f"bench: cleanup {name}: {err}", file=sys.stderr)


atexit.register(cleanup_all)


def _signal_exit(signum, _frame):  # type: ignore[no-untyped-def]
    raise KeyboardInterrupt(f"signal {signum}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*args: str, check: bool = True, quiet: bool = True, env: dict | None = None, cwd: Path | None = None,
       timeout: float | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    if not quiet and proc.stdout:
        print(proc.stdout, end="")
    return proc


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def kill_proc(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(timeout)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False


def force_unmount(path: Path) -> None:
    if not is_mounted(path):
        return
    subprocess.run([FUSERMOUNT, "-u", "-z", str(path)], capture_output=True)
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --------------------------------------------------------------------------- network

def net_down() -> None:
    subprocess.run(["ip", "netns", "pids", NS], capture_output=True)
    if NS in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        # processes still inside (only ours can be there): stop them, then delete the namespace
        pids = subprocess.run(["ip", "netns", "pids", NS], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    if Path(f"/sys/class/net/{VETH_HOST}").exists():
        subprocess.run(["ip", "link", "del", VETH_HOST], capture_output=True)


def net_up(rate_mbit: float) -> None:
    net_down()  # leftovers of an interrupted run
    on_cleanup("network namespace", net_down)
    tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", "256kb", "latency", "50ms"]
    sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS)
    sh("ip", "link", "set", VETH_NS, "netns", NS)
    sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", VETH_HOST)
    sh("ip", "link", "set", VETH_HOST, "up")
    nsx = ["ip", "netns", "exec", NS]
    sh(*nsx, "ip", "link", "set", "lo", "up")
    sh(*nsx, "ip", "addr", "add", f"{NS_IP}/30", "dev", VETH_NS)
    sh(*nsx, "ip", "link", "set", VETH_NS, "up")
    sh("tc", "qdisc", "add", "dev", VETH_HOST, "root", *tbf)
    sh(*nsx, "tc", "qdisc", "add", "dev", VETH_NS, "root", *tbf)


def qdisc_stats() -> str:
    a = sh("tc", "-s", "qdisc", "show", "dev", VETH_HOST, check=False).stdout
    b = sh("ip", "netns", "exec", NS, "tc", "-s", "qdisc", "show", "dev", VETH_NS, check=False).stdout
    return f"host {VETH_HOST}:\n{a}namespace {VETH_NS}:\n{b}"


# --------------------------------------------------------------------------- nginx

@dataclass
class Nginx:
    workdir: Path
    data_root: Path
    port: int
    ttfb_ms: float
    proc: subprocess.Popen | None = None

    @property
    def access_log(self) -> Path:
        return self.workdir / "logs" / "access.log"

    def url(self, rel: str) -> str:
        return f"http://{NS_IP}:{self.port}/data/{rel}"

    def start(self) -> None:
        w = self.workdir
        for sub in ("logs", "tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        delay = f"access_by_lua_block {{ ngx.sleep({self.ttfb_ms / 1000.0:.4f}) }}" if self.ttfb_ms > 0 else ""
        conf = w / "nginx.conf"
        conf.write_text("\n".join(f"load_module {m};" for m in LUA_MODULES) + f"""
user root;
worker_processes 2;
daemon off;
pid {w}/nginx.pid;
error_log {w}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format bench '$msec|$request_method|$uri|$status|$body_bytes_sent|$request_time|$http_range|$connection';
    access_log {self.access_log} bench;
    client_body_temp_path {w}/tmp/body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 120;
    keepalive_requests 1000000;
    server {{
        listen {NS_IP}:{self.port} reuseport;
        {delay}
        location /data/ {{
            alias {self.data_root}/;
            autoindex on;
            autoindex_exact_size on;
        }}
    }}
}}
""")
        errlog = open(w / "logs" / "stderr.log", "wb")
        self.proc = subprocess.Popen(["ip", "netns", "exec", NS, NGINX, "-p", str(w), "-c", str(conf)],
                                     stdout=errlog, stderr=subprocess.STDOUT, start_new_session=True)
        on_cleanup("nginx", self.stop)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", self.url("")],
                               capture_output=True, text=True)
            if r.stdout.strip() in ("200", "403", "404"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"nginx did not start: {(w / 'logs' / 'stderr.log').read_text()[-3000:]}"
                           f"{(w / 'logs' / 'error.log').read_text()[-3000:] if (w / 'logs' / 'error.log').exists() else ''}")

    def stop(self) -> None:
        if self.proc is not None:
            kill_proc(self.proc)

    def mark(self) -> int:
        return len(self._lines())

    def _lines(self) -> list[str]:
        try:
            data = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return data.splitlines() if data.endswith("\n") else data.splitlines()[:-1]

    def since(self, mark: int) -> dict:
        # nginx logs after the response is sent: wait until the log stops growing
        lines = self._lines()
        stable = time.monotonic()
        deadline = stable + 2.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            new = self._lines()
            if len(new) != len(lines):
                lines, stable = new, time.monotonic()
            elif time.monotonic() - stable > 0.3:
                break
        out = {"requests": 0, "bytes": 0, "methods": {}, "status": {}, "ranged": 0, "connections": set()}
        for line in lines[mark:]:
            parts = line.split("|")
            if len(parts) < 8:
                continue
            _, method, _uri, status, sent, _rt, rng, conn = parts[:8]
            out["requests"] += 1
            out["bytes"] += int(sent) if sent.isdigit() else 0
            out["methods"][method] = out["methods"].get(method, 0) + 1
            out["status"][status] = out["status"].get(status, 0) + 1
            out["ranged"] += rng not in ("-", "")
            out["connections"].add(conn)
        out["connections"] = len(out["connections"])
        return out


# --------------------------------------------------------------------------- data sets

GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@dda.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@dda.invalid"}


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(GIT_ENV)
    env["DVC_NO_ANALYTICS"] = "1"
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


@dataclass
class DataSet:
    name: str
    root: Path          # data_root/name
    repo: Path
    remote: Path
    bypath: Path | None
    files: list[str] = field(default_factory=list)   # repo-relative paths of the data files
    total_bytes: int = 0


def build_dataset(data_root: Path, name: str, port: int, make_files) -> DataSet:  # type: ignore[no-untyped-def]
    """A real DVC 3 repository (dvc init/add/push) whose default remote `storage` is the
    nginx URL of `remote/`. Cached across runs under data_root/name (marker file `.complete`)."""
    root = data_root / name
    repo, remote, bypath = root / "repo", root / "remote", root / "bypath"
    manifest = root / "files.json"
    if not (root / ".complete").exists():
        if root.exists():
            shutil.rmtree(root)
        log(f"building data set {name} (real dvc add + push; cached for later runs)")
        repo.mkdir(parents=True)
        remote.mkdir()
        env = _env()
        sh("git", "init", "-q", "-b", "main", cwd=repo, env=env)
        sh(DVC, "init", "-q", cwd=repo, env=env)
        sh(DVC, "config", "core.analytics", "false", cwd=repo, env=env)
        sh(DVC, "remote", "add", "-d", "storage", f"http://{NS_IP}:{port}/data/{name}/remote", cwd=repo, env=env)
        sh(DVC, "remote", "add", "--local", "push", str(remote), cwd=repo, env=env)
        targets, files = make_files(repo)
        for t in targets:
            sh(DVC, "add", "-q", t, cwd=repo, env=env, timeout=1800)
        sh(DVC, "push", "-q", "-r", "push", "-j", "16", *[t + ".dvc" for t in targets], cwd=repo, env=env, timeout=1800)
        sh("git", "add", "-A", cwd=repo, env=env)
        sh("git", "commit", "-q", "-m", f"bench data set {name}", cwd=repo, env=env)
        # the by-path tree for rclone: hard links to the workspace copies
        total = 0
        for rel in files:
            src = repo / rel
            dst = bypath / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
            total += src.stat().st_size
        shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)   # only the remote is needed
        manifest.write_text(json.dumps({"files": files, "total_bytes": total}))
        (root / ".complete").write_text("ok\n")
    meta = json.loads(manifest.read_text())
    return DataSet(name, root, repo, remote, bypath, meta["files"], meta["total_bytes"])


def image_set(data_root: Path, port: int, n: int, lo: int, hi: int, seed: int = 7) -> DataSet:
    def make(repo: Path):  # type: ignore[no-untyped-def]
        rng = random.Random(seed)
        files = []
        for i in range(n):
            label = "cat" if i % 2 else "dog"
            rel = f"data/images/{label}s/{label}_{i:05d}.jpg"
            p = repo / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rng.randbytes(rng.randint(lo, hi)))
            files.append(rel)
        return ["data/images"], files

    return build_dataset(data_root, f"images-{n}-{lo}-{hi}-s{seed}", port, make)


def large_set(data_root: Path, port: int, size_mb: int) -> DataSet:
    def make(repo: Path):  # type: ignore[no-untyped-def]
        rel = "data/large.bin"
        p = repo / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        left = size_mb * 1024 * 1024
        with open(p, "wb") as f:
            while left:
                n = min(left, 8 << 20)
                f.write(os.urandom(n))
                left -= n
        return [rel], [rel]

    return build_dataset(data_root, f"large-{size_mb}MiB", port, make)


# --------------------------------------------------------------------------- readers

def run_readers(mode: str, lists: list[list[str]], tmp: Path, timeout: float) -> list[dict]:
    """Start one reader process per list, release them together, collect their JSON."""
    procs = []
    try:
        for i, paths in enumerate(lists):
            lf = tmp / f"list-{i}.txt"
            lf.write_text("\n".join(paths) + "\n")
            procs.append(subprocess.Popen([PY, str(HERE / "reader.py"), mode, str(lf)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, start_new_session=True))
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if line.strip() != "ready":
                raise RuntimeError(f"reader did not start: {line!r}")
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        results = []
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_proc(p)
                raise RuntimeError(f"reader timed out after {timeout:.0f}s (a hang?)")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            kill_proc(p)


def shuffled(paths: list[str], seed: int) -> list[str]:
    order = list(paths)
    random.Random(seed).shuffle(order)
    return order


def split(order: list[str], readers: int) -> list[list[str]]:
    """Round-robin shares of one shuffled order, as a DataLoader's workers take batches."""
    return [order[i::readers] for i in range(readers)]


def epoch(base: Path, rels: list[str], readers: int, tmp: Path, seed: int, timeout: float) -> dict:
    order = [str(base / r) for r in shuffled(rels, seed)]
    res = run_readers("read", split(order, readers), tmp, timeout)
    start = min(r["start"] for r in res)
    end = max(r["end"] for r in res)
    return {"seconds": end - start, "bytes": sum(r["bytes"] for r in res), "files": sum(r["files"] for r in res),
            "errors": sum(r["n_errors"] for r in res), "error_samples": [e for r in res for e in r["errors"]][:5],
            "slowest_file_s": max(r["slowest_s"] for r in res),
            "per_reader_s": [round(r["end"] - r["start"], 2) for r in res]}


def mepoch(mnt, *args) -> dict:  # type: ignore[no-untyped-def]
    """An epoch through a mount, with the CPU seconds its serving process used meanwhile."""
    c0 = mnt.cpu()
    res = epoch(*args)
    c1 = mnt.cpu()
    res["server_cpu_s"] = None if c0 is None or c1 is None else round(c1 - c0, 2)
    return res


# --------------------------------------------------------------------------- mounts

class DdaDaemon:
    def __init__(self, repo: Path, mountpoint: Path, cache_dir: Path, env: dict):
        self.repo, self.mountpoint, self.cache_dir, self.env = repo, mountpoint, cache_dir, env

    def __enter__(self) -> "DdaDaemon":
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        on_cleanup(f"mount {self.mountpoint}", lambda: force_unmount(self.mountpoint))
        t0 = time.monotonic()
        sh(DDA, "mount", str(self.repo), str(self.mountpoint), "--daemon", "--cache-dir", str(self.cache_dir),
           env=self.env, timeout=300)
        self.mount_s = time.monotonic() - t0
        self.pid = daemon_pid(self.mountpoint)
        return self

    def cpu(self) -> float | None:
        return proc_cpu(self.pid)

    def status(self) -> dict:
        try:
            return json.loads(os.getxattr(self.mountpoint, "user.dda.status"))
        except OSError as err:
            return {"error": str(err)}

    def __exit__(self, *exc: object) -> None:
        if is_mounted(self.mountpoint):
            r = sh(DDA, "unmount", str(self.mountpoint), check=False, timeout=60)
            if r.returncode != 0:
                log(f"dda unmount failed ({r.stderr.strip()}); forcing")
                force_unmount(self.mountpoint)
        # the daemon exits once unmounted; give it a moment so its cache is quiet
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _daemon_running(self.mountpoint):
            time.sleep(0.1)


def proc_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) a process has used so far."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_pid(mountpoint: Path) -> int | None:
    needle = os.fsencode(str(mountpoint))
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mount" in cmd and needle in cmd and any(c.endswith(b"dda") for c in cmd):
                return int(entry.name)
    return None


def _daemon_running(mountpoint: Path) -> bool:
    needle = os.fsencode(str(mountpoint))
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mount" in cmd and needle in cmd and any(c.endswith(b"dda") for c in cmd):
                return True
    return False


class HintMount:
    """The mount served in a helper process of ours (bench/hintmount.py) that takes hint calls."""

    def __init__(self, repo: Path, mountpoint: Path, cache_dir: Path, env: dict):
        self.repo, self.mountpoint, self.cache_dir, self.env = repo, mountpoint, cache_dir, env

    def __enter__(self) -> "HintMount":
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        on_cleanup(f"mount {self.mountpoint}", lambda: force_unmount(self.mountpoint))
        t0 = time.monotonic()
        self.log = open(self.cache_dir.parent / (self.cache_dir.name + "-hintmount.log"), "w")
        self.proc = subprocess.Popen([PY, str(HERE / "hintmount.py"), str(self.repo), str(self.mountpoint),
                                      str(self.cache_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=self.env, start_new_session=True, cwd=ROOT)
        on_cleanup("hint mount process", lambda: kill_proc(self.proc))
        reply = self._reply()
        if not reply.get("ok"):
            raise RuntimeError(f"in-process mount failed: {reply}")
        self.mount_s = time.monotonic() - t0
        self.pid = self.proc.pid
        return self

    def cpu(self) -> float | None:
        return proc_cpu(self.pid)

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"hint mount process ended (exit {self.proc.poll()}); see its log")
        return json.loads(line)

    def call(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._reply()

    def status(self) -> dict:
        return self.call({"cmd": "status"}).get("status", {})

    def __exit__(self, *exc: object) -> None:
        try:
            self.proc.stdin.write('{"cmd": "stop"}\n')  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            self.proc.wait(60)
        except Exception:
            kill_proc(self.proc)
        force_unmount(self.mountpoint)


class RcloneMount:
    def __init__(self, url: str, mountpoint: Path, cache_dir: Path):
        self.url, self.mountpoint, self.cache_dir = url, mountpoint, cache_dir

    def __enter__(self) -> "RcloneMount":
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        on_cleanup(f"rclone mount {self.mountpoint}", lambda: force_unmount(self.mountpoint))
        self.log = open(self.cache_dir.parent / (self.cache_dir.name + "-rclone.log"), "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [RCLONE, "mount", ":http:", str(self.mountpoint), "--http-url", self.url, "--read-only",
             "--vfs-cache-mode", "full", "--cache-dir", str(self.cache_dir), "--config", "/dev/null",
             "--allow-other", "--dir-cache-time", "1h", "--log-level", "NOTICE"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        on_cleanup("rclone process", lambda: kill_proc(self.proc))
        deadline = time.monotonic() + 30
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rclone mount did not come up: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.05)
        self.mount_s = time.monotonic() - t0
        self.pid = self.proc.pid
        return self

    def cpu(self) -> float | None:
        return proc_cpu(self.pid)

    def status(self) -> dict:
        return {}

    def __exit__(self, *exc: object) -> None:
        subprocess.run([FUSERMOUNT, "-u", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            kill_proc(self.proc)
        force_unmount(self.mountpoint)


def list_tree(base: Path) -> tuple[float, int]:
    """What a data loader does first: walk the directory (sizes included)."""
    t0 = time.monotonic()
    n = 0
    for dirpath, _dirs, files in os.walk(base):
        for f in files:
            os.stat(os.path.join(dirpath, f))
            n += 1
    return time.monotonic() - t0, n


# --------------------------------------------------------------------------- the run

@dataclass
class Row:
    case: str
    readers: int
    seconds: float | None
    nbytes: int
    files: int
    link_mb_s: float
    baseline: str = ""
    ratio: float | None = None
    server_bytes: int | None = None
    requests: int | None = None
    notes: str = ""
    errors: int = 0

    @property
    def mb_s(self) -> float | None:
        return self.nbytes / MB / self.seconds if self.seconds else None

    @property
    def files_s(self) -> float | None:
        return self.files / self.seconds if self.seconds and self.files else None

    @property
    def pct_link(self) -> float | None:
        return 100 * self.mb_s / self.link_mb_s if self.mb_s is not None else None


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(rows: list[Row], markdown: bool) -> str:
    head = ["case", "readers", "seconds", "MB/s", "files/s", "% link", "vs baseline", "server MB", "requests", "notes"]
    body = []
    for r in rows:
        ratio = f"{r.ratio:.2f}x {r.baseline}" if r.ratio is not None else (r.baseline or "-")
        body.append([r.case, str(r.readers), fmt(r.seconds, ".2f"), fmt(r.mb_s, ".1f"), fmt(r.files_s, ".0f"),
                     fmt(r.pct_link, ".0f"), ratio,
                     fmt(None if r.server_bytes is None else r.server_bytes / MB, ".1f"),
                     "-" if r.requests is None else str(r.requests),
                     (f"ERRORS {r.errors}; " if r.errors else "") + r.notes])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sets (about 2 minutes)")
    ap.add_argument("--rate-mbit", type=float, default=200.0, help="link rate, both directions (default 200)")
    ap.add_argument("--ttfb-ms", type=float, default=20.0, help="server first-byte delay per request (default 20)")
    ap.add_argument("--images", type=int, help="small files in the epoch set (default 2000; quick 500)")
    ap.add_argument("--min-kb", type=int, default=80)
    ap.add_argument("--max-kb", type=int, default=120)
    ap.add_argument("--large-mb", type=int, help="size of the large file in MiB (default 1024; quick 256)")
    ap.add_argument("--ttfb-files", type=int, help="cold files sampled for time to first byte (default 20)")
    ap.add_argument("--readers", type=int, default=4, help="reader processes of the parallel cases (default 4)")
    ap.add_argument("--dvc-jobs", type=int, default=16)
    ap.add_argument("--port", type=int, default=8231)
    ap.add_argument("--workdir", default="/tmp/ddabench", help="data sets (cached across runs) and scratch")
    ap.add_argument("--only", default="", help="comma list of case groups: local,dda,warm,hints,ttfb,large,rclone,dvc,link")
    ap.add_argument("--skip", default="", help="comma list of case groups to skip")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900, help="seconds one case may take before it counts as a hang")
    ap.add_argument("--out", default=str(HERE / "results.md"))
    args = ap.parse_args(argv)
    n_images = args.images or (500 if args.quick else 2000)
    large_mb = args.large_mb or (256 if args.quick else 1024)
    ttfb_files = args.ttfb_files or (10 if args.quick else 20)
    groups = {"link", "local", "dda", "warm", "hints", "ttfb", "large", "rclone", "dvc"}
    if args.only:
        groups &= set(args.only.split(","))
    groups -= set(args.skip.split(","))
    R = args.readers

    if os.geteuid() != 0:
        print("bench: needs root (network namespace, tc, FUSE, drop_caches)", file=sys.stderr)
        return 2
    for m in LUA_MODULES:
        if not Path(m).exists():
            print(f"bench: {m} missing: apt-get install -y libnginx-mod-http-lua", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _signal_exit)
    signal.signal(signal.SIGHUP, _signal_exit)

    workdir = Path(args.workdir)
    data_root = workdir / "data"
    scratch = workdir / "run"
    if scratch.exists():
        for mp in scratch.glob("mnt-*"):
            force_unmount(mp)
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    data_root.mkdir(parents=True, exist_ok=True)
    link_mb_s = args.rate_mbit * 1e6 / 8 / MB
    rows: list[Row] = []
    details: dict[str, dict] = {}
    started = dt.datetime.now().astimezone()
    head = sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD", check=False).stdout.strip()
    dirty = sh("git", "-C", str(ROOT), "status", "--porcelain", "--", "sidecar", check=False).stdout.split("\n")
    dirty = [d[3:] for d in dirty if d.strip()]
    code_state = f"commit {head}" + (f", uncommitted changes in {', '.join(dirty)}" if dirty else ", clean sidecar/")
    t_start = time.monotonic()
    qd = ""
    load_start = os.getloadavg()[0]

    def record(row: Row, detail: dict) -> None:
        if detail.get("server_cpu_s") is not None:
            row.notes += f"; mount process CPU {detail['server_cpu_s']:.1f}s"
        rows.append(row)
        detail["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        details[f"{row.case} ({row.readers}r)"] = detail
        log(f"  -> {row.case} ({row.readers}r): {fmt(row.seconds, '.2f')} s, {fmt(row.mb_s, '.1f')} MB/s, "
            f"{fmt(row.pct_link, '.0f')}% link, server {fmt((row.server_bytes or 0) / MB, '.1f')} MB, "
            f"{row.requests} req{', ERRORS ' + str(row.errors) if row.errors else ''} {row.notes}")

    try:
        images = image_set(data_root, args.port, n_images, args.min_kb * 1000, args.max_kb * 1000)
        large = large_set(data_root, args.port, large_mb) if groups & {"large", "link"} else None
        log(f"data: {len(images.files)} files, {images.total_bytes / MB:.1f} MB"
            + (f"; large file {large.total_bytes / MB:.0f} MB" if large else ""))

        net_up(args.rate_mbit)
        nginx = Nginx(scratch / "nginx", data_root, args.port, args.ttfb_ms)
        nginx.start()
        remote_url = nginx.url(f"{images.name}/remote")
        log(f"link {args.rate_mbit:g} Mbit/s ({link_mb_s:.1f} MB/s) each way, first-byte delay {args.ttfb_ms:g} ms; "
            f"nginx at {remote_url}")

        def dda_env(ds: DataSet) -> dict:
            return _env(DDA_REMOTE_STORAGE_URL=nginx.url(f"{ds.name}/remote"))

        rels = images.files
        counter = iter(range(1000))

        def fresh(prefix: str) -> tuple[Path, Path, Path]:
            i = next(counter)
            mp, cache, tmp = scratch / f"mnt-{prefix}-{i}", scratch / f"cache-{prefix}-{i}", scratch / f"tmp-{prefix}-{i}"
            for p in (mp, cache, tmp):
                p.mkdir(parents=True)
            return mp, cache, tmp

        # ---- the link itself: one HTTP stream of the large object
        if "link" in groups and large is not None and shutil.which("curl"):
            obj = next(p for p in (large.remote / "files" / "md5").rglob("*") if p.is_file())
            rel = obj.relative_to(data_root)
            n = min(obj.stat().st_size, 256 << 20)
            drop_caches()
            m = nginx.mark()
            t0 = time.monotonic()
            r = sh("curl", "-s", "-o", "/dev/null", "-r", f"0-{n - 1}", "-w", "%{size_download}",
                   nginx.url(str(rel)), timeout=args.timeout)
            secs = time.monotonic() - t0
            srv = nginx.since(m)
            record(Row("link: curl, one HTTP stream", 1, secs, int(r.stdout or 0), 0, link_mb_s,
                       server_bytes=srv["bytes"], requests=srv["requests"],
                       notes="practical ceiling (TCP/IP overhead on the shaped link)"), {"server": srv})

        # ---- local disk
        local_rate: dict[int, float] = {}
        if "local" in groups or "warm" in groups:
            for readers in (R, 1):
                tmp = scratch / f"tmp-local-{readers}"
                tmp.mkdir()
                drop_caches()
                res = epoch(images.bypath, rels, readers, tmp, args.seed, args.timeout)
                row = Row("local disk epoch", readers, res["seconds"], res["bytes"], res["files"], link_mb_s,
                          errors=res["errors"], notes="page cache dropped")
                local_rate[readers] = row.mb_s or 0
                record(row, res)

        # ---- rclone (its numbers are the cold-epoch baseline, so measure it before dda)
        rclone_rate: dict[int, float] = {}
        if "rclone" in groups:
            for readers in (R, 1):
                mp, cache, tmp = fresh("rclone")
                drop_caches()
                m = nginx.mark()
                with RcloneMount(nginx.url(f"{images.name}/bypath/"), mp, cache) as rc:
                    list_s, nlisted = list_tree(mp / "data" / "images")
                    res = mepoch(rc, mp, rels, readers, tmp, args.seed, args.timeout)
                srv = nginx.since(m)
                row = Row("cold epoch, rclone mount --vfs-cache-mode full", readers, res["seconds"], res["bytes"],
                          res["files"], link_mb_s, server_bytes=srv["bytes"], requests=srv["requests"],
                          errors=res["errors"], notes=f"listing {list_s:.2f}s ({nlisted} files) before the epoch")
                rclone_rate[readers] = row.mb_s or 0
                record(row, {**res, "server": srv, "list_s": list_s, "mount_s": rc.mount_s})
                shutil.rmtree(cache, ignore_errors=True)

        def vs_rclone(row: Row) -> Row:
            if row.readers in rclone_rate and rclone_rate[row.readers] and row.mb_s:
                row.ratio, row.baseline = row.mb_s / rclone_rate[row.readers], "rclone"
            return row

        # ---- dda cold epochs (daemon), then warm on the first one's cache
        if "dda" in groups or "warm" in groups:
            for readers in (R, 1):
                mp, cache, tmp = fresh("dda")
                drop_caches()
                m = nginx.mark()
                with DdaDaemon(images.repo, mp, cache, dda_env(images)) as d:
                    list_s, nlisted = list_tree(mp / "data" / "images")
                    res = mepoch(d, mp, rels, readers, tmp, args.seed, args.timeout)
                    st = d.status()
                srv = nginx.since(m)
                row = vs_rclone(Row("cold epoch, dda mount", readers, res["seconds"], res["bytes"], res["files"],
                                    link_mb_s, server_bytes=srv["bytes"], requests=srv["requests"],
                                    errors=res["errors"],
                                    notes=f"mount {d.mount_s:.2f}s, listing {list_s:.2f}s before the epoch"))
                record(row, {**res, "server": srv, "list_s": list_s, "mount_s": d.mount_s, "status": st})
                if readers == R and "warm" in groups:
                    for wr in (R, 1):
                        drop_caches()
                        m = nginx.mark()
                        with DdaDaemon(images.repo, mp, cache, dda_env(images)) as d2:
                            list_s, _ = list_tree(mp / "data" / "images")
                            wtmp = scratch / f"tmp-warm-{wr}"
                            wtmp.mkdir()
                            res = mepoch(d2, mp, rels, wr, wtmp, args.seed + 1, args.timeout)
                            st = d2.status()
                        srv = nginx.since(m)
                        row = Row("warm epoch, dda mount (all cached)", wr, res["seconds"], res["bytes"], res["files"],
                                  link_mb_s, server_bytes=srv["bytes"], requests=srv["requests"],
                                  errors=res["errors"], notes=f"page cache dropped; listing {list_s:.2f}s")
                        if local_rate.get(wr) and row.mb_s:
                            row.ratio, row.baseline = row.mb_s / local_rate[wr], "local disk"
                        record(row, {**res, "server": srv, "list_s": list_s, "status": st})
                shutil.rmtree(cache, ignore_errors=True)

        # ---- dda cold epochs with prefetch hints (in-process mount in a helper of ours)
        if "hints" in groups:
            for readers in (R, 1):
                mp, cache, tmp = fresh("hints")
                drop_caches()
                m = nginx.mark()
                with HintMount(images.repo, mp, cache, dda_env(images)) as h:
                    list_s, nlisted = list_tree(mp / "data" / "images")
                    order = shuffled(rels, args.seed)
                    t0 = time.monotonic()
                    reply = h.call({"cmd": "hint", "paths": order})
                    hint_s = time.monotonic() - t0
                    res = mepoch(h, mp, rels, readers, tmp, args.seed, args.timeout)
                    st = h.status()
                srv = nginx.since(m)
                pf = st.get("prefetch", {})
                row = vs_rclone(Row("cold epoch, dda mount + prefetch hints", readers, res["seconds"], res["bytes"],
                                    res["files"], link_mb_s, server_bytes=srv["bytes"], requests=srv["requests"],
                                    errors=res["errors"],
                                    notes=f"hint call {hint_s * 1000:.0f} ms ({reply.get('accepted')} accepted), "
                                          f"prefetch issued {pf.get('issued_files')} used {pf.get('used_files')}; "
                                          f"listing {list_s:.2f}s"))
                record(row, {**res, "server": srv, "list_s": list_s, "status": st, "hint_reply": reply})
                shutil.rmtree(cache, ignore_errors=True)

        # ---- time to first byte of cold files
        if "ttfb" in groups:
            for listed in (False, True):
                mp, cache, tmp = fresh("ttfb")
                drop_caches()
                sample = shuffled(rels, args.seed + 7)[:ttfb_files]
                m = nginx.mark()
                with DdaDaemon(images.repo, mp, cache, dda_env(images)) as d:
                    if listed:
                        list_tree(mp / "data" / "images")
                    m2 = nginx.mark()
                    res = run_readers("ttfb", [[str(mp / r) for r in sample]], tmp, args.timeout)[0]
                    st = d.status()
                srv = nginx.since(m2)
                totals = [s["total_s"] for s in res["samples"]]
                opens = [s["open_s"] for s in res["samples"]]
                readsx = [s["read_s"] for s in res["samples"]]
                med = statistics.median(totals) if totals else None
                # target: 2 RTT (RTT = first-byte delay + network round trip) plus the transfer of one object
                obj = images.total_bytes / len(rels)
                target = 2 * (args.ttfb_ms / 1000) + obj / (link_mb_s * MB)
                row = Row("TTFB: open + read 4 KiB, cold file" + (" (dir listed first)" if listed else " (no listing)"),
                          1, med, 0, 0, link_mb_s, baseline=f"target <= {target * 1000:.0f} ms",
                          server_bytes=srv["bytes"], requests=srv["requests"], errors=res["n_errors"],
                          notes=f"median of {len(totals)}: open {statistics.median(opens) * 1000:.1f} ms + first read "
                                f"{statistics.median(readsx) * 1000:.1f} ms; p90 {sorted(totals)[int(0.9 * (len(totals) - 1))] * 1000:.1f} ms; "
                                f"{srv['requests'] / max(1, len(totals)):.1f} requests/file" if totals else "no samples")
                if med:
                    row.ratio = med / target
                    row.baseline = f"of target {target * 1000:.0f} ms"
                record(row, {"samples": res["samples"], "server": srv, "status": st, "target_s": target})
                shutil.rmtree(cache, ignore_errors=True)

        # ---- time to first byte with nothing else going on: the first file of a fresh mount
        if "ttfb" in groups:
            samples = []
            srv_total = {"requests": 0, "bytes": 0}
            n_iso = max(3, ttfb_files // 4)
            for i, rel in enumerate(shuffled(rels, args.seed + 11)[:n_iso]):
                mp, cache, tmp = fresh("ttfb1")
                drop_caches()
                with DdaDaemon(images.repo, mp, cache, dda_env(images)) as d:
                    m2 = nginx.mark()
                    res = run_readers("ttfb", [[str(mp / rel)]], tmp, args.timeout)[0]
                srv = nginx.since(m2)
                samples += res["samples"]
                srv_total["requests"] += srv["requests"]
                srv_total["bytes"] += srv["bytes"]
                shutil.rmtree(cache, ignore_errors=True)
            totals = [s["total_s"] for s in samples]
            obj = images.total_bytes / len(rels)
            target = 2 * (args.ttfb_ms / 1000) + obj / (link_mb_s * MB)
            med = statistics.median(totals) if totals else None
            row = Row("TTFB: open + read 4 KiB, first file of a fresh mount", 1, med, 0, 0, link_mb_s,
                      server_bytes=srv_total["bytes"], requests=srv_total["requests"],
                      errors=n_iso - len(samples),
                      notes=(f"median of {len(totals)}: open {statistics.median(s['open_s'] for s in samples) * 1000:.1f} ms "
                             f"+ first read {statistics.median(s['read_s'] for s in samples) * 1000:.1f} ms; "
                             f"max {max(totals) * 1000:.1f} ms; {srv_total['requests'] / max(1, len(totals)):.1f} requests/file")
                      if totals else "no samples")
            if med:
                row.ratio, row.baseline = med / target, f"of target {target * 1000:.0f} ms"
            record(row, {"samples": samples, "server": srv_total, "target_s": target})

        # ---- the large file
        if "large" in groups and large is not None:
            mp, cache, tmp = fresh("large")
            drop_caches()
            m = nginx.mark()
            with DdaDaemon(large.repo, mp, cache, dda_env(large)) as d:
                res = mepoch(d, mp, large.files, 1, tmp, args.seed, args.timeout)
                st = d.status()
            srv = nginx.since(m)
            row = Row(f"cold sequential read, {large.total_bytes >> 20} MiB file, dda mount", 1, res["seconds"],
                      res["bytes"], 0, link_mb_s, server_bytes=srv["bytes"], requests=srv["requests"],
                      errors=res["errors"], notes=f"ranged requests {srv['ranged']}, connections {srv['connections']}")
            if row.mb_s:
                row.ratio, row.baseline = row.mb_s / link_mb_s, "link"
            record(row, {**res, "server": srv, "status": st})
            shutil.rmtree(cache, ignore_errors=True)

        # ---- dvc pull, then local reads
        if "dvc" in groups:
            _, _, tmp = fresh("dvc")
            clone = scratch / "dvc-clone"
            env = _env()
            sh("git", "clone", "-q", str(images.repo), str(clone), env=env)
            sh(DVC, "remote", "modify", "--local", "storage", "url", remote_url, cwd=clone, env=env)
            drop_caches()
            m = nginx.mark()
            t0 = time.monotonic()
            r = sh(DVC, "pull", "-q", "-j", str(args.dvc_jobs), "data/images.dvc", cwd=clone, env=env,
                   check=False, timeout=args.timeout)
            pull_s = time.monotonic() - t0
            srv = nginx.since(m)
            drop_caches()
            res = epoch(clone, rels, R, tmp, args.seed, args.timeout)
            total_s = pull_s + res["seconds"]
            row = vs_rclone(Row(f"cold epoch, dvc pull -j {args.dvc_jobs} then local reads", R, total_s, res["bytes"],
                                res["files"], link_mb_s, server_bytes=srv["bytes"], requests=srv["requests"],
                                errors=res["errors"] + (r.returncode != 0),
                                notes=f"pull {pull_s:.2f}s ({images.total_bytes / MB / pull_s:.1f} MB/s, "
                                      f"{100 * images.total_bytes / MB / pull_s / link_mb_s:.0f}% link) + reads {res['seconds']:.2f}s"
                                      + (f"; dvc pull exit {r.returncode}: {r.stderr.strip()[-200:]}" if r.returncode else "")))
            record(row, {**res, "server": srv, "pull_s": pull_s})
            shutil.rmtree(clone, ignore_errors=True)
    except KeyboardInterrupt as err:
        log(f"interrupted ({err}); cleaning up")
        cleanup_all()
        return 130
    finally:
        if rows:
            try:
                qd = qdisc_stats()
            except Exception:
                qd = ""
        cleanup_all()

    elapsed = time.monotonic() - t_start
    table = render(rows, markdown=False)
    print()
    print(table)
    cmd = shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    params = (f"- link: {args.rate_mbit:g} Mbit/s each way (tbf burst 256kb latency 50ms on both veth ends; "
              f"{link_mb_s:.1f} MB/s), server first-byte delay {args.ttfb_ms:g} ms (nginx + Lua), no netem\n"
              f"- epoch set: {len(images.files)} files, {args.min_kb}-{args.max_kb} KB "
              f"({images.total_bytes / MB:.1f} MB total), shuffled (seed {args.seed}), {R} reader processes "
              f"(round-robin shares of one shuffled order) and 1 reader; 1 MiB reads, whole files\n"
              f"- large file: {large_mb} MiB; TTFB sample: {ttfb_files} cold files\n"
              f"- every case: fresh cache directory, page cache dropped before it; MB = 10^6 bytes\n"
              f"- '% link' = payload MB/s / link rate; 'server MB' = body bytes nginx sent during the case\n"
              f"- code under test: {code_state}\n"
              f"- load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f} "
              f"(other work on this machine skews the CPU-bound cases: warm, hints)\n"
              f"- machine: {os.cpu_count()} CPUs, kernel {os.uname().release}; total run time {elapsed:.0f} s\n")
    md = (f"# dda mount benchmark\n\n- command: `{cmd}`\n- date: {started.isoformat(timespec='seconds')}\n{params}\n"
          f"{render(rows, markdown=True)}\n\n<details><summary>per-case details (JSON)</summary>\n\n```json\n"
          f"{json.dumps(details, indent=1, default=str)[:200_000]}\n```\n</details>\n")
    if rows and qd:
        md += f"\n<details><summary>tc qdisc statistics at the end</summary>\n\n```\n{qd}```\n</details>\n"
    Path(args.out).write_text(md)
    log(f"wrote {args.out} ({elapsed:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
