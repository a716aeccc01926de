"""`dda mount --daemon`: a fresh process serves the mount, with no credential in its argv or env.

A forked child would keep the parent's argv (`dda mount https://user:TOKEN@host/...`) in
/proc/PID/cmdline, visible to `ps` for the mount's lifetime. So the daemon is a new program
(`python -m sidecar.fuse.daemon`) whose command line holds only pipe numbers and a redacted
description; the configuration, credentials included, travels through an inherited pipe, and
environment variables holding a secret are left out of its environment (the config carries them).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..config import Config
from ..errors import DDAError
from ..redact import redact, strip_userinfo

# The log lives in the cache directory and counts against its budget (store/chunks.py BESIDE),
# and a long-lived mount may log an error per read: rotated, it takes at most
# LOG_MAX_BYTES * (1 + LOG_BACKUPS) = 16 MiB (mount.log, mount.log.1 .. .3).
LOG_MAX_BYTES = 4 * 1024 * 1024
LOG_BACKUPS = 3


class _RotatingLog(logging.handlers.RotatingFileHandler):
    """The daemon's log file, rotated by size. Each file it opens also becomes the process's
    stdout and stderr, so what is written there (a library's print, a traceback at exit) goes
    to the current file, never on into a rotated one that nothing bounds. Files are 0600."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        stream = open(fd, "a", encoding=self.encoding, errors=self.errors)
        for std in (1, 2):
            os.dup2(fd, std)
        return stream


def _secrets(config: Config) -> list[str]:
    found = list(config.secrets())
    for url in [config.repo or ""] + [r.get("url", "") for r in config.remotes.values()]:
        _, _, password = strip_userinfo(url)
        if password:
            found.append(password)
    return [s for s in found if len(s) >= 3]


def child_env(config: Config, env: "os._Environ[str] | dict[str, str]") -> dict[str, str]:
    """`env` without the variables whose value holds one of the config's secrets."""
    secrets = _secrets(config)
    return {k: v for k, v in env.items() if not any(s in v for s in secrets)}


def spawn(config: Config, mountpoint: Path, subdir: str, allow_non_empty: bool, log_file: Path,
          log_max_bytes: int = LOG_MAX_BYTES) -> int:
    """Start the daemon and return once the mount is live (0) or the daemon said why not (1).
    The daemon logs to `log_file`, rotated past `log_max_bytes` (LOG_BACKUPS kept)."""
    status_r, status_w = os.pipe()
    config_r, config_w = os.pipe()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    shown = redact(strip_userinfo(config.repo or "")[0], _secrets(config))
    argv = [sys.executable, "-m", "sidecar.fuse.daemon", "--status-fd", str(status_w), "--config-fd", str(config_r),
            "--", "dda", "mount", shown, str(mountpoint)]
    payload = {"config": config.model_dump(mode="json"),
               "mountpoint": str(mountpoint), "subdir": subdir, "allow_non_empty": allow_non_empty,
               "log_level": logging.getLogger().getEffectiveLevel(),
               "log_file": str(log_file), "log_max_bytes": log_max_bytes}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(status_w, config_r),
                                start_new_session=True, env=child_env(config, os.environ), close_fds=True)
    finally:
        os.close(out)
        os.close(status_w)
        os.close(config_r)
    with os.fdopen(config_w, "wb") as pipe:
        try:
            pipe.write(json.dumps(payload).encode())
        except BrokenPipeError:
            pass   # the daemon died at start: its status pipe says so
    with os.fdopen(status_r, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    if message.startswith("ok"):
        print(f"dda: mounted on {mountpoint} (daemon pid {proc.pid}, log {log_file})")
        return 0
    proc.wait()
    print(f"dda: error: {message.strip() or 'the daemon exited before the mount was ready'}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> None:
    """The daemon process: read the configuration from --config-fd, mount, say "ok" on --status-fd."""
    parser = argparse.ArgumentParser(prog="dda mount daemon")
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--config-fd", type=int, required=True)
    parser.add_argument("shown", nargs="*", help="what ps shows (redacted); ignored")
    ns = parser.parse_args(argv)
    with os.fdopen(ns.config_fd, "rb") as pipe:
        payload = json.loads(pipe.read())
    handlers: list[logging.Handler] | None = None
    if payload.get("log_file"):   # else stderr, as spawn() left it
        handlers = [_RotatingLog(payload["log_file"], maxBytes=payload["log_max_bytes"], backupCount=LOG_BACKUPS)]
    logging.basicConfig(level=payload["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers)
    raw = payload["config"]
    config = Config(**raw)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    pipe = os.fdopen(ns.status_fd, "wb", buffering=0)

    from .mount import run_foreground

    def ready(_mount: object) -> None:
        pipe.write(b"ok\n")
        pipe.close()

    code = 1
    try:
        code = asyncio.run(run_foreground(config, Path(payload["mountpoint"]), payload["subdir"],
                                          payload["allow_non_empty"], ready))
    except DDAError as err:
        message = redact(str(err), config.secrets())
        print(f"dda: error: {message}", file=sys.stderr)
        if not pipe.closed:
            pipe.write(message.encode())
    except BaseException as err:  # a daemon must say why it died, in its log
        logging.exception("mount daemon failed")
        if not pipe.closed:
            pipe.write(redact(f"mount daemon failed: {type(err).__name__}: {err}", config.secrets()).encode())
    finally:
        if not pipe.closed:
            pipe.close()
        os._exit(code)


if __name__ == "__main__":
    main()
