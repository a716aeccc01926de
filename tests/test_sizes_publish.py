"""`dda sizes publish` as a user runs it against nginx as the HTTP remote (its access log
counts the requests): a remote that refuses the upload says so on one line, and a node that
already knows every size sends the upload alone - no HEAD per file.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from dvclayout import write_layout
from mounting import DDA
from servers import HttpRemoteServer, S3RemoteServer
from sidecar.sizeindex import index_path

FILES = 40


def _publish(layout, srv: HttpRemoteServer, cache, method: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DDA_REMOTE_STORAGE_USER": srv.user, "DDA_REMOTE_STORAGE_PASSWORD": srv.password,
           "DDA_REMOTE_STORAGE_METHOD": method, "DDA_CACHE_DIR": str(cache)}
    return subprocess.run([DDA, "sizes", "publish", str(layout.repo), "data"], env=env,
                          capture_output=True, text=True, timeout=300)


def _ls(layout, srv: HttpRemoteServer, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "DDA_REMOTE_STORAGE_USER": srv.user, "DDA_REMOTE_STORAGE_PASSWORD": srv.password,
           "DDA_CACHE_DIR": str(cache)}
    return subprocess.run([DDA, "ls", "-R", str(layout.repo), "data"], env=env,
                          capture_output=True, text=True, timeout=300)


def _kinds(requests) -> list[tuple[str, str]]:
    """(method, what) per request: `file`, `dir` (the manifest) or `sizes` (the index)."""
    def what(uri: str) -> str:
        return uri.rsplit(".", 1)[-1] if uri.endswith((".dir", ".sizes")) else "file"
    return [(r.method, what(r.uri)) for r in requests]


@pytest.mark.parametrize("read_only,method,status", [
    (True, "PUT", 403),      # a read-only remote
    (False, "POST", 404),    # nginx takes no POST to a new path: the default method, refused
    (False, "PATCH", 405),   # a method the DAV location does not allow
])
def test_a_refused_upload_is_reported_as_refused_on_one_line(tmp_path, read_only, method, status):
    srv = HttpRemoteServer(tmp_path / "nginx", read_only=read_only).start()
    try:
        layout = write_layout(tmp_path / "l", folders=1, per_folder=FILES, remote=srv.root, remote_url=srv.url)
        proc = _publish(layout, srv, tmp_path / "cache", method)
        refused = [r for r in srv.requests_since(0) if r.method == method]
    finally:
        srv.stop()
    key = index_path(layout.manifest_md5, False)
    assert [r.status for r in refused] == [status]          # asked once: a refusal is not retried
    assert proc.returncode != 0
    assert "published" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("dda: error: ") and "refused the upload" in line, line
    assert f"HTTP {status}" in line and f"{method} /dvc/{key}" in line, line
    assert "missing" not in line and "Traceback" not in proc.stderr
    assert srv.password not in proc.stderr and srv.password not in proc.stdout
    assert not (srv.root / key).exists()


def test_a_read_only_s3_remote_refuses_the_upload_on_one_line(tmp_path):
    srv = S3RemoteServer(tmp_path / "s3", read_only=True).start()
    try:
        layout = write_layout(tmp_path / "l", folders=1, per_folder=FILES, remote=srv.root, remote_url=srv.url)
        env = {**os.environ, "DDA_REMOTE_STORAGE_ENDPOINT_URL": srv.endpoint_url,
               "DDA_REMOTE_STORAGE_ACCESS_KEY_ID": srv.access_key,
               "DDA_REMOTE_STORAGE_SECRET_ACCESS_KEY": srv.secret_key, "DDA_CACHE_DIR": str(tmp_path / "cache")}
        proc = subprocess.run([DDA, "sizes", "publish", str(layout.repo), "data"], env=env,
                              capture_output=True, text=True, timeout=300)
        refused = [r for r in srv.requests_since(0) if r.method == "PUT"]
    finally:
        srv.stop()
    key = f"/{srv.bucket}/{srv.prefix}/{index_path(layout.manifest_md5, False)}"
    assert [r.status for r in refused] == [403]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "refused the upload" in lines[0], proc.stderr
    assert f"PUT {key} answered HTTP 403" in lines[0], lines[0]
    assert srv.secret_key not in proc.stderr and "Signature" not in proc.stderr


def test_publishing_sizes_this_node_knows_sends_only_the_upload(tmp_path):
    """After a listing learned every size (one HEAD each), `dda sizes publish` on the same
    node asks no size again: a refused attempt sends its upload alone, and so does the retry
    with another upload `method` (the fix that refusal suggests)."""
    srv = HttpRemoteServer(tmp_path / "nginx").start()
    try:
        layout = write_layout(tmp_path / "l", folders=1, per_folder=FILES, remote=srv.root, remote_url=srv.url)
        cache = tmp_path / "cache"
        mark = srv.mark()
        listed = _ls(layout, srv, cache)
        listing = _kinds(srv.requests_since(mark))
        mark = srv.mark()
        refused = _publish(layout, srv, cache, "POST")
        refused_asked = _kinds(srv.requests_since(mark))
        mark = srv.mark()
        published = _publish(layout, srv, cache, "PUT")
        published_asked = _kinds(srv.requests_since(mark))
    finally:
        srv.stop()
    assert listed.returncode == 0, listed.stderr
    assert listing.count(("HEAD", "file")) == FILES          # the sizes were learned here, once each
    assert refused.returncode != 0 and "refused the upload" in refused.stderr
    assert refused_asked == [("POST", "sizes")]
    assert published.returncode == 0, published.stderr
    assert published_asked == [("PUT", "sizes")]
    assert f"data: published {FILES} sizes" in published.stdout
