"""Append files to a DVC-tracked directory without pulling it.

Only the new objects travel: hash the files, upload what the remote lacks, merge the new
entries into the existing `.dir` manifest (fetched, never the dataset), upload the manifest,
rewrite the `.dvc` file and commit + push it. Objects go up before the commit, so an
interrupted upload leaves the branch as it was, and a rerun skips what is already there.
If the branch moves meanwhile, we re-read its tip and merge again, backing off with jitter
until a deadline: concurrent writers all land and nobody's files are lost. What is recorded
is what `dvc add` would record: `.dvcignore` applied as DVC applies it, and the `.dvc` file
edited in place (comments and user keys kept).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_delay, wait_random_exponential

from . import dvcyaml
from .config import Config
from .dvcignore import DVCIGNORE, IgnoreFilter
from .engine import Engine
from .errors import ConfigError, DDAError, DvcFileError, ObjectMissing
from .remotes import Remote, object_path
from .snapshot.dvcfiles import DvcOut, ManifestEntry
from .snapshot.git import GitWriter
from .store.verify import Dos2UnixMd5

_TEXT_CHARS = bytes(range(32, 127)) + b"\n\r\t\f\b"
# How long an upload keeps retrying when other writers move the branch first (seconds).
DEFAULT_RETRY_FOR = 600.0
# Names DVC always ignores (dvc/ignore.py defaults): never a place to upload to.
_RESERVED_NAMES = {".git", ".dvc", ".hg"}


class UploadError(DDAError):
    pass


@dataclass(frozen=True)
class LocalFile:
    source: Path
    relpath: str        # inside the target directory
    md5: str
    size: int


@dataclass
class UploadResult:
    commit: str
    branch: str
    dvc_file: str
    files_added: int
    files_replaced: int
    objects_uploaded: int
    bytes_uploaded: int
    manifest_md5: str
    attempts: int
    skipped_present: int = 0
    messages: list[str] = field(default_factory=list)


def _contained_link(link: Path, root: Path) -> None:
    """UploadError unless the symlink `link` resolves to something inside `root`: a link planted
    in a dataset folder (say to ~/.ssh/id_rsa) must not publish what it points at."""
    target = Path(os.path.realpath(link))   # never raises, even on a loop
    if not target.is_relative_to(os.path.realpath(root)):
        raise UploadError(f"{link}: a symlink to {os.readlink(link)!r}, outside {root}; upload that file "
                          f"itself or remove the link")


def collect_files(paths: list[Path]) -> list[tuple[Path, str]]:
    """(source, relpath) for files and, recursively, directories (named by their contents).

    Inside a directory, symlinks are followed only when they stay inside it (UploadError
    otherwise); linked directories are not descended into (their targets are walked anyway).
    A directory holding `.dvc` is a nested DVC repository, which DVC never adds to a dataset.
    """
    found: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                dirnames[:] = [d for d in dirnames if not _is_subrepo(Path(dirpath) / d)]
                for name in dirnames:
                    if (Path(dirpath) / name).is_symlink():
                        _contained_link(Path(dirpath) / name, path)
                for name in sorted(filenames):
                    full = Path(dirpath) / name
                    if full.is_symlink():
                        _contained_link(full, path)
                        if not full.is_file():
                            raise UploadError(f"{full}: a symlink to {os.readlink(full)!r}, which is not a file")
                    elif not full.is_file():       # a FIFO would block the reader forever
                        raise UploadError(f"{full}: {_kind(full)}, not a regular file; DVC would not add it")
                    found.append((full, full.relative_to(path).as_posix()))
        elif path.is_file():
            found.append((path, path.name))
        elif os.path.lexists(path) and not path.is_symlink():
            raise UploadError(f"{path}: {_kind(path)}, not a regular file or directory")
        else:
            raise UploadError(f"{path}: no such file or directory")
    seen: dict[str, Path] = {}
    for source, rel in found:
        if rel in seen:
            raise UploadError(f"{source} and {seen[rel]} would both be uploaded as {rel!r}")
        seen[rel] = source
    return found


def _kind(path: Path) -> str:
    """What a non-regular file is, in words."""
    import stat

    mode = os.lstat(path).st_mode
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")


def _is_subrepo(path: Path) -> bool:
    return os.path.lexists(path / ".dvc")


def check_target(target: str) -> str:
    """The normalized `--to` directory, or UploadError saying why it cannot hold a dataset:
    absolute, empty, `.`/`..` parts (the root itself, or escaping the repository), names DVC
    always ignores (`.git`, `.dvc`, `.hg`, and anything under them), control characters."""
    shown = f"--to {target!r}"
    if not target or not target.strip("/"):
        raise UploadError(f"{shown}: give a directory path inside the repository (not its root)")
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        raise UploadError(f"{shown}: an absolute path; give a path relative to the repository's root")
    if any(ord(c) < 32 or c == "\x7f" for c in target):
        raise UploadError(f"{shown}: contains control characters")
    parts = target.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UploadError(f"{shown}: '.', '..' and empty parts are not allowed; give a plain path inside "
                          f"the repository, e.g. data/images")
    reserved = [p for p in parts if p in _RESERVED_NAMES]
    if reserved:
        raise UploadError(f"{shown}: {reserved[0]!r} is reserved (git's and DVC's own data; DVC ignores it)")
    return "/".join(parts)


def _is_text(head: bytes) -> bool:
    """DVC 2's test (first 512 bytes): no NUL and at most 30% non-text bytes."""
    if not head:
        return True
    if b"\x00" in head:
        return False
    return len(head.translate(None, _TEXT_CHARS)) / len(head) <= 0.30


def hash_file(path: Path, legacy: bool) -> tuple[str, int]:
    """The md5 DVC records: raw bytes (DVC 3), or CRLF->LF for text files (DVC 2)."""
    size = 0
    with open(path, "rb") as f:
        head = f.read(512)
        text = legacy and _is_text(head)
        md5 = Dos2UnixMd5() if text else hashlib.md5()
        f.seek(0)
        while block := f.read(1 << 20):
            md5.update(block)
            size += len(block)
    return md5.hexdigest(), size


def manifest_bytes(entries: list[ManifestEntry]) -> bytes:
    """Byte for byte what DVC writes, so `dvc status` agrees with our md5."""
    rows = sorted(({"md5": e.md5, "relpath": e.relpath} for e in entries), key=lambda r: r["relpath"])
    return json.dumps(rows, sort_keys=True).encode("utf-8")


class Uploader:
    def __init__(self, config: Config, target: str, files: list[tuple[Path, str]], *, message: str | None = None,
                 replace: bool = False, author: tuple[str, str] | None = None, progress: bool = False,
                 retry_for: float = DEFAULT_RETRY_FOR):
        self.config = config
        self.target = check_target(target)
        self.files = files
        self.message = message
        self.replace = replace
        self.author = author or ("dda upload", "dda@localhost")
        self.progress = progress
        if not retry_for >= 0:   # NaN too
            raise UploadError(f"retry for {retry_for!r} seconds: expected a number >= 0")
        self.retry_for = retry_for
        self.bytes_uploaded = 0
        self.objects_uploaded = 0
        self.skipped_present = 0
        self._hashes: dict[tuple[bool, Path], tuple[str, int]] = {}
        self._uploaded: set[str] = set()

    async def run(self) -> UploadResult:
        """Upload, commit and push; retried on a fresh tip (jittered exponential backoff) while
        other writers win the push race, until `retry_for` seconds have passed."""
        from .snapshot.git import GitSource

        source = GitSource(self.config.repo or "", self.config.cache_dir, user=self.config.git_user,
                           token=self.config.git_token, ca_bundle=self.config.ca_bundle)
        writer = GitWriter(source)
        branch = self.config.revision
        attempts = 0

        async def attempt() -> UploadResult | None:
            nonlocal branch, attempts
            attempts += 1
            branch, tip = await writer.branch_tip(branch)
            engine = await Engine.open(self.config.model_copy(update={"revision": tip}))
            try:
                return await self._attempt(engine, writer, branch, tip, attempts)
            finally:
                await engine.aclose()

        def gave_up(state: RetryCallState) -> UploadResult:
            raise UploadError(f"branch {branch!r} kept moving: other writers won {attempts} push(es) in "
                              f"{self.retry_for:.0f}s (the objects are on the remote: rerun to try again)")

        retrying = AsyncRetrying(stop=stop_after_delay(self.retry_for),
                                 wait=wait_random_exponential(multiplier=0.5, max=10),
                                 retry=retry_if_result(lambda result: result is None),
                                 retry_error_callback=gave_up)
        try:
            return await retrying(attempt)
        finally:
            await source.aclose()

    async def _attempt(self, engine: Engine, writer: GitWriter, branch: str, tip: str,
                       attempt: int) -> UploadResult | None:
        out = self._find_output(engine)
        legacy = out.legacy if out else _repo_is_dvc2(engine)
        base = out.path if out else self.target
        existing = self._existing_manifest(engine, out)
        ignore = await self._ignore_filter(engine, base, existing)
        messages: list[str] = []
        if ignore.is_ignored(base, is_dir=True) or ignore.is_ignored(self.target, is_dir=True):
            raise UploadError(f"--to {self.target}: DVC ignores this path (.dvcignore); `dvc add` would refuse it")
        if out is None and ignore.is_ignored(f"{base}.dvc"):
            raise UploadError(f"--to {self.target}: DVC ignores {base}.dvc (.dvcignore); `dvc add` would refuse it")
        wanted = [(source, rel) for source, rel in self.files
                  if not ignore.walk_ignored(posixpath.join(self.target, rel), base)]
        if len(wanted) < len(self.files):
            skipped = sorted({rel for _, rel in self.files} - {rel for _, rel in wanted})
            messages.append(f"skipped {len(skipped)} file(s) that .dvcignore excludes (first: {skipped[0]})")
        local = await asyncio.to_thread(self._hash_all, wanted, legacy)
        from .snapshot.build import root_of

        assert engine._layout is not None
        # the (sub)repository whose .dvc/config governs the target
        root = out.root if out else root_of(self.target + "/x", set(engine._layout.configs))
        remote = engine.remote(out.remote if out else None, f"--to {self.target}", root)
        # `dvc add` walks the whole directory again: entries the rules exclude drop out of it.
        dropped = [e for e in existing if ignore.walk_ignored(posixpath.join(base, e.relpath), base)]
        if dropped:
            messages.append(f"dropped {len(dropped)} file(s) of {base} that .dvcignore now excludes, as "
                            f"`dvc add` would (first: {dropped[0].relpath})")
        gone = {e.relpath for e in dropped}
        kept = [e for e in existing if e.relpath not in gone]
        merged, placed, replaced_old = self._merge(kept, local, out)
        inner = [e.relpath for e in merged if posixpath.basename(e.relpath) == DVCIGNORE]
        if inner:
            raise UploadError(f"{base}/{inner[0]}: DVC refuses a .dvcignore inside a tracked directory "
                              f"(`dvc add` fails); put its patterns in {posixpath.dirname(base) or 'the root'}"
                              f"/.dvcignore instead")
        await self._upload_objects(remote, [f for f in placed if f.md5 not in self._uploaded], legacy)
        self._uploaded.update(f.md5 for f in placed)
        added = len(placed) - len(replaced_old)
        if not placed and not dropped:   # every file is already there, same content: nothing to commit
            return UploadResult(tip, branch, out.source if out else f"{self.target}.dvc", 0, 0,
                                self.objects_uploaded, self.bytes_uploaded, out.md5 if out else "", attempt,
                                self.skipped_present,
                                messages + ["nothing to do: every file is already in the dataset"])
        data = manifest_bytes(merged)
        manifest_md5 = hashlib.md5(data).hexdigest()
        await remote.write(object_path(manifest_md5, legacy, is_dir=True), data)
        self.bytes_uploaded += len(data)
        await asyncio.to_thread(engine.store.index.record_sizes, {f.md5: f.size for f in local})
        # We just put them on this remote: its identity shows these sizes without asking again.
        await asyncio.to_thread(engine.tenancy.record_sizes, remote, {f.md5: f.size for f in local})
        size = await self._total_size(engine, remote, out, merged, legacy, placed, replaced_old + dropped)
        changes, dvc_file = await self._git_changes(engine, out, manifest_md5, size, len(merged), legacy)
        message = self.message or f"dda upload: add {added} file(s) to {self.target}" + (
            f", replace {len(replaced_old)}" if replaced_old else "")
        commit = await writer.commit(tip, changes, message, self.author)
        if not await writer.push(commit, branch, tip):
            return None   # the branch moved: merge again on its new tip
        return UploadResult(commit, branch, dvc_file, added, len(replaced_old), self.objects_uploaded,
                            self.bytes_uploaded, manifest_md5, attempt, self.skipped_present, messages)

    # -- steps ------------------------------------------------------------------------------------
    def _find_output(self, engine: Engine) -> DvcOut | None:
        assert engine._layout is not None
        for out in engine._layout.outputs:
            if self.target == out.path or self.target.startswith(out.path + "/"):
                if out.source.endswith("dvc.lock") or posixpath.basename(out.source) == "dvc.lock":
                    raise UploadError(f"--to {self.target}: {out.path} is an output of a pipeline stage "
                                      f"({out.source}); change the stage's inputs and run `dvc repro` instead")
                if not out.is_dir:
                    raise UploadError(f"--to {self.target}: {out.path} is a single tracked file "
                                      f"({out.source}), not a directory")
                if out.imported is not None or out.files is not None or out.url_source is not None \
                        or out.unavailable is not None:
                    raise UploadError(f"--to {self.target}: {out.path} is "
                                      + ("imported from another repository" if out.imported else
                                         "imported from a URL (dvc import-url)" if out.url_source or out.unavailable
                                         else "on a cloud-versioned remote")
                                      + f" ({out.source}); dda upload cannot add to it")
                return out
            if out.path.startswith(self.target + "/"):
                raise UploadError(f"--to {self.target}: contains the tracked output {out.path} ({out.source}); "
                                  f"upload into that directory instead")
        tree = engine.tree
        for parent in [*_parents(self.target), self.target]:
            entry = tree.files.get(parent)
            if entry is not None and entry.is_symlink:
                # git and DVC refuse a path beyond a symbolic link; a checkout would write through it
                raise UploadError(f"--to {self.target}: {parent} is a symlink in git (to {entry.target!r}); "
                                  f"DVC refuses paths beyond a symbolic link")
            if entry is not None:
                raise UploadError(f"--to {self.target}: {parent} is a file in git")
        inside_git = [p for p in tree.files if p.startswith(self.target + "/")]
        if inside_git:
            raise UploadError(f"--to {self.target}: holds git-tracked files ({inside_git[0]}); "
                              f"choose a directory that git does not track")
        return None

    def _hash_all(self, files: list[tuple[Path, str]], legacy: bool) -> list[LocalFile]:
        result = []
        for source, rel in files:
            key = (legacy, source)
            if key not in self._hashes:   # hashed once per rule, whatever the number of attempts
                self._hashes[key] = hash_file(source, legacy)
            md5, size = self._hashes[key]
            result.append(LocalFile(source, rel, md5, size))
        return result

    async def _ignore_filter(self, engine: Engine, base: str, existing: list[ManifestEntry]) -> IgnoreFilter:
        """DVC's ignore rules for the files that will make up `base`: the `.dvcignore` files git
        holds in every directory above them (read now, so the filter itself never waits)."""
        paths = [posixpath.join(self.target, rel) for _, rel in self.files]
        paths += [posixpath.join(base, e.relpath) for e in existing]
        paths += [base, self.target]
        dirs = {""}
        for path in paths:
            parent = posixpath.dirname(path)
            while parent and parent not in dirs:
                dirs.add(parent)
                parent = posixpath.dirname(parent)
        texts: dict[str, str] = {}
        for d in dirs:
            entry = engine.tree.files.get(posixpath.join(d, DVCIGNORE) if d else DVCIGNORE)
            if entry is not None and entry.kind == "git":
                texts[d] = (await engine.git.read_blob(entry.oid)).decode("utf-8", errors="replace")
        return IgnoreFilter(texts.get)

    async def _upload_objects(self, remote: Remote, files: list[LocalFile], legacy: bool) -> None:
        unique = {f.md5: f for f in files}
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(f.size for f in unique.values()), unit="B", unit_scale=True,
                       unit_divisor=1024, desc="upload")
        limit = asyncio.Semaphore(self.config.jobs)

        async def one(f: LocalFile) -> None:
            path = object_path(f.md5, legacy)
            async with limit:
                try:
                    present = await remote.size(path) == f.size
                except ObjectMissing:
                    present = False
                if present:
                    self.skipped_present += 1
                else:
                    data = await asyncio.to_thread(f.source.read_bytes)
                    await remote.write(path, data)
                    self.objects_uploaded += 1
                    self.bytes_uploaded += len(data)
                if bar is not None:
                    bar.update(f.size)

        try:
            await asyncio.gather(*(one(f) for f in unique.values()))
        finally:
            if bar is not None:
                bar.close()

    def _existing_manifest(self, engine: Engine, out: DvcOut | None) -> list[ManifestEntry]:
        if out is None:
            return []
        files = [e for e in engine.tree.walk_files(out.path) if e.output == out.path]
        prefix = out.path + "/"
        return [ManifestEntry(e.path[len(prefix):], e.oid, e.size) for e in files]

    def _merge(self, existing: list[ManifestEntry], local: list[LocalFile],
               out: DvcOut | None) -> tuple[list[ManifestEntry], list[LocalFile], list[ManifestEntry]]:
        base = out.path if out else self.target
        sub = self.target[len(base):].lstrip("/")
        by_path = {e.relpath: e for e in existing}
        placed: list[LocalFile] = []
        replaced: list[ManifestEntry] = []
        clashes = []
        for f in local:
            rel = posixpath.join(sub, f.relpath) if sub else f.relpath
            old = by_path.get(rel)
            if old is not None and old.md5 != f.md5:
                if not self.replace:
                    clashes.append(rel)
                    continue
                replaced.append(old)
            elif old is not None:
                continue   # already there with the same content
            placed.append(f)
            by_path[rel] = ManifestEntry(rel, f.md5, f.size)
        if clashes:
            raise UploadError(f"{len(clashes)} file(s) already exist with other content in {base} "
                              f"(first: {clashes[0]}); pass --replace to overwrite them")
        for rel in by_path:
            for parent in _parents(rel):
                if parent in by_path:
                    raise UploadError(f"{base}/{rel}: {parent!r} is a file in the dataset, not a directory")
        return list(by_path.values()), placed, replaced

    async def _total_size(self, engine: Engine, remote: Remote, out: DvcOut | None, merged: list[ManifestEntry],
                          legacy: bool, placed: list[LocalFile], replaced: list[ManifestEntry]) -> int:
        """The output's total size, as DVC records it: from the old total where the .dvc file
        has one (asking the remote only about replaced files), else from every entry."""
        from .fetch import ObjectRef

        def refs(entries: list[ManifestEntry]) -> list[ObjectRef]:
            return [ObjectRef(e.md5, remote, object_path(e.md5, legacy), legacy, e.size, e.relpath) for e in entries]

        if out is not None and out.size is not None:
            old = await engine.fetcher.sizes_of(refs(replaced)) if replaced else {}
            return out.size - sum(old[r.md5] for r in replaced) + sum(f.size for f in placed)
        sizes = await engine.fetcher.sizes_of(refs(merged))
        return sum(sizes[e.md5] for e in merged)

    async def _git_changes(self, engine: Engine, out: DvcOut | None, manifest_md5: str, size: int, nfiles: int,
                           legacy: bool) -> tuple[dict[str, bytes], str]:
        changes: dict[str, bytes] = {}
        if out is not None:
            source = out.source
            entry = engine.tree.files.get(source)
            if entry is None:
                raise DvcFileError(f"{source}: not found in the commit")
            text = await engine.git.read_blob(entry.oid)
            changes[source] = dvcyaml.update_output(text, source, out.path, {
                "md5": f"{manifest_md5}.dir", "size": size, "nfiles": nfiles})
            return changes, source
        parent, name = posixpath.split(self.target)
        dvc_file = f"{self.target}.dvc"
        record: dict[str, object] = {"md5": f"{manifest_md5}.dir", "size": size, "nfiles": nfiles}
        if not legacy:
            record["hash"] = "md5"
        record["path"] = name
        changes[dvc_file] = dvcyaml.dump({"outs": [record]})
        ignore = posixpath.join(parent, ".gitignore") if parent else ".gitignore"
        current = b""
        if ignore in engine.tree.files:
            current = await engine.git.read_blob(engine.tree.files[ignore].oid)
        line = f"/{name}".encode()
        if line not in current.splitlines():
            changes[ignore] = current + (b"" if not current or current.endswith(b"\n") else b"\n") + line + b"\n"
        return changes, dvc_file


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _repo_is_dvc2(engine: Engine) -> bool:
    outs = engine._layout.outputs if engine._layout else []
    return bool(outs) and all(o.legacy for o in outs)


async def upload_async(config: Config, to: str, paths: list[Path], **kw: object) -> UploadResult:
    """Upload `paths` (files, or directories named by their contents) into directory `to` of
    the repository `config.repo` on branch `config.revision`; see `Uploader`."""
    check_target(to)
    files = collect_files([Path(p) for p in paths])
    if not files:
        raise UploadError("nothing to upload (no files given)")
    return await Uploader(config, to, files, **kw).run()  # type: ignore[arg-type]


def upload(repo: str, paths: list[str | Path], to: str, *, revision: str | None = None, message: str | None = None,
           replace: bool = False, author: tuple[str, str] | None = None, retry_for: float = DEFAULT_RETRY_FOR,
           **settings: object) -> UploadResult:
    """Python API: `sidecar.upload("https://host/o/r.git", ["a.png"], to="data/images", revision="main")`.
    `retry_for`: seconds to keep retrying while concurrent writers move the branch first."""
    from .config import load_config

    flags = {"repo": repo, "revision": revision, **settings}
    config = load_config(flags)
    if not isinstance(paths, (list, tuple)):
        raise ConfigError("paths must be a list of files or directories")
    return asyncio.run(upload_async(config, to, [Path(p) for p in paths], message=message, replace=replace,
                                    author=author, retry_for=retry_for))
