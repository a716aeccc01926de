"""Build the Tree of one commit: git entries, then every DVC output laid over them.

Every repository path is checked here, once (see paths.py); a bad output becomes a
`Problem` shown at its path instead of failing the whole revision.
"""
from __future__ import annotations

import asyncio
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping, Sequence

import yaml

from ..errors import DvcFileError
from .dvcfiles import (DvcConfig, DvcOut, ManifestEntry, StageDecl, guess_output_paths, parse_dvc_config,
                       parse_dvc_file, parse_dvc_lock, parse_dvc_yaml)
from .git import GitEntry
from .lfs import POINTER_MAX, LfsPointer, is_lfs_path, lfs_patterns, lfs_url_from_config, parse_pointer
from .paths import check_name
from .tree import EXEC_MODE, FILE_MODE, LINK_MODE, ManifestClash, Problem, Tree, TreeBuilder
from .templating import files_needed

@dataclass(frozen=True)
class DvcLayout:
    """What the commit's DVC files declare, before any remote is asked."""
    configs: dict[str, DvcConfig]     # DVC (sub)repository folder ("" = top) -> its .dvc/config
    outputs: list[DvcOut]
    problems: list[Problem] = field(default_factory=list)
    symlinks: dict[str, str] = field(default_factory=dict)   # git symlink path -> target
    lfs: dict[str, LfsPointer] = field(default_factory=dict)  # git path -> its LFS pointer
    lfs_url: str | None = None                                # `lfs.url` of a committed .lfsconfig

    @property
    def config(self) -> DvcConfig:
        return self.configs.get("", DvcConfig(None, {}))


def dvc_roots(paths: list[str]) -> set[str]:
    """Folders holding a `.dvc/` directory: the top repository ("" always) and every
    subrepository made by `dvc init --subdir`."""
    roots = {""}
    for path in paths:
        head, sep, _ = path.partition("/.dvc/") if not path.startswith(".dvc/") else ("", "/", "")
        if sep and head:
            roots.add(head)
    return roots


def root_of(path: str, roots: set[str]) -> str:
    """The innermost DVC repository folder containing `path`."""
    parent = posixpath.dirname(path)
    while parent:
        if parent in roots:
            return parent
        parent = posixpath.dirname(parent)
    return ""


def _in_dvc_dir(path: str, roots: set[str]) -> bool:
    return any(path.startswith((f"{r}/.dvc/" if r else ".dvc/")) for r in roots)


async def read_dvc_layout(entries: list[GitEntry], read_blob: Callable[[str], Awaitable[bytes]]) -> DvcLayout:
    """Parse every .dvc/config, *.dvc, dvc.yaml and dvc.lock of the commit (blobs that come
    with a blob-limited fetch). Raises DvcFileError only for a malformed .dvc/config."""
    blobs_by_path = {e.path: e for e in entries if e.kind == "blob"}
    roots = dvc_roots(list(blobs_by_path))
    configs: dict[str, DvcConfig] = {}
    for root in sorted(roots):
        name = f"{root}/.dvc/config" if root else ".dvc/config"
        configs[root] = (parse_dvc_config(await read_blob(blobs_by_path[name].sha), name)
                         if name in blobs_by_path else DvcConfig(None, {}))
    wanted = [e for e in blobs_by_path.values() if not stat.S_ISLNK(e.mode) and not _in_dvc_dir(e.path, roots)
              and (e.path.endswith(".dvc") or posixpath.basename(e.path) in ("dvc.lock", "dvc.yaml"))]
    links = [e for e in blobs_by_path.values() if stat.S_ISLNK(e.mode)]
    lfs_meta = [e for e in blobs_by_path.values() if posixpath.basename(e.path) == ".gitattributes"
                or e.path == ".lfsconfig"]
    texts = await asyncio.gather(*(read_blob(e.sha) for e in wanted + links + lfs_meta))
    by_path = {e.path: t for e, t in zip(wanted, texts)}
    symlinks = {e.path: t.decode("utf-8", "surrogateescape") for e, t in zip(links, texts[len(wanted):])}
    meta = {e.path: t for e, t in zip(lfs_meta, texts[len(wanted) + len(links):])}
    lfs, lfs_url = await _lfs_pointers(blobs_by_path, meta, read_blob)
    params = await _params_files(by_path, blobs_by_path, read_blob)
    outputs: list[DvcOut] = []
    problems: list[Problem] = []
    for path in sorted(by_path):
        root = root_of(path, roots)
        base = posixpath.basename(path)
        try:
            if base == "dvc.yaml":
                continue
            if base == "dvc.lock":
                stages: dict[str, StageDecl] = {}
                yaml_path = posixpath.join(posixpath.dirname(path), "dvc.yaml")
                if yaml_path in by_path:
                    stages = parse_dvc_yaml(by_path[yaml_path], yaml_path, root, params.get)
                outputs.extend(parse_dvc_lock(by_path[path], path, stages, root))
            else:
                outputs.extend(parse_dvc_file(by_path[path], path, root))
        except DvcFileError as err:
            guessed = guess_output_paths(by_path[path], path, root) if base.endswith(".dvc") else []
            problems.extend(Problem(p, path, str(err)) for p in guessed)
            if not guessed:
                problems.append(Problem(None, path, str(err)))
    seen: dict[str, str] = {}
    kept: list[DvcOut] = []
    for out in outputs:
        if out.path in seen and seen[out.path] != out.source:
            problems.append(Problem(out.path, out.source,
                                    f"{out.source}: output {out.path!r} is also declared by {seen[out.path]}",
                                    out.is_dir))
            continue
        seen[out.path] = out.source
        kept.append(out)
    return DvcLayout(configs, kept, problems, symlinks, lfs, lfs_url)


async def _params_files(texts: dict[str, bytes], blobs: dict[str, GitEntry],
                        read_blob: Callable[[str], Awaitable[bytes]]) -> dict[str, bytes]:
    """The params files (`params.yaml`, `vars` files) the commit's dvc.yaml files template from."""
    wanted: set[str] = set()
    for path, text in texts.items():
        if posixpath.basename(path) == "dvc.yaml":
            try:
                wanted |= files_needed(yaml.safe_load(text.decode("utf-8")), path)
            except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
                continue   # reported when the stages are parsed
    found = [blobs[p] for p in sorted(wanted) if p in blobs and not stat.S_ISLNK(blobs[p].mode)]
    got = await asyncio.gather(*(read_blob(e.sha) for e in found))
    return {e.path: t for e, t in zip(found, got)}


async def _lfs_pointers(blobs: dict[str, GitEntry], meta: dict[str, bytes],
                        read_blob: Callable[[str], Awaitable[bytes]]) -> tuple[dict[str, LfsPointer], str | None]:
    """Blobs `.gitattributes` sends through `filter=lfs` that hold an LFS pointer."""
    rules = lfs_patterns({p: t for p, t in meta.items() if posixpath.basename(p) == ".gitattributes"})
    if not any(is_lfs for _, _, is_lfs in rules):
        return {}, None
    candidates = [e for e in blobs.values() if not stat.S_ISLNK(e.mode) and e.size is not None
                  and e.size <= POINTER_MAX and is_lfs_path(e.path, rules)]
    texts = await asyncio.gather(*(read_blob(e.sha) for e in candidates))
    found = {e.path: ptr for e, t in zip(candidates, texts) if (ptr := parse_pointer(t)) is not None}
    url = lfs_url_from_config(meta[".lfsconfig"]) if ".lfsconfig" in meta else None
    return found, url


def compose_tree(git_entries: list[GitEntry], outputs: list[DvcOut],
                 manifests: Mapping[str, Sequence[ManifestEntry]], problems: list[Problem] = (),  # type: ignore[assignment]
                 symlinks: dict[str, str] | None = None, lfs: dict[str, LfsPointer] | None = None) -> Tree:
    """The checkout `git clone` + `dvc pull` makes. `manifests`: md5 of each directory
    output -> its entries (a directory output whose md5 is absent must have a problem).

    Linear in files (issue 11): entries go straight into the compact TreeBuilder, folder by
    folder (no Entry and no path string kept per file); an output clears only what lies
    under its own path."""
    builder = TreeBuilder()
    problems = list(problems)
    symlinks = symlinks or {}
    for e in git_entries:
        why = check_name(e.path)
        if why:
            problems.append(Problem(None, "git tree", f"git tree: path {e.path!r} {why}; a checkout skips it"))
            continue
        if e.kind == "commit":
            builder.add_dir(e.path)   # a submodule: the empty folder a clone without --recursive has
            continue
        if e.kind != "blob":
            continue
        if stat.S_ISLNK(e.mode):
            # git records 120000; a checkout's symlink is lrwxrwxrwx (Linux ignores a link's bits)
            builder.add(e.path, "git", LINK_MODE, e.size, e.sha, target=symlinks.get(e.path))
        elif lfs and e.path in lfs:   # what a clone with git-lfs checks out: the object, not the pointer
            pointer = lfs[e.path]
            builder.add(e.path, "lfs", EXEC_MODE if e.mode & 0o111 else FILE_MODE, pointer.size, pointer.oid)
        else:
            builder.add(e.path, "git", EXEC_MODE if e.mode & 0o111 else FILE_MODE, e.size, e.sha)
    broken = {p.path for p in problems if p.path}
    for out in outputs:
        if out.path in broken:
            continue
        blocker = builder.file_above(out.path)
        if blocker:
            problems.append(Problem(None, out.source, f"{out.source}: output {out.path!r} lies under {blocker!r}, "
                                                      f"which is a file; dvc checkout cannot place it"))
            continue
        # A DVC output replaces whatever git has there (it is .gitignored in a real checkout).
        builder.clear(out.path)
        if not out.is_dir:
            remote, version = _pick_version(out.remote, out.versions)
            builder.add(out.path, "dvc", EXEC_MODE if out.isexec else FILE_MODE, out.size, out.md5,
                        out.legacy, remote, out.path, out.root, version=version)
            continue
        items = out.files if out.files is not None else manifests.get(out.md5)
        if items is None:
            continue   # the caller recorded why (a problem at out.path)
        try:
            builder.add_manifest(out.path, items, "dvc", out.legacy, out.remote, out.path, out.root, _pick_version)
        except ManifestClash as clash:
            problems.append(Problem(out.path, out.source, f"{out.source}: manifest {out.md5}.dir: {clash}", True))
            continue
        if not items:
            builder.add_dir(out.path)
    for problem in problems:
        if problem.path is None or builder.file_above(problem.path):
            continue
        builder.clear(problem.path)
        if problem.is_dir:
            builder.add_dir(problem.path)
        else:
            builder.add(problem.path, "broken", FILE_MODE, 0, "", output=problem.path)
    return builder.build(problems)


def _pick_version(remote: str | None, versions: tuple[tuple[str, str], ...]) -> tuple[str | None, str | None]:
    """(remote, version id) of an object on a cloud-versioned remote: the output's own
    remote when the file records a version there, else the one remote it records."""
    if not versions:
        return remote, None
    by_name = dict(versions)
    if remote in by_name:
        return remote, by_name[remote]
    name, version = versions[0]
    return name, version
