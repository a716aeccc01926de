"""The CSI node plugin (`dda csi`) driven as the kubelet drives it: real CSI messages over gRPC on
its unix socket. NodePublishVolume mounts /dev/fuse at a target under a kubelet root and offers
the descriptor in the pod's emptyDir; `dda sidecar --fuse-fd-socket` collects it and serves the
repository as uid 65534 with no capabilities; every byte read through the target is compared;
NodeUnpublishVolume leaves no mount behind, with the sidecar stopped, killed, or still serving."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import pytest

from mounting import DDA, wait_until
from servers import free_port
from sidecar_util import http

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("setpriv"),
    reason="needs root, /dev/fuse and setpriv")

NOBODY = 65534
ROOT = Path(__file__).resolve().parent.parent


def mounted(path: Path) -> bool:
    """From the mount table alone: until the sidecar serves it, any stat of the mount waits for
    the FUSE INIT answer (the kubelet never stats inside a published target either)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _pb():
    from sidecar.csi import csi_pb2

    return csi_pb2


@pytest.fixture()
def world(tmp_path):
    """A folder every user may traverse (pytest's tmp_path is root's alone): the kubelet root and
    the sidecar's home and cache."""
    base = Path(tempfile.mkdtemp(prefix="dda-csi-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    for line in open("/proc/self/mountinfo"):
        point = line.split()[4]
        if point.startswith(str(base)):
            subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(base, ignore_errors=True)


def _serving(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class Plugin:
    """`dda csi` as a subprocess on a temporary endpoint and kubelet root."""

    def __init__(self, base: Path):
        self.kubelet = base / "kubelet"
        self.kubelet.mkdir(exist_ok=True)    # a restarted plugin finds the kubelet's state
        self.kubelet.chmod(0o755)
        self.endpoint = f"unix://{base}/plugin/csi.sock"
        self.log = base / f"plugin-{free_port()}.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen([DDA, "csi", "--csi-endpoint", self.endpoint, "--kubelet-dir",
                                      str(self.kubelet), "--node-id", "node-a"], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        # serving, not just a socket file (a crashed plugin leaves its file behind)
        assert wait_until(lambda: self.proc.poll() is not None or _serving(Path(self.endpoint[7:])), 30), self.output()
        assert self.proc.poll() is None, self.output()
        from sidecar.csi.client import CsiClient

        self.client = CsiClient(self.endpoint)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def call(self, service: str, method: str, request=None):
        return self.client.call(service, method, request)

    def stop(self) -> int | None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        finally:
            self._log.close()


@pytest.fixture()
def plugin(world):
    p = Plugin(world)
    yield p
    rc = p.stop()
    assert rc == 0, p.output()
    assert not Path(p.endpoint[7:]).exists(), "the plugin left its socket behind"
    assert "Traceback" not in p.output(), p.output()


class Pod:
    """One pod's CSI volume: the kubelet's paths and its publish request."""

    def __init__(self, plugin: Plugin, volume: str = "data"):
        self.uid = str(uuid.uuid4())
        pod_dir = plugin.kubelet / "pods" / self.uid
        self.target = pod_dir / "volumes" / "kubernetes.io~csi" / volume / "mount"
        self.target.parent.mkdir(parents=True)    # the kubelet creates the parent; the plugin the target
        self.socket = pod_dir / "volumes" / "kubernetes.io~empty-dir" / "dda-csi" / f"{volume}.sock"
        for d in (pod_dir, *pod_dir.rglob("*")):
            if d.is_dir():
                d.chmod(0o755)
        self.volume_id = f"csi-{self.uid}"
        self.context = {"csi.storage.k8s.io/pod.name": "train-0", "csi.storage.k8s.io/pod.namespace": "ml",
                        "csi.storage.k8s.io/pod.uid": self.uid, "csi.storage.k8s.io/serviceAccount.name": "default",
                        "csi.storage.k8s.io/ephemeral": "true", "socketVolume": "dda-csi"}

    def publish_request(self, **overrides):
        pb = _pb()
        fields = dict(volume_id=self.volume_id, target_path=str(self.target), readonly=True,
                      volume_capability=pb.VolumeCapability(
                          mount=pb.VolumeCapability.MountVolume(),
                          access_mode=pb.VolumeCapability.AccessMode(
                              mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY)),
                      volume_context=self.context)
        fields.update(overrides)
        return pb.NodePublishVolumeRequest(**fields)

    def unpublish_request(self):
        return _pb().NodeUnpublishVolumeRequest(volume_id=self.volume_id, target_path=str(self.target))


class UnprivilegedSidecar:
    """`dda sidecar --fuse-fd-socket` as uid/gid 65534, no groups, no capabilities at all
    (bounding set emptied, no_new_privs), as the pod's sidecar container runs."""

    def __init__(self, base: Path, socket: Path, repo, http_remote, pod_env: dict[str, str] | None = None,
                 user: tuple[int, int] = (NOBODY, NOBODY)):
        """`pod_env`: the container's environment from a pod spec (paths already mapped to
        the node), instead of this test's own; the repository and port are the test's."""
        self.home = base / f"sidecar-{free_port()}"
        self.home.mkdir()
        self.home.chmod(0o700)
        os.chown(self.home, *user)
        self.port = free_port()
        self.log = base / f"{self.home.name}.log"
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HOME": str(self.home)}
        env.update(pod_env if pod_env is not None else
                   {"DDA_CACHE_DIR": str(self.home / "cache"), "DDA_FUSE_FD_SOCKET": str(socket)})
        env.update({"DDA_REPO": repo.git_url, "DDA_REVISION": repo.branches["http"],
                    "DDA_PORT": str(self.port), "DDA_BIND": "127.0.0.1",
                    "DDA_REMOTE_HTTP_USER": http_remote.user, "DDA_REMOTE_HTTP_PASSWORD": http_remote.password})
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", "--inh-caps=-all",
             "--bounding-set=-all", "--no-new-privs", DDA, "sidecar"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.home)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        try:
            return http("GET", f"http://127.0.0.1:{self.port}/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 90) -> None:
        ok = wait_until(lambda: self.proc.poll() is not None or self.ready(), timeout, 0.1)
        assert ok and self.proc.poll() is None, f"sidecar not ready (rc {self.proc.poll()}):\n{self.output()}"

    def credentials(self) -> tuple[str, str, str]:
        """(real/effective uids, effective capabilities, NoNewPrivs) from /proc/<pid>/status."""
        status = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
                      if ":" in line)
        return status["Uid"].split()[1], status["CapEff"].strip(), status["NoNewPrivs"].strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def _read_all(target: Path, expected: dict[str, Path]) -> None:
    for rel, ref in sorted(expected.items()):
        got = (target / rel).read_bytes()
        assert got == ref.read_bytes(), f"{rel}: {len(got)} bytes differ from the reference"


def test_generated_messages_match_the_proto(tmp_path):
    """csi_pb2.py is committed; it must be what grpcio-tools makes of csi.proto."""
    from importlib.resources import files

    from grpc_tools import protoc

    well_known = files("grpc_tools") / "_proto"   # google/protobuf/wrappers.proto
    assert protoc.main(["protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={tmp_path}",
                        str(ROOT / "sidecar/csi/csi.proto")]) == 0
    fresh = (tmp_path / "sidecar/csi/csi_pb2.py").read_text()
    committed = (ROOT / "sidecar/csi/csi_pb2.py").read_text()
    assert fresh == committed, "sidecar/csi/csi_pb2.py is stale: regenerate it (see csi.proto)"


def test_identity_and_node_info(plugin):
    pb = _pb()
    assert plugin.call("Identity", "Probe").ready.value is True
    info = plugin.call("Identity", "GetPluginInfo")
    assert info.name == "csi.dda-sidecar.io" and info.vendor_version
    assert list(plugin.call("Identity", "GetPluginCapabilities").capabilities) == []
    assert list(plugin.call("Node", "NodeGetCapabilities").capabilities) == []   # no staging
    assert plugin.call("Node", "NodeGetInfo").node_id == "node-a"
    assert isinstance(pb.ProbeResponse().ready.value, bool)


def test_bad_requests_get_one_line_and_mount_nothing(plugin, world):
    pod = Pod(plugin)
    outside = world / "elsewhere"
    cases = [
        (pod.publish_request(target_path=str(outside)), "is not under"),
        (pod.publish_request(target_path=str(pod.target.parent / ".." / ".." / ".." / ".." / ".." / "x")),
         "is not under"),
        (pod.publish_request(volume_context={"socketVolume": "dda-csi"}), "podInfoOnMount"),
        (pod.publish_request(volume_context={**pod.context, "csi.storage.k8s.io/pod.uid": str(uuid.uuid4())}),
         "is not a volume of pod"),
        (pod.publish_request(volume_context={**pod.context, "socketVolume": "../../etc"}), "not a volume name"),
        (pod.publish_request(volume_context={**pod.context, "uid": "0"}), "root is refused"),
        (pod.publish_request(volume_id=""), "volume_id is empty"),
        (pod.publish_request(volume_capability=_pb().VolumeCapability(block=_pb().VolumeCapability.BlockVolume())),
         "block volumes"),
    ]
    for request, fragment in cases:
        with pytest.raises(grpc.RpcError) as info:
            plugin.call("Node", "NodePublishVolume", request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert fragment in info.value.details() and "\n" not in info.value.details(), info.value.details()
    assert not outside.exists() and not pod.target.exists() and not mounted(pod.target)
    # unpublishing what was never published is fine (the kubelet retries)
    plugin.call("Node", "NodeUnpublishVolume", pod.unpublish_request())


@pytest.mark.parametrize("ending", ["sigterm", "sigkill", "serving"])
def test_publish_serve_unprivileged_and_unpublish(plugin, world, dvc3_repo, http_remote, ending):
    # the "http" branch differs from the reference checkout only in which remote .dvc/config names
    # and models/model.bin lives on the "extra" remote, a local folder under pytest's root-only
    # tmp dir that uid 65534 may not read
    expected = {rel: p for rel, p in dvc3_repo.expected_files().items()
                if rel not in (".dvc/config", "models/model.bin")}
    pod = Pod(plugin)
    plugin.call("Node", "NodePublishVolume", pod.publish_request())
    assert mounted(pod.target) and pod.socket.exists()
    plugin.call("Node", "NodePublishVolume", pod.publish_request())   # idempotent
    assert os.stat(pod.socket).st_uid == NOBODY and os.stat(pod.socket).st_mode & 0o077 == 0

    sidecar = UnprivilegedSidecar(world, pod.socket, dvc3_repo, http_remote)
    try:
        sidecar.wait_ready()
        uid, caps, nnp = sidecar.credentials()
        assert (uid, int(caps, 16), nnp) == (str(NOBODY), 0, "1")
        assert wait_until(lambda: not pod.socket.exists(), 10), "the plugin kept offering the descriptor"
        _read_all(pod.target, expected)
        names = sorted(os.listdir(pod.target))
        assert names == sorted({rel.split("/")[0] for rel in dvc3_repo.expected_files()}), names

        if ending == "sigterm":
            sidecar.proc.send_signal(signal.SIGTERM)
            assert sidecar.proc.wait(30) == 0, sidecar.output()
            # the app fails loudly on a dead mount; it never hangs
            with pytest.raises(OSError) as dead:
                os.listdir(pod.target)
            assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        elif ending == "sigkill":
            held = open(pod.target / sorted(expected)[0], "rb")   # an open file keeps the mount busy
            sidecar.proc.kill()
            sidecar.proc.wait(10)
        started = time.monotonic()
        plugin.call("Node", "NodeUnpublishVolume", pod.unpublish_request())
        assert time.monotonic() - started < 10
        assert not mounted(pod.target) and not pod.target.exists()
        if ending == "sigkill":
            held.close()
        if ending == "serving":   # the kubelet tore the volume down under a live sidecar: it exits
            assert sidecar.proc.wait(30) is not None, sidecar.output()
        plugin.call("Node", "NodeUnpublishVolume", pod.unpublish_request())   # idempotent
        assert "Traceback" not in sidecar.output(), sidecar.output()
    finally:
        sidecar.close()


def test_unpublish_before_the_sidecar_came(plugin):
    """The pod went away before its sidecar collected the descriptor: the offer is withdrawn."""
    pod = Pod(plugin)
    plugin.call("Node", "NodePublishVolume", pod.publish_request())
    assert mounted(pod.target) and pod.socket.exists()
    plugin.call("Node", "NodeUnpublishVolume", pod.unpublish_request())
    assert not mounted(pod.target) and not pod.target.exists() and not pod.socket.exists()


def test_csi_command_says_what_is_wrong_in_one_line(world):
    """A bad endpoint, and a plugin started without root (e.g. root's HOME left in place)."""
    proc = subprocess.run([DDA, "csi", "--csi-endpoint", "tcp://10.0.0.1:5"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "dda: error: CSI endpoint must be unix:///absolute/path, got 'tcp://10.0.0.1:5'"], proc.stderr
    proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", DDA, "csi",
                           "--csi-endpoint", f"unix://{world}/c.sock"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": "/root"})
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "run it as root" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_the_webhooks_pod_meets_the_node_plugin(plugin, world, dvc3_repo, http_remote):
    """The kubelet's part played from the webhook's own csi-mode patch: the CSI volume's
    attributes plus the pod info are the volume context of NodePublishVolume; the sidecar runs
    with the container's environment, user and (no) capabilities from the patch, its paths on
    the pod's emptyDirs; the app's mount path is only a name to it (DDA_MOUNT, for hints), and
    /readyz turns ready without it. Every byte is read through the published target; then the
    kubelet tears the volume down under the live sidecar, which exits."""
    import copy
    import sys

    import jsonpatch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from k8s_tools import decode_patch, load_review

    from sidecar.webhook.mutate import WebhookConfig, mutate

    review = load_review("job_single_repo.json")
    response = mutate(copy.deepcopy(review), WebhookConfig.load(env={}))["response"]
    spec = jsonpatch.apply_patch(review["request"]["object"], decode_patch(response))["spec"]
    side = spec["initContainers"][0]
    volume = next(v for v in spec["volumes"] if "csi" in v)
    assert volume["csi"]["driver"] == "csi.dda-sidecar.io"   # the driver name the plugin answers to

    pod = Pod(plugin, volume["name"])
    pod.context = {**volume["csi"]["volumeAttributes"], **{k: v for k, v in pod.context.items()
                                                          if k.startswith("csi.storage.k8s.io/")}}
    empty_dirs = pod.target.parents[2] / "kubernetes.io~empty-dir"
    mounts = {m["mountPath"]: m["name"] for m in side["volumeMounts"]}
    for v in spec["volumes"]:
        if "emptyDir" in v and v["name"] in mounts.values():   # the kubelet sets them up 0777
            (empty_dirs / v["name"]).mkdir(parents=True)
            (empty_dirs / v["name"]).chmod(0o777)

    def on_node(path: str) -> str:
        for at in sorted(mounts, key=len, reverse=True):
            if path == at or path.startswith(at + "/"):
                return str(empty_dirs / mounts[at] / path[len(at):].lstrip("/"))
        raise AssertionError(f"{path}: on no volume of the sidecar")

    env = {e["name"]: e["value"] for e in side["env"]}
    assert env["DDA_MOUNT"] == "/data" and not Path("/data/README.md").exists()
    env.update(DDA_FUSE_FD_SOCKET=on_node(env["DDA_FUSE_FD_SOCKET"]), DDA_CACHE_DIR=on_node(env["DDA_CACHE_DIR"]),
               TMPDIR=on_node("/tmp"), HOME=on_node("/tmp"))
    assert env["DDA_FUSE_FD_SOCKET"] == str(pod.socket)

    plugin.call("Node", "NodePublishVolume", pod.publish_request(readonly=volume["csi"]["readOnly"]))
    assert mounted(pod.target) and pod.socket.exists()
    security = side["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]} and security["allowPrivilegeEscalation"] is False
    sidecar = UnprivilegedSidecar(world, pod.socket, dvc3_repo, http_remote, pod_env=env,
                                  user=(security["runAsUser"], security["runAsGroup"]))
    try:
        sidecar.wait_ready()
        uid, caps, nnp = sidecar.credentials()
        assert (int(uid), int(caps, 16), nnp) == (security["runAsUser"], 0, "1")
        expected = {rel: p for rel, p in dvc3_repo.expected_files().items()
                    if rel not in (".dvc/config", "models/model.bin")}
        _read_all(pod.target, expected)
        assert any((empty_dirs / mounts["/dda-cache"]).iterdir()), "the cache emptyDir stayed empty"
        plugin.call("Node", "NodeUnpublishVolume", pod.unpublish_request())
        assert not mounted(pod.target) and not pod.target.exists()
        assert sidecar.proc.wait(30) is not None, sidecar.output()
        assert "Traceback" not in sidecar.output(), sidecar.output()
    finally:
        sidecar.close()


def test_unpublish_after_the_plugin_restarted_and_the_sidecar_never_came(world):
    """The node plugin crashed (SIGKILL: its offer and descriptor gone, the FUSE connection
    with no server) and came back; the kubelet then tears the volume down: the new plugin
    unmounts from the mount table alone and removes the target."""
    first = Plugin(world)
    pod = Pod(first)
    first.call("Node", "NodePublishVolume", pod.publish_request())
    assert mounted(pod.target)
    first.client.close()
    first.proc.kill()
    first.proc.wait(10)
    first._log.close()
    assert mounted(pod.target)
    second = Plugin(world)
    try:
        second.call("Node", "NodeUnpublishVolume", pod.unpublish_request())
        assert not mounted(pod.target) and not pod.target.exists()
        second.call("Node", "NodeUnpublishVolume", pod.unpublish_request())   # idempotent
    finally:
        assert second.stop() == 0, second.output()
    assert "Traceback" not in second.output(), second.output()
