"""A `.dir` manifest parsed incrementally into compact arrays (issue 11, item 3).

A 1M-entry manifest is ~80 MB of JSON; `json.loads` made 1M dicts and strings first (an
873 MB peak). Here ijson (yajl, C) hands over one entry at a time and each is checked and
stored at once: directory parts and names shared (a name repeated across folders is held
once), md5 as 16 raw bytes, sizes in an array. `Manifest` still reads as a sequence of
`ManifestEntry` for callers that want objects; the tree builder reads its arrays directly.
"""
from __future__ import annotations

import io
from array import array
from typing import Any, Iterator, Sequence

import ijson

from ..errors import DvcFileError
from .dvcfiles import _MD5, ManifestEntry
from .paths import join_inside


class Manifest(Sequence[ManifestEntry]):
    """The entries of one `.dir` object, in manifest order. Memory per entry: 16 B md5,
    8 B size, 4 B folder index, 1 B exec flag, one pointer to a shared name."""

    def __init__(self) -> None:
        self.dirs: list[str] = []             # folder of each entry, relative ("" = the top)
        self.dir_of = array("I")              # entry -> index into dirs
        self.names: list[str] = []            # entry -> its file name (one object per distinct name)
        self.md5 = bytearray()                # entry i: bytes [16 i, 16 i + 16)
        self.sizes = array("q")               # -1: the manifest does not say
        self.isexec = bytearray()             # 1: executable
        self._dir_ids: dict[str, int] = {}
        self._seen: dict[str, str] = {}       # while parsing: one object per distinct name

    def append(self, relpath: str, md5: str, size: int | None, isexec: bool = False) -> None:
        """Add one entry (relpath already checked and normalized, md5 32 lowercase hex)."""
        folder, _, name = relpath.rpartition("/")
        index = self._dir_ids.get(folder)
        if index is None:
            index = self._dir_ids[folder] = len(self.dirs)
            self.dirs.append(folder)
        self.dir_of.append(index)
        self.names.append(self._seen.setdefault(name, name))
        self.md5 += bytes.fromhex(md5)
        self.sizes.append(-1 if size is None else size)
        self.isexec.append(1 if isexec else 0)

    def relpath(self, i: int) -> str:
        folder = self.dirs[self.dir_of[i]]
        return f"{folder}/{self.names[i]}" if folder else self.names[i]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):  # type: ignore[no-untyped-def,override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        size = self.sizes[i]
        return ManifestEntry(self.relpath(i), self.md5[16 * i:16 * i + 16].hex(), None if size < 0 else size,
                             bool(self.isexec[i]))

    def __iter__(self) -> Iterator[ManifestEntry]:
        for i in range(len(self)):
            yield self[i]


def parse_manifest(text: bytes, source: str) -> Manifest:
    """A `.dir` object: a JSON list of {md5, relpath[, size][, isexec]}. Raises DvcFileError
    naming `source` (and the entry) for anything else. Memory: the compact entries plus one
    entry being parsed."""
    manifest = Manifest()
    if text.lstrip()[:1] != b"[":
        _check_json(text, source)
        raise DvcFileError(f"{source}: a .dir manifest must be a JSON list")
    try:
        for i, item in enumerate(_items(text, source)):
            _add(manifest, item, source, i)
    except (ijson.JSONError, UnicodeDecodeError) as err:
        raise DvcFileError(f"{source}: not a valid .dir manifest (JSON: {_first_line(err)})") from None
    manifest._dir_ids, manifest._seen = {}, {}
    return manifest


MAX_DEPTH = 32   # containers inside the top-level list (an entry is one; DVC's are never deeper than 3)


def _items(text: bytes, source: str) -> Iterator[object]:
    """The values of the top-level JSON list, one at a time, from yajl's events (ijson's own
    item builder keeps a prefix string per level: hostile nesting would cost depth^2)."""
    events = ijson.basic_parse(io.BytesIO(text), use_float=True)
    stack: list[Any] = []        # containers being built, innermost last
    keys: list[Any] = []         # the pending key of each (None in a list)
    next(events)                 # the top-level start_array (checked by the caller)
    for event, value in events:
        if event == "map_key":
            keys[-1] = value
            continue
        if event == "start_map" or event == "start_array":
            if len(stack) >= MAX_DEPTH:
                raise DvcFileError(f"{source}: not a valid .dir manifest (nested too deeply)")
            stack.append({} if event == "start_map" else [])
            keys.append(None)
            continue
        if event == "end_map" or event == "end_array":
            if not stack:
                continue         # the end of the list; yajl raises on anything after it
            value = stack.pop()
            keys.pop()
        if not stack:
            yield value
        elif keys[-1] is None and isinstance(stack[-1], list):
            stack[-1].append(value)
        else:
            stack[-1][keys[-1]] = value


def _add(manifest: Manifest, item: object, source: str, i: int) -> None:
    if not isinstance(item, dict):
        raise DvcFileError(f"{source}: entry {i}: expected an object")
    md5, relpath = item.get("md5"), item.get("relpath")
    if not isinstance(md5, str) or not _MD5.fullmatch(md5):
        raise DvcFileError(f"{source}: entry {i}: 'md5' {md5!r} is not an md5 hash")
    if isinstance(relpath, str) and _plain(relpath):
        rel = relpath     # already what join_inside would return (checked in C, not per name)
    else:
        rel = join_inside("", relpath, f"{source}: entry {i}", "relpath")
        if not rel:
            raise DvcFileError(f"{source}: entry {i}: relpath {relpath!r} names the directory itself")
    size = item.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63):
        raise DvcFileError(f"{source}: entry {i}: 'size' must be a non-negative integer below 2**63")
    manifest.append(rel, md5, size, item.get("isexec") is True)


def _plain(rel: str) -> bool:
    """A relpath with nothing to normalize or refuse: no name starts with '.' (so no `.`,
    `..`, `.git`), no empty name, not absolute, no drive letter, no NUL."""
    return bool(rel) and rel[0] not in "./" and "/." not in rel and "//" not in rel and rel[-1] != "/" \
        and "\0" not in rel and not (len(rel) > 1 and rel[1] == ":")


def _check_json(text: bytes, source: str) -> None:
    """Raise the JSON error of `text`, if any, without building it (bounded memory)."""
    try:
        for _ in ijson.basic_parse(io.BytesIO(text)):
            pass
    except (ijson.JSONError, UnicodeDecodeError) as err:
        raise DvcFileError(f"{source}: not a valid .dir manifest (JSON: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    """yajl's message (bytes, several lines with a caret) as one short line."""
    raw = err.args[0] if err.args else ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return (text.strip().splitlines() or [type(err).__name__])[0][:200]
