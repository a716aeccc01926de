"""Issue 16, must work 5: the webhook-mutated pod, played for real with `podman kube play`.

The image is built from our install steps (tests/podman_image.py: Debian debootstrap, then
scripts/image-install.sh's steps with `podman run --rootfs`, then `podman import`; no
registry), once per suite run (cached by a hash of its inputs). The pod is the webhook's own
`mutate()` output for a Job's pod carrying the annotation, its app container the same image
running a small reader; tests/podman_pod.py lists the few changes podman 4.3 needs and why.
The repository is served by `git daemon` (git://, which the webhook accepts) and the fixture
DVC HTTP remote, both on 127.0.0.1 (the pod uses the host's network).

- privileged mode: the sidecar mounts FUSE itself (privileged, Bidirectional propagation);
  the app reads every byte; SIGTERM to the sidecar unmounts (exit 0), and `podman kube down`
  leaves no pod, container or mount.
- csi mode (the default): the node plugin `dda csi` runs in a privileged container of its
  own; the test plays the kubelet with real CSI messages (NodePublishVolume into the pod's
  volume folder, NodeUnpublishVolume at the end); the pod's sidecar runs as uid 65534 with no
  capabilities and serves the descriptor it collects; the app reads every byte.

Needs root, /dev/fuse, podman, runc, catatonit and debootstrap (scripts/bootstrap.sh test
installs them). Without podman the tests fail, they are not skipped: CI must run them.
"""
from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jsonpatch
import pytest

from k8s_tools import decode_patch, load_review
from mounting import wait_until
from podman_image import Podman, PodmanMissing, containers_conf, ensure_image
from podman_pod import (PlayedPod, for_podman, host_process_status, mount_points, podman_mounts, rshared_bind,
                        unmount_all)
from servers import GitDaemonServer, free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")

NOBODY = 65534
APP = "trainer"

# The app: waits for the sidecar's /readyz (the kubelet's startupProbe gate, which podman does
# not play), then reads every file under the mount and prints one JSON line: per file its size
# and sha256, or the errno of a failed read.
READER = r"""
import hashlib, json, os, sys, time, urllib.request
port, root = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 240
while True:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the sidecar never became ready")
    time.sleep(0.3)
files, errors = {}, {}
for top, dirs, names in os.walk(root):
    dirs.sort()
    for name in sorted(names):
        path = os.path.join(top, name)
        rel = os.path.relpath(path, root)
        try:
            with open(path, "rb") as f:
                data = f.read()
            files[rel] = [len(data), hashlib.sha256(data).hexdigest()]
        except OSError as err:
            errors[rel] = err.errno
try:
    open(os.path.join(root, "written-by-app"), "wb").close()
    write_refused = False
except OSError:
    write_refused = True
print(json.dumps({"files": files, "errors": errors, "uid": os.getuid(), "write_refused": write_refused,
                  "top": sorted(os.listdir(root))}))
"""


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def podman(tmp_path_factory) -> Podman:
    try:
        return Podman(containers_conf(tmp_path_factory.mktemp("podman")))
    except PodmanMissing as err:
        pytest.fail(str(err))   # CI has podman: never skip there


@pytest.fixture(scope="session")
def sidecar_image(podman) -> str:
    """The image's tag; built once per input hash (the build's step times go to stderr)."""
    tag, steps = ensure_image(podman)
    print(f"\n[podman] image {tag}: " + (f"built, seconds per step {steps}" if steps else "cached"),
          file=sys.stderr)
    return tag


@pytest.fixture(scope="session")
def git_daemon(session_dir, git_server, fixture_repos):
    srv = GitDaemonServer(session_dir / "git-daemon", git_server.root).start()
    yield srv
    srv.stop()


@pytest.fixture()
def world():
    """A folder every user may traverse (the unprivileged sidecar's socket and cache live
    below it); every mount below it is undone at the end."""
    base = Path(tempfile.mkdtemp(prefix="dda-pod-", dir="/var/tmp"))
    base.chmod(0o755)
    yield base
    unmount_all(base)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def played(podman, world):
    """PlayedPods to remove at the end, whatever happened."""
    pods: list[PlayedPod] = []
    yield pods
    for pod in pods:
        pod.close()


def _expected(repo) -> dict[str, bytes]:
    """Every file of the repository's "http" branch as `git clone` + `dvc pull` give it, except
    models/model.bin, whose remote is a folder on this machine the pod cannot see."""
    files = {rel: p.read_bytes() for rel, p in repo.expected_files().items() if rel != "models/model.bin"}
    files[".dvc/config"] = subprocess.run(["git", "-C", str(repo.local_path), "show",
                                           f"{repo.commits['http']}:.dvc/config"],
                                          capture_output=True, check=True).stdout
    return files


def _mutated(image: str, repo_url: str, revision: str, mode: str, port: int) -> tuple[dict, dict]:
    """(pod, sidecar container) from the webhook's own mutate(): a Job's pod (the admission
    sample) whose app is the reader, on our image."""
    from sidecar.webhook.mutate import WebhookConfig, mutate

    review = load_review("job_single_repo.json")
    pod = review["request"]["object"]
    pod["metadata"]["annotations"].update({"dda-sidecar.io/repo": repo_url, "dda-sidecar.io/revision": revision,
                                           "dda-sidecar.io/secret": "dvc-creds"})
    app = pod["spec"]["containers"][0]
    # base64: podman 4.3 could not read the pod with this script inline ("error converting YAML
    # to JSON: did not find expected '-' indicator")
    code = base64.b64encode(READER.encode()).decode()
    app.update(image=image, command=["python", "-c", f"import base64; exec(base64.b64decode('{code}'))",
                                     str(port), "/data"], resources={})
    config = WebhookConfig.load(env={}, mode=mode, image=image, metrics_port=port)
    response = mutate(review, config)["response"]
    assert response["allowed"], response
    mutated = jsonpatch.apply_patch(pod, decode_patch(response))
    sidecar = next(c for c in mutated["spec"]["initContainers"] if c["name"] == "dda-sidecar")
    return mutated, sidecar


def _check_read(report: dict, expected: dict[str, bytes]) -> None:
    import hashlib

    want = {rel: [len(b), hashlib.sha256(b).hexdigest()] for rel, b in expected.items()}
    assert report["files"] == want, {rel: (report["files"].get(rel), want.get(rel))
                                      for rel in set(want) | set(report["files"])
                                      if report["files"].get(rel) != want.get(rel)}
    # the output on a remote the pod cannot reach fails loudly, never with wrong bytes
    assert report["errors"] == {"models/model.bin": errno.EIO}, report["errors"]
    assert report["write_refused"] is True


def _report(pod: PlayedPod) -> dict:
    rc = pod.wait(APP, timeout=400)
    logs = pod.logs(APP)
    assert rc == 0, f"app exit {rc}:\n{logs[-3000:]}\n--- sidecar:\n{pod.logs('dda-sidecar')[-3000:]}"
    return json.loads(logs.strip().splitlines()[-1])


def _creds(http_remote) -> dict[str, dict[str, str]]:
    return {"dvc-creds": {"DDA_REMOTE_HTTP_USER": http_remote.user,
                          "DDA_REMOTE_HTTP_PASSWORD": http_remote.password,
                          "LD_PRELOAD": "/nonexistent.so"}}   # an undocumented key: never acted on


def _ready(port: int) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200
    except OSError:
        return False


def _timing(what: str, seconds: float) -> None:
    print(f"[podman] {what}: {seconds:.1f}s", file=sys.stderr)


# ---------------------------------------------------------------- privileged mode


def test_privileged_pod_reads_every_byte_and_leaves_no_mount(podman, sidecar_image, git_daemon, dvc3_repo,
                                                             http_remote, world, played):
    started = time.monotonic()
    port = free_port()
    pod, sidecar = _mutated(sidecar_image, git_daemon.url(dvc3_repo.name), dvc3_repo.commits["http"],
                            "privileged", port)
    assert sidecar["securityContext"]["privileged"] is True
    data_volume = next(m["name"] for m in sidecar["volumeMounts"] if m.get("mountPropagation") == "Bidirectional")
    volumes = world / "volumes"
    pod = for_podman(pod, volumes, secrets_data=_creds(http_remote), shared=(data_volume,))
    shared = volumes / data_volume
    baseline = mount_points(shared)   # our rshared bind
    played.append(running := PlayedPod(podman, pod, world))
    before = podman_mounts()
    _timing("privileged: kube play", running.play())

    report = _report(running)
    _check_read(report, _expected(dvc3_repo))
    assert report["uid"] == 10001   # the image's user: the app is no root
    # the sidecar's mount reached the host through the rshared folder (Bidirectional)
    assert [fs for _, fs in mount_points(shared) if fs.startswith("fuse")] == ["fuse.dda"], mount_points(shared)

    # SIGTERM: the sidecar unmounts and exits 0
    running.kill("dda-sidecar", "TERM")
    assert running.wait("dda-sidecar", timeout=60) == 0, running.logs("dda-sidecar")[-3000:]
    assert "Traceback" not in running.logs("dda-sidecar")
    assert mount_points(shared) == baseline, mount_points(shared)
    running.down()
    assert not running.exists() and running.containers() == []
    assert podman_mounts() == before, podman_mounts() ^ before
    unmount_all(world)
    assert mount_points(world) == []
    _timing("privileged: whole test", time.monotonic() - started)


def test_privileged_pod_deleted_while_serving(podman, sidecar_image, git_daemon, dvc3_repo, http_remote, world,
                                             played):
    """The pod deleted under a serving sidecar as the kubelet deletes it (SIGTERM with a grace
    period: `podman pod stop`, then `podman kube down`): the sidecar exits 0, no mount is left
    on the host. (A bare `podman kube down` SIGKILLs at once: see tests/podman_pod.py.)"""
    started = time.monotonic()
    port = free_port()
    pod, sidecar = _mutated(sidecar_image, git_daemon.url(dvc3_repo.name), dvc3_repo.commits["http"],
                            "privileged", port)
    data_volume = next(m["name"] for m in sidecar["volumeMounts"] if m.get("mountPropagation") == "Bidirectional")
    volumes = world / "volumes"
    pod = for_podman(pod, volumes, secrets_data=_creds(http_remote), shared=(data_volume,))
    played.append(running := PlayedPod(podman, pod, world))
    before = podman_mounts()
    running.play()
    _report(running)
    assert any(fs == "fuse.dda" for _, fs in mount_points(volumes / data_volume))
    assert running.state("dda-sidecar") == "running"
    running.stop(grace=30)
    assert running.inspect("dda-sidecar", "{{.State.ExitCode}}") == "0", running.logs("dda-sidecar")[-3000:]
    running.down()
    assert not running.exists() and running.containers() == []
    assert not any(fs.startswith("fuse") for _, fs in mount_points(world)), mount_points(world)
    assert podman_mounts() == before, podman_mounts() ^ before
    _timing("privileged, pod deleted: whole test", time.monotonic() - started)


# ---------------------------------------------------------------- csi mode


class NodePluginContainer:
    """`dda csi` in a privileged container of our image (the DaemonSet's plugin container):
    the kubelet's folder bind-mounted rshared, so the FUSE mounts it makes reach the host."""

    def __init__(self, podman: Podman, image: str, kubelet: Path, plugin_dir: Path):
        self.podman, self.kubelet, self.plugin_dir = podman, kubelet, plugin_dir
        self.name = f"dda-csi-node-{uuid.uuid4().hex[:8]}"
        self.endpoint = f"unix://{plugin_dir}/csi.sock"
        self.podman.run("run", "--detach", "--name", self.name, "--privileged", "--network", "host",
                        "--user", "0:0", "--volume", f"{kubelet}:{kubelet}:rshared",
                        "--volume", f"{plugin_dir}:/csi", image,
                        "csi", "--csi-endpoint", "unix:///csi/csi.sock", "--kubelet-dir", str(kubelet),
                        "--node-id", "podman-node")
        ok = wait_until(lambda: (plugin_dir / "csi.sock").exists() or not self.running(), 60)
        assert ok and self.running(), self.logs()
        from sidecar.csi.client import CsiClient

        self.client = CsiClient(self.endpoint)

    def running(self) -> bool:
        return self.podman.text("inspect", "--format", "{{.State.Running}}", self.name).strip() == "true"

    def logs(self) -> str:
        proc = self.podman.run("logs", self.name, check=False)
        return (proc.stdout + proc.stderr).decode(errors="replace")

    def call(self, service: str, method: str, request=None):
        return self.client.call(service, method, request)

    def stop(self) -> int:
        """SIGTERM (podman stop); the exit code."""
        self.client.close()
        self.podman.run("stop", "--time", "20", self.name, timeout=60)
        return int(self.podman.text("inspect", "--format", "{{.State.ExitCode}}", self.name).strip())

    def close(self) -> None:
        self.podman.run("rm", "--force", "--time", "5", self.name, check=False, timeout=60)


def test_csi_mode_pod_unprivileged_sidecar_reads_every_byte(podman, sidecar_image, git_daemon, dvc3_repo,
                                                            http_remote, world, played):
    from sidecar.csi import csi_pb2 as pb

    started = time.monotonic()
    port = free_port()
    pod, sidecar = _mutated(sidecar_image, git_daemon.url(dvc3_repo.name), dvc3_repo.commits["http"],
                            "csi", port)
    security = sidecar["securityContext"]
    assert security["runAsUser"] == NOBODY and security["capabilities"] == {"drop": ["ALL"]}
    assert security["allowPrivilegeEscalation"] is False and not security.get("privileged")
    csi_volume = next(v for v in pod["spec"]["volumes"] if "csi" in v)
    socket_volume = csi_volume["csi"]["volumeAttributes"]["socketVolume"]

    # the kubelet's folders: <root>/pods/<uid>/volumes/kubernetes.io~{csi,empty-dir}/<name>
    kubelet = world / "kubelet"
    rshared_bind(kubelet)
    kubelet.chmod(0o755)
    pod_uid = str(uuid.uuid4())
    volumes_root = kubelet / "pods" / pod_uid / "volumes"
    target = volumes_root / "kubernetes.io~csi" / csi_volume["name"] / "mount"
    socket_dir = volumes_root / "kubernetes.io~empty-dir" / socket_volume
    for d in (target.parent, socket_dir):
        d.mkdir(parents=True)
    for d in [kubelet / "pods", *kubelet.joinpath("pods").rglob("*")]:
        d.chmod(0o755)
    socket_dir.chmod(0o777)   # an emptyDir
    plugin_dir = world / "plugin"
    plugin_dir.mkdir()
    before = podman_mounts()
    plugin = NodePluginContainer(podman, sidecar_image, kubelet, plugin_dir)
    try:
        # the pod is created first, while the target is an empty folder (tests/podman_pod.py: podman
        # stats bind sources, and a FUSE mount nobody serves yet blocks every stat)
        adapted = for_podman(pod, world / "volumes", secrets_data=_creds(http_remote),
                             csi_targets={csi_volume["name"]: target}, emptydir_paths={socket_volume: socket_dir})
        target.mkdir()
        played.append(running := PlayedPod(podman, adapted, world))
        _timing("csi: kube play --start=false", running.play(start=False))

        # NodePublishVolume as the kubelet sends it for an ephemeral inline volume with podInfoOnMount
        context = {**csi_volume["csi"]["volumeAttributes"], "csi.storage.k8s.io/pod.name": adapted["metadata"]["name"],
                   "csi.storage.k8s.io/pod.namespace": "ml", "csi.storage.k8s.io/pod.uid": pod_uid,
                   "csi.storage.k8s.io/serviceAccount.name": "default", "csi.storage.k8s.io/ephemeral": "true"}
        volume_id = f"csi-{pod_uid}"
        publish = pb.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=str(target), readonly=True, volume_context=context,
            volume_capability=pb.VolumeCapability(
                mount=pb.VolumeCapability.MountVolume(),
                access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY)))
        t = time.monotonic()
        plugin.call("Node", "NodePublishVolume", publish)
        _timing("csi: NodePublishVolume", time.monotonic() - t)
        assert [fs for _, fs in mount_points(target)] == ["fuse.dda"], mount_points(target)
        assert (socket_dir / f"{csi_volume['name']}.sock").exists()

        # the native sidecar starts first; the app once the sidecar is ready (its startupProbe)
        t = time.monotonic()
        running.start("dda-sidecar")
        ready = wait_until(lambda: _ready(port) or running.state("dda-sidecar") != "running", 240, 0.3)
        assert ready and running.state("dda-sidecar") == "running", running.logs("dda-sidecar")[-3000:]
        _timing("csi: sidecar ready", time.monotonic() - t)
        assert not (socket_dir / f"{csi_volume['name']}.sock").exists(), "the descriptor was not collected"
        running.start()
        report = _report(running)
        _check_read(report, _expected(dvc3_repo))

        # the sidecar: uid 65534, no capabilities at all, no_new_privs (from the host's /proc)
        pid = int(running.inspect("dda-sidecar", "{{.State.Pid}}"))
        status = host_process_status(pid)
        assert status["Uid"].split() == [str(NOBODY)] * 4, status["Uid"]
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
        assert int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"] == "1", status
        assert running.inspect("dda-sidecar", "{{.HostConfig.Privileged}}") == "false"

        # the kubelet's teardown: containers first (podman kube down), then NodeUnpublishVolume
        running.down()
        assert not running.exists() and running.containers() == []
        t = time.monotonic()
        plugin.call("Node", "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id=volume_id,
                                                                                 target_path=str(target)))
        _timing("csi: NodeUnpublishVolume", time.monotonic() - t)
        assert mount_points(target) == [] and not target.exists()
        assert plugin.stop() == 0, plugin.logs()
        assert "Traceback" not in plugin.logs(), plugin.logs()
    finally:
        plugin.close()
    assert [m for m in mount_points(kubelet) if m[0] != str(kubelet)] == [], mount_points(kubelet)
    assert podman_mounts() == before, podman_mounts() ^ before
    _timing("csi: whole test", time.monotonic() - started)


def test_podman_leaves_nothing_behind(podman):
    """Runs last in this file: no pod or container of these tests is left."""
    names = podman.text("ps", "-a", "--format", "{{.Names}}").split()
    assert not [n for n in names if n.startswith(("train-resnet-", "dda-csi-node-"))], names
    pods = podman.text("pod", "ls", "--format", "{{.Name}}").split()
    assert not [n for n in pods if n.startswith("train-resnet-")], pods
