"""Real servers for the test suite: git over smart HTTP, a DVC HTTP (WebDAV)
remote and an S3 remote (rclone) behind an nginx proxy that counts requests.

Everything binds 127.0.0.1 on free ports, runs as subprocesses under a private
directory, and is stopped by ``stop()``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import atexit
import weakref
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
FCGIWRAP = shutil.which("fcgiwrap") or "/usr/sbin/fcgiwrap"
GIT_HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
DAV_EXT_MODULE = "/usr/lib/nginx/modules/ngx_http_dav_ext_module.so"
RCLONE = str(VENV_BIN / "rclone") if (VENV_BIN / "rclone").exists() else (shutil.which("rclone") or "rclone")

LOG_FORMAT = "log_format counts '$request_method|$uri|$status|$body_bytes_sent|$request_length';"

GIT_USER = "gituser"
GIT_PASSWORD = "gitpass-SECRET-123"
DVC_HTTP_USER = "dvcuser"
DVC_HTTP_PASSWORD = "dvcpass-SECRET-456"
S3_ACCESS_KEY = "s3key"
S3_SECRET_KEY = "s3secret-SECRET-789"
S3_BUCKET = "dvc"


# --------------------------------------------------------------------------- helpers

_RUNNING: "weakref.WeakSet" = None  # set below


def _stop_all_at_exit() -> None:
    for srv in list(_RUNNING):
        try:
            srv.stop()
        except Exception:
            pass


_RUNNING = weakref.WeakSet()
atexit.register(_stop_all_at_exit)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(path: Path, limit: int = 8000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def wait_for_port(port: int, proc: subprocess.Popen | None, logs: list[Path], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    detail = "\n".join(f"--- {p}:\n{_read(p)}" for p in logs)
    rc = proc.poll() if proc is not None else None
    raise RuntimeError(f"{what} did not start listening on 127.0.0.1:{port} (exit code {rc})\n{detail}")


def wait_for_path(path: Path, proc: subprocess.Popen, logs: list[Path], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    detail = "\n".join(f"--- {p}:\n{_read(p)}" for p in logs)
    raise RuntimeError(f"{what} did not create {path} (exit code {proc.poll()})\n{detail}")


def _terminate(proc: subprocess.Popen | None, timeout: float = 5.0, group: bool = False) -> None:
    """Stop a server we started; with group=True, its whole process group
    (it was started with start_new_session=True, so the group is its own)."""
    if proc is None:
        return
    if group:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    elif proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if group:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        else:
            proc.kill()
        proc.wait(timeout=timeout)
    if group:
        # prefork children (fcgiwrap -c N, nginx workers) got the same SIGTERM;
        # give them a moment, then SIGKILL whatever is still running (zombies
        # waiting for a reaper do not count).
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.05)
        if _group_alive(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _group_alive(pgid: int) -> bool:
    """Whether a non-zombie process of process group pgid exists (Linux /proc)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            return True
    return False


def _htpasswd_line(user: str, password: str) -> str:
    # nginx accepts {PLAIN} passwords (ngx_crypt); good enough for tests.
    return f"{user}:{{PLAIN}}{password}\n"


@dataclass(frozen=True)
class Request:
    method: str
    uri: str
    status: int
    bytes_sent: int
    request_length: int = 0


class _CountingLog:
    """Request counter over an nginx access log in the ``counts`` format."""

    access_log: Path

    def _lines(self) -> list[str]:
        try:
            data = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        # only complete lines
        return data.splitlines() if data.endswith("\n") else data.splitlines()[:-1]

    def mark(self) -> int:
        """Number of requests logged so far (settled)."""
        return len(self._settle())

    def _settle(self, max_wait: float = 1.0, quiet: float = 0.15) -> list[str]:
        # nginx writes the log line after the response has been sent: poll until
        # the line count stays unchanged for `quiet` seconds (at most max_wait).
        deadline = time.monotonic() + max_wait
        lines = self._lines()
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.02)
            new = self._lines()
            if len(new) != len(lines):
                lines = new
                stable_since = time.monotonic()
            elif time.monotonic() - stable_since >= quiet:
                break
        return lines

    def requests_since(self, mark: int) -> list[Request]:
        out: list[Request] = []
        for line in self._settle()[mark:]:
            parts = line.split("|")
            if len(parts) < 5:
                continue
            method, uri, status, sent, reqlen = parts[:5]
            out.append(
                Request(
                    method=method,
                    uri=uri,
                    status=int(status),
                    bytes_sent=int(sent) if sent.isdigit() else 0,
                    request_length=int(reqlen) if reqlen.isdigit() else 0,
                )
            )
        return out

    def bytes_since(self, mark: int) -> int:
        return sum(r.bytes_sent for r in self.requests_since(mark))


class _Nginx:
    """One nginx master (daemon off) with a private prefix directory."""

    def __init__(self, workdir: Path, http_block: str, load_dav: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "nginx.conf"
        self.error_log = self.workdir / "logs" / "error.log"
        self.stderr_path = self.workdir / "logs" / "stderr.log"
        w = self.workdir
        load = f"load_module {DAV_EXT_MODULE};\n" if load_dav else ""
        self.conf.write_text(
            f"""{load}user root;
worker_processes 2;
daemon off;
pid {w}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 1024; }}
http {{
    {LOG_FORMAT}
    client_body_temp_path {w}/tmp/body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 65;
{http_block}
}}
"""
        )
        self.proc: subprocess.Popen | None = None

    def start(self, port: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [NGINX, "-c", str(self.conf), "-p", str(self.workdir), "-e", str(self.error_log)],
            stdout=self._stderr,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(port, self.proc, [self.stderr_path, self.error_log], f"nginx ({self.conf})")

    def stop(self) -> None:
        # SIGTERM = fast shutdown of nginx master and workers
        _terminate(self.proc, group=True)
        self.proc = None
        if getattr(self, "_stderr", None):
            self._stderr.close()
            self._stderr = None


# --------------------------------------------------------------------------- git


class GitHttpServer(_CountingLog):
    """nginx + fcgiwrap + git-http-backend serving bare repos under ``root``.

    ``/git/NAME.git`` is anonymous; ``/private/NAME.git`` serves the same repos
    behind basic auth (``user``/``password``).
    """

    user = GIT_USER
    password = GIT_PASSWORD

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.root = self.workdir / "repos"
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.socket = self.workdir / "fcgiwrap.sock"
        self.htpasswd = self.workdir / "htpasswd"
        self.htpasswd.write_text(_htpasswd_line(self.user, self.password))
        self._fcgi: subprocess.Popen | None = None
        self.access_log = self.workdir / "logs" / "access.log"
        common = f"""
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME {GIT_HTTP_BACKEND};
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param GIT_PROJECT_ROOT {self.root};
            fastcgi_param GIT_PROTOCOL $http_git_protocol;
            fastcgi_param PATH_INFO $1;
            fastcgi_param REMOTE_USER $remote_user;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param HOME {self.workdir};
            fastcgi_pass unix:{self.socket};
            fastcgi_buffering off;
            fastcgi_read_timeout 300s;
"""
        block = f"""
    server {{
        listen 127.0.0.1:{self.port};
        access_log {self.access_log} counts;
        client_max_body_size 0;
        location ~ ^/git(/.*)$ {{
{common}
        }}
        location ~ ^/private(/.*)$ {{
            auth_basic "git";
            auth_basic_user_file {self.htpasswd};
{common}
        }}
    }}
"""
        self._nginx = _Nginx(self.workdir, block)

    def start(self) -> "GitHttpServer":
        _RUNNING.add(self)
        if self._fcgi is None or self._fcgi.poll() is not None:
            if self.socket.exists():
                self.socket.unlink()
            log = self.workdir / "logs" / "fcgiwrap.log"
            self._fcgi_log = open(log, "ab")
            env = dict(os.environ, HOME=str(self.workdir))
            self._fcgi = subprocess.Popen(
                [FCGIWRAP, "-c", "4", "-s", f"unix:{self.socket}"],
                stdout=self._fcgi_log,
                stderr=self._fcgi_log,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
            wait_for_path(self.socket, self._fcgi, [log], "fcgiwrap")
        self._nginx.start(self.port)
        return self

    def stop(self) -> None:
        self._nginx.stop()
        _terminate(self._fcgi, group=True)
        self._fcgi = None
        if getattr(self, "_fcgi_log", None):
            self._fcgi_log.close()
            self._fcgi_log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/git/{name}.git"

    def private_url(self, name: str, with_credentials: bool = False) -> str:
        if with_credentials:
            return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}/private/{name}.git"
        return f"{self.base_url}/private/{name}.git"

    def repo_path(self, name: str) -> Path:
        return self.root / f"{name}.git"

    def create_bare(self, name: str) -> Path:
        path = self.repo_path(name)
        if path.exists():
            shutil.rmtree(path)
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True)
        for key, value in (
            ("http.receivepack", "true"),
            ("uploadpack.allowFilter", "true"),
            ("uploadpack.allowAnySHA1InWant", "true"),
            ("uploadpack.allowReachableSHA1InWant", "true"),
            ("uploadpack.allowTipSHA1InWant", "true"),
        ):
            subprocess.run(["git", "-C", str(path), "config", key, value], check=True)
        # git-http-backend runs as root on a root-owned repo; no safe.directory issue,
        # but be explicit for environments where ownership differs.
        return path


# --------------------------------------------------------------------------- DVC HTTP remote


class HttpRemoteServer(_CountingLog):
    """nginx serving ``root`` at ``/dvc`` with basic auth, WebDAV-writable (unless
    ``read_only``), Range-capable. ``url`` carries no credentials."""

    user = DVC_HTTP_USER
    password = DVC_HTTP_PASSWORD

    def __init__(self, workdir: Path, read_only: bool = False):
        self.workdir = Path(workdir)
        self.root = self.workdir / "data"
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.htpasswd = self.workdir / "htpasswd"
        self.htpasswd.write_text(_htpasswd_line(self.user, self.password))
        self.access_log = self.workdir / "logs" / "access.log"
        # read_only: a remote that serves reads and answers every write 403 (a read-only token)
        deny_writes = "\n            limit_except GET PROPFIND OPTIONS { deny all; }" if read_only else ""
        block = f"""
    server {{
        listen 127.0.0.1:{self.port};
        access_log {self.access_log} counts;
        client_max_body_size 0;
        location /dvc/ {{
            alias {self.root}/;
            auth_basic "dvc";
            auth_basic_user_file {self.htpasswd};
            autoindex on;
            dav_methods PUT DELETE MKCOL;
            dav_ext_methods PROPFIND OPTIONS;
            create_full_put_path on;
            dav_access user:rw group:rw all:r;
            client_max_body_size 0;{deny_writes}
        }}
    }}
"""
        self._nginx = _Nginx(self.workdir, block, load_dav=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dvc"

    @property
    def running(self) -> bool:
        return self._nginx.proc is not None and self._nginx.proc.poll() is None

    def start(self) -> "HttpRemoteServer":
        _RUNNING.add(self)
        self._nginx.start(self.port)
        return self

    def stop(self) -> None:
        self._nginx.stop()


# --------------------------------------------------------------------------- S3 remote


class S3RemoteServer(_CountingLog):
    """``rclone serve s3`` on a private port, with a counting nginx reverse
    proxy in front (``endpoint_url``; it refuses writes when ``read_only``). Objects of
    ``url`` live under ``root``."""

    access_key = S3_ACCESS_KEY
    secret_key = S3_SECRET_KEY
    bucket = S3_BUCKET
    prefix = "store"

    def __init__(self, workdir: Path, read_only: bool = False):
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.bucket_dir = self.data_dir / self.bucket
        self.bucket_dir.mkdir(parents=True, exist_ok=True)
        self.root = self.bucket_dir / self.prefix
        self.root.mkdir(parents=True, exist_ok=True)
        self.rclone_port = free_port()
        self.port = free_port()
        while self.port == self.rclone_port:
            self.port = free_port()
        self.access_log = self.workdir / "logs" / "access.log"
        self._rclone: subprocess.Popen | None = None
        self.rclone_log = self.workdir / "logs" / "rclone.log"
        # read_only: the proxy answers every write 403 (a read-only key)
        deny_writes = "\n            limit_except GET { deny all; }" if read_only else ""
        block = f"""
    upstream rclone_s3 {{
        server 127.0.0.1:{self.rclone_port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{self.port};
        access_log {self.access_log} counts;
        client_max_body_size 0;
        location / {{
            proxy_pass http://rclone_s3;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
            client_max_body_size 0;{deny_writes}
        }}
    }}
"""
        self._nginx = _Nginx(self.workdir, block)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def rclone_endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.rclone_port}"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def prefix_url(self, prefix: str) -> str:
        """s3:// URL of another prefix inside the bucket (created on disk)."""
        (self.bucket_dir / prefix).mkdir(parents=True, exist_ok=True)
        return f"s3://{self.bucket}/{prefix}"

    def prefix_root(self, prefix: str) -> Path:
        return self.bucket_dir / prefix

    def start(self) -> "S3RemoteServer":
        _RUNNING.add(self)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        if self._rclone is None or self._rclone.poll() is not None:
            self._rclone_fh = open(self.rclone_log, "ab")
            env = dict(os.environ, RCLONE_CONFIG=str(self.workdir / "rclone.conf"))
            self._rclone = subprocess.Popen(
                [
                    RCLONE,
                    "serve",
                    "s3",
                    "--auth-key",
                    f"{self.access_key},{self.secret_key}",
                    "--addr",
                    f"127.0.0.1:{self.rclone_port}",
                    "--etag-hash",
                    "MD5",
                    "--dir-cache-time",
                    "1s",
                    "--log-level",
                    "NOTICE",
                    str(self.data_dir),
                ],
                stdout=self._rclone_fh,
                stderr=self._rclone_fh,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
            wait_for_port(self.rclone_port, self._rclone, [self.rclone_log], "rclone serve s3")
        self._nginx.start(self.port)
        return self

    def stop(self) -> None:
        self._nginx.stop()
        _terminate(self._rclone, group=True)
        self._rclone = None
        if getattr(self, "_rclone_fh", None):
            self._rclone_fh.close()
            self._rclone_fh = None

    def client(self):
        """A botocore S3 client talking to the counting endpoint."""
        import botocore.config
        import botocore.session

        session = botocore.session.get_session()
        return session.create_client(
            "s3",
            region_name="us-east-1",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                response_checksum_validation="when_required",
                request_checksum_calculation="when_required",
            ),
        )


# --------------------------------------------------------------------------- git:// (git daemon)


class GitDaemonServer:
    """`git daemon` serving the bare repositories under ``root`` on git://127.0.0.1:PORT/NAME.git
    (read-only, anonymous). The webhook accepts git:// (it refuses plain http://), so a pod
    played from the webhook's own output can reach the test's repositories without TLS."""

    def __init__(self, workdir: Path, root: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root = Path(root)
        self.port = free_port()
        self.log = self.workdir / "git-daemon.log"
        self._proc: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}.git"

    def start(self) -> "GitDaemonServer":
        _RUNNING.add(self)
        self._log = open(self.log, "ab")
        self._proc = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1", f"--port={self.port}",
             f"--base-path={self.root}", "--informative-errors", str(self.root)],
            stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(self.port, self._proc, [self.log], "git daemon")
        return self

    def stop(self) -> None:
        _terminate(self._proc, group=True)   # its forked per-connection children too
        self._proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
