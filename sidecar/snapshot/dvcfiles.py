"""Parse what DVC keeps in git: *.dvc files, dvc.lock, .dvc/config, and .dir manifests.

Pure functions over bytes; every error names the file and the field.
"""
from __future__ import annotations

import configparser
import posixpath
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import yaml

from ..errors import DvcFileError
from .paths import join_inside
from .templating import resolve_stages

if TYPE_CHECKING:
    from .manifest import Manifest

_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class DvcOut:
    path: str               # repository-relative, posix, contained (see paths.py)
    md5: str                # 32 hex digits, without ".dir"
    is_dir: bool
    size: int | None
    nfiles: int | None
    legacy: bool            # DVC 2 hash ("md5-dos2unix" rules, legacy remote layout)
    remote: str | None      # per-output remote
    source: str             # the file that declared it
    isexec: bool = False    # `isexec: true`: checked out executable
    root: str = ""          # folder of the DVC (sub)repository whose .dvc/config governs it
    imported: "ImportSource | None" = None   # `dvc import`: where `dvc pull` gets the data
    # Cloud-versioned remotes: remote name -> version id of this (file) output, and a
    # directory output's files (it has no .dir manifest then; md5 is "").
    versions: tuple[tuple[str, str], ...] = ()
    files: "tuple[ManifestEntry, ...] | None" = None
    url_source: "UrlSource | None" = None      # `dvc import-url`: the recorded source
    unavailable: str | None = None             # why it cannot be shown (reported at its path)


@dataclass(frozen=True)
class UrlSource:
    """`deps[0]` of a `dvc import-url` output: where the data came from, and what was
    recorded about it then (an md5 for local sources; an etag or `checksum` for http and s3)."""
    url: str                  # as recorded: a URL, or a path relative to the .dvc file's folder
    base: str                 # the .dvc file's folder (or its wdir), repository path
    md5: str | None           # without ".dir"
    etag: str | None
    size: int | None
    version_id: str | None    # a version-aware S3 source
    legacy: bool = False      # the dep's md5 is DVC 2's (no `hash: md5`)


@dataclass(frozen=True)
class ImportSource:
    """`deps: - path: P, repo: {url: U, rev_lock: R}` of a `dvc import`ed output."""
    url: str
    rev_lock: str
    path: str    # the path in the source repository (contained)


@dataclass(frozen=True)
class ManifestEntry:
    relpath: str
    md5: str
    size: int | None
    isexec: bool = False
    versions: tuple[tuple[str, str], ...] = ()   # cloud-versioned: remote name -> version id


@dataclass(frozen=True)
class OutFlags:
    """What dvc.yaml says about one output (dvc.lock does not repeat it)."""
    cache: bool = True
    remote: str | None = None
    push: bool = True      # `push: false`: `dvc push` never uploads it (pulled only if there)


@dataclass(frozen=True)
class StageDecl:
    """One stage of a dvc.yaml: its working directory (repository path) and its outputs'
    flags keyed by their repository path."""
    wdir: str
    outs: dict[str, OutFlags]


MAX_SIZE = 2**63 - 1    # what a file system (st_size) and the tree's size array can hold


def _is_size(value: object) -> bool:
    """A size a .dvc file or manifest may state: an int (not a bool) in [0, 2**63)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SIZE


def _parse_out(raw: object, base_dir: str, source: str, where: str, root: str = "",
               flags: OutFlags | None = None) -> DvcOut | None:
    if not isinstance(raw, dict):
        raise DvcFileError(f"{where}: expected a mapping, got {type(raw).__name__}")
    path = join_inside(base_dir, raw.get("path"), where, "path", root)
    if path == root:
        raise DvcFileError(f"{where}: path {raw.get('path')!r} is the repository itself, not an output in it")
    cache = raw.get("cache", True)
    if not isinstance(cache, bool):
        raise DvcFileError(f"{where}: 'cache' must be true or false, got {cache!r}")
    if cache is False or (flags is not None and not flags.cache):
        return None  # lives in git; the git tree already has it
    md5 = raw.get("md5")
    if md5 is None and isinstance(raw.get("etag"), str):
        raise DvcFileError(f"{where}: external outputs (etag only) are not supported")
    if md5 is None and raw.get("files") is not None:
        files = _versioned_files(raw.get("files"), where)
        remote = raw.get("remote") if isinstance(raw.get("remote"), str) else (flags.remote if flags else None)
        return DvcOut(path=path, md5="", is_dir=True, size=raw.get("size") if _is_size(raw.get("size")) else None,
                      nfiles=len(files), legacy=False, remote=remote, source=source, root=root, files=files)
    if md5 is None:
        # An output that was declared but never computed (e.g. `dvc stage add` without repro).
        return None
    if not isinstance(md5, str):
        raise DvcFileError(f"{where}: 'md5' {md5!r} is not an md5 hash")
    is_dir = md5.endswith(".dir")
    digest = md5[:-4] if is_dir else md5
    if not _MD5.match(digest):
        raise DvcFileError(f"{where}: 'md5' {md5!r} is not an md5 hash")
    size = raw.get("size")
    if size is not None and not _is_size(size):
        raise DvcFileError(f"{where}: 'size' must be a non-negative integer below 2**63, got {str(size)[:40]}")
    nfiles = raw.get("nfiles")
    if nfiles is not None and (not isinstance(nfiles, int) or isinstance(nfiles, bool) or nfiles < 0):
        raise DvcFileError(f"{where}: 'nfiles' must be a non-negative integer, got {nfiles!r}")
    hash_name = raw.get("hash")
    if hash_name not in (None, "md5"):
        raise DvcFileError(f"{where}: unsupported hash {hash_name!r} (expected md5)")
    remote = raw.get("remote")
    if remote is None and flags is not None:
        remote = flags.remote
    if remote is not None and not isinstance(remote, str):
        raise DvcFileError(f"{where}: 'remote' must be a remote name")
    isexec = raw.get("isexec", False)
    if not isinstance(isexec, bool):
        raise DvcFileError(f"{where}: 'isexec' must be true or false, got {isexec!r}")
    return DvcOut(path=path, md5=digest, is_dir=is_dir, size=size, nfiles=nfiles, legacy=hash_name is None,
                  remote=remote, source=source, isexec=isexec and not is_dir, root=root,
                  versions=_cloud_versions(raw.get("cloud"), where))


def _cloud_versions(cloud: object, where: str) -> tuple[tuple[str, str], ...]:
    """`cloud: {remote: {etag, version_id}}` -> ((remote, version_id), ...)."""
    if cloud is None:
        return ()
    if not isinstance(cloud, dict):
        raise DvcFileError(f"{where}: 'cloud' must map remote names to {{etag, version_id}}")
    found = []
    for name, info in cloud.items():
        version = info.get("version_id") if isinstance(info, dict) else None
        if not isinstance(name, str) or not isinstance(version, str) or not version:
            raise DvcFileError(f"{where}: cloud.{name}: needs a 'version_id'")
        found.append((name, version))
    return tuple(sorted(found))


def _versioned_files(files: object, where: str) -> tuple[ManifestEntry, ...]:
    """The `files:` list DVC writes for a directory on a cloud-versioned remote."""
    if not isinstance(files, list):
        raise DvcFileError(f"{where}: 'files' must be a list")
    found = []
    for i, item in enumerate(files):
        at = f"{where}: files[{i}]"
        if not isinstance(item, dict):
            raise DvcFileError(f"{at}: expected a mapping")
        md5 = item.get("md5")
        if not isinstance(md5, str) or not _MD5.match(md5):
            raise DvcFileError(f"{at}: 'md5' {md5!r} is not an md5 hash")
        rel = join_inside("", item.get("relpath"), at, "relpath")
        if not rel:
            raise DvcFileError(f"{at}: relpath {item.get('relpath')!r} names the directory itself")
        size = item.get("size")
        if size is not None and not _is_size(size):
            raise DvcFileError(f"{at}: 'size' must be a non-negative integer below 2**63")
        found.append(ManifestEntry(rel, md5, size, item.get("isexec") is True, _cloud_versions(item.get("cloud"), at)))
    return tuple(found)


def _load_yaml(text: bytes, source: str) -> object:
    try:
        return yaml.safe_load(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise DvcFileError(f"{source}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise DvcFileError(f"{source}: not valid YAML{at}") from None
    except RecursionError:
        raise DvcFileError(f"{source}: nested too deeply") from None


def parse_dvc_file(text: bytes, source: str, root: str = "") -> list[DvcOut]:
    """Outputs of one `*.dvc` file at repository path `source`, inside the DVC repository
    at folder `root`. Paths are relative to the file's folder, or to its `wdir`."""
    data = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise DvcFileError(f"{source}: expected a mapping with 'outs'")
    outs = data.get("outs")
    if not isinstance(outs, list) or not outs:
        raise DvcFileError(f"{source}: 'outs' must be a non-empty list")
    base = posixpath.dirname(source)
    # A `wdir` moves where paths are resolved from (DVC 1 style files still carry it).
    wdir = data.get("wdir")
    if wdir is not None and wdir not in ("", "."):
        base = join_inside(base, wdir, source, "wdir", root)
    url_source = _url_source(data, base, source)
    if url_source is not None:
        return [_url_import(outs[0], url_source, base, source, root)]
    parsed = [_parse_out(raw, base, source, f"{source}: outs[{i}]", root) for i, raw in enumerate(outs)]
    imported = _import_source(data.get("deps"), source)
    if imported is not None and len(outs) == 1 and parsed[0] is None and isinstance(outs[0], dict) \
            and outs[0].get("md5") is None and outs[0].get("cache", True) is not False:
        # `dvc import --no-download`: no md5 yet; the source repository's output says what it is.
        path = join_inside(base, outs[0].get("path"), f"{source}: outs[0]", "path", root)
        return [DvcOut(path=path, md5="", is_dir=False, size=None, nfiles=None, legacy=False, remote=None,
                       source=source, root=root, imported=imported)]
    return [replace(o, imported=imported) if imported else o for o in parsed if o is not None]


def _url_source(data: dict, base: str, source: str) -> UrlSource | None:
    """The source of a `dvc import-url` file, as DVC tells one (`Stage.is_import`: no `cmd`,
    one dep, one out; a dep with `repo` or `db` is another kind of import)."""
    deps, outs = data.get("deps"), data.get("outs")
    if data.get("cmd") or not isinstance(deps, list) or len(deps) != 1 or len(outs) != 1:
        return None
    dep = deps[0]
    if not isinstance(dep, dict) or "repo" in dep or "db" in dep:
        return None
    where = f"{source}: deps[0]"
    url = dep.get("path")
    if not isinstance(url, str) or not url:
        raise DvcFileError(f"{where}: 'path' must name the imported URL or file")
    md5 = dep.get("md5") if isinstance(dep.get("md5"), str) else None
    etag = dep.get("etag") if isinstance(dep.get("etag"), str) else None
    size = dep.get("size") if _is_size(dep.get("size")) else None
    version = dep.get("version_id") if isinstance(dep.get("version_id"), str) else None
    return UrlSource(url, base, md5, etag, size, version, dep.get("hash") is None)


def _url_import(raw: object, src: UrlSource, base: str, source: str, root: str) -> DvcOut:
    """The output of an import-url file. With `--no-download` it records no md5: DVC 3's
    `dvc pull` then reads the source and takes the dep's hash; we can verify that only when it
    is an md5 of a file (a local source). Anything else is reported unavailable."""
    where = f"{source}: outs[0]"
    out = _parse_out(raw, base, source, where, root)
    if out is None and isinstance(raw, dict) and raw.get("cache") is not False and raw.get("md5") is None:
        path = join_inside(base, raw.get("path"), where, "path", root)
        dep_md5 = src.md5 or ""
        is_dir = dep_md5.endswith(".dir")
        partial = DvcOut(path=path, md5="", is_dir=is_dir, size=src.size, nfiles=None, legacy=False,
                         remote=None, source=source, root=root)
        if is_dir:
            why = "a directory imported with --no-download: its files are on no remote, and its source " \
                  "lists no md5 per file to verify them against (dvc pull 3.67 checks out no file of it)"
        elif not _MD5.match(dep_md5):
            why = f"imported with --no-download from {_display(src.url)}, which records no md5 to verify it against"
        else:
            return replace(partial, md5=dep_md5, legacy=src.legacy, url_source=src)
        return replace(partial, unavailable=f"{source}: {why}")
    if out is None:
        raise DvcFileError(f"{where}: an import-url output must be cached")
    return replace(out, url_source=src)


def _display(url: str) -> str:
    from ..redact import strip_userinfo
    return strip_userinfo(url)[0]


def _import_source(deps: object, source: str) -> ImportSource | None:
    """The source of a `dvc import` (a dep with a `repo` mapping), else None."""
    if not isinstance(deps, list):
        return None
    for i, dep in enumerate(deps):
        if not isinstance(dep, dict) or "repo" not in dep:
            continue
        where = f"{source}: deps[{i}]"
        repo = dep.get("repo")
        if not isinstance(repo, dict) or not isinstance(repo.get("url"), str) or not repo["url"]:
            raise DvcFileError(f"{where}: 'repo' must be a mapping with a 'url'")
        rev = repo.get("rev_lock") or repo.get("rev")
        if rev is not None and not isinstance(rev, str):
            raise DvcFileError(f"{where}: 'rev_lock' must be a commit")
        path = join_inside("", dep.get("path"), where, "path")
        return ImportSource(repo["url"], rev or "", path)
    return None


def guess_output_paths(text: bytes, source: str, root: str = "") -> list[str]:
    """Where a malformed .dvc file's outputs would be (to show them there as unavailable):
    each readable, contained `outs[].path`, else the file's own name without `.dvc`."""
    found: list[str] = []
    try:
        data = yaml.safe_load(text.decode("utf-8"))
        base = posixpath.dirname(source)
        if isinstance(data, dict):
            wdir = data.get("wdir")
            if wdir not in (None, "", "."):
                base = join_inside(base, wdir, source, "wdir", root)
            for raw in data.get("outs") or []:
                try:
                    path = join_inside(base, raw.get("path"), source, "path", root)
                except (DvcFileError, AttributeError):
                    continue
                if path != root:
                    found.append(path)
    except Exception:   # noqa: BLE001 - best effort on a file already known to be broken
        pass
    if found:
        return found
    fallback = source[:-4] if source.endswith(".dvc") else ""
    return [fallback] if fallback and posixpath.basename(fallback) else []


def _stage_outs(stage: dict, wdir: str, where: str, root: str) -> dict[str, OutFlags]:
    flags: dict[str, OutFlags] = {}
    for section in ("outs", "metrics", "plots"):
        items = stage.get(section) or []
        if not isinstance(items, list):
            raise DvcFileError(f"{where}: {section!r} must be a list")
        for i, item in enumerate(items):
            if isinstance(item, str):
                raw, opts = item, {}
            elif isinstance(item, dict) and len(item) == 1:
                raw, opts = next(iter(item.items()))
                opts = opts or {}
                if not isinstance(opts, dict):
                    raise DvcFileError(f"{where}: {section}[{i}]: options must be a mapping")
            else:
                raise DvcFileError(f"{where}: {section}[{i}]: expected a path or {{path: options}}")
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                raw = str(raw)   # `- ${item}` with a number: DVC takes it as a path
            if not isinstance(raw, str):
                raise DvcFileError(f"{where}: {section}[{i}]: path must be a string, got {raw!r}")
            cache = opts.get("cache", True)
            if not isinstance(cache, bool):
                raise DvcFileError(f"{where}: {section}[{i}]: 'cache' must be true or false")
            remote = opts.get("remote")
            if remote is not None and not isinstance(remote, str):
                raise DvcFileError(f"{where}: {section}[{i}]: 'remote' must be a remote name")
            push = opts.get("push", True)
            if not isinstance(push, bool):
                raise DvcFileError(f"{where}: {section}[{i}]: 'push' must be true or false")
            path = join_inside(wdir, raw, f"{where}: {section}[{i}]", "path", root)
            flags[path] = OutFlags(cache=cache, remote=remote, push=push)
    return flags


def parse_dvc_yaml(text: bytes, source: str, root: str = "",
                   read: "Callable[[str], bytes | None] | None" = None) -> dict[str, StageDecl]:
    """Stages of a dvc.yaml: working directory and output flags, keyed by the stage names
    dvc.lock uses (`foreach`/`matrix` items as `name@key`), rendered as DVC's parser renders
    them (`vars`, params.yaml, `${...}`; see templating.py). `read(path)`: the bytes of a
    repository file (params files), None when absent."""
    data = _load_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DvcFileError(f"{source}: expected a mapping")
    try:
        stages = resolve_stages(data, source, read or (lambda _p: None), root)
    except RecursionError:
        raise DvcFileError(f"{source}: nested too deeply") from None
    return {name: StageDecl(wdir, _stage_outs(body, wdir, f"{source}: stage {name!r}", root))
            for name, (wdir, body) in stages.items()}


def parse_dvc_lock(text: bytes, source: str, stages: dict[str, StageDecl] | None = None,
                   root: str = "") -> list[DvcOut]:
    """Outputs recorded in a dvc.lock. `stages`: the sibling dvc.yaml's declarations (each
    stage's `wdir`, which lock paths are relative to, and `cache: false` flags)."""
    data = _load_yaml(text, source)
    if data is None:
        return []
    if not isinstance(data, dict):
        raise DvcFileError(f"{source}: expected a mapping")
    base = posixpath.dirname(source)
    locked = data.get("stages") if "schema" in data else data  # lock schema 1 had stages at the top
    if locked is None:
        return []
    if not isinstance(locked, dict):
        raise DvcFileError(f"{source}: 'stages' must be a mapping")
    found: list[DvcOut] = []
    for name, stage in locked.items():
        if not isinstance(stage, dict):
            raise DvcFileError(f"{source}: stage {name!r}: expected a mapping")
        decl = (stages or {}).get(str(name)) or (stages or {}).get(str(name).split("@", 1)[0])
        wdir = decl.wdir if decl else base
        outs = stage.get("outs") or []
        if not isinstance(outs, list):
            raise DvcFileError(f"{source}: stage {name!r}: 'outs' must be a list")
        for i, raw in enumerate(outs):
            where = f"{source}: stage {name!r} outs[{i}]"
            flags = None
            if decl and isinstance(raw, dict) and isinstance(raw.get("path"), str):
                flags = decl.outs.get(join_inside(wdir, raw["path"], where, "path", root))
            out = _parse_out(raw, wdir, source, where, root, flags)
            if out is not None:
                found.append(out)
    return found


def parse_manifest(text: bytes, source: str) -> "Manifest":
    """A `.dir` object: a JSON list of {md5, relpath[, size]}, parsed incrementally into a
    compact `Manifest` (a sequence of ManifestEntry); see manifest.py."""
    from .manifest import parse_manifest as parse

    return parse(text, source)


@dataclass(frozen=True)
class RemoteSpec:
    name: str
    settings: dict[str, str]   # url and the other keys of the section


@dataclass(frozen=True)
class DvcConfig:
    default_remote: str | None
    remotes: dict[str, RemoteSpec]


_SECTION = re.compile(r"""^\s*'?remote\s+"(?P<name>[^"]+)"'?\s*$""")


def parse_dvc_config(text: bytes, source: str = ".dvc/config") -> DvcConfig:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(text.decode("utf-8"), source)
    except (configparser.Error, UnicodeDecodeError) as err:
        raise DvcFileError(f"{source}: cannot parse ({err.__class__.__name__})") from None
    default = None
    remotes: dict[str, RemoteSpec] = {}
    for section in parser.sections():
        if section.strip() == "core":
            default = parser.get(section, "remote", fallback=None)
            continue
        match = _SECTION.match(section)
        if match:
            settings = {k.replace(" ", "_"): v for k, v in parser.items(section)}
            remotes[match["name"]] = RemoteSpec(match["name"], settings)
    if default is not None and default not in remotes:
        raise DvcFileError(f"{source}: default remote {default!r} is not defined")
    return DvcConfig(default, remotes)
