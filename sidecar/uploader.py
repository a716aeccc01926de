"""Append files to a DVC-tracked directory without pulling it.

Only the new objects travel: hash the files, upload what the remote lacks, merge the new
entries into the existing `.dir` manifest (fetched, never the dataset), upload the manifest,
rewrite the `.dvc` file and commit + push it. Objects go up before the commit, so an
interrupted upload leaves the branch as it was, and a rerun skips what is already there.
If the branch moves meanwhile, we re-read its tip and merge again: nobody's files are lost.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import Config
from .engine import Engine
from .errors import ConfigError, DDAError, DvcFileError, ObjectMissing
from .remotes import Remote, object_path
from .snapshot.dvcfiles import DvcOut, ManifestEntry
from .snapshot.git import GitWriter
from .store.verify import Dos2UnixMd5

_TEXT_CHARS = bytes(range(32, 127)) + b"\n\r\t\f\b"
MAX_PUSH_ATTEMPTS = 5


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


def collect_files(paths: list[Path]) -> list[tuple[Path, str]]:
    """(source, relpath) for files and, recursively, directories (named by their contents)."""
    found: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    full = Path(dirpath) / name
                    found.append((full, full.relative_to(path).as_posix()))
        elif path.is_file():
            found.append((path, path.name))
        else:
            raise UploadError(f"{path}: no such file or directory")
    seen: dict[str, Path] = {}
    for source, rel in found:
        if rel in seen:
            raise UploadError(f"{source} and {seen[rel]} would both be uploaded as {rel!r}")
        seen[rel] = source
    return found


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
                 replace: bool = False, author: tuple[str, str] | None = None, progress: bool = False):
        if not target or target.startswith("/") or ".." in target.split("/"):
            raise UploadError(f"--to {target!r}: give a directory path inside the repository")
        self.config = config
        self.target = posixpath.normpath(target)
        self.files = files
        self.message = message
        self.replace = replace
        self.author = author or ("dda upload", "dda@localhost")
        self.progress = progress
        self.bytes_uploaded = 0
        self.objects_uploaded = 0
        self.skipped_present = 0

    async def run(self) -> UploadResult:
        from .snapshot.git import GitSource

        source = GitSource(self.config.repo or "", self.config.cache_dir, user=self.config.git_user,
                           token=self.config.git_token, ca_bundle=self.config.ca_bundle)
        writer = GitWriter(source)
        hashed: dict[bool, list[LocalFile]] = {}
        uploaded: set[str] = set()
        branch = self.config.revision
        try:
            for attempt in range(1, MAX_PUSH_ATTEMPTS + 1):
                branch, tip = await writer.branch_tip(branch)
                engine = await Engine.open(Config(**{**self.config.__dict__, "revision": tip}))
                try:
                    result = await self._attempt(engine, writer, branch, tip, hashed, uploaded, attempt)
                finally:
                    await engine.aclose()
                if result is not None:
                    return result
            raise UploadError(f"branch {branch!r} kept moving; gave up after {MAX_PUSH_ATTEMPTS} attempts "
                              f"(the objects are on the remote: rerun to try again)")
        finally:
            await source.aclose()

    async def _attempt(self, engine: Engine, writer: GitWriter, branch: str, tip: str,
                       hashed: dict[bool, list[LocalFile]], uploaded: set[str], attempt: int) -> UploadResult | None:
        out = self._find_output(engine)
        legacy = out.legacy if out else _repo_is_dvc2(engine)
        if legacy not in hashed:
            hashed[legacy] = await asyncio.to_thread(self._hash_all, legacy)
        local = hashed[legacy]
        from .snapshot.build import root_of

        assert engine._layout is not None
        root = out.root if out else root_of(self.target + "/x", set(engine._layout.configs))
        remote = engine.remote(out.remote if out else None, f"--to {self.target}", root)
        await self._upload_objects(remote, [f for f in local if f.md5 not in uploaded], legacy)
        uploaded.update(f.md5 for f in local)
        existing = self._existing_manifest(engine, out)
        merged, placed, replaced_old = self._merge(existing, local, out)
        added = len(placed) - len(replaced_old)
        if not placed:   # every file is already there, same content: nothing to commit
            return UploadResult(tip, branch, out.source if out else f"{self.target}.dvc", 0, 0,
                                self.objects_uploaded, self.bytes_uploaded, out.md5 if out else "", attempt,
                                self.skipped_present, ["nothing to do: every file is already in the dataset"])
        data = manifest_bytes(merged)
        manifest_md5 = hashlib.md5(data).hexdigest()
        await remote.write(object_path(manifest_md5, legacy, is_dir=True), data)
        self.bytes_uploaded += len(data)
        engine.store.index.record_sizes({f.md5: f.size for f in local})
        size = await self._total_size(engine, remote, out, merged, legacy, placed, replaced_old)
        changes, dvc_file = await self._git_changes(engine, out, manifest_md5, size, len(merged), legacy)
        message = self.message or f"dda upload: add {added} file(s) to {self.target}" + (
            f", replace {len(replaced_old)}" if replaced_old else "")
        commit = await writer.commit(tip, changes, message, self.author)
        if not await writer.push(commit, branch, tip):
            return None   # the branch moved: merge again on its new tip
        return UploadResult(commit, branch, dvc_file, added, len(replaced_old), self.objects_uploaded,
                            self.bytes_uploaded, manifest_md5, attempt, self.skipped_present)

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
                if out.imported is not None or out.files is not None:
                    raise UploadError(f"--to {self.target}: {out.path} is "
                                      + ("imported from another repository" if out.imported else
                                         "on a cloud-versioned remote") + f" ({out.source}); dda upload cannot add to it")
                return out
            if out.path.startswith(self.target + "/"):
                raise UploadError(f"--to {self.target}: contains the tracked output {out.path} ({out.source}); "
                                  f"upload into that directory instead")
        tree = engine.tree
        if self.target in tree.files:
            raise UploadError(f"--to {self.target}: is a file in git")
        inside_git = [p for p in tree.files if p.startswith(self.target + "/")]
        if inside_git:
            raise UploadError(f"--to {self.target}: holds git-tracked files ({inside_git[0]}); "
                              f"choose a directory that git does not track")
        return None

    def _hash_all(self, legacy: bool) -> list[LocalFile]:
        result = []
        for source, rel in self.files:
            md5, size = hash_file(source, legacy)
            result.append(LocalFile(source, rel, md5, size))
        return result

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
            data = yaml.safe_load(await engine.git.read_blob(entry.oid))
            from .snapshot.paths import join_inside

            base = posixpath.dirname(source)
            if data.get("wdir") not in (None, "", "."):   # the snapshot checked it already
                base = join_inside(base, data["wdir"], source, "wdir", out.root)
            for raw in data.get("outs", []):
                if isinstance(raw.get("path"), str) and join_inside(base, raw["path"], source, "path") == out.path:
                    raw["md5"] = f"{manifest_md5}.dir"
                    raw["size"] = size
                    raw["nfiles"] = nfiles
            changes[source] = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()
            return changes, source
        parent, name = posixpath.split(self.target)
        dvc_file = f"{self.target}.dvc"
        record: dict[str, object] = {"md5": f"{manifest_md5}.dir", "size": size, "nfiles": nfiles}
        if not legacy:
            record["hash"] = "md5"
        record["path"] = name
        changes[dvc_file] = yaml.safe_dump({"outs": [record]}, sort_keys=False, allow_unicode=True).encode()
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
    files = collect_files([Path(p) for p in paths])
    if not files:
        raise UploadError("nothing to upload (no files given)")
    return await Uploader(config, to, files, **kw).run()  # type: ignore[arg-type]


def upload(repo: str, paths: list[str | Path], to: str, *, revision: str | None = None, message: str | None = None,
           replace: bool = False, author: tuple[str, str] | None = None, **settings: object) -> UploadResult:
    """Python API: `sidecar.upload("https://host/o/r.git", ["a.png"], to="data/images", revision="main")`."""
    from .config import load_config

    flags = {"repo": repo, "revision": revision, **settings}
    config = load_config(flags)
    if not isinstance(paths, (list, tuple)):
        raise ConfigError("paths must be a list of files or directories")
    return asyncio.run(upload_async(config, to, [Path(p) for p in paths], message=message, replace=replace,
                                    author=author))
