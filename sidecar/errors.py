"""Errors a user can act on: each renders as one line that says what and where."""
from __future__ import annotations


class DDAError(Exception):
    """Base of every error we show to users (CLI prints str(err), no traceback)."""

    exit_code = 1


class ConfigError(DDAError):
    exit_code = 2


class GitError(DDAError):
    """Cloning, fetching or resolving a revision failed."""


class UnknownRevision(GitError):
    pass


class DvcFileError(DDAError):
    """A .dvc file, dvc.lock, .dvc/config or .dir manifest is malformed."""


class RemoteError(DDAError):
    """Base of failures talking to a DVC remote."""

    retryable = False


class RemoteUnavailable(RemoteError):
    """Network error, timeout or 5xx: worth retrying."""

    retryable = True
    retry_after: float | None = None     # what the server asked for (Retry-After), in seconds


class RemoteAuthError(RemoteError):
    pass


class ObjectMissing(RemoteError):
    pass


class HashMismatch(DDAError):
    pass


class DeadlineExceeded(DDAError):
    pass


class NotFound(DDAError):
    """A path that is not in the snapshot."""


class CacheFull(DDAError):
    """The cache directory's filesystem is full (ENOSPC), even after evicting."""
