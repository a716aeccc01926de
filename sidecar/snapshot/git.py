"""Git access through the git CLI: blob-less, shallow fetches into a per-URL bare cache repo.

Credentials never reach the command line or the environment: they travel as an
`http.extraHeader` in a 0600 git config file of ours (GIT_CONFIG_GLOBAL), removed at close,
and every message we surface is redacted.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import shlex
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from ..errors import DeadlineExceeded, GitError, UnknownRevision
from ..locks import FileLock
from ..redact import redact, strip_userinfo
from ..remotes.tls import combined_bundle

# Blobs up to this size come with the commit (every .dvc file, dvc.lock, .dvc/config);
# larger git blobs are fetched lazily, only when read or stat'ed.
BLOB_LIMIT = "1m"
LOCAL_READERS = 2   # cat-file readers for blobs on disk
LAZY_READERS = 4    # ... and for blobs git must fetch from the server (each may block on the network)
_HEX = re.compile(r"^[0-9a-f]{4,40}$")


@dataclass(frozen=True)
class GitEntry:
    path: str
    mode: int
    sha: str
    kind: str            # "blob" | "commit" (submodule)
    size: int | None     # None: blob not fetched yet (over BLOB_LIMIT)


# Variables git (and curl, ssh) may see from our environment; everything else - GIT_SSH_COMMAND,
# GIT_SSH, GIT_ASKPASS, GIT_EXEC_PATH, GIT_CONFIG_*, GIT_DIR, LD_PRELOAD, ... - is dropped, since
# a tenant's Secret or a hostile environment could set it to run commands as us.
_ENV_ALLOWED = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "SSH_AUTH_SOCK",
})
# Config no file may override: ours come last (GIT_CONFIG_*), and no global or system file is
# read. Only transports that cannot run commands (no ext::, no fd::); no hooks, no fsmonitor.
SAFE_CONFIG: tuple[tuple[str, str], ...] = (
    ("protocol.allow", "never"), ("protocol.https.allow", "always"), ("protocol.http.allow", "always"),
    ("protocol.ssh.allow", "always"), ("protocol.git.allow", "always"), ("protocol.file.allow", "always"),
    ("core.fsmonitor", "false"), ("core.hooksPath", "/dev/null"), ("core.askPass", "true"),
    ("credential.helper", ""), ("core.gitProxy", "none"),
)
SSH_KEY_FILE_ENV = "DDA_SSH_KEY_FILE"               # set by the webhook: the Secret's ssh-privatekey
SSH_KNOWN_HOSTS_ENV = "DDA_SSH_KNOWN_HOSTS_FILE"    # and its known_hosts


def ssh_command(env: "os._Environ[str] | dict[str, str] | None" = None) -> str:
    """The ssh git runs: batch mode; with the Secret's key and known_hosts files (paths in
    DDA_SSH_KEY_FILE / DDA_SSH_KNOWN_HOSTS_FILE) when they exist, and then no ssh config file
    (a ProxyCommand there would run commands). Never taken from the user's environment."""
    env = os.environ if env is None else env
    args = ["ssh", "-o", "BatchMode=yes"]
    key = env.get(SSH_KEY_FILE_ENV, "")
    known = env.get(SSH_KNOWN_HOSTS_ENV, "")
    if (key and os.path.isfile(key)) or (known and os.path.isfile(known)):
        args += ["-F", "/dev/null"]
    if key and os.path.isfile(key):
        args += ["-i", key, "-o", "IdentitiesOnly=yes"]
    if known and os.path.isfile(known):
        args += ["-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes"]
    return " ".join(shlex.quote(a) for a in args)


def git_env(env: "os._Environ[str] | dict[str, str] | None" = None) -> dict[str, str]:
    """git's environment from an allow-list of `env` (default os.environ): locale, proxies, CA
    files, PATH and HOME; plus no prompts, no global or system config, and our ssh command."""
    env = os.environ if env is None else env
    out = {k: v for k, v in env.items() if k in _ENV_ALLOWED or k.startswith("LC_")}
    out.setdefault("PATH", os.defpath)
    out.update(GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="true", SSH_ASKPASS="true", GIT_CONFIG_NOSYSTEM="1",
               GIT_CONFIG_GLOBAL=os.devnull, GIT_SSH_COMMAND=ssh_command(env), GIT_PROTOCOL_FROM_USER="0")
    return out


def _looks_local(url: str) -> bool:
    return "://" not in url and not re.match(r"^[\w.-]+@[\w.-]+:", url)


class GitSource:
    def __init__(self, url: str, cache_dir: Path, user: str | None = None, token: str | None = None,
                 deadline: float = 60.0, ca_bundle: str | None = None):
        if _looks_local(url):
            path = Path(url).expanduser().resolve()
            if not path.exists():
                raise GitError(f"repository {redact(url)}: no such directory")
            url = path.as_uri()
        clean, url_user, url_token = strip_userinfo(url)
        if url.lower().startswith("ssh://") and url_token is None:
            # ssh://git@host/...: the login name of ssh, not a credential; it stays in the URL
            clean, url_user = url, None
        self.url = clean
        self.user = user or url_user
        self.token = token or url_token
        self.display_url = clean
        key = hashlib.sha256(clean.encode()).hexdigest()[:24]
        self.gitdir = Path(cache_dir) / "git" / f"{key}.git"
        self._lock_path = Path(cache_dir) / "git" / f"{key}.lock"
        # git's sslCAInfo replaces the public CAs: give it both, in one file
        self._cainfo = str(combined_bundle(ca_bundle, Path(cache_dir))) if ca_bundle else None
        self._size_cache: dict[str, int] = {}
        self._cred_path: str | None = None   # see _credential_file
        self.last_ref: str | None = None   # the ref the last resolve() followed (None: a commit)
        self.deadline = deadline            # seconds a blob read may wait
        self.lazy_timeout = max(600.0, deadline)   # a lazy blob fetch, however many readers gave up
        self._present: set[str] = set()     # blobs known to be on disk (no lazy fetch needed)
        self._lazy: dict[str, asyncio.Task[bytes]] = {}
        self._local_pool = _ReaderPool(self._spawn_reader, LOCAL_READERS)
        self._lazy_pool = _ReaderPool(self._spawn_reader, LAZY_READERS)

    @property
    def local_path(self) -> Path | None:
        if self.url.startswith("file://"):
            from urllib.parse import unquote, urlsplit

            return Path(unquote(urlsplit(self.url).path))
        return None

    # -- plumbing -------------------------------------------------------------------------
    async def _spawn_reader(self) -> "_BatchReader":
        proc = await asyncio.create_subprocess_exec(
            "git", "--git-dir", str(self.gitdir), "cat-file", "--batch",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env=self._env(), limit=1 << 20, start_new_session=True)   # its own group: kill() ends its fetch too
        return _BatchReader(proc, f"repository {self.display_url}")

    def _env(self) -> dict[str, str]:
        """git's whole environment, built from an allow-list (`git_env`) plus our settings."""
        env = git_env()
        config = list(SAFE_CONFIG) + [("protocol.version", "2"), ("http.lowSpeedLimit", "1000"),
                                      ("http.lowSpeedTime", "30")]
        if self._cainfo:
            config.append(("http.sslCAInfo", self._cainfo))
            env["GIT_SSL_CAINFO"] = self._cainfo    # the variable would win over the config
        if self.token or self.user:
            # The credential reaches git through a 0600 config file of ours (GIT_CONFIG_GLOBAL),
            # never through the environment or argv that every child (and /proc) would show.
            env["GIT_CONFIG_GLOBAL"] = self._credential_file()
        env["GIT_CONFIG_COUNT"] = str(len(config))
        for i, (key, value) in enumerate(config):
            env[f"GIT_CONFIG_KEY_{i}"] = key
            env[f"GIT_CONFIG_VALUE_{i}"] = value
        return env

    def _credential_file(self) -> str:
        """A git config file holding only the http.extraHeader of our credential, in a 0700
        folder, mode 0600; written once, removed by aclose()."""
        if self._cred_path is None or not os.path.exists(self._cred_path):
            if self.user:
                raw = f"{self.user}:{self.token or ''}".encode()
                header = "Authorization: Basic " + base64.b64encode(raw).decode()
            else:
                header = f"Authorization: Bearer {self.token}"
            folder = tempfile.mkdtemp(prefix="dda-git-")      # 0700
            path = os.path.join(folder, "config")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write('[http]\n\textraHeader = "' + header.replace("\\", "\\\\").replace('"', '\\"') + '"\n')
            self._cred_path = path
        return self._cred_path

    def _forget_credential_file(self) -> None:
        if self._cred_path is not None:
            shutil.rmtree(os.path.dirname(self._cred_path), ignore_errors=True)
            self._cred_path = None

    def _secrets(self) -> list[str | None]:
        secrets = [self.token]
        if self.user:
            secrets.append(base64.b64encode(f"{self.user}:{self.token or ''}".encode()).decode())
        return secrets

    async def _git(self, *args: str, input: bytes | None = None, timeout: float = 600.0,
                   check: bool = True, extra_env: dict[str, str] | None = None) -> tuple[int, bytes, str]:
        env = self._env()
        env.update(extra_env or {})
        proc = await asyncio.create_subprocess_exec(
            "git", "--git-dir", str(self.gitdir), *args,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise GitError(f"repository {self.display_url}: git {args[0]} took longer than {timeout:.0f}s") from None
        message = redact(err.decode(errors="replace"), self._secrets()).strip()
        if check and proc.returncode != 0:
            raise self._classify(args[0], message)
        return proc.returncode, out, message

    def _classify(self, op: str, stderr: str) -> GitError:
        low = stderr.lower()
        where = f"repository {self.display_url}"
        if "authentication failed" in low or "401" in low or "403" in low or "could not read username" in low:
            return GitError(f"{where}: authentication failed (check the token or user for this URL)")
        if "not found" in low or "does not appear to be a git repository" in low or "repository not found" in low:
            return GitError(f"{where}: no git repository at this URL")
        if "could not resolve host" in low or "connection refused" in low or "failed to connect" in low \
                or "timed out" in low or "couldn't connect" in low:
            return GitError(f"{where}: cannot reach the server ({_last_line(stderr)})")
        return GitError(f"{where}: git {op} failed: {_last_line(stderr)}")

    def _lock(self):
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(self._lock_path)

    async def _ensure_repo(self) -> None:
        if (self.gitdir / "HEAD").exists():
            return
        self.gitdir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.gitdir.with_name(self.gitdir.name + f".tmp{os.getpid()}")
        proc = await asyncio.create_subprocess_exec("git", "init", "--bare", "-q", str(tmp),
                                                    stdout=asyncio.subprocess.DEVNULL, env=git_env())
        await proc.wait()
        # The remote URL has no credentials in it (they travel in the environment).
        for key, value in (("remote.origin.url", self.url), ("remote.origin.promisor", "true"),
                           ("remote.origin.partialclonefilter", f"blob:limit={BLOB_LIMIT}"),
                           ("extensions.partialClone", "origin"), ("core.repositoryformatversion", "1"),
                           ("gc.auto", "0")):
            proc = await asyncio.create_subprocess_exec("git", "--git-dir", str(tmp), "config", key, value,
                                                        env=git_env())
            await proc.wait()
        try:
            os.rename(tmp, self.gitdir)
        except OSError:  # another process won the race
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)

    # -- public ---------------------------------------------------------------------------
    async def ls_remote(self) -> tuple[dict[str, str], str | None]:
        """All refs of the remote and the ref HEAD points at."""
        await self._ensure_repo()
        _, out, _ = await self._git("ls-remote", "--symref", "origin", timeout=120)
        refs: dict[str, str] = {}
        head_target = None
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("ref: "):
                target, _, name = line[5:].partition("\t")
                if name == "HEAD":
                    head_target = target
                continue
            sha, _, name = line.partition("\t")
            if name.endswith("^{}"):
                refs[name[:-3]] = sha  # peeled tag: the commit wins over the tag object
            else:
                refs.setdefault(name, sha)
        return refs, head_target

    async def resolve(self, revision: str | None) -> tuple[str, str]:
        """Fetch the revision (shallow, blob-limited) and return (commit sha, label)."""
        async with self._lock():
            await self._ensure_repo()
            refs, head = await self.ls_remote()
            ref = None
            if revision is None:
                ref = head or ("HEAD" if "HEAD" in refs else None)
                if ref is None:
                    raise UnknownRevision(f"repository {self.display_url}: has no default branch (empty repository?)")
            else:
                for candidate in (revision, f"refs/heads/{revision}", f"refs/tags/{revision}"):
                    if candidate in refs:
                        ref = candidate
                        break
            self.last_ref = ref
            if ref is not None:
                sha = refs[ref]
                if not await self._has_commit(sha):
                    await self._fetch([f"+{ref}:{_keep_ref(sha)}"], depth=True)
                return await self._peel(sha, revision or ref), (revision or ref.removeprefix("refs/heads/"))
            if revision and _HEX.match(revision.lower()):
                return await self._resolve_sha(revision.lower(), refs), revision
            raise UnknownRevision(f"repository {self.display_url}: no branch, tag or commit named {revision!r}")

    async def _resolve_sha(self, sha: str, refs: dict[str, str]) -> str:
        if len(sha) == 40:
            if await self._has_commit(sha):
                return sha
            code, _, _ = await self._git("fetch", "-q", "--no-tags", "--depth", "1",
                                         f"--filter=blob:limit={BLOB_LIMIT}", "origin",
                                         f"+{sha}:{_keep_ref(sha)}", check=False)
            if code == 0:
                return sha
        for name, target in refs.items():   # a short sha of a branch or tag tip
            if target.startswith(sha) and (name.startswith("refs/heads/") or name.startswith("refs/tags/")):
                await self._fetch([f"+{name}:{_keep_ref(target)}"], depth=True)
                return await self._peel(target, sha)
        # Servers that refuse unadvertised wants, or a short sha deep in history: fetch the
        # history of every branch and tag (commits and trees only), then look again. A shallow
        # repository (any earlier --depth 1 fetch) keeps its boundary on a plain fetch: unshallow it.
        _, shallow, _ = await self._git("rev-parse", "--is-shallow-repository", check=False, timeout=30)
        await self._fetch(["+refs/heads/*:refs/dda/heads/*", "+refs/tags/*:refs/dda/tags/*"], depth=False,
                          unshallow=shallow.strip() == b"true")
        found = await self._rev_parse(sha)
        if not found:
            raise UnknownRevision(f"repository {self.display_url}: no commit {sha!r} on any branch or tag")
        return found

    async def _fetch(self, refspecs: list[str], depth: bool, unshallow: bool = False) -> None:
        args = ["fetch", "-q", "--no-tags", f"--filter=blob:limit={BLOB_LIMIT}"]
        if depth:
            args += ["--depth", "1"]
        elif unshallow:
            args += ["--unshallow"]
        await self._git(*args, "origin", *refspecs)

    async def _has_commit(self, sha: str) -> bool:
        """Whether we fetched this commit before. Asks the refs only: looking the object up
        would make git lazily fetch it (and its whole history) from the promisor remote."""
        _, out, _ = await self._git("for-each-ref", "--format=%(refname)", _keep_ref(sha), timeout=30)
        return bool(out.strip())

    async def _rev_parse(self, rev: str) -> str | None:
        code, out, _ = await self._git("rev-parse", "--verify", "-q", f"{rev}^{{commit}}", check=False, timeout=30)
        return out.decode().strip() if code == 0 else None

    async def _peel(self, sha: str, label: str) -> str:
        found = await self._rev_parse(sha)
        if not found:
            raise UnknownRevision(f"repository {self.display_url}: {label!r} does not name a commit")
        return found

    async def commit_time(self, commit: str) -> int:
        _, out, _ = await self._git("show", "-s", "--format=%ct", commit, timeout=30)
        return int(out.decode().strip() or 0)

    async def ls_tree(self, commit: str) -> list[GitEntry]:
        _, out, _ = await self._git("ls-tree", "-r", "-z", "--full-tree", commit, timeout=120)
        entries: list[GitEntry] = []
        for record in out.split(b"\0"):
            if not record:
                continue
            meta, _, path = record.partition(b"\t")
            mode, kind, sha = meta.decode().split()
            entries.append(GitEntry(path.decode("utf-8", "surrogateescape"), int(mode, 8), sha, kind, None))
        sizes = await self._local_sizes([e.sha for e in entries if e.kind == "blob"])
        return [GitEntry(e.path, e.mode, e.sha, e.kind, sizes.get(e.sha) if e.kind == "blob" else 0)
                for e in entries]

    async def _local_sizes(self, shas: list[str]) -> dict[str, int]:
        """Sizes of blobs already in the local object store, without any lazy fetch."""
        if not shas:
            return {}
        _, out, _ = await self._git("cat-file", "--batch-all-objects", "--batch-check=%(objectname) %(objecttype) %(objectsize)",
                                    timeout=120)
        wanted = set(shas)
        sizes: dict[str, int] = {}
        for line in out.decode().splitlines():
            sha, kind, size = line.split()
            if kind == "blob" and sha in wanted:
                sizes[sha] = int(size)
        self._size_cache.update(sizes)
        self._present.update(sizes)
        return sizes

    async def blob_size(self, sha: str) -> int:
        if sha not in self._size_cache:
            await self.read_blob(sha)
        return self._size_cache[sha]

    async def start_reader(self) -> None:
        """Start a long-lived `git cat-file --batch` for blobs already on disk: they are read
        without a fork per read, and (what matters for a FUSE daemon) without forking while a
        mount is being served, unless a stuck reader had to be replaced."""
        await self._local_pool.warm()

    async def read_blob(self, sha: str, deadline: float | None = None) -> bytes:
        """The blob's bytes; git fetches a missing one from the promisor remote and verifies it.

        Waits at most `deadline` seconds (default: the source's deadline), then raises
        DeadlineExceeded. A blob already on disk is read by its own small pool of readers, so it
        never queues behind a lazy fetch; a stuck reader is killed and replaced. A lazy fetch is
        single-flight per blob and runs on in the background (up to `lazy_timeout`) after its
        readers gave up, so the next read of that blob joins it instead of starting over.
        """
        deadline = self.deadline if deadline is None else deadline
        where = f"repository {self.display_url}"
        if sha in self._present:
            try:
                data = await self._local_pool.read(sha, deadline)
            except TimeoutError:
                raise DeadlineExceeded(f"{where}: reading git blob {sha} took longer than {deadline:g}s "
                                       f"(the reader was replaced)") from None
        else:
            task = self._lazy.get(sha)
            if task is None:
                task = asyncio.create_task(self._lazy_pool.read(sha, self.lazy_timeout))
                self._lazy[sha] = task
                task.add_done_callback(lambda t, sha=sha: self._lazy_done(sha, t))
            try:
                data = await asyncio.wait_for(asyncio.shield(task), deadline)
            except TimeoutError:
                if task.done() and isinstance(task.exception(), TimeoutError):
                    raise DeadlineExceeded(f"{where}: git blob {sha} was not fetched within "
                                           f"{self.lazy_timeout:g}s; gave up") from None
                raise DeadlineExceeded(f"{where}: git blob {sha} not fetched from the git server within "
                                       f"{deadline:g}s (still fetching in the background)") from None
        self._present.add(sha)
        self._size_cache[sha] = len(data)
        return data

    def _lazy_done(self, sha: str, task: "asyncio.Task[bytes]") -> None:
        if self._lazy.get(sha) is task:
            del self._lazy[sha]
        if not task.cancelled():
            task.exception()   # retrieved: an abandoned fetch's error is reported to its readers only

    async def aclose(self) -> None:
        for task in list(self._lazy.values()):
            task.cancel()
        await asyncio.gather(*self._lazy.values(), return_exceptions=True)
        await self._local_pool.close()
        await self._lazy_pool.close()
        self._forget_credential_file()


class _BatchReader:
    """One `git cat-file --batch` process answering one request at a time."""

    def __init__(self, proc: asyncio.subprocess.Process, where: str):
        self.proc = proc
        self.where = where

    async def read(self, sha: str) -> bytes:
        assert self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(sha.encode() + b"\n")
            await self.proc.stdin.drain()
            header = (await self.proc.stdout.readline()).decode().split()
            if len(header) != 3 or header[1] != "blob":
                raise GitError(f"{self.where}: cannot read blob {sha} ({' '.join(header[1:]) or 'git exited'})")
            size = int(header[2])
            data = await self.proc.stdout.readexactly(size + 1)
        except (asyncio.IncompleteReadError, ConnectionError) as err:
            raise GitError(f"{self.where}: cannot read blob {sha} (git cat-file exited: {type(err).__name__})") from None
        return data[:size]

    def kill(self) -> None:
        """Kill cat-file and what it started (a lazy fetch runs `git fetch` and a remote helper)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    async def reap(self) -> None:
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            pass

    async def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.kill()
            await self.reap()


class _ReaderPool:
    """Up to `size` cat-file readers; a read that overruns its timeout kills its reader (its
    pipe is mid-answer and the process may hang on the network) and a fresh one replaces it."""

    def __init__(self, spawn: "Callable[[], Awaitable[_BatchReader]]", size: int):
        self._spawn = spawn
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_BatchReader] = []
        self._busy: set[_BatchReader] = set()

    async def warm(self) -> None:
        if not self._idle and not self._busy:
            self._idle.append(await self._spawn())

    async def read(self, sha: str, timeout: float) -> bytes:
        """TimeoutError after `timeout` seconds, waiting for a free reader included."""
        reader: _BatchReader | None = None
        ok = False
        try:
            async with asyncio.timeout(timeout):
                async with self._slots:
                    reader = self._idle.pop() if self._idle else await self._spawn()
                    self._busy.add(reader)
                    data = await reader.read(sha)
                    ok = True
                    return data
        finally:
            if reader is not None:
                self._busy.discard(reader)
                if ok:
                    self._idle.append(reader)
                else:
                    reader.kill()   # mid-answer or dead: never reuse it
                    await reader.reap()

    async def close(self) -> None:
        for reader in list(self._busy):
            reader.kill()
        readers, self._idle = self._idle, []
        await asyncio.gather(*(r.close() for r in readers), return_exceptions=True)


class GitWriter:
    """Commits made without a checkout (a private index over the parent's tree), and pushes.
    Needs no blobs of the parent: only its trees, which a blob-less fetch has."""

    def __init__(self, source: GitSource):
        self.source = source

    async def branch_tip(self, branch: str | None) -> tuple[str, str]:
        """(branch name, tip commit), fetched; `branch` None means the default branch."""
        async with self.source._lock():
            await self.source._ensure_repo()
            refs, head = await self.source.ls_remote()
        ref = (f"refs/heads/{branch}" if branch else head) or ""
        if ref not in refs:
            tags = f"refs/tags/{branch}" in refs
            raise UnknownRevision(f"repository {self.source.display_url}: "
                                  + (f"{branch!r} is a tag; uploads need a branch" if tags else
                                     f"no branch named {branch!r}" if branch else "no default branch"))
        commit, _ = await self.source.resolve(ref.removeprefix("refs/heads/"))
        return ref.removeprefix("refs/heads/"), commit

    async def commit(self, parent: str, files: dict[str, bytes], message: str, author: tuple[str, str],
                     timestamp: int | None = None) -> str:
        import tempfile

        git = self.source._git
        with tempfile.TemporaryDirectory(prefix="dda-index-") as tmp:
            env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
            await git("read-tree", parent, extra_env=env)
            for path, content in files.items():
                _, sha, _ = await git("hash-object", "-w", "--stdin", input=content)
                await git("update-index", "--add", "--cacheinfo", f"100644,{sha.decode().strip()},{path}",
                          extra_env=env)
            _, tree, _ = await git("write-tree", extra_env=env)
        name, email = author
        env = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name,
               "GIT_COMMITTER_EMAIL": email}
        if timestamp is not None:
            env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = f"{timestamp} +0000"
        _, commit, _ = await git("commit-tree", tree.decode().strip(), "-p", parent, "-m", message, extra_env=env)
        return commit.decode().strip()

    async def push(self, commit: str, branch: str, expected_tip: str) -> bool:
        """Fast-forward `branch` from `expected_tip` to `commit`. False if the branch moved."""
        code, out, err = await self.source._git(
            "push", "--porcelain", f"--force-with-lease=refs/heads/{branch}:{expected_tip}", "origin",
            f"{commit}:refs/heads/{branch}", check=False, timeout=600)
        if code == 0:
            return True
        said = (out.decode(errors="replace") + "\n" + err).lower()
        # Lost a race: the lease saw a new tip, or the server could not lock/update the ref
        # because another push was landing at that moment.
        if any(word in said for word in ("stale info", "non-fast-forward", "fetch first", "rejected",
                                         "cannot lock ref", "failed to update ref", "failed to lock")):
            return False
        raise self.source._classify("push", err)


def _keep_ref(sha: str) -> str:
    """A ref per fetched commit keeps it (and marks it as fetched)."""
    return f"refs/dda/commits/{sha}"


def _last_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1].removeprefix("fatal: ") if lines else "no details"
