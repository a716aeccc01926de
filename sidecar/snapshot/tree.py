"""The immutable view of one commit: what a checkout looks like after `dvc pull`."""
from __future__ import annotations

import posixpath
import stat
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal


@dataclass(frozen=True)
class Entry:
    path: str
    kind: Literal["git", "dvc", "broken", "lfs"]
    mode: int                 # st_mode bits of a regular file or symlink
    size: int | None          # None only until looked up (never shown to users as a size)
    oid: str                  # git blob sha, DVC md5, LFS sha256 ("" for a broken output)
    legacy: bool = False      # DVC 2 object
    remote: str | None = None # DVC remote name (None: the default one)
    output: str | None = None # the DVC output this file belongs to
    root: str = ""            # folder of the DVC (sub)repository the output belongs to
    target: str | None = None # a git symlink's target, as committed
    version: str | None = None  # cloud-versioned remote: the object's version id (key = path in its repo)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(frozen=True)
class Problem:
    """One output (or git entry) that cannot be shown as `dvc pull` would: reported once,
    shown at `path` (when known) and every read inside it fails naming `cause`."""
    path: str | None   # repository path of the output (None: not known)
    source: str        # the file that declared it (.dvc, dvc.lock, git tree)
    cause: str         # one line, already naming the file and field
    is_dir: bool = False

    def message(self) -> str:
        where = self.path if self.path is not None else self.source
        return f"{where}: unavailable: {self.cause}"


class Tree:
    def __init__(self, files: dict[str, Entry], empty_dirs: Iterable[str] = (),
                 problems: Iterable[Problem] = ()):
        self.files = files
        self.problems = list(problems)
        # Output path -> its problem, for outputs shown as unavailable.
        self.broken = {p.path: p for p in self.problems if p.path}
        children: dict[str, set[str]] = {"": set()}
        for path in list(files) + [d for d in empty_dirs if d]:
            if path not in files:
                children.setdefault(path, set())
            parent, name = posixpath.split(path)
            children.setdefault(parent, set()).add(name)
            while parent:   # register each ancestor once
                grand, pname = posixpath.split(parent)
                siblings = children.setdefault(grand, set())
                if pname in siblings or grand == parent:
                    break
                siblings.add(pname)
                parent = grand
        self.dirs = {d: sorted(names) for d, names in children.items()}

    @staticmethod
    def normalize(path: str) -> str:
        """A user-given path as a tree key: '/' separates names; a backslash is an ordinary
        character (POSIX), and `..` cannot climb above the repository."""
        path = posixpath.normpath("/" + path).lstrip("/")
        return "" if path == "." else path

    def problem_at(self, path: str) -> Problem | None:
        """The problem of the unavailable output at or above `path`, if any."""
        path = self.normalize(path)
        if not self.broken:
            return None
        while True:
            if path in self.broken:
                return self.broken[path]
            if not path:
                return None
            path = posixpath.dirname(path)

    def get(self, path: str) -> Entry | None:
        return self.files.get(self.normalize(path))

    def is_dir(self, path: str) -> bool:
        return self.normalize(path) in self.dirs

    def exists(self, path: str) -> bool:
        path = self.normalize(path)
        return path in self.files or path in self.dirs

    def listdir(self, path: str) -> list[str]:
        return self.dirs[self.normalize(path)]

    def walk_files(self, path: str = "") -> Iterator[Entry]:
        """Every file at or below `path`, in path order."""
        root = self.normalize(path)
        if root in self.files:
            yield self.files[root]
            return
        prefix = root + "/" if root else ""
        for name in sorted(p for p in self.files if p.startswith(prefix)):
            yield self.files[name]

    def resolve(self, path: str, max_links: int = 40) -> str | None:
        """`path` with git symlinks followed inside the tree (None: a link points outside
        the repository, or is dangling). Raises OSError(ELOOP) on a symlink loop."""
        import errno
        import os

        names = [n for n in self.normalize(path).split("/") if n]
        done: list[str] = []
        hops = 0
        while names:
            name = names.pop(0)
            current = "/".join(done + [name])
            entry = self.files.get(current)
            if entry is not None and entry.is_symlink:
                hops += 1
                if hops > max_links:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                if entry.target is None or entry.target.startswith("/"):
                    return None
                joined = posixpath.normpath(posixpath.join("/".join(done), entry.target))
                if joined == ".." or joined.startswith("../"):
                    return None
                names = [n for n in joined.split("/") if n not in ("", ".")] + names
                done = []
                continue
            if current not in self.files and current not in self.dirs:
                return None
            done.append(name)
        return "/".join(done)
