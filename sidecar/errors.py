"""Errors a user can act on: each renders as one line that says what and where.

Every error carries its meaning as fields, never in its text:

- `errno`: what the file-system frontends answer (FUSE reply, the hooks' OSError);
- `reason`: a short, bounded label for metrics and counters (`deadline`, `missing`, ...);
- `exit_code`: what `dda` exits with;
- `path`: the repository path (or object) it concerns, when there is one.

`describe()` is the one mapping every frontend uses, also for exceptions that are not ours
(a bare timeout is ETIMEDOUT everywhere, a cancellation is `cancelled`).
"""
from __future__ import annotations

import asyncio
import errno as _errno
from dataclasses import dataclass
from typing import Any


class DDAError(Exception):
    """Base of every error we show to users (CLI prints str(err), no traceback)."""

    errno: int = _errno.EIO
    reason: str = "error"
    exit_code: int = 1

    def __init__(self, message: str = "", *, path: str | None = None, errno: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.path = path
        if errno is not None:
            self.errno = errno
        if reason is not None:
            self.reason = reason


class ConfigError(DDAError):
    exit_code = 2
    reason = "config"
    errno = _errno.EINVAL


class GitError(DDAError):
    """Cloning, fetching or resolving a revision failed."""

    reason = "git"


class UnknownRevision(GitError):
    reason = "unknown_revision"


class DvcFileError(DDAError):
    """A .dvc file, dvc.lock, .dvc/config or .dir manifest is malformed."""

    reason = "dvc_file"


class RemoteError(DDAError):
    """Base of failures talking to a DVC remote."""

    retryable = False


class RemoteUnavailable(RemoteError):
    """Network error, timeout or 5xx: worth retrying."""

    retryable = True
    reason = "unavailable"
    retry_after: float | None = None     # what the server asked for (Retry-After), in seconds


class RetryAfter(RemoteUnavailable):
    """HTTP 429 or 503 (or another retryable status) carrying the server's Retry-After delay."""

    def __init__(self, message: str, retry_after: float | None = None, status: int = 429, **fields: Any):
        super().__init__(message, **fields)
        self.retry_after = retry_after   # seconds the server asked us to wait; None: not said
        self.status = status


class RemoteAuthError(RemoteError):
    reason = "auth"
    errno = _errno.EACCES


class ObjectMissing(RemoteError):
    reason = "missing"


class UploadRefused(RemoteError):
    """The remote answered an upload with a client error (403, 405, a 404 from a server that
    takes no uploads there): not worth retrying, and not a missing object."""

    reason = "upload_refused"
    errno = _errno.EACCES


class HashMismatch(DDAError):
    reason = "hash_mismatch"


class DeadlineExceeded(DDAError):
    """A read waited longer than its deadline: ETIMEDOUT in every frontend."""

    reason = "deadline"
    errno = _errno.ETIMEDOUT


class OutputUnavailable(DDAError):
    """A DVC output of the revision cannot be shown (manifest missing, malformed .dvc, ...);
    the rest of the revision can. The message names the output and the cause."""

    reason = "unavailable_output"


# `dda ls` exit status when it listed the revision but some outputs are unavailable
# (scripts can tell it from 1 = failed, 2 = bad configuration).
PARTIAL_EXIT = 3


class NotFound(DDAError):
    """A path that is not in the snapshot."""

    reason = "not_found"
    errno = _errno.ENOENT


class NotADirectory(DDAError):
    reason = "not_a_directory"
    errno = _errno.ENOTDIR


class IsADirectory(DDAError):
    reason = "is_a_directory"
    errno = _errno.EISDIR


class NotASymlink(DDAError):
    reason = "not_a_symlink"
    errno = _errno.EINVAL


class SymlinkLoop(DDAError):
    reason = "symlink_loop"
    errno = _errno.ELOOP


class ReadOnly(DDAError):
    reason = "read_only"
    errno = _errno.EROFS


class BadHandle(DDAError):
    reason = "bad_handle"
    errno = _errno.EBADF


@dataclass(frozen=True)
class ErrorInfo:
    errno: int
    reason: str        # bounded metric label
    exit_code: int
    message: str


def describe(exc: BaseException) -> ErrorInfo:
    """The one mapping from an exception to (errno, reason, exit code, message)."""
    if isinstance(exc, DDAError):
        return ErrorInfo(exc.errno, exc.reason, exc.exit_code, str(exc))
    if isinstance(exc, asyncio.CancelledError):
        return ErrorInfo(_errno.EINTR, "cancelled", 130, "cancelled")
    if isinstance(exc, TimeoutError):          # asyncio.TimeoutError is TimeoutError on 3.11+
        return ErrorInfo(_errno.ETIMEDOUT, "deadline", 1, str(exc) or "timed out")
    if isinstance(exc, OSError) and exc.errno:
        return ErrorInfo(exc.errno, "os_error", 1, str(exc))
    return ErrorInfo(_errno.EIO, "error", 1, str(exc) or type(exc).__name__)


def errno_of(exc: BaseException) -> int:
    return describe(exc).errno


def reason_of(exc: BaseException) -> str:
    return describe(exc).reason

class ObjectResized(DDAError):
    """The size a reader was given came from a remote and the verified object proved it wrong."""

    reason = "size_changed"


class CacheFull(DDAError):
    """The cache directory's filesystem is full (ENOSPC), even after evicting."""
