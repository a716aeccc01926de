"""A tenant's Secret and environment cannot make us run commands: git's environment is built
from an allow-list (planted GIT_SSH_COMMAND, GIT_SSH, GIT_ASKPASS, GIT_CONFIG_*, a global
config with core.sshCommand/core.fsmonitor, ext:: transports never run), ssh keys and
known_hosts come from the Secret's documented keys by path, and the sidecar takes only the
documented credential keys from the mounted Secret (never LD_PRELOAD, PYTHONPATH, ...)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mounting import DDA, mounted  # noqa: E402

from sidecar.secretfiles import read_secret_dir  # noqa: E402
from sidecar.snapshot.git import git_env  # noqa: E402


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def planted(tmp_path: Path) -> tuple[dict[str, str], list[Path]]:
    """An environment with every known way to make git run a command; the files they would create."""
    marks = [tmp_path / f"ran-{i}" for i in range(8)]
    cfg = tmp_path / "evil.gitconfig"
    cfg.write_text(f"[core]\n\tsshCommand = touch {marks[5]}\n\tfsmonitor = touch {marks[6]}\n"
                   f"[protocol \"ext\"]\n\tallow = always\n")
    env = {
        "GIT_SSH_COMMAND": f"touch {marks[0]}",
        "GIT_SSH": script(tmp_path / "gitssh", f"touch {marks[1]}"),
        "GIT_ASKPASS": script(tmp_path / "askpass", f"touch {marks[2]}"),
        "SSH_ASKPASS": script(tmp_path / "sshaskpass", f"touch {marks[2]}"),
        "GIT_PROXY_COMMAND": script(tmp_path / "proxy", f"touch {marks[3]}"),
        "GIT_CONFIG_COUNT": "2",
        "GIT_CONFIG_KEY_0": "core.sshCommand", "GIT_CONFIG_VALUE_0": f"touch {marks[4]}",
        "GIT_CONFIG_KEY_1": "core.fsmonitor", "GIT_CONFIG_VALUE_1": f"touch {marks[6]}",
        "GIT_CONFIG_GLOBAL": str(cfg),
        "GIT_CONFIG_PARAMETERS": f"'core.sshcommand'='touch {marks[7]}'",
        "GIT_EXEC_PATH": str(tmp_path / "no-such-exec-path"),
        "GIT_ALLOW_PROTOCOL": "ext:ssh",
    }
    return env, marks


def fake_ssh(tmp_path: Path) -> tuple[Path, Path]:
    """A `ssh` first on PATH that records its arguments and fails like an unreachable host."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    argv = tmp_path / "ssh-argv"
    script(bindir / "ssh", f'printf "%s\\n" "$@" > {argv}\necho "ssh: connect to host: Connection refused" >&2\n'
                           f"exit 255")
    return bindir, argv


def test_planted_git_settings_never_run(tmp_path):
    env, marks = planted(tmp_path)
    bindir, argv = fake_ssh(tmp_path)
    url = "ssh://git@127.0.0.1/owner/data.git"     # no port: every ssh variant would be run
    proc = subprocess.run([DDA, "ls", url], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, **env, "PATH": f"{bindir}:{os.environ['PATH']}",
                               "DDA_CACHE_DIR": str(tmp_path / "cache")})
    assert [m.name for m in marks if m.exists()] == []
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "repository ssh://" in proc.stderr and "cannot reach the server" in proc.stderr
    # git did go through ssh: ours, in batch mode, with nothing planted on its command line
    args = argv.read_text().splitlines()
    assert "BatchMode=yes" in args and not any("touch" in a for a in args)
    assert "git@127.0.0.1" in args           # the ssh login name of the URL is kept


def test_planted_real_ssh_and_ext_transport_never_run(tmp_path):
    """The same with the real ssh binary (connection refused), and an ext:: URL."""
    env, marks = planted(tmp_path)
    full = {**os.environ, **env, "DDA_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([DDA, "ls", f"ssh://git@127.0.0.1:{closed_port()}/o/d.git"], capture_output=True,
                          text=True, timeout=60, env=full, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    proc = subprocess.run([DDA, "ls", f"ext::sh -c touch% {marks[0]}"], capture_output=True, text=True,
                          timeout=60, env=full, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert [m.name for m in marks if m.exists()] == []


def test_git_env_is_an_allow_list(tmp_path):
    env, _ = planted(tmp_path)
    env.update(LD_PRELOAD="/tmp/x.so", PYTHONPATH="/tmp", PATH="/usr/bin", HOME="/home/u", LC_ALL="C.UTF-8",
               https_proxy="http://proxy:3128", DDA_GIT_TOKEN="tok")
    out = git_env(env)
    assert out["PATH"] == "/usr/bin" and out["HOME"] == "/home/u" and out["LC_ALL"] == "C.UTF-8"
    assert out["https_proxy"] == "http://proxy:3128"
    for name in ("LD_PRELOAD", "PYTHONPATH", "GIT_SSH", "GIT_EXEC_PATH", "GIT_CONFIG_COUNT", "GIT_CONFIG_PARAMETERS",
                 "GIT_PROXY_COMMAND", "GIT_ALLOW_PROTOCOL", "DDA_GIT_TOKEN"):
        assert name not in out, name
    assert out["GIT_CONFIG_GLOBAL"] == os.devnull and out["GIT_CONFIG_NOSYSTEM"] == "1"
    assert out["GIT_SSH_COMMAND"] == "ssh -o BatchMode=yes" and out["GIT_ASKPASS"] == "true"


def test_ssh_key_and_known_hosts_from_the_secret_files(tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "ssh-privatekey").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n")
    (secret / "ssh-privatekey").chmod(0o400)
    (secret / "known_hosts").write_text("[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB\n")
    bindir, argv = fake_ssh(tmp_path)
    env, marks = planted(tmp_path)
    proc = subprocess.run([DDA, "ls", f"ssh://git@127.0.0.1:{closed_port()}/o/d.git"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, **env, "PATH": f"{bindir}:{os.environ['PATH']}",
                               "DDA_CACHE_DIR": str(tmp_path / "cache"),
                               "DDA_SSH_KEY_FILE": str(secret / "ssh-privatekey"),
                               "DDA_SSH_KNOWN_HOSTS_FILE": str(secret / "known_hosts")})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    args = argv.read_text().splitlines()
    joined = " ".join(args)
    assert f"-i {secret / 'ssh-privatekey'}" in joined and "IdentitiesOnly=yes" in args
    assert f"UserKnownHostsFile={secret / 'known_hosts'}" in args and "StrictHostKeyChecking=yes" in args
    assert "-F /dev/null" in joined            # no ssh config file: no ProxyCommand from anywhere
    assert [m.name for m in marks if m.exists()] == []
    # a key path the Secret does not have is left out, not passed to ssh
    out = git_env({"PATH": "/usr/bin", "DDA_SSH_KEY_FILE": str(secret / "absent")})
    assert out["GIT_SSH_COMMAND"] == "ssh -o BatchMode=yes"


def test_secret_dir_takes_only_documented_keys(tmp_path):
    """A Secret volume as the kubelet writes it (..data link, timestamped dir) with documented
    keys and hostile ones."""
    real = tmp_path / "..2026_01_01_00_00_00.1"
    real.mkdir()
    files = {"DDA_GIT_USER": "alice", "DDA_GIT_TOKEN": "tok\n", "DDA_REMOTE_STORAGE_PASSWORD": "pw",
             "DDA_REMOTE_DEFAULT_SECRET_ACCESS_KEY": "sk", "LD_PRELOAD": "/tmp/evil.so", "PYTHONPATH": "/tmp",
             "GIT_SSH_COMMAND": "sh -c id", "DDA_JOBS": "99", "DDA_REMOTE_X_PROFILE": "p",
             "ssh-privatekey": "KEY", "known_hosts": "kh"}
    for name, value in files.items():
        (real / name).write_text(value)
    (tmp_path / "..data").symlink_to(real.name)
    for name in files:
        (tmp_path / name).symlink_to(f"..data/{name}")
    assert read_secret_dir(tmp_path) == {"DDA_GIT_USER": "alice", "DDA_GIT_TOKEN": "tok",
                                         "DDA_REMOTE_STORAGE_PASSWORD": "pw",
                                         "DDA_REMOTE_DEFAULT_SECRET_ACCESS_KEY": "sk"}
    assert read_secret_dir(tmp_path / "absent") == {} and read_secret_dir(None) == {}


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_sidecar_takes_git_credentials_from_the_mounted_secret(dvc3_repo, git_server, http_remote, mp, tmp_path):
    """`dda sidecar` as the webhook configures it: the Secret as files (DDA_SECRET_DIR); the
    private repository mounts with the Secret's DDA_GIT_* keys; its GIT_SSH_COMMAND and
    LD_PRELOAD keys are not taken."""
    from sidecar_util import Sidecar

    secret = tmp_path / "secret"
    secret.mkdir()
    mark = tmp_path / "ran"
    (secret / "DDA_GIT_USER").write_text(git_server.user)
    (secret / "DDA_GIT_TOKEN").write_text(git_server.password + "\n")
    (secret / "DDA_REMOTE_HTTP_USER").write_text(http_remote.user)
    (secret / "DDA_REMOTE_HTTP_PASSWORD").write_text(http_remote.password)
    (secret / "GIT_SSH_COMMAND").write_text(f"touch {mark}")
    (secret / "LD_PRELOAD").write_text(str(tmp_path / "evil.so"))
    env = {"DDA_SECRET_DIR": str(secret), "DDA_REVISION": dvc3_repo.branches.get("http", "main")}
    with Sidecar(dvc3_repo.private_git_url, mp, tmp_path / "cache", env=env) as sc:
        assert mounted(mp) and (mp / "src" / "train.py").read_bytes()
        assert "ignored" in sc.output() and "GIT_SSH_COMMAND" in sc.output()
        assert str(tmp_path / "evil.so") not in sc.output() and git_server.password not in sc.output()
    assert not mark.exists()
    # without the Secret the private repository is refused: the files were what authenticated
    sc = Sidecar(dvc3_repo.private_git_url, mp, tmp_path / "cache2", env={"DDA_REVISION": env["DDA_REVISION"]})
    try:
        with pytest.raises(AssertionError, match="authentication failed"):
            sc.start(timeout=60)
        assert sc.proc.wait(10) != 0
    finally:
        if sc.proc.poll() is None:
            sc.proc.kill()
            sc.proc.wait()
