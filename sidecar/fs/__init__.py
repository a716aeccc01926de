"""The frontend-neutral file-system layer: FUSE (sidecar.fuse), the in-process hooks
(sidecar.hooks) and `dda ls/cat/get` (sidecar.cli, sidecar.download) sit on it."""
from .attr import Attr, DirEntry, Kind, dir_attr
from .filesystem import FileSystem, Handle, Refreshed

__all__ = ["Attr", "DirEntry", "FileSystem", "Handle", "Kind", "Refreshed", "dir_attr"]
