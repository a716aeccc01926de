"""Child processes: fork handling, and what spawn/forkserver children and other interpreters
started from this one need to install the same hooks again.

- fork: `os.register_at_fork` pauses the runtime's loop thread around the fork (so the child
  inherits no lock it held); the child opens a fresh runtime lazily, on the parent's commit.
- spawn/forkserver/any new interpreter: `DDA_HOOKS` (JSON) carries the installation's public
  arguments; a `.pth` line (see `PTH_LINE`, `install_autoload()`) re-installs the hooks at
  interpreter start when it is set. Credentials never go into the environment or argv: they
  are written to a 0600 file in a private (0700) temporary directory, referenced by path from
  `DDA_HOOKS` and deleted when the installing process uninstalls or exits.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from . import core
from .runtime import Runtime

ENV_VAR = "DDA_HOOKS"
PTH_NAME = "dda_sidecar_hooks.pth"
# One line for site-packages/*.pth: re-installs the hooks in spawn/forkserver children. It
# costs one dict lookup when DDA_HOOKS is unset.
PTH_LINE = ('import os; os.environ.get("DDA_HOOKS") and '
            '__import__("sidecar.hooks", fromlist=["_"])._reinstall_from_env()\n')

install_lock = threading.RLock()
_paused: list[Runtime] = []


# ------------------------------------------------------------------------------------------------
# credentials for children: a private file, never the environment

class CredentialFile:
    """A 0600 file in a fresh 0700 directory; removed by the process that wrote it."""

    def __init__(self, secrets: dict[str, Any]):
        import tempfile

        runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
        base = runtime_dir if runtime_dir and os.path.isdir(runtime_dir) and os.access(runtime_dir, os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="dda-hooks-", dir=base)     # mode 0700
        self.path = os.path.join(self.dir, "credentials.json")
        self.owner = os.getpid()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(secrets, f)

    def remove(self) -> None:
        if os.getpid() != self.owner:
            return                               # a forked child: the parent still needs it
        for target, drop in ((self.path, os.unlink), (self.dir, os.rmdir)):
            try:
                drop(target)
            except OSError:
                pass


def read_credentials(path: str) -> dict[str, Any]:
    """The secrets a parent left for its children ({} when the file is gone or not ours)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            return {}                            # someone else's, or readable by others: ignore
        try:
            data = json.loads(f.read())
        except ValueError:
            return {}
    return data if isinstance(data, dict) else {}


def export(payload: dict[str, Any]) -> None:
    os.environ[ENV_VAR] = json.dumps(payload)


def _reinstall_from_env() -> None:
    """Called at interpreter start (the .pth line) in spawn/forkserver children."""
    raw = os.environ.get(ENV_VAR)
    if not raw or core.current is not None:
        return
    try:
        from .api import install_from_payload

        install_from_payload(json.loads(raw))
    except Exception as err:  # noqa: BLE001 - never break interpreter start
        print(f"dda: could not re-install hooks from {ENV_VAR}: {err}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# fork

def _before_fork() -> None:
    h = core.current
    rt = h.runtime if h is not None and h.pid == os.getpid() else None
    if rt is not None and rt.pause():
        _paused.append(rt)


def _after_fork_in_parent() -> None:
    while _paused:
        _paused.pop().resume()


def _after_fork_in_child() -> None:
    global install_lock
    install_lock = threading.RLock()     # another thread may have held it at fork time
    _paused.clear()
    h = core.current
    if h is not None:
        h.after_fork()


def register() -> None:
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------------------------------------
# the .pth file

def install_autoload(site_dir: str | None = None) -> str:
    """Write the .pth file that re-installs the hooks in spawn/forkserver children (the package
    ships it; this is for environments where it is missing). Returns its path."""
    from .patching import orig

    if site_dir is None:
        import sysconfig
        site_dir = sysconfig.get_paths()["purelib"]
    path = os.path.join(site_dir, PTH_NAME)
    with orig.open(path, "w") as f:
        f.write(PTH_LINE)
    return path


def remove_autoload(site_dir: str | None = None) -> None:
    if site_dir is None:
        import sysconfig
        site_dir = sysconfig.get_paths()["purelib"]
    try:
        os.unlink(os.path.join(site_dir, PTH_NAME))
    except FileNotFoundError:
        pass
