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
