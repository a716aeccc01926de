"""The immutable view of one commit: what a checkout looks like after `dvc pull`."""
from __future__ import annotations

import posixpath
import stat
from dataclasses import dataclass
from typing import Iterator, Literal


@dataclass(frozen=True)
class Entry:
    path: str
    kind: Literal["git", "dvc"]
    mode: int                 # st_mode bits of a regular file or symlink
    size: int | None          # None only until looked up (never shown to users as a size)
    oid: str                  # git blob sha or DVC md5
    legacy: bool = False      # DVC 2 object
    remote: str | None = None # DVC remote name (None: the default one)
    output: str | None = None # the DVC output this file belongs to

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


class Tree:
    def __init__(self, files: dict[str, Entry]):
        self.files = files
        children: dict[str, set[str]] = {"": set()}
        for path in files:
            parent, name = posixpath.split(path)
            children.setdefault(parent, set()).add(name)
            while parent:   # register each ancestor once
                grand, pname = posixpath.split(parent)
                siblings = children.setdefault(grand, set())
                if pname in siblings:
                    break
                siblings.add(pname)
                parent = grand
        self.dirs = {d: sorted(names) for d, names in children.items()}

    @staticmethod
    def normalize(path: str) -> str:
        path = posixpath.normpath("/" + path.replace("\\", "/")).lstrip("/")
        return "" if path == "." else path

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
