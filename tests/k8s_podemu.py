"""A pod, emulated with Linux mount namespaces (run as root, inside a private "node" mount
namespace: `unshare --mount --propagation private -- python k8s_podemu.py ARGS`, so nothing
leaks into the machine's mount table even if this script dies).

    node ns     the pod's volume: a directory made a shared mount (kubelet's pod dir is rshared);
                --volume bind: a bind mount of a directory (same filesystem as its parent)
                --volume tmpfs: a filesystem of its own (an emptyDir, as a container sees it)
    app ns      `unshare --mount --propagation slave`, started BEFORE the sidecar mounts
                (mountPropagation: HostToContainer)
    private ns  `unshare --mount --propagation private`: what an app container without
                HostToContainer would see (nothing)
    sidecar ns  `unshare --mount --propagation shared -- dda mount REPO VOLUME`
                (mountPropagation: Bidirectional)

The app reads files through the mount (checked against the DVC md5s of the remote); SIGTERM
to the sidecar must leave no FUSE mount in the node or app namespace. Prints a JSON report.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from sidecar.remotes.base import object_path
from sidecar.sample import make_sample_repo


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, check=check, timeout=60)


def in_ns(pid: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "--", *args], capture_output=True, timeout=60)


def fuse_mounts(mountinfo: str, path: str) -> list[str]:
    return [line for line in mountinfo.splitlines() if line.split()[4] == path and " - fuse" in line]


def wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--volume", choices=("bind", "tmpfs"), default="bind")
    parser.add_argument("--dda", required=True)
    parser.add_argument("--entrypoint", choices=("mount", "sidecar"), default="mount",
                        help="sidecar: `dda sidecar` configured by --env-json (the injected container's env), "
                             "ready when /readyz answers 200, as the startupProbe sees it")
    parser.add_argument("--env-json", default="{}")
    ns = parser.parse_args()
    work = Path(ns.workdir)
    report: dict = {"volume": ns.volume}
    repo, remote = make_sample_repo(work / "sample", images=12)
    volume = work / "pod" / "volumes" / "dda-data"
    volume.mkdir(parents=True)
    if ns.volume == "bind":
        sh("mount", "--bind", str(volume), str(volume))
    else:
        sh("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(volume))
    sh("mount", "--make-shared", str(volume))
    vol = str(volume)

    # what the files must be: the DVC manifest of data/images, from the remote itself
    dir_md5 = yaml.safe_load((repo / "data" / "images.dvc").read_text())["outs"][0]["md5"][: -len(".dir")]
    manifest = json.loads((remote / object_path(dir_md5, legacy=False, is_dir=True)).read_bytes())
    wanted = {f"data/images/{e['relpath']}": e["md5"] for e in manifest[:5]}
    wanted_readme = (repo / "README.md").read_bytes()

    app = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "--", "sleep", "600"])
    private = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sleep", "600"])
    own_ns = os.readlink("/proc/self/ns/mnt")
    assert wait_for(lambda: os.readlink(f"/proc/{app.pid}/ns/mnt") != own_ns
                    and os.readlink(f"/proc/{private.pid}/ns/mnt") != own_ns, 10), "namespaces not created"
    port = None
    if ns.entrypoint == "mount":
        command, env = [ns.dda, "mount", str(repo), vol, "--cache-dir", str(work / "cache")], dict(os.environ)
    else:
        injected = json.loads(ns.env_json)
        port = injected["DDA_PORT"]
        # the pod's env, with this machine's paths: the repository is local here
        env = {**os.environ, **injected, "DDA_REPO": str(repo), "DDA_MOUNT": vol, "DDA_CACHE_DIR": str(work / "cache")}
        command = [ns.dda, "sidecar"]
    sidecar = subprocess.Popen(["unshare", "--mount", "--propagation", "shared", "--", *command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def probe(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as answer:
                return answer.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0

    def is_ready() -> bool:
        if ns.entrypoint == "mount":
            return in_ns(app.pid, "test", "-f", f"{vol}/README.md").returncode == 0
        if probe("/readyz") != 200:
            return False
        # the startupProbe passed: the app must see the files at once, never an empty directory
        report["app_saw_files_when_ready"] = in_ns(app.pid, "test", "-f", f"{vol}/README.md").returncode == 0
        return True

    try:
        started = time.monotonic()
        ready = wait_for(lambda: sidecar.poll() is not None or is_ready(), 60)
        if sidecar.poll() is not None:
            _, err = sidecar.communicate()
            report.update(error=err.strip()[-2000:], sidecar_exit=sidecar.returncode)
            print(json.dumps(report))
            return 0
        assert ready, "the app never saw the repository"
        report["mount_seconds"] = round(time.monotonic() - started, 2)
        report["app_listing"] = sorted(in_ns(app.pid, "ls", vol).stdout.decode().split())
        report["app_readme_ok"] = in_ns(app.pid, "cat", f"{vol}/README.md").stdout == wanted_readme
        report["app_files_ok"] = {
            path: hashlib.md5(in_ns(app.pid, "cat", f"{vol}/{path}").stdout).hexdigest() == md5
            for path, md5 in wanted.items()}
        report["app_write_refused"] = in_ns(app.pid, "touch", f"{vol}/new-file").returncode != 0
        report["private_listing"] = sorted(in_ns(private.pid, "ls", "-A", vol).stdout.decode().split())
        mi = {"node": Path("/proc/self/mountinfo").read_text(),
              "app": in_ns(app.pid, "cat", "/proc/self/mountinfo").stdout.decode(),
              "sidecar": Path(f"/proc/{sidecar.pid}/mountinfo").read_text()}
        report["mounted"] = {k: fuse_mounts(v, vol) for k, v in mi.items()}
        if ns.entrypoint == "sidecar":
            report["healthz"] = probe("/healthz")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                report["metric_names"] = sorted({line.split("{")[0].split()[0] for line in answer.read().decode().splitlines()
                                                 if line.startswith("dda_")})

        sidecar.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = sidecar.communicate(timeout=30)
        report["sidecar_exit"] = sidecar.returncode
        report["stop_seconds"] = round(time.monotonic() - t0, 2)
        mi_after = {"node": Path("/proc/self/mountinfo").read_text(),
                    "app": in_ns(app.pid, "cat", "/proc/self/mountinfo").stdout.decode()}
        report["after"] = {k: fuse_mounts(v, vol) for k, v in mi_after.items()}
        listing = in_ns(app.pid, "ls", "-A", vol)
        report["app_after_listing"] = listing.stdout.decode().split()
        report["app_after_ls_error"] = listing.stderr.decode().strip()
    finally:
        for proc in (sidecar, app, private):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        sh("umount", "-l", vol, check=False)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
