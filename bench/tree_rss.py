"""Daemon memory for a DVC-identical 1M-file tree (1,000 x 1,000 in one tracked directory),
without writing 1M objects: the manifest (exactly as dvc-data writes it) is served by the
in-memory fake remote, the repository is real git. Prints RSS after the snapshot is built
(VmRSS) and its peak while building (VmHWM).

    python bench/tree_rss.py [--folders 1000] [--per 1000]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dvclayout import _git   # noqa: E402
from sidecar.config import load_config   # noqa: E402
from sidecar.engine import Engine   # noqa: E402
from sidecar.remotes.fake import FakeRemote   # noqa: E402


def rss() -> tuple[float, float]:
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            got[key] = int(value.split()[0]) / 1024
    return got["VmRSS"], got["VmHWM"]


def reset_peak() -> None:
    """Start VmHWM from the current RSS (Linux: clear_refs 5), so the peak is the snapshot's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def ls_recursive(ns: argparse.Namespace, repo: Path, work: Path) -> None:
    """`dda ls -R` (sidecar.cli.main, stdout to a file) once every size is in the cache's
    persistent index (as after `dda sizes publish` or a remount): its peak RSS is the
    snapshot plus one batch of rows, not the whole listing."""
    import os

    from sidecar.cli import main as dda
    from sidecar.store import Store

    store = Store(work / "cache", 1 << 30, 1 << 20)
    for d in range(ns.folders):
        store.index.record_sizes({hashlib.md5(f"{d}/{f}".encode()).hexdigest(): 100 + (d * ns.per + f) % 901
                                  for f in range(ns.per)})
    store.close()
    gc.collect()
    reset_peak()
    before, _ = rss()
    out = work / "ls.txt"
    saved = os.dup(1)
    with open(out, "w") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            started = time.perf_counter()
            code = dda(["ls", "-R", str(repo), "--rev", "main", "--cache-dir", str(work / "cache")])
            sys.stdout.flush()
        finally:
            os.dup2(saved, 1)
    took = time.perf_counter() - started
    _, peak = rss()
    with open(out, "rb") as f:
        lines = sum(1 for _ in f)
    print(f"dda ls -R: exit {code}, {lines:,} lines in {took:.1f}s; RSS before {before:.0f} MB, peak {peak:.0f} MB")


def mount_daemon(repo: Path, work: Path) -> None:
    """`dda mount --daemon` of the 1M tree (local remote, fresh cache): the daemon's RSS after
    the mount, its peak so far (VmHWM: the snapshot build), and after `find -type f` (names
    only: no request, no size)."""
    import os
    import shutil
    import subprocess

    from mounting import daemon_pid

    dda = shutil.which("dda") or str(Path(sys.executable).parent / "dda")
    mp = work / "mnt"
    mp.mkdir()
    env = {**os.environ, "DDA_CACHE_DIR": str(work / "cache-mount"), "DDA_REMOTE_STORAGE_URL": str(work / "remote")}
    started = time.perf_counter()
    subprocess.run([dda, "mount", str(repo), str(mp), "--daemon"], check=True, env=env, timeout=3600,
                   capture_output=True)
    took = time.perf_counter() - started
    pid = daemon_pid(mp)

    def status() -> tuple[float, float]:
        got = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                got[key] = int(value.split()[0]) / 1024
        return got["VmRSS"], got["VmHWM"]

    try:
        after, peak = status()
        started = time.perf_counter()
        found = subprocess.run(f"find {mp} -type f | wc -l", shell=True, capture_output=True, text=True,
                               timeout=3600).stdout.strip()
        walked = time.perf_counter() - started
        now, peak2 = status()
        print(f"dda mount: {took:.1f}s; daemon RSS {after:.0f} MB (peak while building {peak:.0f} MB); "
              f"find -type f: {found} files in {walked:.1f}s, RSS then {now:.0f} MB (peak {peak2:.0f} MB)")
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folders", type=int, default=1000)
    parser.add_argument("--per", type=int, default=1000)
    parser.add_argument("--unique-names", action="store_true",
                        help="file names unique across folders (ImageNet-like n0xxx_yyy.JPEG), not f000000.bin in each")
    parser.add_argument("--ls", action="store_true", help="also `dda ls -R` of the whole tree, in this process "
                                                          "(sizes from the persistent index: 0 requests)")
    parser.add_argument("--mount", action="store_true", help="also `dda mount --daemon` with a local remote "
                                                             "holding the manifest: daemon RSS, peak, find -type f")
    ns = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dda-rss-"))
    # Exactly what json.dumps(sorted entries, sort_keys=True) gives, written without a
    # list of 1M dicts (that list would be this process's peak, not the daemon's).
    manifest = ("[" + ", ".join(json.dumps({"md5": hashlib.md5(f"{d}/{f}".encode()).hexdigest(),
                                            "relpath": f"d{d:04d}/" + (f"n{d:08d}_{f:06d}.JPEG" if ns.unique_names
                                                                        else f"f{f:06d}.bin")}, sort_keys=True)
                                for d in range(ns.folders) for f in range(ns.per)) + "]").encode()
    mmd5 = hashlib.md5(manifest).hexdigest()
    fake = FakeRemote.register("rss")
    fake.objects[f"files/md5/{mmd5[:2]}/{mmd5[2:]}.dir"] = manifest
    if ns.mount:   # the same manifest in a local remote folder, for the daemon (no data objects needed)
        local = work / "remote" / "files" / "md5" / mmd5[:2]
        local.mkdir(parents=True)
        (local / f"{mmd5[2:]}.dir").write_bytes(manifest)
    del manifest
    repo = work / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / ".dvc" / "config").write_text("[core]\n    remote = storage\n['remote \"storage\"']\n    url = fake://rss\n")
    (repo / "data.dvc").write_text(f"outs:\n- md5: {mmd5}.dir\n  nfiles: {ns.folders * ns.per}\n  hash: md5\n  path: data\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "data")
    gc.collect()
    reset_peak()
    base, _ = rss()
    fake_bytes = sum(len(v) for v in fake.objects.values()) / 1e6

    async def go() -> None:
        started = time.perf_counter()
        config = load_config({"repo": str(repo), "revision": "main", "cache_dir": str(work / "cache")}, env={})
        async with await Engine.open(config) as engine:
            took = time.perf_counter() - started
            fake.objects.clear()
            gc.collect()
            now, peak = rss()
            # memory_bytes() exists only on the compact tree (not ported onto parity's tree)
            measure = getattr(engine.tree, "memory_bytes", None)
            structures = f"{measure() / 1e6:.0f} MB" if measure else "n/a"
            print(f"files {len(engine.tree.files):,}: snapshot {took:.1f}s; RSS before {base:.0f} MB "
                  f"(incl. the fake remote's {fake_bytes:.0f} MB manifest), after {now:.0f} MB, peak {peak:.0f} MB; "
                  f"tree structures {structures}")

    try:
        asyncio.run(go())
        if ns.ls:
            ls_recursive(ns, repo, work)
        if ns.mount:
            mount_daemon(repo, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
