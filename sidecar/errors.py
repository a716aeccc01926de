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


class RemoteAuthError(RemoteError):
    pass


class ObjectMissing(RemoteError):
    pass


class HashMismatch(DDAError):
    pass


class DeadlineExceeded(DDAError):
    pass


class OutputUnavailable(DDAError):
    """A DVC output of the revision cannot be shown (manifest missing, malformed .dvc, ...);
    the rest of the revision can. The message names the output and the cause."""


# `dda ls` exit status when it listed the revision but some outputs are unavailable
# (scripts can tell it from 1 = failed, 2 = bad configuration).
PARTIAL_EXIT = 3


class NotFound(DDAError):
    """A path that is not in the snapshot."""
