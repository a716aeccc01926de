"""Parse what DVC keeps in git: *.dvc files, dvc.lock, .dvc/config, and .dir manifests.

Pure functions over bytes; every error names the file and the field.
"""
from __future__ import annotations

import configparser
import json
import posixpath
import re
from dataclasses import dataclass

import yaml

from ..errors import DvcFileError

_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class DvcOut:
    path: str               # repository-relative, posix
    md5: str                # 32 hex digits, without ".dir"
    is_dir: bool
    size: int | None
    nfiles: int | None
    legacy: bool            # DVC 2 hash ("md5-dos2unix" rules, legacy remote layout)
    remote: str | None      # per-output remote
    source: str             # the file that declared it


@dataclass(frozen=True)
class ManifestEntry:
    relpath: str
    md5: str
    size: int | None


def _safe_relpath(path: object, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise DvcFileError(f"{where}: 'path' must be a non-empty string")
    norm = posixpath.normpath(path.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise DvcFileError(f"{where}: path {path!r} points outside the repository")
    return norm


def _parse_out(raw: object, base_dir: str, source: str, where: str) -> DvcOut | None:
    if not isinstance(raw, dict):
        raise DvcFileError(f"{where}: expected a mapping, got {type(raw).__name__}")
    rel = _safe_relpath(raw.get("path"), where)
    path = posixpath.normpath(posixpath.join(base_dir, rel)) if base_dir else rel
    if path.startswith("../"):
        raise DvcFileError(f"{where}: path {rel!r} points outside the repository")
    if raw.get("cache") is False:
        return None  # lives in git; the git tree already has it
    md5 = raw.get("md5")
    if md5 is None and isinstance(raw.get("etag"), str):
        raise DvcFileError(f"{where}: external outputs (etag only) are not supported")
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
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise DvcFileError(f"{where}: 'size' must be a non-negative integer, got {size!r}")
    nfiles = raw.get("nfiles")
    if nfiles is not None and (not isinstance(nfiles, int) or nfiles < 0):
        raise DvcFileError(f"{where}: 'nfiles' must be a non-negative integer, got {nfiles!r}")
    hash_name = raw.get("hash")
    if hash_name not in (None, "md5"):
        raise DvcFileError(f"{where}: unsupported hash {hash_name!r} (expected md5)")
    remote = raw.get("remote")
    if remote is not None and not isinstance(remote, str):
        raise DvcFileError(f"{where}: 'remote' must be a remote name")
    return DvcOut(path=path, md5=digest, is_dir=is_dir, size=size if not is_dir else size,
                  nfiles=nfiles, legacy=hash_name is None, remote=remote, source=source)


def _load_yaml(text: bytes, source: str) -> object:
    try:
        return yaml.safe_load(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise DvcFileError(f"{source}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise DvcFileError(f"{source}: not valid YAML{at}") from None


def parse_dvc_file(text: bytes, source: str) -> list[DvcOut]:
    """Outputs of one `*.dvc` file at repository path `source`."""
    data = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise DvcFileError(f"{source}: expected a mapping with 'outs'")
    outs = data.get("outs")
    if not isinstance(outs, list) or not outs:
        raise DvcFileError(f"{source}: 'outs' must be a non-empty list")
    base = posixpath.dirname(source)
    # A `wdir` moves where paths are resolved from (DVC 1 style files still carry it).
    wdir = data.get("wdir")
    if isinstance(wdir, str) and wdir not in ("", "."):
        base = posixpath.normpath(posixpath.join(base, wdir))
    parsed = [_parse_out(raw, base, source, f"{source}: outs[{i}]") for i, raw in enumerate(outs)]
    return [o for o in parsed if o is not None]


def parse_dvc_lock(text: bytes, source: str) -> list[DvcOut]:
    data = _load_yaml(text, source)
    if data is None:
        return []
    if not isinstance(data, dict):
        raise DvcFileError(f"{source}: expected a mapping")
    base = posixpath.dirname(source)
    stages = data.get("stages") if "schema" in data else data  # lock schema 1 had stages at the top
    if stages is None:
        return []
    if not isinstance(stages, dict):
        raise DvcFileError(f"{source}: 'stages' must be a mapping")
    found: list[DvcOut] = []
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            raise DvcFileError(f"{source}: stage {name!r}: expected a mapping")
        outs = stage.get("outs") or []
        if not isinstance(outs, list):
            raise DvcFileError(f"{source}: stage {name!r}: 'outs' must be a list")
        for i, raw in enumerate(outs):
            out = _parse_out(raw, base, source, f"{source}: stage {name!r} outs[{i}]")
            if out is not None:
                found.append(out)
    return found


def parse_manifest(text: bytes, source: str) -> list[ManifestEntry]:
    """A `.dir` object: a JSON list of {md5, relpath[, size]}."""
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DvcFileError(f"{source}: not a valid .dir manifest (JSON: {err})") from None
    if not isinstance(data, list):
        raise DvcFileError(f"{source}: a .dir manifest must be a JSON list")
    entries: list[ManifestEntry] = []
    for i, item in enumerate(data):
        where = f"{source}: entry {i}"
        if not isinstance(item, dict):
            raise DvcFileError(f"{where}: expected an object")
        md5, relpath = item.get("md5"), item.get("relpath")
        if not isinstance(md5, str) or not _MD5.match(md5):
            raise DvcFileError(f"{where}: 'md5' {md5!r} is not an md5 hash")
        rel = _safe_relpath(relpath, where)
        size = item.get("size")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise DvcFileError(f"{where}: 'size' must be a non-negative integer")
        entries.append(ManifestEntry(rel, md5, size))
    return entries


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
