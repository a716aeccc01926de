"""Credentials from a mounted Kubernetes Secret: only the documented keys, never the rest.

The webhook mounts the pod's Secret read-only into the sidecar (it no longer passes the whole
Secret as environment with `envFrom`: a key such as `LD_PRELOAD`, `PYTHONPATH` or
`GIT_SSH_COMMAND` would act before, or around, any code of ours). Here each file whose name is
a documented credential key becomes a setting; every other file is ignored (and named in the
log, never its value). ssh material (`ssh-privatekey`, `known_hosts`) is used by path, see
`sidecar.snapshot.git`.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

SECRET_DIR_ENV = "DDA_SECRET_DIR"
SSH_KEY = "ssh-privatekey"            # the key of a kubernetes.io/ssh-auth Secret
KNOWN_HOSTS = "known_hosts"
# The credential suffixes of DDA_REMOTE_<NAME>_<KEY> (README: "The Secret").
REMOTE_SUFFIXES = ("USER", "PASSWORD", "TOKEN", "ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "SESSION_TOKEN",
                   "ENDPOINT_URL", "REGION", "URL", "AUTH", "CUSTOM_AUTH_HEADER", "METHOD")
_ALLOWED = re.compile(r"^(DDA_GIT_USER|DDA_GIT_TOKEN|DDA_REMOTE_[A-Z0-9_]+_(" + "|".join(REMOTE_SUFFIXES) + r"))$")
MAX_VALUE = 64 * 1024                 # a credential, not a file to slurp


def is_documented_key(name: str) -> bool:
    """Whether `name` is a Secret key the sidecar takes as a setting (DDA_GIT_USER, DDA_GIT_TOKEN,
    DDA_REMOTE_<NAME>_<USER|PASSWORD|TOKEN|...>)."""
    return bool(_ALLOWED.match(name))


def read_secret_dir(directory: str | os.PathLike[str] | None) -> dict[str, str]:
    """{key: value} for the documented keys among the files of a mounted Secret (a missing
    directory: {}). Values lose one trailing newline (`--from-file` keeps it). Files of other
    names are skipped, named in a warning, never read."""
    if not directory:
        return {}
    path = Path(directory)
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return {}
    except OSError as err:
        log.warning("secret directory %s: cannot list it (%s)", path, err.strerror)
        return {}
    found: dict[str, str] = {}
    ignored = []
    for name in names:
        if name.startswith(".") or name in (SSH_KEY, KNOWN_HOSTS):   # ..data links; ssh files go by path
            continue
        if not is_documented_key(name):
            ignored.append(name)
            continue
        try:
            with open(path / name, "rb") as f:
                raw = f.read(MAX_VALUE + 1)
        except OSError as err:
            log.warning("secret key %s: cannot read it (%s)", name, err.strerror)
            continue
        if len(raw) > MAX_VALUE:
            log.warning("secret key %s: longer than %d bytes; ignored", name, MAX_VALUE)
            continue
        text = raw.decode(errors="replace")
        found[name] = text[:-1] if text.endswith("\n") else text
    if ignored:
        log.warning("secret keys ignored (not documented settings): %s", ", ".join(n[:64] for n in ignored[:20]))
    return found
