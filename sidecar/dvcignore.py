""".dvcignore exactly as DVC applies it, over repository-relative paths (no checkout needed).

DVC's rules (dvc/ignore.py, dvc/pathspec_math.py, DVC 2.x and 3.x): patterns are gitwildmatch
(pathspec); a `.dvcignore` applies to its own directory and below; a directory's patterns are
its parent's followed by its own file's, rebased onto their common directory, and the last
matching pattern wins; `.hg/`, `.git/`, `.git` and `.dvc/` are always ignored; a `.dvcignore`
that is itself ignored is not read. (A directory holding `.dvc`, a sub-repository, DVC skips too:
the uploader prunes those while collecting files.) We port that logic (not re-invent it) so an upload records what `dvc add` would record.
"""
from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from itertools import groupby

from pathspec.util import normalize_file

try:   # pathspec >= 1
    from pathspec.patterns.gitignore.spec import _DIR_MARK
    from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern as _Pattern
except ImportError:  # pragma: no cover - pathspec < 1
    from pathspec.patterns.gitwildmatch import _DIR_MARK  # type: ignore[attr-defined,no-redef]
    from pathspec.patterns.gitwildmatch import GitWildMatchPattern as _Pattern  # type: ignore[no-redef]

DVCIGNORE = ".dvcignore"
DEFAULT_PATTERNS = (".hg/", ".git/", ".git", ".dvc/")
# DVC works on absolute paths; a fixed virtual root keeps the ported arithmetic identical.
_ROOT = "/repo"


def _abs(rel: str) -> str:
    return posixpath.join(_ROOT, rel) if rel else _ROOT


class Patterns:
    """One directory's effective patterns (DVC's DvcIgnorePatterns), anchored at `dirname`
    (absolute, under the virtual root)."""

    def __init__(self, patterns: Iterable[str], dirname: str):
        self.dirname = dirname
        self.patterns: list[str] = []
        compiled: list[tuple[str, bool, bool]] = []
        for count, pattern in enumerate(patterns):
            regex, include = _Pattern.pattern_to_regex(pattern)
            if regex is not None and include is not None:
                self.patterns.append(pattern)
                compiled.append((regex.replace(f"<{_DIR_MARK}>", f"<{_DIR_MARK}{count}>"), include,
                                 pattern.endswith("/")))
        # (regex, ignores?, directories only?) in DVC's grouping; the last match decides.
        self.spec: list[tuple[re.Pattern[str], bool, bool]] = []
        for (include, dir_only), group in groupby(compiled, key=lambda c: (c[1], c[2])):
            regexes = [r for r, _, _ in group]
            if include:
                self.spec.append((re.compile("|".join(f"(?:{r})" for r in regexes)), True, dir_only))
            else:
                self.spec.extend((re.compile(r), False, dir_only) for r in regexes)
        self._find = cache(self._find_uncached)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches(self, dirname: str, basename: str, is_dir: bool = False) -> bool:
        """Whether `dirname/basename` (absolute, virtual root) is ignored by these patterns."""
        prefix = self.dirname.rstrip("/") + "/"
        if dirname == self.dirname:
            path = basename
        elif dirname.startswith(prefix):
            path = f"{dirname[len(prefix):]}/{basename}"
        else:
            return False
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            if self._find("/".join(parts[:i]), is_dir or i < len(parts)):
                return True
        return False

    def _find_uncached(self, path: str, is_dir: bool) -> bool:
        paths = [path, f"{path}/"] if is_dir and not path.endswith("/") else [path]
        for regex, include, dir_only in reversed(self.spec):
            if dir_only and not is_dir:
                continue
            if any(regex.match(p) for p in paths):
                return include
        return False


def _change_rule(rule: str, rel: str) -> str:
    rule = rule.strip()
    if rule.startswith("#"):
        return rule
    negate = rule.startswith("!")
    rule = rule[1:] if negate else rule
    if rule[:-1].find("/") >= 0 and not rule.startswith("**/"):
        match_all, rule = False, rule.removeprefix("/")
    else:
        match_all, rule = True, rule.removeprefix("**/")
    rule = rule[1:] if rule.startswith("\\") else rule
    rule = f"/**/{rule}" if match_all else f"/{rule}"
    return normalize_file(f"!/{rel}{rule}" if negate else f"/{rel}{rule}")


def _rebase(dirname: str, patterns: list[str], new_dirname: str) -> list[str]:
    if new_dirname == dirname:
        return patterns
    rel = posixpath.relpath(dirname, new_dirname)
    return [_change_rule(p, rel) for p in patterns]


def merge(a: Patterns, b: Patterns) -> Patterns:
    """DVC's merge_patterns: both rebased onto their common directory, the shallower first."""
    if not a:
        return b
    if not b:
        return a
    common = posixpath.commonpath([a.dirname, b.dirname])
    pa, pb = _rebase(a.dirname, a.patterns, common), _rebase(b.dirname, b.patterns, common)
    return Patterns(pa + pb if len(a.dirname) <= len(b.dirname) else pb + pa, common)


def parse(text: str) -> list[str]:
    """The patterns of one .dvcignore (stripped lines, no blanks or comments), as DVC reads it."""
    return [line for line in map(str.strip, text.splitlines()) if line and not line.startswith("#")]


@dataclass
class IgnoreFilter:
    """DVC's ignore filter over a repository described by its `.dvcignore` files.

    `read(dir)` gives the text of `dir/.dvcignore` (dir repository-relative, "" for the root) or
    None where there is none."""

    read: Callable[[str], str | None]
    _by_dir: dict[str, Patterns] = field(default_factory=dict)

    def patterns_at(self, rel_dir: str) -> Patterns:
        """The effective patterns inside `rel_dir` (DVC's trie entry for that directory)."""
        if rel_dir in self._by_dir:
            return self._by_dir[rel_dir]
        if rel_dir:
            parent = self.patterns_at(posixpath.dirname(rel_dir))
        else:
            parent = Patterns(DEFAULT_PATTERNS, _ROOT)
        here = parent
        if not parent.matches(_abs(rel_dir), DVCIGNORE):
            text = self.read(rel_dir)
            if text is not None:
                here = merge(parent, Patterns(parse(text), _abs(rel_dir)))
        self._by_dir[rel_dir] = here
        return here

    def is_ignored(self, rel_path: str, is_dir: bool = False) -> bool:
        """DVC's `is_ignored` for one path: the patterns of its directory, checked against every
        prefix of the path (so an ignored parent ignores it too)."""
        parent, name = posixpath.split(rel_path)
        return self.patterns_at(parent).matches(_abs(parent), name, is_dir)

    def walk_ignored(self, rel_path: str, base: str) -> bool:
        """Whether a walk of directory `base` (as `dvc add base` does) skips file `rel_path`:
        one of its directories below `base` is ignored, or the file is."""
        parts = rel_path[len(base):].lstrip("/").split("/") if base else rel_path.split("/")
        current = base
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            if self.patterns_at(current).matches(_abs(current), name, not last):
                return True
            current = posixpath.join(current, name) if current else name
        return False
