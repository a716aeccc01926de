"""Secrets never travel (issue 14, must-work 4).

One repository whose git server and four DVC remotes (basic, bearer and custom-header HTTP auth,
S3 keys) each take a distinct planted credential. The credentials are given every way a user can
give them: DDA_REMOTE_<NAME>_* variables, Secret-style files (DDA_SECRET_DIR), the git token in
the URL's userinfo and in the DDA_GIT_TOKEN setting, install_hooks() arguments. Then, while a
mount, `dda sidecar` or a hooks session is live, and after failures (wrong credentials, 401, 5xx
answers that echo the request's headers, a redirect to another origin, a remote that hangs), the
planted values are searched for in:

- every child process's /proc/PID/environ and cmdline (git through a recording wrapper first on
  PATH, the FUSE daemon, the sidecar, the hooks' children);
- stdout/stderr, logs (with -v), error messages of ls/cat/get/mount/hooks;
- `/metrics`, `/healthz`, `/readyz` and other answers of the sidecar;
- every xattr of a few paths of the mount; `dda status` (human and JSON);
- the webhook's answers (patch, message, warnings);
- files we write: in the cache none may hold a secret; in TMPDIR a file that does must be 0600
  in a 0700 folder, and be gone at close.
"""
from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mounting import DDA, mounted, wait_until  # noqa: E402
from servers import GIT_PASSWORD, GIT_USER, S3_ACCESS_KEY, S3_SECRET_KEY  # noqa: E402
from test_hostile import HostileRepo, git  # noqa: E402

BASIC_USER = "alice-basic"
BASIC_PW = "basicPW-7f3a91c2"
BEARER = "bearerTOK-2c8e5d41"
CUSTOM = "customKEY-9b4d06e7"
WRONG_GIT = "wrongGIT-44aa21b0"
WRONG_PW = "wrongPW-8812cd3e"
WRONG_S3 = "wrongS3-d1e2f3a4b5"


def _b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# Every planted value, as it could show up: plain, and as the Basic header git and httpx send.
PLANTED = {
    "git token": GIT_PASSWORD, "git basic header": _b64(GIT_USER, GIT_PASSWORD),
    "remote password": BASIC_PW, "remote basic header": _b64(BASIC_USER, BASIC_PW),
    "bearer token": BEARER, "custom header value": CUSTOM, "s3 secret key": S3_SECRET_KEY,
    "wrong git token": WRONG_GIT, "wrong git header": _b64(GIT_USER, WRONG_GIT),
    "wrong password": WRONG_PW, "wrong basic header": _b64(BASIC_USER, WRONG_PW), "wrong s3 key": WRONG_S3,
}
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
NAME = f"secrets-travel-{os.getpid()}"


def found(data: bytes | str, where: str) -> list[str]:
    """'<what> in <where>' for each planted value in `data`."""
    raw = data.encode(errors="replace") if isinstance(data, str) else data
    return [f"{what} in {where}" for what, value in PLANTED.items() if value.encode() in raw]


# ---------------------------------------------------------------------------------------------
# servers


class AuthStore:
    """A DVC HTTP remote over `root` (URL path /store/...) that serves only requests carrying
    `header: value`. `mode`: "ok"; "401" or "500" (the body echoes the request's headers, as a
    careless server would); "redirect" (302 to `other`, another origin); "hang" (never answers)."""

    def __init__(self, root: Path, header: str, value: str, other: "Recorder"):
        store = self
        self.mode = "ok"
        self.released = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes, extra: dict | None = None, send_body: bool = True) -> None:
                self.send_response(code)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _answer(self, send_body: bool) -> None:
                echo = json.dumps(dict(self.headers)).encode()
                if store.mode == "hang":
                    store.released.wait(60)
                    return
                if store.mode == "redirect":
                    return self._send(302, b"", {"Location": other.url + self.path})
                if store.mode in ("401", "500") or self.headers.get(header) != value:
                    code = 500 if store.mode == "500" else 401
                    return self._send(code, echo, {"WWW-Authenticate": 'Basic realm="x"'} if code == 401 else {},
                                      send_body)
                target = root / self.path.removeprefix("/store/")
                if ".." in self.path or not target.is_file():
                    return self._send(404, b"")
                data = target.read_bytes()
                start, end = 0, len(data) - 1
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    start = int(a) if a else 0
                    end = min(int(b), len(data) - 1) if b else len(data) - 1
                    return self._send(206, data[start:end + 1],
                                      {"Content-Range": f"bytes {start}-{end}/{len(data)}"}, send_body)
                self._send(200, data, None, send_body)

            def do_GET(self):  # noqa: N802
                self._answer(True)

            def do_HEAD(self):  # noqa: N802
                self._answer(False)

            def do_PUT(self):  # noqa: N802  (dda upload)
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if store.mode != "ok" or self.headers.get(header) != value or ".." in self.path:
                    return self._send(401 if store.mode == "ok" else 500, json.dumps(dict(self.headers)).encode())
                target = root / self.path.removeprefix("/store/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                self._send(201, b"")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/store"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


class Recorder:
    """Another origin: records every request's headers, answers 200 with junk."""

    def __init__(self):
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                seen.append(json.dumps(dict(self.headers)))
                self.send_response(200)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"junk")

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class World:
    """The repository, its servers, and how a user runs dda against them."""

    def __init__(self, root: Path, git_server, s3_remote):
        self.root = root
        self.other = Recorder()
        h = self.h = HostileRepo(root / "src")
        self.stores = {
            "basic": AuthStore(h.remote, "Authorization", "Basic " + _b64(BASIC_USER, BASIC_PW), self.other),
            "bearer": AuthStore(h.remote, "Authorization", f"Bearer {BEARER}", self.other),
            "custom": AuthStore(h.remote, "X-Api-Key", CUSTOM, self.other),
        }
        prefix = f"secrets-{os.getpid()}"
        s3_url = s3_remote.prefix_url(prefix)
        (h.repo / ".dvc/config").write_text(
            "[core]\n    remote = basic\n"
            f"['remote \"basic\"']\n    url = {self.stores['basic'].url}\n    auth = basic\n    method = PUT\n"
            f"['remote \"bearer\"']\n    url = {self.stores['bearer'].url}\n    auth = bearer\n"
            f"['remote \"custom\"']\n    url = {self.stores['custom'].url}\n    auth = custom\n"
            "    custom_auth_header = X-Api-Key\n"
            f"['remote \"s3\"']\n    url = {s3_url}\n    endpointurl = {s3_remote.endpoint_url}\n")
        self.data: dict[str, bytes] = {}
        for remote in ("basic", "bearer", "custom", "s3"):
            for i in range(2):       # two files each: one read early, one read after a failure is set
                data = f"{remote} payload {i}\n".encode() * 50
                name = f"{remote}{i}.bin"
                md5 = h.put(data)
                h.write(name + ".dvc", yaml.safe_dump({"outs": [{"md5": md5, "size": len(data), "hash": "md5",
                                                                 "path": name, "remote": remote}]}))
                self.data[name] = data
        files = {f"f{i}.txt": f"dir file {i}\n".encode() for i in range(3)}
        h.write("data.dvc", yaml.safe_dump({"outs": [{**h.dir_output(files), "path": "data"}]}))
        h.write("README.md", "# secrets\n")
        h.commit()
        shutil.copytree(h.remote, s3_remote.prefix_root(prefix), dirs_exist_ok=True)
        bare = git_server.create_bare(NAME)
        git(h.repo, "push", "-q", str(bare), "main")
        self.public_url = git_server.private_url(NAME)
        self.token_url = git_server.private_url(NAME, with_credentials=True)
        self.wrong_url = self.token_url.replace(GIT_PASSWORD, WRONG_GIT)
        # git through a wrapper that records its environment and argv (git_env keeps PATH)
        self.bin = root / "bin"
        self.gitlog = root / "gitlog"
        self.bin.mkdir()
        self.gitlog.mkdir()
        real = shutil.which("git")
        (self.bin / "git").write_text(
            f"#!/bin/sh\ncat /proc/$$/environ > {self.gitlog}/env.$$\n"
            f"printf '%s\\0' \"$@\" > {self.gitlog}/argv.$$\nexec {real} \"$@\"\n")
        (self.bin / "git").chmod(0o755)
        self.tmp = root / "tmp"
        self.tmp.mkdir(mode=0o700)

    def reset(self) -> None:
        """Between tests: healthy remotes, nothing recorded."""
        self.modes("ok")
        self.other.seen.clear()
        for p in self.gitlog.iterdir():
            p.unlink()
        for p in self.tmp.iterdir():       # what an earlier test left is that test's failure
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def modes(self, mode: str) -> None:
        for store in self.stores.values():
            store.mode = mode

    def cred_env(self) -> dict[str, str]:
        """The remotes' credentials as DDA_REMOTE_<NAME>_* variables."""
        return {"DDA_REMOTE_BASIC_USER": BASIC_USER, "DDA_REMOTE_BASIC_PASSWORD": BASIC_PW,
                "DDA_REMOTE_BEARER_TOKEN": BEARER, "DDA_REMOTE_CUSTOM_PASSWORD": CUSTOM,
                "DDA_REMOTE_S3_ACCESS_KEY_ID": S3_ACCESS_KEY, "DDA_REMOTE_S3_SECRET_ACCESS_KEY": S3_SECRET_KEY}

    def env(self, cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DDA_", "AWS_")) and k != "XDG_RUNTIME_DIR"}
        env.update(DDA_CACHE_DIR=str(cache), TMPDIR=str(self.tmp), PATH=f"{self.bin}:{env['PATH']}",
                   HOME=str(self.root / "home"))
        env.update(extra or {})
        return env

    def dda(self, *args: str, cache: Path, env: dict[str, str] | None = None,
            timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([DDA, *args], capture_output=True, env=self.env(cache, env), timeout=timeout,
                              cwd=self.root)

    def git_leaks(self) -> list[str]:
        out = []
        for p in sorted(self.gitlog.iterdir()):
            out += found(p.read_bytes(), f"git's {p.name}")
        return out

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        self.other.close()


@pytest.fixture(scope="module")
def shared_world(tmp_path_factory, git_server, s3_remote):
    w = World(tmp_path_factory.mktemp("secrets-travel"), git_server, s3_remote)
    yield w
    w.close()


@pytest.fixture()
def world(shared_world):
    shared_world.reset()
    yield shared_world
    shared_world.modes("ok")


# ---------------------------------------------------------------------------------------------
# what to search


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, now."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def process_leaks(pids: list[int]) -> tuple[list[str], int]:
    """Planted values in the environ and cmdline of `pids`; and how many could be read."""
    leaks, read = [], 0
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        read += 1
        name = cmdline.split(b"\0")[:4]
        leaks += found(environ, f"environ of {pid} {name}") + found(cmdline, f"cmdline of {pid} {name}")
    return leaks, read


def file_leaks(cache: Path, tmp: Path, live: bool) -> list[str]:
    """No file in the cache holds a secret. In TMPDIR, one that does is 0600 in a 0700 folder
    while `live`, and gone otherwise."""
    leaks = []
    for base, private_ok in ((cache, False), (tmp, live)):
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                p = Path(dirpath) / name
                try:
                    data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
                except OSError:
                    continue
                hits = found(data, str(p))
                if not hits:
                    continue
                mode, folder = stat.S_IMODE(p.stat().st_mode), stat.S_IMODE(p.parent.stat().st_mode)
                if private_ok and mode == 0o600 and folder == 0o700 and p.stat().st_uid == os.getuid():
                    continue
                leaks += [f"{h} (mode {mode:o}, folder {folder:o}, {'live' if live else 'after close'})"
                          for h in hits]
    return leaks


def xattr_leaks(paths: list[Path]) -> tuple[list[str], int]:
    """Planted values in any xattr of `paths` (every listed name, plus user.dda.refresh)."""
    leaks, got = [], 0
    for path in paths:
        names = set(os.listxattr(path)) | {"user.dda.status", "user.dda.commit", "user.dda.refresh"}
        for name in sorted(names):
            try:
                value = os.getxattr(path, name)
            except OSError:
                continue
            got += 1
            leaks += found(value, f"xattr {name} of {path}")
    return leaks, got


def status_leaks(world: World, mp: Path, cache: Path) -> list[str]:
    leaks = []
    for args in (("status", str(mp)), ("status", "--json", str(mp))):
        proc = world.dda(*args, cache=cache)
        assert proc.returncode == 0 and proc.stdout, proc.stderr
        leaks += found(proc.stdout + proc.stderr, "dda " + " ".join(args[:-1]))
    return leaks


# ---------------------------------------------------------------------------------------------
# the CLI, working and failing


@pytest.mark.parametrize("git_creds", ["userinfo", "setting"])
def test_cli_with_every_credential_leaks_nothing(world, tmp_path, git_creds):
    """ls, cat and get through all four remotes and the private git server, -v: every answer is
    right (so each credential was used) and no planted value is anywhere."""
    cache = tmp_path / "cache"
    env = world.cred_env()
    url = world.token_url
    if git_creds == "setting":
        url, env = world.public_url, {**env, "DDA_GIT_USER": GIT_USER, "DDA_GIT_TOKEN": GIT_PASSWORD}
    world.modes("ok")
    leaks: list[str] = []
    runs = [("ls", "-R", "-v", url), ("cat", "-v", url, "basic0.bin"), ("cat", url, "bearer0.bin"),
            ("cat", url, "custom0.bin"), ("cat", url, "s30.bin"),
            ("get", "-v", url, ".", "-o", str(tmp_path / "out"))]
    (tmp_path / "up.txt").write_text(f"uploaded by {git_creds}\n")
    runs.append(("upload", "-v", url, str(tmp_path / "up.txt"), "--to", f"up-{git_creds}", "--no-progress"))
    for args in runs:
        proc = world.dda(*args, cache=cache, env=env)
        assert proc.returncode == 0, (args, proc.stderr.decode())
        if args[0] == "cat":
            assert proc.stdout == world.data[args[-1]]
        leaks += found(proc.stdout + proc.stderr, f"output of dda {args[0]}")
    assert (tmp_path / "out/custom1.bin").read_bytes() == world.data["custom1.bin"]
    leaks += world.git_leaks() + file_leaks(cache, world.tmp, live=False)
    assert not leaks, leaks
    assert list(world.gitlog.iterdir()), "the git wrapper saw no git run"


@pytest.mark.parametrize("fault", ["wrong", "401", "500", "redirect", "hang"])
def test_cli_failures_leak_nothing(world, tmp_path, fault):
    """Wrong credentials (git, HTTP, S3), 401, a 500 echoing the request headers, a redirect to
    another origin, a remote that hangs: each fails with a line that holds no planted value, and
    the other origin never sees one."""
    cache = tmp_path / "cache"
    env = world.cred_env()
    if fault == "wrong":
        env.update(DDA_REMOTE_BASIC_PASSWORD=WRONG_PW, DDA_REMOTE_BEARER_TOKEN=WRONG_PW,
                   DDA_REMOTE_CUSTOM_PASSWORD=WRONG_PW, DDA_REMOTE_S3_SECRET_ACCESS_KEY=WRONG_S3)
        world.modes("ok")
    else:
        world.modes(fault)
    world.other.seen.clear()
    leaks: list[str] = []
    limits = ("--deadline", "3", "--retries", "1", "--request-timeout", "2")
    try:
        runs = [("cat", *limits, world.token_url, f"{r}1.bin") for r in ("basic", "bearer", "custom")]
        runs += [("get", *limits, world.token_url, "data", "-o", str(tmp_path / "out"))]
        (tmp_path / "up.txt").write_text("never lands\n")
        runs += [("upload", *limits, "--retry-for", "0", world.token_url, str(tmp_path / "up.txt"),
                  "--to", f"up-{fault}", "--no-progress")]
        if fault == "wrong":
            runs += [("cat", *limits, world.token_url, "s31.bin"), ("ls", world.wrong_url),
                     ("get", world.wrong_url, ".", "-o", str(tmp_path / "out2")),
                     ("mount", world.wrong_url, str(tmp_path / "mnt"))]
            (tmp_path / "mnt").mkdir()
        for args in runs:
            proc = world.dda(*args, cache=cache, env=env, timeout=60)
            err = proc.stderr.decode()
            assert proc.returncode != 0 and "Traceback" not in err, (args, err)
            leaks += found(proc.stdout + proc.stderr, f"output of dda {args[0]} ({fault})")
        if fault == "wrong":
            assert "authentication failed" in err or "access denied" in err, err
    finally:
        world.modes("ok")
    if fault == "redirect":
        assert world.other.seen, "no request followed the redirect"
        leaks += [f"{hit} (sent to another origin)" for seen in world.other.seen for hit in found(seen, "headers")]
    leaks += world.git_leaks() + file_leaks(cache, world.tmp, live=False)
    assert not leaks, leaks


# ---------------------------------------------------------------------------------------------
# live sessions: the mount, the sidecar, the hooks


def _read_everything(mp: Path, world: World, skip: str) -> None:
    for name, data in world.data.items():
        if not name.startswith(skip):
            assert (mp / name).read_bytes() == data, name
    assert (mp / "data/f0.txt").read_bytes() == b"dir file 0\n"


@needs_fuse
def test_mount_daemon_live_leaks_nothing(world, tmp_path, mp):
    """`dda mount http://user:TOKEN@... --daemon -v` with the remotes' credentials in DDA_REMOTE_*:
    while it serves (and after a read failed on a 500 that echoes the credential), nothing in the
    daemon's or git's environ/cmdline, the xattrs, `dda status`, the log or our files; at unmount
    the files holding a credential are gone."""
    cache = tmp_path / "cache"
    world.modes("ok")
    proc = world.dda("mount", "-v", world.token_url, str(mp), "--daemon", "--deadline", "5", "--retries", "1",
                     cache=cache, env=world.cred_env())
    assert proc.returncode == 0, proc.stderr.decode()
    pid = int(proc.stdout.decode().split("daemon pid ")[1].split(",")[0])
    leaks = found(proc.stdout + proc.stderr, "dda mount's output")
    try:
        _read_everything(mp, world, skip="custom1")
        world.stores["custom"].mode = "500"
        with pytest.raises(OSError):
            (mp / "custom1.bin").read_bytes()
        pids = descendants(pid)
        got, read = process_leaks(pids)
        assert read >= 2, pids           # the daemon and at least one git cat-file reader
        leaks += got
        got, n = xattr_leaks([mp, mp / "basic0.bin", mp / "data", mp / "data/f1.txt"])
        assert n >= 5
        leaks += got + status_leaks(world, mp, cache) + file_leaks(cache, world.tmp, live=True)
    finally:
        world.modes("ok")
        subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        wait_until(lambda: not mounted(mp), 10)
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), 20), "the daemon did not exit"
    log = (cache / "logs/mount.log").read_bytes()
    assert b"custom1.bin" in log or b"HTTP 500" in log, log[-2000:]     # the failure was logged...
    leaks += found(log, "the mount's log") + world.git_leaks() + file_leaks(cache, world.tmp, live=False)
    assert not leaks, leaks                                             # ...without a credential


@needs_fuse
@pytest.mark.parametrize("git_creds", ["secret-files", "userinfo"])
def test_sidecar_live_leaks_nothing(world, tmp_path, mp, git_creds):
    """`dda sidecar` as the webhook runs it: every credential in Secret files (DDA_SECRET_DIR);
    or the git token in DDA_REPO's userinfo, as a user may run it by hand. Its HTTP answers
    (/metrics labels the repository), its output, its children's environ/cmdline (its own too
    when it was given no secret), the xattrs, `dda status` and our files hold none of them, live
    and after a failed read; SIGTERM cleans up."""
    from sidecar_util import Sidecar, http

    secret = tmp_path / "secret"
    secret.mkdir()
    git_files = {"DDA_GIT_USER": GIT_USER, "DDA_GIT_TOKEN": GIT_PASSWORD} if git_creds == "secret-files" else {}
    for key, value in {**world.cred_env(), **git_files}.items():
        (secret / key).write_text(value + "\n")
    cache = tmp_path / "cache"
    env = world.env(cache, {"DDA_SECRET_DIR": str(secret), "DDA_DEADLINE": "5",
                            "DDA_RETRIES": "1"})
    world.modes("ok")
    repo = world.public_url if git_creds == "secret-files" else world.token_url
    sc = Sidecar(repo, mp, cache, env=env, args=("-v",))
    sc.env = {**env, **{k: v for k, v in sc.env.items() if k in ("DDA_REPO", "DDA_MOUNT", "DDA_PORT", "DDA_BIND")}}
    leaks: list[str] = []
    early: list[bytes] = []          # /metrics while it starts: before the mount is up, too
    starting = threading.Event()

    def poll() -> None:
        while not starting.is_set():
            try:
                early.append(http("GET", sc.url + "/metrics", timeout=2)[1])
            except OSError:
                pass
            starting.wait(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    with sc:
        starting.set()
        poller.join(5)
        assert any(b"dda_" in body for body in early), "no /metrics answer while starting"
        leaks += [hit for body in early for hit in found(body, "/metrics while starting")]
        _read_everything(mp, world, skip="custom1")
        world.stores["custom"].mode = "500"
        try:
            with pytest.raises(OSError):
                (mp / "custom1.bin").read_bytes()
        finally:
            world.modes("ok")
        for path in ("/metrics", "/healthz", "/readyz", "/nope", "/v1/hints"):
            status, body = sc.get(path)
            leaks += found(body, f"GET {path} ({status})")
        for path, doc in (("/v1/hints", {"paths": ["basic0.bin", "../x"]}), ("/v1/batch-wait", {"seconds": [0.1]}),
                          ("/v1/hints", {"paths": 5})):
            status, body = http("POST", sc.url + path, doc)
            leaks += found(body, f"POST {path} ({status})")
        assert "dda_" in sc.metrics_text()
        pids = descendants(sc.proc.pid)
        if git_creds == "userinfo":           # its own environ holds what the user gave it
            pids.remove(sc.proc.pid)
        got, read = process_leaks(pids)       # with Secret files it got only the folder's path
        assert read >= 1, pids
        leaks += got
        got, n = xattr_leaks([mp, mp / "bearer0.bin", mp / "data"])
        assert n >= 4
        leaks += got + status_leaks(world, mp, cache) + file_leaks(cache, world.tmp, live=True)
        rc, _ = sc.stop()
        assert rc == 0
    output = sc.output()
    assert "custom1.bin" in output or "HTTP 500" in output, output[-2000:]
    leaks += found(output, "the sidecar's output") + world.git_leaks() + file_leaks(cache, world.tmp, live=False)
    assert not leaks, leaks


HOOKS_SCRIPT = r'''
import json, os, subprocess, sys, traceback
from pathlib import Path
from sidecar.hooks import install_hooks

args = json.loads(Path(sys.argv[1]).read_text())        # the user's own file: url and credentials
root = args["root"]
install_hooks(args["url"], root=root, cache_dir=args["cache"], deadline=5, retries=1, remotes=args["remotes"])
out = {"read": {}, "errors": [], "children": [], "tmp": []}
for name in args["read"]:
    out["read"][name] = open(os.path.join(root, name), "rb").read().decode()
try:
    open(os.path.join(root, "custom1.bin"), "rb").read()      # its remote answers 500, echoing the headers
    out["errors"].append("no error")
except OSError as err:
    out["errors"].append(str(err) + "\n" + repr(err) + "\n" + traceback.format_exc())
for walked in os.walk(root):
    out["errors"].append(repr(walked))
# children: a shell (what any tool sees), a python child (the hooks re-installed from DDA_HOOKS)
sh = subprocess.run(["sh", "-c", "cat /proc/$$/environ; echo; cat /proc/$$/cmdline; env"], capture_output=True)
out["children"].append(sh.stdout.decode(errors="replace") + sh.stderr.decode(errors="replace"))
py = subprocess.run([sys.executable, "-c", "import os,sys; print(open(sys.argv[1]).read()); "
                     "print(open('/proc/self/environ').read())", os.path.join(root, "bearer0.bin")],
                    capture_output=True, text=True, timeout=120)
out["children"].append(py.stdout + py.stderr)
out["py_child_read"] = py.stdout.split("\n")[0]
# every process below this one now (git cat-file readers, ...)
kids, todo = [], [os.getpid()]
table = {}
for p in Path("/proc").iterdir():
    if p.name.isdigit():
        try:
            table.setdefault(int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(p.name))
        except (OSError, ValueError, IndexError):
            pass
while todo:
    pid = todo.pop()
    kids.append(pid)
    todo += table.get(pid, [])
for pid in kids:
    try:
        out["children"].append(Path(f"/proc/{pid}/environ").read_text(errors="replace") + " | "
                               + Path(f"/proc/{pid}/cmdline").read_text(errors="replace"))
    except OSError:
        pass
out["pids"] = len(kids)
for dirpath, dirnames, filenames in os.walk(args["tmp"]):
    for n in filenames:
        p = Path(dirpath) / n
        out["tmp"].append([str(p), oct(p.stat().st_mode & 0o777), oct(p.parent.stat().st_mode & 0o777)])
print(json.dumps(out))
'''


def test_hooks_leak_nothing(world, tmp_path):
    """install_hooks(URL with token, remotes={credentials}): reads work in the process and in a
    spawned python child; no planted value in DDA_HOOKS or any child's environ/cmdline, the
    error of a failed read, or a file left behind; the credentials file is 0600 and removed."""
    world.modes("ok")
    world.stores["custom"].mode = "500"
    root = tmp_path / "root"
    root.mkdir()
    args = tmp_path / "args.json"
    args.write_text(json.dumps({
        "url": world.token_url, "root": str(root), "cache": str(tmp_path / "cache"), "tmp": str(world.tmp),
        "read": ["basic0.bin", "bearer0.bin", "s30.bin", "data/f2.txt"],
        "remotes": {"basic": {"user": BASIC_USER, "password": BASIC_PW}, "bearer": {"token": BEARER},
                    "custom": {"password": CUSTOM},
                    "s3": {"access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET_KEY}}}))
    script = tmp_path / "train.py"
    script.write_text(HOOKS_SCRIPT)
    try:
        proc = subprocess.run([sys.executable, str(script), str(args)], capture_output=True, timeout=180,
                              env=world.env(tmp_path / "cache"), cwd=tmp_path)
    finally:
        world.modes("ok")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    out = json.loads(proc.stdout)
    assert out["read"]["bearer0.bin"] == world.data["bearer0.bin"].decode()
    assert out["py_child_read"] == world.data["bearer0.bin"].decode().split("\n")[0]
    assert "no error" not in out["errors"][0]
    assert out["pids"] >= 2 and any("DDA_HOOKS=" in c for c in out["children"])
    creds = [t for t in out["tmp"] if "credentials" in t[0] or "dda-" in t[0]]
    assert creds and all(mode == "0o600" and folder == "0o700" for _, mode, folder in creds), out["tmp"]
    leaks = found(proc.stdout, "the hooks' children, errors and walk") + found(proc.stderr, "the hooks' stderr")
    leaks += world.git_leaks() + file_leaks(tmp_path / "cache", world.tmp, live=False)
    assert not leaks, leaks


# ---------------------------------------------------------------------------------------------
# the webhook


def test_webhook_never_inlines_a_credential():
    """A repo annotation with a token is refused (deny) or left out (warn) without echoing the
    token; a pod with a Secret gets the Secret mounted by name: no value in the patch."""
    from k8s_tools import decode_patch, load_review

    from sidecar.webhook.mutate import WebhookConfig, mutate

    leaks = []
    for on_invalid in ("deny", "warn"):
        for repo in (f"https://{GIT_USER}:{GIT_PASSWORD}@git.example.com/o/r.git",
                     f"https://{BEARER}@git.example.com/o/r.git",
                     f"http://{GIT_USER}:{GIT_PASSWORD}@git.example.com/o/r.git",
                     f"ssh://git:{GIT_PASSWORD}@git.example.com/o/r.git",
                     f"https://git.example.com/o/r.git?token={GIT_PASSWORD}"):
            review = load_review("job_single_repo.json")
            review["request"]["object"]["metadata"]["annotations"]["dda-sidecar.io/repo"] = repo
            config = WebhookConfig.load(env={}, on_invalid=on_invalid, image="registry.example.com/dda-sidecar:0.1.0")
            response = mutate(review, config)["response"]
            leaks += found(json.dumps(response), f"webhook answer ({on_invalid}, {repo[:12]})")
            if response.get("patch"):
                leaks += found(json.dumps(decode_patch(response)), "webhook patch")
    review = load_review("job_single_repo.json")
    review["request"]["object"]["metadata"]["annotations"]["dda-sidecar.io/secret"] = "dataset-creds"
    response = mutate(review, WebhookConfig.load(env={}, image="registry.example.com/dda-sidecar:0.1.0"))["response"]
    patch = json.dumps(decode_patch(response))
    assert "dataset-creds" in patch and "envFrom" not in patch and "secretKeyRef" not in patch
    assert not leaks, leaks


# ---------------------------------------------------------------------------------------------
# hostile servers and URLs that push a credential into what we print: redaction is the defence


class EchoGitServer:
    """A git smart-HTTP server that answers every request with an ERR packet echoing the
    request's Authorization header and the password in it (a hostile or careless server)."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                auth = self.headers.get("Authorization", "")
                if not auth:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="x"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                scheme, _, value = auth.partition(" ")
                decoded = base64.b64decode(value).decode(errors="replace") if scheme == "Basic" else value

                def pkt(text: str) -> bytes:
                    data = text.encode()
                    return f"{len(data) + 4:04x}".encode() + data

                body = pkt("# service=git-upload-pack\n") + b"0000" + pkt(f"ERR seen {auth} = {decoded}\n")
                self.send_response(200)
                self.send_header("Content-Type", "application/x-git-upload-pack-advertisement")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_server_echoing_the_credential_and_malformed_urls_leak_nothing(world, tmp_path):
    """A git server whose error echoes the credential it was sent, and URLs a user may mistype
    with a token in them (scp-like with a password, unparsable IPv6): one line each, no token."""
    echo = EchoGitServer()
    leaks: list[str] = []
    echoed = 0
    try:
        cases = [(f"http://{GIT_USER}:{GIT_PASSWORD}@127.0.0.1:{echo.port}/o/r.git", {}),
                 (f"http://127.0.0.1:{echo.port}/o/r.git", {"DDA_GIT_USER": GIT_USER, "DDA_GIT_TOKEN": GIT_PASSWORD}),
                 (f"http://127.0.0.1:{echo.port}/o/r.git", {"DDA_GIT_TOKEN": BEARER}),
                 (f"{GIT_USER}:{GIT_PASSWORD}@127.0.0.1:o/r.git", {}),
                 (f"http://{GIT_USER}:{GIT_PASSWORD}@[::1/o/r.git", {}),
                 (f"http://{GIT_USER}:{GIT_PASSWORD}@127.0.0.1:99999/o/r.git", {})]
        for url, env in cases:
            for args in (("ls", url), ("get", url, ".", "-o", str(tmp_path / "out"))):
                proc = world.dda(*args, cache=tmp_path / "cache", env=env, timeout=60)
                err = proc.stderr.decode()
                lines = [line for line in err.splitlines() if line.strip()]
                assert proc.returncode != 0 and "Traceback" not in err and len(lines) == 1, (url, err)
                leaks += found(proc.stdout + proc.stderr, f"dda {args[0]} {url.split('@')[-1]}")
                echoed += "remote error: seen" in err
        assert echoed >= 6, "the echoing server's message never came through"
    finally:
        echo.close()
    leaks += world.git_leaks()
    assert not leaks, leaks
