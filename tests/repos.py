"""Fixture repositories authored with the real DVC CLI (DVC 3 and DVC 2),
pushed to real remotes (local dir, HTTP/WebDAV, S3) and to the git server.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from servers import GitHttpServer, HttpRemoteServer, S3RemoteServer

VENV_BIN = Path(sys.executable).parent
DVC3_BIN = str(VENV_BIN / "dvc")
REMOTE_KINDS = ("local", "http", "s3")

# Files excluded from a checkout's "what the user sees" listing.
_EXCLUDED_DVC = (".dvc/cache", ".dvc/tmp", ".dvc/config.local")


def dvc2_bin() -> str | None:
    """Path of the DVC 2.x executable, or None when it is not installed."""
    cand = os.environ.get("DDA_DVC2_BIN")
    if not cand and os.environ.get("DDA_DVC2"):
        cand = str(Path(os.environ["DDA_DVC2"]) / "bin" / "dvc")
    cand = cand or "/tmp/dvc2/bin/dvc"
    return cand if Path(cand).is_file() and os.access(cand, os.X_OK) else None


DVC2_MISSING_REASON = (
    "DVC 2.x not found: set DDA_DVC2_BIN to a dvc 2.58 executable "
    "(or DDA_DVC2 to a venv that has it); default /tmp/dvc2/bin/dvc"
)


@dataclass
class FixtureRepo:
    name: str
    dvc_version: str  # "2" or "3"
    git_url: str
    local_path: Path  # bare repo served by the git server
    branches: dict[str, str]  # remote kind -> branch name
    remote_roots: dict[str, Path]  # remote name (local/http/s3/extra) -> dir holding its objects
    remote_urls: dict[str, str]  # remote name -> URL as written in .dvc/config
    expected: Path  # reference checkout (git clone + dvc pull)
    work: Path  # authoring working tree (has .dvc/config.local with credentials)
    default_branch: str = "main"
    tag: str = "v1"
    private_git_url: str = ""
    build_seconds: float = 0.0
    info: dict = field(default_factory=dict)
    # remote kind -> the branch's commit as authored (tests that upload move the branches;
    # a test comparing with `expected` pins this commit)
    commits: dict[str, str] = field(default_factory=dict)

    def expected_files(self) -> dict[str, Path]:
        """Every regular file a user sees after clone + dvc pull, keyed by
        posix relpath; excludes .git/ and DVC's cache/tmp/config.local."""
        out: dict[str, Path] = {}
        root = self.expected
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            keep = []
            for d in dirnames:
                rel = rel_dir + d
                if rel == ".git" or rel in _EXCLUDED_DVC:
                    continue
                keep.append(d)
            dirnames[:] = keep
            for f in filenames:
                rel = rel_dir + f
                if rel in _EXCLUDED_DVC:
                    continue
                p = Path(dirpath) / f
                if p.is_file() and not p.is_symlink():
                    out[rel] = p
        return out

    @property
    def remote_root(self) -> dict[str, Path]:
        return self.remote_roots


# --------------------------------------------------------------------------- env / running


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    home = workdir / "home"
    (home / ".config").mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc-system"),
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
        GIT_AUTHOR_NAME="Fixture Author",
        GIT_AUTHOR_EMAIL="author@example.invalid",
        GIT_COMMITTER_NAME="Fixture Author",
        GIT_COMMITTER_EMAIL="author@example.invalid",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        PYTHONUNBUFFERED="1",
    )
    env.pop("GIT_DIR", None)
    env.pop("GIT_WORK_TREE", None)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"cwd={cwd}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


# --------------------------------------------------------------------------- content


PREPARE_PY = '''\
"""Stage command: derive out/prepared.txt and out/features/ from data/labels.csv."""
import os

with open("data/labels.csv", "rb") as f:
    rows = f.read().decode("utf-8").splitlines()
os.makedirs("out/features", exist_ok=True)
with open("out/prepared.txt", "w", newline="\\n") as f:
    for row in rows[1:]:
        f.write(row.upper() + "\\n")
for i, row in enumerate(rows[1:4]):
    with open(f"out/features/feat_{i}.txt", "w", newline="\\n") as f:
        f.write(f"feature {i}: {row}\\n" * (i + 1))
os.makedirs("out/features/nested", exist_ok=True)
with open("out/features/nested/summary.txt", "w", newline="\\n") as f:
    f.write(f"rows={len(rows) - 1}\\n")
'''


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)


def _small_repo_content(work: Path, seed: int) -> None:
    rng = random.Random(seed)
    _write(work / "README.md", f"# Fixture repository (seed {seed})\n\nGit-only file.\n")
    _write(
        work / "src" / "train.py",
        "import sys\n\n\ndef main():\n    print('training', sys.argv[1:])\n\n\nif __name__ == '__main__':\n    main()\n",
    )
    _write(work / "src" / "prepare.py", PREPARE_PY)
    img = work / "data" / "images"
    names: list[str] = []
    for i in range(8):
        names.append(f"cats/cat_{i:02d}.bin")
    for i in range(6):
        names.append(f"dogs/dog_{i:02d}.bin")
    for i in range(6):
        names.append(f"dogs/small/puppy_{i:02d}.bin")
    for i in range(5):
        names.append(f"birds/deep/er/bird_{i:02d}.bin")
    for i in range(3):
        names.append(f"top_{i}.bin")
    names += ["cats/my cat ü.bin", "日本語.bin", "dogs/with space/dog one.bin"]
    for n in names:
        _write(img / n, rng.randbytes(rng.randint(1, 4096)))
    _write(img / "dogs" / "empty.bin", b"")
    # CRLF text: DVC 2 hashes text files with CRLF->LF normalised md5 ("dos2unix" rule)
    lines = ["id,label,score"] + [f"{i},{rng.choice(['cat', 'dog', 'bird'])},{rng.random():.4f}" for i in range(40)]
    _write(work / "data" / "labels.csv", ("\r\n".join(lines) + "\r\n").encode())
    _write(work / "data" / "empty.txt", b"")
    _write(work / "models" / "model.bin", rng.randbytes(2 * 1024 * 1024 + 123))


def _big_repo_content(work: Path, seed: int, n_files: int = 10_000, large_mib: int = 200) -> None:
    rng = random.Random(seed)
    _write(work / "README.md", f"# Big fixture repository (seed {seed})\n")
    _write(work / "src" / "prepare.py", PREPARE_PY)
    many = work / "data" / "many"
    for i in range(n_files):
        sub = many / f"d{i // 1000:02d}" / f"s{(i // 100) % 10}"
        if i % 100 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.txt").write_bytes(rng.randbytes(rng.randint(100, 300)))
    block = random.Random(seed + 1).randbytes(1 << 20)
    with open(work / "data" / "large.bin", "wb") as f:
        for i in range(large_mib):
            # 16-byte varying prefix so every MiB differs; pseudo-random otherwise
            f.write(i.to_bytes(8, "little") + random.Random(seed * 1000 + i).randbytes(8) + block[16:])
    lines = ["id,label"] + [f"{i},x{i}" for i in range(10)]
    _write(work / "data" / "labels.csv", ("\r\n".join(lines) + "\r\n").encode())


# --------------------------------------------------------------------------- authoring


def _set_out_remote(dvcfile: Path, remote: str) -> None:
    data = yaml.safe_load(dvcfile.read_text())
    data["outs"][0]["remote"] = remote
    dvcfile.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _git(work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return _run(["git", *args], work, env)


def _author(
    *,
    name: str,
    dvc: str,
    dvc_version: str,
    workdir: Path,
    git: GitHttpServer,
    http: HttpRemoteServer,
    s3: S3RemoteServer,
    big: bool = False,
) -> FixtureRepo:
    t0 = time.monotonic()
    env = _env(workdir)
    work = workdir / "authoring" / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    jobs = ["-j", "16"] if big else ["-j", "8"]

    def d(*args: str) -> subprocess.CompletedProcess:
        return _run([dvc, *args], work, env)

    _git(work, env, "init", "-q", "-b", "main")
    _git(work, env, "config", "core.autocrlf", "false")
    d("init", "-q")
    d("config", "core.analytics", "false")
    d("config", "core.autostage", "true")

    # remotes -------------------------------------------------------------
    remote_roots: dict[str, Path] = {
        "local": workdir / "remotes" / "local" / name,
        "extra": workdir / "remotes" / "extra" / name,
        "http": http.root / name,
        "s3": s3.prefix_root(f"store-{name}"),
    }
    for p in remote_roots.values():
        p.mkdir(parents=True, exist_ok=True)
    remote_urls = {
        "local": str(remote_roots["local"]),
        "extra": str(remote_roots["extra"]),
        "http": f"{http.url}/{name}",
        "s3": s3.prefix_url(f"store-{name}"),
    }
    d("remote", "add", "-d", "local", remote_urls["local"])
    d("remote", "add", "extra", remote_urls["extra"])
    d("remote", "add", "http", remote_urls["http"])
    d("remote", "modify", "http", "method", "PUT")
    d("remote", "modify", "--local", "http", "auth", "basic")
    d("remote", "modify", "--local", "http", "user", http.user)
    d("remote", "modify", "--local", "http", "password", http.password)
    d("remote", "add", "s3", remote_urls["s3"])
    d("remote", "modify", "s3", "endpointurl", s3.endpoint_url)
    d("remote", "modify", "--local", "s3", "access_key_id", s3.access_key)
    d("remote", "modify", "--local", "s3", "secret_access_key", s3.secret_key)

    # content -------------------------------------------------------------
    seed = sum(map(ord, name))
    if big:
        _big_repo_content(work, seed)
        d("add", "data/many")
        d("add", "data/large.bin")
        _git(work, env, "add", "-A")
        _git(work, env, "commit", "-q", "-m", "Add big data")
    else:
        _small_repo_content(work, seed)
        _git(work, env, "add", "README.md", "src")
        _git(work, env, "commit", "-q", "-m", "Initial code")
        d("add", "data/images")
        d("add", "data/labels.csv")
        d("add", "data/empty.txt")
        d("add", "models/model.bin")
        _set_out_remote(work / "models" / "model.bin.dvc", "extra")
        d(
            "stage", "add", "-n", "prepare",
            "-d", "data/labels.csv", "-d", "src/prepare.py",
            "-o", "out/prepared.txt", "-o", "out/features",
            "python3 src/prepare.py",
        )  # fmt: skip
        d("repro", "prepare")
        _git(work, env, "add", "-A")
        _git(work, env, "commit", "-q", "-m", "Track data with DVC")

    # push ------------------------------------------------------------------
    push_times = {}
    for kind in ("local", "http"):
        t = time.monotonic()
        d("push", *jobs, "-r", kind)
        push_times[kind] = round(time.monotonic() - t, 2)
    t = time.monotonic()
    if dvc_version == "3":
        d("push", *jobs, "-r", "s3")
        s3_via = "dvc push"
    else:
        # DVC 2 here lacks dvc-s3; a DVC 2 S3 remote has the same layout as a
        # DVC 2 local remote, so copy the objects onto the disk rclone serves.
        shutil.copytree(remote_roots["local"], remote_roots["s3"], dirs_exist_ok=True)
        s3_via = "copied from local remote (DVC 2 has no dvc-s3)"
    push_times["s3"] = round(time.monotonic() - t, 2)
    # plain push: outputs with `remote: extra` go to extra
    d("push", *jobs)

    # git: main (default remote local), tag, branches -------------------------
    _git(work, env, "tag", "v1")
    _git(work, env, "remote", "add", "origin", git.url(name))
    branches: dict[str, str] = {}
    for kind in REMOTE_KINDS:
        br = f"remote-{kind}"
        _git(work, env, "checkout", "-q", "-b", br, "main")
        d("remote", "default", kind)
        _git(work, env, "add", ".dvc/config")
        _git(work, env, "commit", "-q", "--allow-empty", "-m", f"Use remote {kind} by default")
        branches[kind] = br
    _git(work, env, "checkout", "-q", "main")
    bare = git.create_bare(name)
    _git(work, env, "push", "-q", "origin", "--all")
    _git(work, env, "push", "-q", "origin", "--tags")

    # reference checkout -------------------------------------------------------
    expected = workdir / "expected" / name
    if expected.exists():
        shutil.rmtree(expected)
    expected.parent.mkdir(parents=True, exist_ok=True)
    _run(["git", "clone", "-q", git.url(name), str(expected)], workdir, env)
    t = time.monotonic()
    _run([dvc, "pull", *jobs], expected, env)
    pull_time = round(time.monotonic() - t, 2)

    return FixtureRepo(
        name=name,
        dvc_version=dvc_version,
        git_url=git.url(name),
        private_git_url=git.private_url(name),
        local_path=bare,
        branches=branches,
        remote_roots=remote_roots,
        remote_urls=remote_urls,
        expected=expected,
        work=work,
        build_seconds=round(time.monotonic() - t0, 2),
        info={"push_seconds": push_times, "pull_seconds": pull_time, "s3_via": s3_via},
        commits={kind: _git(work, env, "rev-parse", br).stdout.strip() for kind, br in branches.items()},
    )


# --------------------------------------------------------------------------- public


_CACHE: dict[tuple[str, str], FixtureRepo] = {}


def build_fixture_repos(
    workdir: Path, git: GitHttpServer, http: HttpRemoteServer, s3: S3RemoteServer
) -> dict[str, FixtureRepo]:
    """Build (once per workdir) the "dvc3" and, when DVC 2 is installed, "dvc2" repos."""
    workdir = Path(workdir)
    out: dict[str, FixtureRepo] = {}
    specs = [("dvc3", DVC3_BIN, "3")]
    d2 = dvc2_bin()
    if d2:
        specs.append(("dvc2", d2, "2"))
    todo = [(name, dvc, ver) for name, dvc, ver in specs if (str(workdir), name) not in _CACHE]
    if todo:
        # DVC 2 and DVC 3 repos are independent: author them concurrently.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(todo)) as pool:
            futures = {
                name: pool.submit(
                    _author, name=name, dvc=dvc, dvc_version=ver, workdir=workdir, git=git, http=http, s3=s3
                )
                for name, dvc, ver in todo
            }
            for name, fut in futures.items():
                _CACHE[(str(workdir), name)] = fut.result()
    for name, _, _ in specs:
        out[name] = _CACHE[(str(workdir), name)]
    return out


def build_big_repo(workdir: Path, git: GitHttpServer, http: HttpRemoteServer, s3: S3RemoteServer) -> FixtureRepo:
    """The slow "big" repo (DVC 3): 10,000 small files + a 200 MiB file."""
    key = (str(Path(workdir)), "big")
    if key not in _CACHE:
        repo = _author(name="big", dvc=DVC3_BIN, dvc_version="3", workdir=Path(workdir), git=git, http=http, s3=s3, big=True)
        print(f"\n[fixtures] built big repo in {repo.build_seconds:.1f}s {repo.info}", file=sys.stderr)
        _CACHE[key] = repo
    return _CACHE[key]
