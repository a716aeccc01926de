"""13.8: remotes (and git) on HTTPS with a private CA.

A TLS nginx (certificate from a trustme CA) fronts the real git server and the real DVC
HTTP remote. `ssl_verify = false` or `ssl_verify = /path/ca.pem` in .dvc/config is honoured
per remote; `DDA_CA_BUNDLE` (= `--ca-bundle`, `ca_bundle:` in the config file) makes git and
every remote trust the private CA; without either the failure is one clear line.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from repos import DVC3_BIN, _env, _run
from servers import _Nginx, free_port

trustme = pytest.importorskip("trustme")
DDA = str(Path(sys.executable).parent / "dda")


class TlsFront:
    """nginx terminating TLS on a port per upstream, proxying to plain-HTTP servers."""

    def __init__(self, workdir: Path, upstreams: dict[str, int]):
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_pem = workdir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        chain, key = workdir / "server.pem", workdir / "server.key"
        cert.private_key_pem.write_to_path(str(key))
        with open(chain, "wb") as f:
            for blob in cert.cert_chain_pems:
                f.write(blob.bytes())
        self.ports = {name: free_port() for name in upstreams}
        block = "".join(f"""
    server {{
        listen 127.0.0.1:{self.ports[name]} ssl;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        client_max_body_size 0;
        location / {{
            proxy_pass http://127.0.0.1:{port};
            proxy_set_header Host $host:$server_port;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
""" for name, port in upstreams.items())
        self._nginx = _Nginx(workdir, block)

    def url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.ports[name]}"

    def start(self) -> "TlsFront":
        for port in self.ports.values():
            self._nginx.start(port)
        return self

    def stop(self) -> None:
        self._nginx.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory, git_server, http_remote):
    front = TlsFront(tmp_path_factory.mktemp("tls"), {"git": git_server.port, "dvc": http_remote.port}).start()
    yield front
    front.stop()


@pytest.fixture(scope="module")
def tls_repo(tls, tmp_path_factory, git_server, http_remote):
    """A DVC 3 repository whose default remote is the HTTP remote reached over TLS; branch
    `noverify` says `ssl_verify = false`, branch `ca` says `ssl_verify = <ca.pem>`."""
    root = tmp_path_factory.mktemp("tls-repo")
    env = _env(root)
    work = root / "work"
    work.mkdir()
    run = lambda *a: _run(list(a), work, env)  # noqa: E731
    run("git", "init", "-q", "-b", "main")
    run(DVC3_BIN, "init", "-q")
    plain = f"{http_remote.url}/tls-repo"
    run(DVC3_BIN, "remote", "add", "-d", "web", plain)
    run(DVC3_BIN, "remote", "modify", "web", "method", "PUT")
    for key, value in (("auth", "basic"), ("user", http_remote.user), ("password", http_remote.password)):
        run(DVC3_BIN, "remote", "modify", "--local", "web", key, value)
    (work / "data").mkdir()
    (work / "data" / "a.txt").write_text("over tls\n")
    (work / "data" / "b.bin").write_bytes(os.urandom(5000))
    run(DVC3_BIN, "add", "-q", "data")
    run(DVC3_BIN, "push", "-q")
    run(DVC3_BIN, "remote", "modify", "web", "url", f"{tls.url('dvc')}/dvc/tls-repo")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "data over https")
    for branch, value in (("noverify", "false"), ("ca", str(tls.ca_pem))):
        run("git", "checkout", "-q", "-b", branch, "main")
        run(DVC3_BIN, "remote", "modify", "web", "ssl_verify", value)
        run("git", "commit", "-q", "-am", f"ssl_verify {value}")
    run("git", "checkout", "-q", "main")
    git_server.create_bare("tls-repo")
    run("git", "push", "-q", "--all", git_server.url("tls-repo"))
    return work


def dda(*args, cache, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("DDA_")}
    full.update({"DDA_CACHE_DIR": str(cache), "DDA_REMOTE_WEB_USER": "dvcuser", **(env or {})})
    return subprocess.run([DDA, *args], capture_output=True, env=full, timeout=120)


def _creds(http_remote) -> dict[str, str]:
    return {"DDA_REMOTE_WEB_USER": http_remote.user, "DDA_REMOTE_WEB_PASSWORD": http_remote.password}


def test_private_ca_fails_with_one_clear_line(tls_repo, tmp_path, http_remote):
    proc = dda("cat", str(tls_repo), "data/a.txt", cache=tmp_path, env=_creds(http_remote))
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err and err.count("\n") == 1
    assert "CERTIFICATE_VERIFY_FAILED" in err or "certificate verify failed" in err


@pytest.mark.parametrize("branch", ["noverify", "ca"])
def test_ssl_verify_in_dvc_config_is_honoured(tls_repo, tmp_path, http_remote, branch):
    proc = dda("cat", str(tls_repo), "data/a.txt", "--rev", branch, cache=tmp_path, env=_creds(http_remote))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"over tls\n"


def test_one_ca_bundle_for_git_and_every_remote(tls, tls_repo, tmp_path, http_remote):
    url = f"{tls.url('git')}/git/tls-repo.git"
    without = dda("ls", url, cache=tmp_path / "c1")
    assert without.returncode != 0 and b"Traceback" not in without.stderr
    env = {**_creds(http_remote), "DDA_CA_BUNDLE": str(tls.ca_pem)}
    listing = dda("ls", url, "data", cache=tmp_path / "c2", env=env)
    assert listing.returncode == 0, listing.stderr.decode()
    assert b"data/b.bin" in listing.stdout
    got = dda("cat", url, "data/a.txt", cache=tmp_path / "c2", env=env)
    assert got.returncode == 0 and got.stdout == b"over tls\n"
    flag = dda("cat", url, "data/a.txt", "--ca-bundle", str(tls.ca_pem), cache=tmp_path / "c3",
               env=_creds(http_remote))
    assert flag.returncode == 0 and flag.stdout == b"over tls\n"
