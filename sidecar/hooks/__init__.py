"""In-process streaming: `install_hooks()` for notebooks and scripts that cannot mount.

After `install_hooks()`, paths under the hooks' root that are missing on local disk are served
by the file-system layer (sidecar.fs; same cache as `dda` and `dda mount`): `open`/`io.open` in
read modes, `os.stat`/`lstat`/`access`/`listdir`/`scandir`/`mkdir`/`chdir`/`listxattr`, and
through them `os.walk`, `os.path.*`, `glob`, `shutil` and `pathlib`; the references modules bound
at import (tarfile, bz2, tokenize, `from os import stat`) are patched too. Local files always
win; writes go to local disk; `os.chdir` into a repository-only directory creates it locally.
Listings come from the snapshot (no request); a size is learned when asked for.

The package, by job:
- `api`       install_hooks / refresh_hooks / latest_commit / uninstall_hooks / hooks_installed
- `core`      the installation's state: root, exclusions, fs answers -> os results and errors
- `patching`  the replacement functions and what they replace
- `files`     the file object open() returns (pinned to its handle), scandir's entries
- `runtime`   the engine's private event loop thread
- `forking`   fork handling; DDA_HOOKS, the credentials file and the .pth line for new interpreters

This package imports only the standard library at import time; the engine is imported on
first use (the `.pth` line runs at every interpreter start).

Limits: C-level readers (OpenCV, TensorFlow file ops, anything that opens paths in C or needs
`fileno()`/mmap) bypass Python and see only local files: use `dda mount` for them.
"""
from __future__ import annotations

import atexit
from typing import Any

from .api import hooks_installed, install_hooks, latest_commit, refresh_hooks, uninstall_hooks
from .core import HooksInfo
from .forking import ENV_VAR, PTH_LINE, PTH_NAME, _reinstall_from_env, install_autoload, remove_autoload
from .patching import _access, _chdir, _listdir, _lstat, _mkdir, _open, _scandir, _stat  # noqa: F401

__all__ = ["install_hooks", "uninstall_hooks", "hooks_installed", "HooksInfo", "install_autoload",
           "remove_autoload", "PTH_LINE", "refresh_hooks", "latest_commit"]


def __getattr__(name: str) -> Any:
    if name == "_state":            # the live installation (tests and debugging)
        from . import core

        return core.current
    raise AttributeError(f"module 'sidecar.hooks' has no attribute {name!r}")


def _register() -> None:
    from . import api, forking

    forking.register()
    atexit.register(api.close_at_exit)


_register()
