"""The sidecar's container image, built from our own install steps with podman and no registry.

The Dockerfile's two stages, replayed on a Debian rootfs (the python image's base, bookworm):

1. base: `debootstrap --variant=minbase bookworm` with python3 and python3-venv, then a venv at
   /opt/venv on PATH: what `python:3.11-slim-bookworm` gives (a python with pip on PATH).
2. builder (a copy of base): python3-dev (the python image's headers), then
   `image-install.sh build-deps` and `image-install.sh wheels /src /wheels`.
3. runtime (base itself): `image-install.sh runtime-deps`, `user`, `install /wheels`.
4. `podman import` of the runtime rootfs, with the Dockerfile's ENV, USER, ENTRYPOINT and CMD.

Each step runs in the rootfs with `podman run --rootfs DIR`. The image is tagged
`localhost/dda-sidecar-test:<key>`, the key a hash of every input (image-install.sh, the
Dockerfile, pyproject.toml, setup.py, the sidecar package, this file): an unchanged tree reuses
the image, so a suite run builds it at most once.

Podman pitfalls met here (podman 4.3.1, Debian 12, runc, cgroup v1):
- Without CAP_SYS_RESOURCE (this machine's root lacks it) runc cannot raise an rlimit, and
  podman's defaults for root (nofile 1048576, nproc 4194304) do: "error setting rlimit type 6:
  operation not permitted". podman itself runs with nproc capped at 32768, so every container
  gets nofile <= our hard limit and nproc <= 32768, through a containers.conf of ours
  (CONTAINERS_CONF), which also names runc (Debian's podman has no crun).
- `podman run --rootfs DIR` takes DIR as the positional image argument: every option must come
  before it, or it becomes the command ("exec: "-e": executable file not found").
- Bind-mount targets podman creates in a rootfs (an empty /usr/local/bin/image-install.sh,
  /wheels) stay in it: the script is copied in and every leftover is removed before the import,
  as the Dockerfile's `rm` does.
- pip in the rootfs must trust the host's CA bundle (a TLS-intercepting proxy answers with a
  self-signed chain): it is bind-mounted read-only and named by PIP_CERT, in the builder only.
- `podman import --change "EXPOSE 8443 9400"` fails (one port per EXPOSE there).
- Debian's python3 has no headers: pyfuse3's build needs python3-dev (the python image has them).
- Debian's system python refuses `pip install` (PEP 668): the venv stands in for the python
  image's /usr/local.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import shlex
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
REPO_TAG = "localhost/dda-sidecar-test"
SUITE = "bookworm"
MIRROR = os.environ.get("DDA_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY = os.environ.get("DDA_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
VENV = "/opt/venv"
PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The Dockerfile's input files (COPY): what the wheels are built from.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "sidecar")
# One build at a time on a machine (the suite's background build and the fixture, or two sessions).
LOCK = Path("/var/tmp/dda-sidecar-test-image.lock")


class PodmanMissing(RuntimeError):
    pass


def containers_conf(directory: Path) -> Path:
    """A containers.conf that works without CAP_SYS_RESOURCE (see the module docstring)."""
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1048576)
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    path = directory / "containers.conf"
    path.write_text(f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
                    '[engine]\nruntime = "runc"\n')
    return path


class Podman:
    """Runs podman with our containers.conf. `run(...)` raises CalledProcessError with stderr."""

    def __init__(self, conf: Path):
        exe = shutil.which("podman")
        if exe is None or shutil.which("runc") is None:
            raise PodmanMissing("podman and runc are not installed: `apt-get install podman runc debootstrap` "
                                "(scripts/bootstrap.sh test does)")
        self.exe = exe
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 600, input: bytes | None = None,
            stdin=None) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.exe, *args], env=self.env, capture_output=True, timeout=timeout,
                              input=input, stdin=stdin)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, ["podman", *args], proc.stdout, proc.stderr)
        return proc

    def text(self, *args: str, **kw) -> str:
        return self.run(*args, **kw).stdout.decode(errors="replace")


def _files(path: Path):
    if path.is_file():
        yield path
        return
    for p in sorted(path.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith((".pyc", ".so")):
            yield p


def image_key() -> str:
    """sha256 (16 hex digits) of every input of the image; README.md is left out (it only
    becomes the package's long description) so README edits do not rebuild."""
    digest = hashlib.sha256()
    inputs = [ROOT / "scripts" / "image-install.sh", ROOT / "Dockerfile", HERE,
              *(ROOT / s for s in SOURCES if s != "README.md")]
    for top in inputs:
        for f in _files(top):
            digest.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    digest.update(f"{SUITE} {MIRROR}".encode())
    return digest.hexdigest()[:16]


def dockerfile_runtime_changes() -> list[str]:
    """The runtime stage's ENV, USER, ENTRYPOINT, CMD and EXPOSE lines of the Dockerfile, as
    `podman import --change` arguments (PATH gets the venv first)."""
    text = (ROOT / "Dockerfile").read_text()
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    runtime = lines[max(i for i, line in enumerate(lines) if line.upper().startswith("FROM ")) + 1:]
    changes = [f"ENV PATH={PATH}"]
    for line in runtime:
        word = line.split(None, 1)[0].upper()
        if word == "ENV":
            changes += [f"ENV {pair}" for pair in shlex.split(line.split(None, 1)[1])]
        elif word == "EXPOSE":   # podman import takes one port per EXPOSE
            changes += [f"EXPOSE {port}" for port in line.split()[1:]]
        elif word in ("USER", "ENTRYPOINT", "CMD"):
            changes.append(line)
    return changes


def _host_ca() -> str | None:
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), paths.cafile,
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


class ImageBuild:
    """One build in `work` (removed afterwards by the caller). `log` collects each step's time."""

    def __init__(self, podman: Podman, work: Path):
        self.podman, self.work = podman, work
        self.steps: dict[str, float] = {}
        self.containers: list[str] = []   # removed by cleanup(), also after an interruption

    def cleanup(self) -> None:
        for name in self.containers:
            self.podman.run("rm", "--force", "--time", "0", name, check=False, timeout=60)

    def _step(self, name: str, fn, *args) -> None:
        started = time.monotonic()
        fn(*args)
        self.steps[name] = round(time.monotonic() - started, 1)

    def _in_rootfs(self, rootfs: Path, script: str, *, mounts: tuple[tuple[Path, str, str], ...] = (),
                   env: dict[str, str] | None = None) -> None:
        name = f"dda-image-build-{secrets.token_hex(4)}"
        self.containers.append(name)
        args = ["run", "--rm", "--name", name, "--network", "host", "--env", "DEBIAN_FRONTEND=noninteractive",
                "--env", f"PATH={PATH}"]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        for source, target, mode in mounts:
            args += ["--volume", f"{source}:{target}:{mode}"]
        args += ["--rootfs", str(rootfs), "sh", "-ec", script]   # options before the rootfs
        try:
            self.podman.run(*args, timeout=900)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"image build step failed in {rootfs.name}: {script}\n"
                               f"{err.stderr.decode(errors='replace')[-4000:]}") from None

    def debootstrap(self, base: Path) -> None:
        proc = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", SUITE,
                               str(base), MIRROR], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"debootstrap failed: {(proc.stdout + proc.stderr)[-4000:]}")
        (base / "etc/apt/sources.list").write_text(
            f"deb {MIRROR} {SUITE} main\ndeb {MIRROR} {SUITE}-updates main\ndeb {SECURITY} {SUITE}-security main\n")
        self._in_rootfs(base, f"python3 -m venv {VENV}")

    def builder(self, builder: Path, src: Path, wheels: Path) -> None:
        shutil.copy2(ROOT / "scripts" / "image-install.sh", builder / "usr/local/bin/image-install.sh")
        mounts: list[tuple[Path, str, str]] = [(src, "/src", "rw"), (wheels, "/wheels", "rw")]
        env = {}
        ca = _host_ca()
        if ca:
            mounts.append((Path(ca), "/etc/ssl/host-ca.crt", "ro"))
            env["PIP_CERT"] = "/etc/ssl/host-ca.crt"
        for key in ("PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT"):
            if os.environ.get(key) and not os.environ[key].startswith("file:"):
                env[key] = os.environ[key]
        self._in_rootfs(builder, "apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-dev "
                        ">/dev/null && image-install.sh build-deps && image-install.sh wheels /src /wheels",
                        mounts=tuple(mounts), env=env)

    def runtime(self, base: Path, wheels: Path) -> None:
        shutil.copy2(ROOT / "scripts" / "image-install.sh", base / "usr/local/bin/image-install.sh")
        self._in_rootfs(base, "image-install.sh runtime-deps && image-install.sh user && image-install.sh install "
                        "/wheels && rm /usr/local/bin/image-install.sh", mounts=((wheels, "/wheels", "ro"),))
        # mount targets podman made in the rootfs, and the venv's caches
        (base / "wheels").rmdir()
        for leftover in ("etc/ssl/host-ca.crt", "run/.containerenv"):
            (base / leftover).unlink(missing_ok=True)

    def import_(self, base: Path, tag: str) -> None:
        changes = [arg for change in dockerfile_runtime_changes() for arg in ("--change", change)]
        tar = subprocess.Popen(["tar", "-C", str(base), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
        try:
            self.podman.run("import", *changes, "-", tag, stdin=tar.stdout, timeout=600)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"podman import failed: {err.stderr.decode(errors='replace')[-2000:]}") from None
        finally:
            tar.stdout.close()
            tar.wait()

    def build(self, tag: str) -> None:
        base, builder = self.work / "base", self.work / "builder"
        src, wheels = self.work / "src", self.work / "wheels"
        self._step("debootstrap", self.debootstrap, base)
        self._step("copy base", lambda: subprocess.run(["cp", "-a", str(base), str(builder)], check=True))
        src.mkdir()
        wheels.mkdir()
        for name in SOURCES:   # a clean copy, as the Dockerfile's COPY gives it
            (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name)
        for cache in src.rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)
        self._step("builder stage", self.builder, builder, src, wheels)
        self._step("runtime stage", self.runtime, base, wheels)
        self._step("import", self.import_, base, tag)


def ensure_image(podman: Podman) -> tuple[str, dict[str, float]]:
    """(tag, seconds per build step; {} when the image for these inputs exists already). Waits
    for a build of another process (the suite's background build) under LOCK."""
    tag = f"{REPO_TAG}:{image_key()}"
    with open(LOCK, "a") as lock:
        waited = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        waited = round(time.monotonic() - waited, 1)
        if podman.run("image", "exists", tag, check=False).returncode == 0:
            return tag, ({"waited for another build": waited} if waited > 1 else {})
        return tag, _build(podman, tag)


def _build(podman: Podman, tag: str) -> dict[str, float]:
    if shutil.which("debootstrap") is None:
        raise PodmanMissing("debootstrap is not installed (scripts/bootstrap.sh test installs it)")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dda-image-", dir="/var/tmp"))
    build = ImageBuild(podman, work)
    try:
        build.build(tag)
    finally:
        build.cleanup()
        _unmount_below(work)   # an interrupted debootstrap leaves proc/sys mounted in its target
        shutil.rmtree(work, ignore_errors=True)
    # older builds of this test image: only the newest is kept
    for line in podman.text("images", "--format", "{{.Repository}}:{{.Tag}}", REPO_TAG).split():
        if line != tag:
            podman.run("rmi", "--force", line, check=False)
    return {**build.steps, "total": round(time.monotonic() - started, 1)}


def _unmount_below(path: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(f"{path}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def start_background_build(log: Path) -> subprocess.Popen:
    """`python podman_image.py` in the background (conftest starts it when the pod tests are
    collected, so the build overlaps the tests before them); stop it with SIGTERM."""
    return subprocess.Popen([sys.executable, str(HERE)], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _interrupted(signum: int, frame) -> None:
    raise SystemExit(128 + signum)   # unwinds through the build's cleanup


if __name__ == "__main__":   # build (or find) the image by hand: python tests/podman_image.py
    signal.signal(signal.SIGTERM, _interrupted)
    conf_dir = Path(tempfile.mkdtemp(prefix="dda-podman-"))
    try:
        print(json.dumps(ensure_image(Podman(containers_conf(conf_dir)))))
    finally:
        shutil.rmtree(conf_dir, ignore_errors=True)
