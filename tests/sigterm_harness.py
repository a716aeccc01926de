"""SIGTERM under read load, many times over, fast: `dda sidecar`'s serve() in forked children.

    python tests/sigterm_harness.py REPO MOUNTPOINT CACHE_DIR RUNS

The parent imports everything once; each run forks a child that serves the mount exactly as
`dda sidecar` does (sidecar_cmd.serve, its signal handlers, its exit through the interpreter's
normal shutdown) while a `find ... -exec cat` loop reads it; the parent sends SIGTERM at a
random moment 0-300 ms after the mount is live and checks the child exits 0, printed no
traceback or asyncio error, and left nothing mounted. One line per failure and a summary line
`runs N failures F seconds S`; exit status 1 if any run failed.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from sidecar.config import load_config
from sidecar.fuse.mountpoint import mount_entry
from sidecar.sidecar_cmd import serve

# What serve() imports lazily, imported once here: every child runs the same code.
import sidecar.fetch.scheduler  # noqa: E402,F401
import sidecar.fuse.mount  # noqa: E402,F401
import sidecar.metrics  # noqa: E402,F401
import sidecar.server  # noqa: E402,F401

BAD_OUTPUT = ("Traceback", "InvalidStateError", "Exception in callback", "Fatal Python error")


def child(config, mountpoint: Path, log_path: Path) -> int:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    logging.basicConfig(level=logging.WARNING, format="dda: %(levelname)s: %(message)s", force=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return asyncio.run(serve(config, mountpoint, port=0, bind="127.0.0.1"))


def wait_mounted(mountpoint: Path, pid: int, timeout: float = 30.0) -> int | None:
    """None once the child's mount is live; its wait status if it exited before that."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        entry = mount_entry(mountpoint)
        if entry and entry[1].startswith("fuse"):
            return None
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def main(argv: list[str]) -> int:
    repo, mountpoint, cache, runs = argv[0], Path(argv[1]), Path(argv[2]), int(argv[3])
    config = load_config({"repo": repo, "cache_dir": str(cache)}, env={})
    rng = random.Random(int(os.environ.get("DDA_SIGTERM_SEED", "16")))
    logs = cache.parent / "sigterm-logs"
    logs.mkdir(parents=True, exist_ok=True)
    failures = 0
    started = time.monotonic()
    for run in range(runs):
        log_path = logs / f"run-{run}.log"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            # The child leaves through main()'s return and the interpreter's normal shutdown,
            # as `dda sidecar` does: a crash at exit shows too.
            return child(config, mountpoint, log_path)
        problem = None
        reader = None
        early = wait_mounted(mountpoint, pid)
        if early is not None:
            problem = f"never mounted (exit {os.waitstatus_to_exitcode(early)})"
        else:
            reader = subprocess.Popen(["sh", "-c", f"while :; do find '{mountpoint}' -type f -exec cat {{}} + "
                                                   f">/dev/null 2>&1; done"], start_new_session=True)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGTERM)
        status = early if early is not None else os.waitpid(pid, 0)[1]
        if reader is not None:
            os.killpg(reader.pid, signal.SIGKILL)
            reader.wait()
        output = log_path.read_text(errors="replace")
        code = os.waitstatus_to_exitcode(status)
        if problem is None and code != 0:
            problem = f"exit {code}" + (f" (signal {signal.Signals(-code).name})" if code < 0 else "")
        if problem is None and any(bad in output for bad in BAD_OUTPUT):
            problem = "error output"
        entry = mount_entry(mountpoint)
        if entry and entry[1].startswith("fuse"):
            problem = (problem + "; " if problem else "") + "left mounted"
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        if problem:
            failures += 1
            tail = " | ".join(output.strip().splitlines()[-4:])
            print(f"run {run}: {problem}: {tail}", flush=True)
    print(f"runs {runs} failures {failures} seconds {time.monotonic() - started:.1f}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
