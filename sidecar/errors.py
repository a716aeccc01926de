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


class RetryAfter(RemoteUnavailable):
    """HTTP 429 or 503 (or another retryable status) carrying the server's Retry-After delay."""

    def __init__(self, message: str, retry_after: float | None = None, status: int = 429):
        super().__init__(message)
        self.retry_after = retry_after   # seconds the server asked us to wait; None: not said
        self.status = status


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
