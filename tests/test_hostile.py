"""A hostile-input corpus (issue 14): repositories, annotations, requests and remotes written by an
attacker or an unlucky user. Nothing may be written outside its destination, nothing may hang,
no secret may leak, and each failure is one clear line.

Repositories are authored here without DVC (exactly the files `dvc add` + `dvc push` write) so a
test can plant what DVC itself would refuse to write; they are served from a local path."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DDA = str(Path(sys.executable).parent / "dda")
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          env={**os.environ, **GIT_ENV}).stdout.decode().strip()


def dda(*args: str, cache: Path, cwd: Path | None = None, env: dict | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "DDA_REPO"}
    full.update({"DDA_CACHE_DIR": str(cache), **(env or {})})
    return subprocess.run([DDA, *args], capture_output=True, env=full, timeout=timeout, cwd=cwd)


class HostileRepo:
    """A git repository with a local DVC remote; `put`/`dir_output` plant objects as DVC 3 would."""

    def __init__(self, root: Path):
        self.repo, self.remote = root / "repo", root / "storage"
        self.repo.mkdir(parents=True)
        self.remote.mkdir(parents=True)
        git(self.repo, "init", "-q", "-b", "main")
        (self.repo / ".dvc").mkdir()
        (self.repo / ".dvc/config").write_text(
            f"[core]\n    remote = storage\n['remote \"storage\"']\n    url = {self.remote}\n")

    def put(self, data: bytes, is_dir: bool = False) -> str:
        md5 = hashlib.md5(data).hexdigest()
        target = self.remote / "files/md5" / md5[:2] / (md5[2:] + (".dir" if is_dir else ""))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return md5

    def dir_output(self, files: dict[str, bytes]) -> dict:
        """The `outs` entry of a tracked directory holding `files` (relpath -> bytes)."""
        manifest = sorted(({"md5": self.put(data), "relpath": rel} for rel, data in files.items()),
                          key=lambda e: e["relpath"])
        raw = json.dumps(manifest, separators=(", ", ": ")).encode()
        return {"md5": self.put(raw, is_dir=True) + ".dir", "size": sum(map(len, files.values())),
                "nfiles": len(files), "hash": "md5"}

    def write(self, rel: str, text: str | bytes) -> None:
        path = self.repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)

    def commit(self, message: str = "c") -> str:
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", message)
        return git(self.repo, "rev-parse", "HEAD")


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Everything under `root` (file bytes, symlink targets), to prove nothing changed there."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = p.read_bytes()
    return out


def tree_state(root: Path) -> dict[str, bytes | str]:
    """`snapshot` plus every folder (an empty folder made outside is a write outside too)."""
    out = snapshot(root)
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                out[str(p.relative_to(root)) + "/"] = "dir"
    return out


# ---------------------------------------------------------------------------------------------
# dda get: never writes outside its destination (issue 14, items 1 and 2)


def test_get_wdir_dotdot_path_dot_writes_nothing_outside(tmp_path):
    """The issue's example: `wdir: ..` + `path: .` with victim.txt and .ssh/authorized_keys inside,
    `cd ~ && dda get URL . -o ~/data` must not touch ~/victim.txt or ~/.ssh/authorized_keys."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / "victim.txt").write_text("precious\n")
    (home / ".ssh/authorized_keys").write_text("ssh-ed25519 AAAA good@key\n")
    before = snapshot(home)
    h = HostileRepo(tmp_path / "src")
    evil = {"victim.txt": b"pwned\n", ".ssh/authorized_keys": b"ssh-ed25519 AAAA attacker\n"}
    h.write("victim.txt", "pwned\n")            # the same names as git files, too
    h.write(".ssh/authorized_keys", "ssh-ed25519 AAAA attacker\n")
    h.write("evil.dvc", yaml.safe_dump({"wdir": "..", "outs": [{**h.dir_output(evil), "path": "."}]}))
    h.commit()
    proc = dda("get", str(h.repo), ".", "-o", str(home / "data"), cache=tmp_path / "cache", cwd=home,
               env={"HOME": str(home)})
    after = snapshot(home)
    assert {k: v for k, v in after.items() if not k.startswith("data")} == before, proc.stderr.decode()
    err = proc.stderr.decode()
    assert "Traceback" not in err
    if proc.returncode != 0:   # refused: one line that says what and where
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("dda: error: ") and ".." in lines[0], err


@pytest.mark.parametrize("name", ["..", "../x", "a/../../x", "/etc/x", "a//b", "./a"])
def test_split_safe_rejects_names_that_leave(name):
    from sidecar.safewrite import UnsafePath, split_safe

    with pytest.raises(UnsafePath):
        split_safe(name)
    assert split_safe("a/b.c/..d") == ["a", "b.c", "..d"]


def test_get_replaces_symlink_from_earlier_revision(tmp_path):
    """Rev A has `d` -> a folder outside; rev B has a directory `d/` holding evil.txt. Getting A
    then B into the same folder replaces the symlink with a directory (as git checkout does)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    h = HostileRepo(tmp_path / "src")
    (h.repo / "d").symlink_to(outside)
    h.write("README", "a\n")
    rev_a = h.commit("A")
    (h.repo / "d").unlink()
    h.write("d/evil.txt", "evil\n")
    h.write("e/tracked.dvc", yaml.safe_dump({"outs": [{**h.dir_output({"x.bin": b"x" * 10}), "path": "x"}]}))
    rev_b = h.commit("B")
    ds, cache = tmp_path / "ds", tmp_path / "cache"
    proc = dda("get", str(h.repo), ".", "-o", str(ds), "--rev", rev_a, cache=cache)
    assert proc.returncode == 0, proc.stderr.decode()
    assert os.readlink(ds / "d") == str(outside)
    # A DVC output below a path that is a symlink in the destination: also replaced, not followed.
    (ds / "e").symlink_to(outside)
    proc = dda("get", str(h.repo), ".", "-o", str(ds), "--rev", rev_b, cache=cache)
    assert proc.returncode == 0, proc.stderr.decode()
    assert list(outside.iterdir()) == []
    assert not (ds / "d").is_symlink() and (ds / "d/evil.txt").read_text() == "evil\n"
    assert not (ds / "e").is_symlink() and (ds / "e/x/x.bin").read_bytes() == b"x" * 10


def test_get_replaces_planted_symlink_at_file_and_temp_name(tmp_path):
    """A symlink where a file goes (or where its temporary file goes) is replaced, never written through."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("keep\n")
    h = HostileRepo(tmp_path / "src")
    h.write("a.txt", "new\n")
    h.commit()
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "a.txt").symlink_to(outside / "target.txt")
    (ds / ".a.txt.dda-part").symlink_to(outside / "target.txt")
    proc = dda("get", str(h.repo), ".", "-o", str(ds), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr.decode()
    assert (outside / "target.txt").read_text() == "keep\n"
    assert not (ds / "a.txt").is_symlink() and (ds / "a.txt").read_text() == "new\n"


# ---------------------------------------------------------------------------------------------
# webhook: paths are compared the way the kernel resolves them (issue 14, item 9)


def _review_with(annotations: dict, app_mounts: list[str] = ()) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from k8s_tools import load_review

    review = load_review("job_single_repo.json")
    pod = review["request"]["object"]
    pod["metadata"]["annotations"].update(annotations)
    container = pod["spec"]["containers"][0]
    for i, path in enumerate(app_mounts):
        container.setdefault("volumeMounts", []).append({"name": f"app-{i}", "mountPath": path})
        pod["spec"].setdefault("volumes", []).append({"name": f"app-{i}", "emptyDir": {}})
    return review


def _webhook(review: dict) -> dict:
    from sidecar.webhook.mutate import WebhookConfig, mutate

    return mutate(review, WebhookConfig.load(env={}, image="registry.example.com/dda-sidecar:0.1.0"))["response"]


@pytest.mark.parametrize("path,reserved", [
    ("//etc", "/etc"), ("//proc", "/proc"), ("//var/run/secrets/kubernetes.io", "/var/run"),
    ("/./etc", "/etc"), ("/data/../etc", "/etc"), ("/etc/", "/etc"), ("///usr//lib", "/usr"),
    ("/data/../../../proc/self", "/proc"), ("//tmp", "/tmp"),
])
def test_webhook_refuses_reserved_paths_in_any_spelling(path, reserved):
    response = _webhook(_review_with({"dda-sidecar.io/mount-path": path}))
    assert response["allowed"] is False, response
    message = response["status"]["message"]
    assert f"directory {reserved}" in message and "mount-path" in message, message


@pytest.mark.parametrize("app_path", ["//data", "/data/", "/./data", "//data//images", "/x/../data"])
def test_webhook_app_mount_collides_in_any_spelling(app_path):
    response = _webhook(_review_with({"dda-sidecar.io/mount-path": "/data"}, [app_path]))
    assert response["allowed"] is False, response
    assert "collides with volumeMount" in response["status"]["message"]


def test_webhook_kernel_path():
    from sidecar.webhook.mutate import kernel_path

    assert kernel_path("//etc") == "/etc" and kernel_path("/../..//a/./b/") == "/a/b" and kernel_path("//") == "/"
    assert _webhook(_review_with({"dda-sidecar.io/mount-path": "/data/set"}, ["/dataset"]))["allowed"] is True


# ---------------------------------------------------------------------------------------------
# the sidecar's HTTP endpoints (issue 14, item 7; must-work 3)


def _pod_ip() -> str | None:
    """A non-loopback address of this machine (what the pod IP is in a pod)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))   # no packet is sent: this only picks a source address
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def _raw(port: int, request: bytes, host: str = "127.0.0.1", timeout: float = 10) -> tuple[int, bytes]:
    """Send `request` as is; the status and body of the answer (0 when the server just closed)."""
    import socket

    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and b"Connection: close" in data:
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    if len(body) >= length:
                        break
        except (ConnectionResetError, TimeoutError):
            pass
    if not data:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _post(path: str, body: bytes, length: int | None = None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


def _rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def sample_repo(tmp_path_factory):
    from sidecar.sample import make_sample_repo

    return make_sample_repo(tmp_path_factory.mktemp("hostile-sample"), images=8)[0]


needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


@needs_fuse
def test_sidecar_loader_api_only_on_loopback(sample_repo, mp, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sidecar_util import Sidecar, http

    pod_ip = _pod_ip()
    if pod_ip is None:
        pytest.skip("no non-loopback address on this machine")
    with Sidecar(str(sample_repo), mp, tmp_path / "cache", env={"DDA_BIND": "0.0.0.0"}) as sc:
        pod = f"http://{pod_ip}:{sc.port}"
        assert http("GET", pod + "/healthz")[0] == 200 and http("GET", pod + "/metrics")[0] == 200
        for path, doc in (("/v1/hints", {"paths": ["data/labels.csv"]}), ("/v1/batch-wait", {"seconds": [1]})):
            status, body = http("POST", pod + path, doc)
            assert status == 403 and b"127.0.0.1" in body, (status, body)
            assert sc.post(path, doc)[0] == 200     # the same request on 127.0.0.1 is served
        assert _raw(sc.port, _post("/metrics", b"{}"), host=pod_ip)[0] == 403
        assert sc.value("dda_hinted_files_total") == 1   # only the loopback hint counted
    # bound to the pod IP itself: the loader API still answers on 127.0.0.1, never on the pod IP
    with Sidecar(str(sample_repo), mp, tmp_path / "cache2", env={"DDA_BIND": pod_ip}) as sc:
        sc.url = f"http://{pod_ip}:{sc.port}"
        assert sc.get("/readyz")[0] == 200
        assert http("POST", sc.url + "/v1/hints", {"paths": []})[0] == 403
        assert http("POST", f"http://127.0.0.1:{sc.port}/v1/hints", {"paths": []})[0] == 200


@needs_fuse
def test_sidecar_bounds_bodies_json_and_a_flood(sample_repo, mp, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import threading

    from sidecar_util import Sidecar

    with Sidecar(str(sample_repo), mp, tmp_path / "cache") as sc:
        port = sc.port
        base = _rss_peak_kib(sc.proc.pid)
        # 250 MB announced: refused from the header, before a byte of body is read
        status, body = _raw(port, _post("/v1/hints", b"", length=250 * 1024 * 1024))
        assert status == 413 and b"too large" in body
        # deep nesting, a 400-digit number, NaN, bad UTF-8: 400 with a reason, never 500
        for bad in (b"[" * 100_000 + b"]" * 100_000, b'{"paths": ' + b"[" * 50 + b"]" * 50 + b"}",
                    b'{"seconds": [' + b"9" * 400 + b"]}", b'{"seconds": [' + b"9" * 400 + b".5]}",
                    b'{"seconds": [NaN]}', b"\xff\xfe", b'{"paths": "x"}'):
            for path in ("/v1/hints", "/v1/batch-wait"):
                status, reply = _raw(port, _post(path, bad))
                assert 400 <= status < 500, (path, bad[:40], status, reply)
        status, reply = _raw(port, _post("/v1/hints", json.dumps({"paths": ["x"] * 1_000_001}).encode()))
        assert status == 413 and b"at most" in reply
        # a header that never ends, a body shorter than announced: closed, nothing held
        assert _raw(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 200_000)[0] in (0, 400)

        # a flood: 16 clients, each streaming 30 MB bodies of junk, 4 times over, plus idle sockets
        import socket

        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        junk = b'{"paths": ["' + b"a" * (30 * 1024 * 1024 - 20) + b'"]}'
        answers: list[int] = []

        def client() -> None:
            for _ in range(4):
                try:
                    answers.append(_raw(port, _post("/v1/hints", junk), timeout=60)[0])
                except OSError:
                    answers.append(-1)

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        for s in idle:
            s.close()
        print("flood answers", sorted(set((a, answers.count(a)) for a in answers)), "peak growth MiB", (_rss_peak_kib(sc.proc.pid) - base) // 1024)
        assert len(answers) == 64 and set(answers) <= {0, -1, 400, 413, 503}, answers
        assert answers.count(503) + answers.count(0) + answers.count(-1) > 0   # some were turned away
        assert sc.get("/healthz", timeout=5) == (200, b"ok\n")
        peak = _rss_peak_kib(sc.proc.pid)
        # 64 MiB of buffered bodies at most, plus one parse: far below the pod's 2Gi limit
        assert peak - base < 350 * 1024, f"RSS peak grew by {(peak - base) // 1024} MiB"
        assert sc.post("/v1/hints", {"paths": ["data/labels.csv"]})[0] == 200


# ---------------------------------------------------------------------------------------------
# secrets never travel (issue 14, item 8)


class _Recorder:
    """A real HTTP server on 127.0.0.1 that records request headers; `redirect_to` answers 302."""

    def __init__(self, redirect_to: str | None = None):
        import http.server
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                seen.append((self.path, dict(self.headers)))
                if redirect_to and not self.path.startswith("/local/"):
                    target = redirect_to if "://" in redirect_to else redirect_to + self.path
                    self.send_response(302)
                    self.send_header("Location", target.replace("{path}", self.path))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = b"object bytes"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("auth", ["custom", "bearer", "basic"])
def test_credentials_dropped_on_cross_origin_redirect(auth):
    import asyncio

    from sidecar.remotes.http import HttpRemote

    secret = "s3cr3t-TOKEN-4711"
    other = _Recorder()
    origin = _Recorder(redirect_to=other.url + "{path}")
    try:
        kwargs = {"custom": dict(auth="custom", custom_auth_header="X-Api-Key", password=secret),
                  "bearer": dict(auth="bearer", token=secret),
                  "basic": dict(auth="basic", user="u", password=secret)}[auth]
        remote = HttpRemote("r", origin.url + "/store", **kwargs)

        async def go() -> bytes:
            try:
                return (await remote.read("files/md5/ab/cd", 0, None)).data
            finally:
                await remote.aclose()

        assert asyncio.run(go()) == b"object bytes"
        (_, first), (_, second) = origin.seen[0], other.seen[0]
        assert any(secret in v or "dTpzM2NyM3Q" in v for v in first.values()), first   # sent to its origin
        assert not any(secret in v or "dTpzM2NyM3Q" in v for v in second.values()), second
    finally:
        origin.close()
        other.close()


def test_custom_header_kept_on_same_origin_redirect():
    import asyncio

    from sidecar.remotes.http import HttpRemote

    srv = _Recorder(redirect_to="/local")
    try:
        remote = HttpRemote("r", srv.url, auth="custom", custom_auth_header="X-Api-Key", password="k-123")

        async def go() -> bytes:
            try:
                return (await remote.read("x", 0, None)).data
            finally:
                await remote.aclose()

        assert asyncio.run(go()) == b"object bytes"
        assert [h.get("X-Api-Key") for _, h in srv.seen] == ["k-123", "k-123"]
    finally:
        srv.close()


@needs_fuse
def test_mount_daemon_shows_no_token_in_ps(sample_repo, git_server, mp, tmp_path):
    """`dda mount http://user:TOKEN@host/... --daemon`: the token is in no process's argv and not
    in the daemon's environment while the mount lives."""
    import base64

    from mounting import mounted, wait_until

    bare = git_server.root / "hostile-daemon.git"
    if not bare.exists():
        subprocess.run(["git", "clone", "-q", "--bare", str(sample_repo), str(bare)], check=True)
    token = git_server.password
    url = f"http://{git_server.user}:{token}@127.0.0.1:{git_server.port}/private/hostile-daemon.git"
    env = {k: v for k, v in os.environ.items() if k != "DDA_REPO"}
    proc = subprocess.run([DDA, "mount", url, str(mp), "--daemon"], capture_output=True, text=True, timeout=120,
                          env={**env, "DDA_CACHE_DIR": str(tmp_path / "cache"),
                               "DDA_REMOTE_STORAGE_PASSWORD": "env-planted-777"})
    assert proc.returncode == 0, proc.stderr
    try:
        assert mounted(mp) and (mp / "README.md").read_bytes().startswith(b"# sample")
        pid = int(proc.stdout.split("daemon pid ")[1].split(",")[0])
        planted = [token.encode(), base64.b64encode(f"{git_server.user}:{token}".encode()), b"env-planted-777"]
        leaks = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmdline = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if any(s in cmdline for s in planted):
                leaks.append((p.name, cmdline))
        assert not leaks, leaks
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"dda\0mount\0" in cmdline and str(mp).encode() in cmdline   # ps still says what it is
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert not any(s in environ for s in planted)
        log = (tmp_path / "cache/logs/mount.log").read_text()
        assert token not in log
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        wait_until(lambda: not mounted(mp), 10)


# ---------------------------------------------------------------------------------------------
# 429/503 and Retry-After; messages a user can act on (issue 14, item 10)


class _Storage:
    """An HTTP DVC remote over a folder that answers the first `limited` GETs of each object with
    `status` and a Retry-After header from `retry_after()`."""

    def __init__(self, root: Path, status: int, retry_after, limited: int = 1):
        import http.server
        import threading

        self.hits: list[float] = []
        hits, counts = self.hits, {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body_wanted: bool) -> None:
                import time as _t

                hits.append(_t.monotonic())
                counts[self.path] = counts.get(self.path, 0) + 1
                if counts[self.path] <= limited:
                    self.send_response(status)
                    self.send_header("Retry-After", retry_after())
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                target = root / self.path.lstrip("/")
                if not target.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = target.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body_wanted:
                    self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._answer(True)

            def do_HEAD(self):  # noqa: N802
                self._answer(False)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _http_repo(tmp_path: Path) -> tuple[HostileRepo, bytes]:
    h = HostileRepo(tmp_path / "src")
    data = b"rate limited payload\n" * 100
    md5 = h.put(data)
    h.write("f.bin.dvc", yaml.safe_dump({"outs": [{"md5": md5, "size": len(data), "hash": "md5", "path": "f.bin"}]}))
    h.commit()
    return h, data


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured(tmp_path, status, form):
    import email.utils
    import time

    h, data = _http_repo(tmp_path)

    def retry_after() -> str:
        if form == "seconds":
            return "2"
        return email.utils.formatdate(time.time() + 3, usegmt=True)   # second resolution: 2-3 s from now

    srv = _Storage(h.remote, status, retry_after)
    try:
        started = time.monotonic()
        proc = dda("cat", str(h.repo), "f.bin", "--deadline", "20", cache=tmp_path / "cache",
                   env={"DDA_REMOTE_STORAGE_URL": srv.url})
        took = time.monotonic() - started
        assert proc.returncode == 0 and proc.stdout == data, proc.stderr.decode()
        gaps = [b - a for a, b in zip(srv.hits, srv.hits[1:])]
        assert max(gaps) >= 1.9, (gaps, took)     # it waited as asked (backoff alone starts at 0.2 s)
        words = "rate limited" if status == 429 else "service unavailable"
        err = proc.stderr.decode()
        assert f"{words} (HTTP {status}), retrying after" in err and "server error" not in err, err
    finally:
        srv.close()


def test_retry_after_past_the_deadline_fails_fast_with_the_reason(tmp_path):
    import time

    h, _ = _http_repo(tmp_path)
    srv = _Storage(h.remote, 429, lambda: "120", limited=1000)
    try:
        started = time.monotonic()
        proc = dda("cat", str(h.repo), "f.bin", "--deadline", "5", cache=tmp_path / "cache",
                   env={"DDA_REMOTE_STORAGE_URL": srv.url})
        took = time.monotonic() - started
        err = proc.stderr.decode()
        assert proc.returncode != 0 and took < 5, (took, err)
        assert "rate limited (HTTP 429)" in err and "120 s" in err and "Traceback" not in err, err
    finally:
        srv.close()


def test_parse_retry_after():
    from sidecar.remotes.httpcommon import parse_retry_after

    assert parse_retry_after("7") == 7 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    assert 59 <= parse_retry_after("Thu, 01 Jan 1970 00:01:00 GMT", now=0) <= 60


def _mount_error(cmd_prefix: list[str], repo: Path, mp: Path, cache: Path, env: dict | None = None) -> str:
    full = {k: v for k, v in os.environ.items() if k != "DDA_REPO"}
    full.update({"DDA_CACHE_DIR": str(cache), **(env or {})})
    proc = subprocess.run([*cmd_prefix, DDA, "mount", str(repo), str(mp)], capture_output=True, text=True,
                          env=full, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dda: error: ")]
    assert len(lines) == 1, proc.stderr
    assert "fuse3 installed" not in lines[0]
    return lines[0]


@needs_fuse
@pytest.mark.skipif(os.getuid() != 0 or not Path("/usr/bin/setpriv").exists(), reason="needs root and setpriv")
def test_mount_without_cap_sys_admin_says_so(sample_repo, mp, tmp_path):
    line = _mount_error(["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin"], sample_repo, mp,
                        tmp_path / "cache")
    assert "CAP_SYS_ADMIN" in line and "--cap-add SYS_ADMIN" in line, line


@needs_fuse
@pytest.mark.skipif(os.getuid() != 0 or not Path("/usr/bin/setpriv").exists(), reason="needs root and setpriv")
def test_mount_without_access_to_dev_fuse_says_so(tmp_path):
    import shutil
    import stat as st
    import tempfile

    if os.stat("/dev/fuse").st_mode & (st.S_IROTH | st.S_IWOTH):
        pytest.skip("/dev/fuse is open to every user here")
    from sidecar.sample import make_sample_repo

    work = Path(tempfile.mkdtemp(prefix="dda-nobody-", dir="/tmp"))
    try:
        repo, _ = make_sample_repo(work / "s", images=2)
        (work / "mnt").mkdir()
        subprocess.run(["chown", "-R", "65534:65534", str(work)], check=True)
        work.chmod(0o755)
        line = _mount_error(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"], repo,
                            work / "mnt", work / "cache", env={"HOME": str(work)})
        assert "permission denied opening /dev/fuse" in line and "--device /dev/fuse" in line, line
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_why_mount_failed_names_the_missing_piece(tmp_path):
    from sidecar.fuse.mountpoint import why_mount_failed

    assert "does not exist" in why_mount_failed(tmp_path, device=str(tmp_path / "no-fuse"))
    dev = tmp_path / "fake-fuse"
    dev.write_bytes(b"")
    assert "CAP_SYS_ADMIN" in why_mount_failed(tmp_path, device=str(dev), uid=0, has_sys_admin=False)
    assert "seccomp" in why_mount_failed(tmp_path, device=str(dev), uid=0, has_sys_admin=True)


# ---------------------------------------------------------------------------------------------
# liveness: git blob reads and reads against a hanging remote honour the deadline (issue 14.6)


class _TrickleProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream`: `mode` "fast" forwards freely, "trickle"
    sends the server's bytes on at `rate` bytes/s, "hang" forwards nothing (for every open
    connection too). Threads only; close() ends every connection."""

    def __init__(self, upstream: tuple[str, int], rate: int = 1536):
        import socket
        import threading

        self.upstream, self.rate, self.mode = upstream, rate, "fast"
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src, dst, downstream: bool) -> None:
        import time

        try:
            while not self.closed:
                data = src.recv(65536 if self.mode == "fast" or not downstream else 256)
                if not data:
                    break
                while self.mode == "hang" and not self.closed:
                    time.sleep(0.05)
                if downstream and self.mode == "trickle":
                    for i in range(0, len(data), 64):
                        dst.sendall(data[i:i + 64])
                        time.sleep(64 / self.rate)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass


def _timed(fn) -> tuple[float, object]:
    import time

    started = time.monotonic()
    try:
        result: object = fn()
    except OSError as err:
        result = err
    return time.monotonic() - started, result


def _lazy_blob_repo(h: "HostileRepo") -> None:
    import random

    # over the 1m blob filter: fetched lazily, when first stat'ed or read
    for i in range(4):
        h.write(f"l{i}/big.bin", random.Random(i).randbytes(2 * 1024 * 1024))
    h.write("small.txt", "tiny\n")
    h.write("l0/small.txt", "tiny too\n")
    h.commit()


def test_git_blob_reads_honour_the_deadline_engine(git_server, tmp_path):
    """Engine level: four lazy blobs stuck on a git server trickling 1.5 KB/s each end at the
    deadline (5 s, not when the transfer ends), concurrently; a small blob on disk reads at once."""
    import asyncio
    import time

    from sidecar.config import Config
    from sidecar.engine import Engine
    from sidecar.errors import DeadlineExceeded

    h = HostileRepo(tmp_path / "src")
    _lazy_blob_repo(h)
    bare = git_server.create_bare(f"throttle-e{os.getpid()}")   # allows blob filters: big blobs stay lazy
    git(h.repo, "push", "-q", str(bare), "main")
    proxy = _TrickleProxy(("127.0.0.1", git_server.port))
    url = f"http://127.0.0.1:{proxy.port}/git/{bare.name}"

    async def scenario() -> dict[str, tuple[float, str]]:
        engine = await Engine.open(Config(repo=url, cache_dir=tmp_path / "cache", deadline=5))
        proxy.mode = "trickle"
        started = time.monotonic()
        out: dict[str, tuple[float, str]] = {}

        async def timed(name: str, coro) -> None:
            try:
                await coro
                result = "ok"
            except DeadlineExceeded:
                result = "deadline"
            out[name] = (time.monotonic() - started, result)

        async def small() -> None:
            await asyncio.sleep(0.5)
            await timed("small", engine.read("small.txt", 0, 100))

        try:
            await asyncio.gather(*(timed(f"l{i}", engine.stat(f"l{i}/big.bin")) for i in range(4)), small())
        finally:
            proxy.mode = "fast"
            await engine.aclose()
        return out

    try:
        out = asyncio.run(scenario())
    finally:
        proxy.close()
    print("engine blob reads:", out)
    # closing the engine leaves no git process behind (cat-file readers, their lazy fetches)
    import time as _time

    def left() -> list[str]:
        found = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and str(tmp_path / "cache").encode() in (p / "cmdline").read_bytes():
                    found.append(p.name)
            except OSError:
                pass
        return found

    deadline = _time.monotonic() + 10
    while left() and _time.monotonic() < deadline:
        _time.sleep(0.2)
    assert not left()
    assert out["small"][1] == "ok" and out["small"][0] < 1.5, out
    for i in range(4):
        took, result = out[f"l{i}"]
        assert result == "deadline" and 4.5 < took < 6.5, out


@needs_fuse
def test_git_blob_reads_honour_the_deadline(git_server, mp, tmp_path):
    """The issue's case through the mount: git server throttled to 1.5 KB/s, --deadline 5: stat of a
    2 MB lazily fetched blob gives ETIMEDOUT after ~5 s (not after the transfer, 394 s), and a tiny
    blob already on disk never waits behind it. Once the server is fast again the blob reads."""
    import errno
    import threading
    import time

    from mounting import mounted, wait_until

    h = HostileRepo(tmp_path / "src")
    _lazy_blob_repo(h)
    bare = git_server.create_bare(f"throttle-m{os.getpid()}")
    git(h.repo, "push", "-q", str(bare), "main")
    proxy = _TrickleProxy(("127.0.0.1", git_server.port))
    env = {k: v for k, v in os.environ.items() if k != "DDA_REPO"}
    url = f"http://127.0.0.1:{proxy.port}/git/{bare.name}"
    try:
        proc = subprocess.run([DDA, "mount", url, str(mp), "--deadline", "5", "--daemon"], capture_output=True,
                              text=True, timeout=120, env={**env, "DDA_CACHE_DIR": str(tmp_path / "cache")})
        assert proc.returncode == 0, proc.stderr
        proxy.mode = "trickle"
        results: dict[str, tuple[float, object]] = {}
        names = [f"l{i}/big.bin" for i in range(4)]
        stats = [threading.Thread(target=lambda n=n: results.__setitem__(n, _timed(lambda: os.stat(mp / n))))
                 for n in names]
        for t in stats:
            t.start()
        time.sleep(0.5)
        took_small, small = _timed(lambda: (mp / "small.txt").read_bytes())
        # The kernel serializes lookups within one directory (seen on 6.18 with libfuse 3.14), so a
        # small file beside a stuck one waits for that lookup's deadline, never longer.
        took_beside, beside = _timed(lambda: (mp / "l0/small.txt").read_bytes())
        for t in stats:
            t.join(60)
        print("mount blob reads:", {n: (round(t, 2), type(r).__name__) for n, (t, r) in results.items()},
              "small", round(took_small, 2), "beside a stuck one", round(took_beside, 2))
        assert small == b"tiny\n" and took_small < 1.5, (took_small, small)
        assert beside == b"tiny too\n" and took_beside < 6.5, (took_beside, beside)
        for name, (took, result) in results.items():
            assert isinstance(result, OSError) and result.errno == errno.ETIMEDOUT, (name, result)
            assert took < 6.5, (name, took)
        # the remote healthy again: the background fetch finishes (or a new one starts) and the blob reads
        proxy.mode = "fast"
        assert wait_until(lambda: isinstance(_timed(lambda: os.stat(mp / "l1/big.bin"))[1], os.stat_result), 60)
        assert (mp / "l1/big.bin").read_bytes() == (h.repo / "l1/big.bin").read_bytes()
    finally:
        proxy.mode = "fast"
        subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        wait_until(lambda: not mounted(mp), 10)
        proxy.close()


class _HangingServer:
    """Accepts TCP connections and never answers."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list = []

        def accept() -> None:
            while True:
                try:
                    self.held.append(self.sock.accept()[0])
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        for s in self.held:
            s.close()


@needs_fuse
def test_single_read_against_hanging_remote_returns_at_the_deadline(mp, tmp_path):
    import errno

    from mounting import mounted, wait_until

    h = HostileRepo(tmp_path / "src")
    data = os.urandom(3 * 1024 * 1024)
    md5 = h.put(data)
    h.write("d.bin.dvc", yaml.safe_dump({"outs": [{"md5": md5, "size": len(data), "hash": "md5", "path": "d.bin"}]}))
    h.commit()
    hang = _HangingServer()
    env = {k: v for k, v in os.environ.items() if k != "DDA_REPO"}
    try:
        proc = subprocess.run([DDA, "mount", str(h.repo), str(mp), "--deadline", "5", "--daemon"],
                              capture_output=True, text=True, timeout=120,
                              env={**env, "DDA_CACHE_DIR": str(tmp_path / "cache"),
                                   "DDA_REMOTE_STORAGE_URL": hang.url})
        assert proc.returncode == 0, proc.stderr
        fd = os.open(mp / "d.bin", os.O_RDONLY)
        try:
            took, result = _timed(lambda: os.read(fd, 1024 * 1024))
        finally:
            os.close(fd)
        print("single read against a hanging remote took", round(took, 2), "s")
        assert isinstance(result, OSError) and result.errno == errno.ETIMEDOUT, result
        assert took < 7, took
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        wait_until(lambda: not mounted(mp), 10)
        hang.close()


# ---------------------------------------------------------------------------------------------
# upload: nothing outside the folder being uploaded is read and published


def test_upload_refuses_a_symlink_out_of_the_folder(tmp_path):
    h = HostileRepo(tmp_path / "src")
    h.write("README", "x\n")
    h.commit()
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(h.repo), str(bare)], check=True)
    secret = tmp_path / "home/.ssh/id_ed25519"
    secret.parent.mkdir(parents=True)
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- planted\n")
    data = tmp_path / "dataset"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("a\n")
    (data / "sub/b.txt").write_text("b\n")
    (data / "inside-link.txt").symlink_to(data / "a.txt")   # stays inside: uploaded as a copy
    before = snapshot(h.remote)
    for name, target in (("key", secret), ("keys-dir", secret.parent), ("chain", data / "chain2")):
        link = data / name
        if name == "chain":
            (data / "chain2").symlink_to(secret)           # a chain that leaves on its second hop
        link.symlink_to(target)
        proc = dda("upload", str(bare), str(data), "--to", "data", "--no-progress", cache=tmp_path / "cache")
        err = proc.stderr.decode()
        assert proc.returncode != 0 and "outside" in err and "Traceback" not in err, err
        assert snapshot(h.remote) == before                  # nothing went up
        link.unlink()
        if name == "chain":
            (data / "chain2").unlink()
    # a loop: refused with one line, no hang
    (data / "loop1").symlink_to(data / "loop2")
    (data / "loop2").symlink_to(data / "loop1")
    proc = dda("upload", str(bare), str(data), "--to", "data", "--no-progress", cache=tmp_path / "cache", timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr.decode(), proc.stderr.decode()
    (data / "loop1").unlink()
    (data / "loop2").unlink()
    proc = dda("upload", str(bare), str(data), "--to", "data", "--no-progress", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr.decode()
    pushed = b"".join(p.read_bytes() for p in h.remote.rglob("*") if p.is_file())
    assert b"PRIVATE KEY" not in pushed


@pytest.mark.parametrize("relpaths", [
    ["../escape.txt"], ["/abs/escape.txt"], ["ok/../../escape.txt"], ["ok/../../../escape.txt", "fine.txt"],
])
def test_get_manifest_paths_that_leave(tmp_path, relpaths):
    """Variants: a tracked directory whose manifest names paths that climb out or are absolute."""
    h = HostileRepo(tmp_path / "src")
    files = {rel: b"evil\n" for rel in relpaths}
    h.write("data.dvc", yaml.safe_dump({"outs": [{**h.dir_output(files), "path": "data"}]}))
    h.commit()
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    proc = dda("get", str(h.repo), ".", "-o", str(work / "out"), cache=tmp_path / "cache", cwd=work)
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    assert not list(tmp_path.rglob("escape.txt")), err
    assert not Path("/abs/escape.txt").exists()
    assert sorted(p.name for p in work.iterdir()) == ["out"]


def test_get_symlink_chain_and_dvc_output_below_a_git_symlink(tmp_path):
    """Variants: rev A holds a git symlink chain leading out (link1 -> link2 -> outside) and a
    loop; rev B tracks a DVC directory at link1/x and 200 nested folders. Getting A then B into
    the same folder writes nothing through the chain, and the loop is recreated as links."""
    outside = tmp_path / "outside"
    outside.mkdir()
    h = HostileRepo(tmp_path / "src")
    (h.repo / "link2").symlink_to(outside)
    (h.repo / "link1").symlink_to("link2")
    (h.repo / "loop1").symlink_to("loop2")
    (h.repo / "loop2").symlink_to("loop1")
    rev_a = h.commit("A")
    (h.repo / "link1").unlink()
    h.write("x.dvc", yaml.safe_dump({"outs": [{**h.dir_output({"f.txt": b"in\n"}), "path": "link1/x"}]}))
    deep = "deep/" + "/".join(["d"] * 200) + "/leaf.txt"
    h.write(deep, "deep\n")
    rev_b = h.commit("B")
    ds, cache = tmp_path / "ds", tmp_path / "cache"
    proc = dda("get", str(h.repo), ".", "-o", str(ds), "--rev", rev_a, cache=cache, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert os.readlink(ds / "link1") == "link2" and os.readlink(ds / "loop1") == "loop2"
    proc = dda("get", str(h.repo), ".", "-o", str(ds), "--rev", rev_b, cache=cache, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert list(outside.iterdir()) == []
    assert not (ds / "link1").is_symlink() and (ds / "link1/x/f.txt").read_bytes() == b"in\n"
    assert (ds / deep).read_text() == "deep\n"


def test_get_slash_look_alikes_are_plain_names(tmp_path):
    """Names with '/'-look-alikes (U+2215, U+2044) are single names, written inside. (A git name
    with a backslash is not readable today: Tree.normalize turns '\\' into '/'; it fails safe.)"""
    h = HostileRepo(tmp_path / "src")
    names = ["..\u2215..\u2215escape.txt", "\u2044etc\u2044x"]
    for n in names:
        h.write(n, "plain\n")
    h.commit()
    ds = tmp_path / "ds"
    proc = dda("get", str(h.repo), ".", "-o", str(ds), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(p.name for p in ds.iterdir() if p.name != ".dvc") == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ds", "src"]


# ---------------------------------------------------------------------------------------------
# the hooks (install_hooks() in a subprocess): the same corpus, read and walked, plus the hooks'
# own local writes (folders made for os.chdir / os.mkdir)

HOOKS_CORPUS_SCRIPT = r'''
import json, os, sys, time
from sidecar.hooks import install_hooks

repo, root, cache, names = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
install_hooks(repo, root=root, cache_dir=cache, deadline=10)
out = {}

def attempt(what, fn):
    started = time.monotonic()
    try:
        result = fn()
        out[what] = ["ok", repr(result)[:200]]
    except OSError as err:
        out[what] = ["OSError", f"{err.errno} {err.strerror}"]
    except BaseException as err:   # anything else is a bug: the test names it
        out[what] = [type(err).__name__, str(err)[:300]]
    out[what].append(round(time.monotonic() - started, 2))

attempt("listdir", lambda: sorted(os.listdir(root)))
attempt("walk", lambda: sum(len(f) + len(d) for _, d, f in os.walk(root)))
for name in names:
    p = os.path.join(root, name)
    attempt(f"stat {name}", lambda: os.stat(p).st_mode)
    attempt(f"lstat {name}", lambda: os.lstat(p).st_mode)
    attempt(f"readlink {name}", lambda: os.readlink(p))
    attempt(f"open {name}", lambda: open(p, "rb").read(64))
    attempt(f"listdir {name}", lambda: len(os.listdir(p)))
    here = os.getcwd()
    attempt(f"chdir {name}", lambda: (os.chdir(p), os.getcwd())[1])
    os.chdir(here)
    attempt(f"mkdir {name}/new", lambda: os.mkdir(os.path.join(p, "new")))
print(json.dumps(out))
'''


def test_hooks_hostile_corpus(tmp_path):
    """Repository entries an attacker can plant - symlink chains out of the root and loops,
    `..` and absolute link targets, '/'-look-alike names (U+2215, U+FF0F, U+2044), 150 nested
    folders, a manifest with escaping paths, an escaping wdir, a 20,000-entry manifest - and a
    local symlink over a repository-only folder: install_hooks() in a subprocess stats, reads,
    lists, walks, chdirs into and mkdirs below each. Only OSErrors, nothing hangs, and nothing
    outside the root and the cache is written (the canaries are byte-identical)."""
    outside, canary = tmp_path / "outside", tmp_path / "canary"
    for d in (outside, canary):
        d.mkdir()
        (d / "keep.txt").write_text("keep\n")
    h = HostileRepo(tmp_path / "src")
    (h.repo / "link2").symlink_to(outside)
    (h.repo / "link1").symlink_to("link2")
    (h.repo / "loop1").symlink_to("loop2")
    (h.repo / "loop2").symlink_to("loop1")
    (h.repo / "up").symlink_to("../../..")
    (h.repo / "etc").symlink_to("/etc")
    look_alikes = ["a\u2215..\u2215b.txt", "\uff0fetc\uff0fpasswd", "\u2044x", "..\u2215..\u2215c"]
    for n in look_alikes[:3]:
        h.write(n, "plain\n")
    h.write(look_alikes[3] + "/inner.txt", "in a look-alike folder\n")
    deep = "deep/" + "/".join(["d"] * 150)
    h.write(deep + "/leaf.txt", "deep\n")
    h.write("sub/inner/file.txt", "sub\n")        # locally, `sub` will be a symlink to the canary
    h.write("data.dvc", yaml.safe_dump({"outs": [{**h.dir_output({"../escape.txt": b"e\n", "ok.txt": b"ok\n",
                                                                  "/abs/escape.txt": b"a\n"}), "path": "data"}]}))
    h.write("evil.dvc", yaml.safe_dump({"wdir": "..", "outs": [{**h.dir_output({"victim.txt": b"x\n"}),
                                                                "path": "."}]}))
    huge = [{"md5": hashlib.md5(str(i).encode()).hexdigest(), "relpath": f"h{i // 1000}/f{i}.bin"}
            for i in range(20_000)]
    raw = json.dumps(huge, separators=(", ", ": ")).encode()
    h.write("huge.dvc", yaml.safe_dump({"outs": [{"md5": h.put(raw, is_dir=True) + ".dir", "nfiles": len(huge),
                                                  "path": "huge", "hash": "md5"}]}))
    h.commit()
    root = tmp_path / "root"
    root.mkdir()
    (root / "sub").symlink_to(canary)               # a local symlink over a repository folder
    names = ["link1", "link1/x", "link2", "loop1", "up", "up/etc", "etc", "etc/passwd", *look_alikes,
             look_alikes[3] + "/inner.txt", deep, deep + "/leaf.txt", "sub/inner", "sub/inner/file.txt", "data",
             "data/ok.txt", "data/../escape.txt", "escape.txt", "victim.txt", "huge", "huge/h3/f3000.bin", ".git",
             ".dvc/config"]
    before = {"outside": tree_state(outside), "canary": tree_state(canary), "src": tree_state(h.repo)}
    script = tmp_path / "corpus.py"
    script.write_text(HOOKS_CORPUS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDA_")}
    proc = subprocess.run([sys.executable, str(script), str(h.repo), str(root), str(tmp_path / "cache"),
                           json.dumps(names)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    print("\n".join(f"{k}: {v}" for k, v in out.items()))
    assert {k: v for k, v in out.items() if v[0] not in ("ok", "OSError")} == {}
    assert max(v[2] for v in out.values()) < 30, out
    after = {"outside": tree_state(outside), "canary": tree_state(canary), "src": tree_state(h.repo)}
    assert after == before
    # nothing beside the root, the cache and what the test made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "canary", "corpus.py", "outside", "root", "src"]
    assert not Path("/abs/escape.txt").exists()
    # the root holds only folders the hooks made for chdir/mkdir, plus the test's own symlink
    for dirpath, dirnames, filenames in os.walk(root):
        assert [f for f in filenames if f != "sub"] == [] or dirpath != str(root), (dirpath, filenames)
    assert out["open " + deep + "/leaf.txt"][0] == "ok" and out["chdir " + deep][0] == "ok"
    assert out["open " + look_alikes[3] + "/inner.txt"][0] == "ok" and (root / look_alikes[3]).is_dir()
    assert out["chdir sub/inner"][0] == "OSError" and out["mkdir sub/inner/new"][0] == "OSError"
    assert out["stat link1"][0] == "OSError" and out["stat loop1"][1].startswith("40 ")
    assert out["readlink link1"] == ["ok", "'link2'", out["readlink link1"][2]]
    assert out["open escape.txt"][0] == "OSError" and out["open victim.txt"][0] == "OSError"


# ---------------------------------------------------------------------------------------------
# upload: the hostile corpus as targets and sources


def _upload_world(tmp_path: Path) -> tuple[HostileRepo, Path, Path]:
    """A repository with a git symlink `lnk` to a canary folder outside and a file `README`, its
    bare clone, and the canary."""
    canary = tmp_path / "canary"
    (canary / "sub").mkdir(parents=True)
    (canary / "keep.txt").write_text("keep\n")
    h = HostileRepo(tmp_path / "src")
    h.write("README", "x\n")
    (h.repo / "lnk").symlink_to(canary)
    (h.repo / "rel").symlink_to("../../..")
    h.commit()
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(h.repo), str(bare)], check=True)
    return h, bare, canary


def _tip(bare: Path) -> str:
    return git(bare, "rev-parse", "main")


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("dda: error: "), err
    return lines[0]


@pytest.mark.parametrize("to", ["../x", "/abs/x", "a/../../x", "data/..", "./.git", "data//x", "lnk", "lnk/sub",
                                "rel/x", "README/x", ".git/hooks"])
def test_upload_hostile_targets_are_refused(tmp_path, to):
    """`--to` with `..`, absolute, empty parts, reserved names, or below a git symlink (which
    DVC refuses: 'beyond a symbolic link') or a file: one line, no commit, nothing written."""
    h, bare, canary = _upload_world(tmp_path)
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "a.txt").write_text("a\n")
    before = (tree_state(canary), tree_state(h.remote), _tip(bare))
    proc = dda("upload", str(bare), str(data), "--to", to, "--no-progress", cache=tmp_path / "cache", timeout=120)
    line = _one_line_error(proc)
    assert repr(to) in line or to in line, line
    assert (tree_state(canary), tree_state(h.remote), _tip(bare)) == before
    assert not Path("/abs/x").exists()


def test_upload_hostile_sources(tmp_path):
    """Sources: a FIFO (would block a reader forever), symlinks out (file, folder, a chain), a
    loop - each refused in one line without a hang and with nothing published. Then a folder of
    '/'-look-alike names, 120 nested folders and 3,000 files uploads into a look-alike target,
    stays inside the repository's tree, and `dda get` writes it back inside its destination."""
    h, bare, canary = _upload_world(tmp_path)
    data = tmp_path / "dataset"
    deep = "/".join(["n"] * 120)
    (data / deep).mkdir(parents=True)
    (data / deep / "leaf.txt").write_text("leaf\n")
    for name in ("a\u2215..\u2215..\u2215b.txt", "\uff0fetc\uff0fpasswd", "\u2044x", "..\u2215c"):
        (data / name).write_text("look-alike\n")
    many = data / "many"
    many.mkdir()
    for i in range(3000):
        (many / f"f{i:04}.txt").write_text(f"{i}\n")
    before = (tree_state(canary), tree_state(h.remote), _tip(bare))
    hostile = [("fifo", lambda p: os.mkfifo(p)), ("key", lambda p: p.symlink_to(canary / "keep.txt")),
               ("dir", lambda p: p.symlink_to(canary)), ("chain", lambda p: p.symlink_to(data / "chain2")),
               ("loop", lambda p: p.symlink_to(data / "loop"))]
    for name, make in hostile:
        if name == "chain":
            (data / "chain2").symlink_to(canary / "keep.txt")
        make(data / name)
        proc = dda("upload", str(bare), str(data), "--to", "data", "--no-progress", cache=tmp_path / "cache",
                   timeout=120)
        line = _one_line_error(proc)
        assert name in line, line
        assert (tree_state(canary), tree_state(h.remote), _tip(bare)) == before
        (data / name).unlink()
        if name == "chain":
            (data / "chain2").unlink()
    to = "sets\u2215..\u2215..\u2215x"
    proc = dda("upload", str(bare), str(data), "--to", to, "--no-progress", cache=tmp_path / "cache", timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert tree_state(canary) == before[0]
    paths = git(bare, "ls-tree", "-r", "--name-only", "-z", "main").split("\0")
    assert f"{to}.dvc" in paths and all(".." not in p.split("/") for p in paths), paths
    out = tmp_path / "got"
    proc = dda("get", str(bare), to, "-o", str(out), cache=tmp_path / "cache2", timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (out / deep / "leaf.txt").read_text() == "leaf\n" and (out / "\u2044x").read_text() == "look-alike\n"
    assert len(list((out / "many").iterdir())) == 3000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "cache2", "canary", "dataset", "got",
                                                         "origin.git", "src"]


# ---------------------------------------------------------------------------------------------
# issue 14 item 3 as a user meets it: an absolute wdir through `dda mount --daemon` and `dda sidecar`


def _abs_wdir_repo(tmp_path: Path) -> tuple[HostileRepo, bytes]:
    h = HostileRepo(tmp_path / "src")
    data = b"fine\n" * 100
    h.write("good.bin.dvc", yaml.safe_dump({"outs": [{"md5": h.put(data), "size": len(data), "hash": "md5",
                                                      "path": "good.bin"}]}))
    h.write("evil.dvc", yaml.safe_dump({"wdir": "/some/abs/path", "outs": [{"md5": "0" * 32, "path": "x"}]}))
    h.commit()
    return h, data


@needs_fuse
def test_absolute_wdir_mount_daemon_and_sidecar_stay_live(tmp_path, mp):
    """`dda mount --daemon` and `dda sidecar` on a revision with `wdir: /some/abs/path`: they come
    up at once, serve the rest, answer /healthz, report the bad file in `dda status`, and SIGTERM
    ends the sidecar promptly (it used to spin at 100% CPU and ignore SIGTERM)."""
    import errno
    import signal
    import time

    from mounting import mounted, wait_until
    from sidecar_util import Sidecar

    h, data = _abs_wdir_repo(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "DDA_REPO"}
    started = time.monotonic()
    proc = subprocess.run([DDA, "mount", str(h.repo), str(mp), "--daemon"], capture_output=True, text=True,
                          timeout=60, env={**env, "DDA_CACHE_DIR": str(tmp_path / "cache")})
    try:
        assert proc.returncode == 0 and time.monotonic() - started < 30, proc.stderr
        assert (mp / "good.bin").read_bytes() == data
        with pytest.raises(OSError) as err:
            (mp / "evil").read_bytes()          # the bad output's place: EIO, as a broken output
        assert err.value.errno == errno.EIO
        status = subprocess.run([DDA, "status", str(mp)], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "evil.dvc" in status.stdout and "wdir" in status.stdout, status.stdout
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        wait_until(lambda: not mounted(mp), 10)
    with Sidecar(str(h.repo), mp, tmp_path / "cache2") as sc:
        assert sc.get("/healthz", timeout=5) == (200, b"ok\n")
        assert (mp / "good.bin").read_bytes() == data
        rc, took = sc.stop(signal.SIGTERM, timeout=20)
        assert rc == 0 and took < 10, (rc, took, sc.output()[-2000:])
