"""The injected pod's data path, emulated with Linux mount namespaces (see k8s_podemu.py): the
"sidecar" (`dda mount` in a namespace with shared propagation, i.e. Bidirectional) mounts
into the pod's volume; the "app" (a namespace with slave propagation, i.e. HostToContainer,
created before the mount) reads the repository through it; SIGTERM to the sidecar leaves no
stale mount in either namespace. Offline: a local git repository and a local DVC remote."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DDA = str(Path(sys.executable).parent / "dda")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("unshare")
    or not shutil.which("nsenter") or not shutil.which("fusermount3"),
    reason="needs root, /dev/fuse, util-linux unshare/nsenter and fuse3")


def emulate(tmp_path: Path, volume: str, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                           str(HERE / "k8s_podemu.py"), "--workdir", str(tmp_path), "--volume", volume, "--dda", DDA, *extra],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(report: dict) -> None:
    assert report["app_listing"] == ["README.md", "data"]
    assert report["app_readme_ok"] is True
    assert report["app_files_ok"] and all(report["app_files_ok"].values()), report["app_files_ok"]
    assert report["app_write_refused"] is True                      # read-only
    # the mount reached the node's volume (Bidirectional) and the app (HostToContainer) ...
    assert all(len(v) == 1 for v in report["mounted"].values()), report["mounted"]
    assert " master:" in report["mounted"]["app"][0]                # a slave in the app namespace
    assert " shared:" in report["mounted"]["sidecar"][0]
    # ... but not a container without HostToContainer
    assert report["private_listing"] == []
    # SIGTERM: clean exit, no stale mount anywhere, the app sees the empty volume again
    assert report["sidecar_exit"] == 0 and report["stop_seconds"] < 10
    assert report["after"] == {"node": [], "app": []}, report["after"]
    assert report["app_after_listing"] == [] and report["app_after_ls_error"] == ""


def test_sidecar_mount_propagates_to_the_app_and_sigterm_cleans_up(tmp_path):
    report = emulate(tmp_path, "bind")
    assert "error" not in report, report.get("error")
    check(report)


def test_volume_with_its_own_filesystem(tmp_path):
    """As in a real pod: the volume is a mount of another filesystem than the container's root
    (an emptyDir on the node's disk, or tmpfs), so the mountpoint is itself a mount point."""
    report = emulate(tmp_path, "tmpfs")
    if "already a mount point" in report.get("error", ""):
        pytest.xfail("sidecar/fuse/mountpoint.prepare() refuses to mount over a volume mount point: "
                     "the sidecar cannot mount in a real pod until it accepts a non-FUSE mount there")
    assert "error" not in report, report.get("error")
    check(report)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dda_sidecar_with_the_env_the_webhook_injects(tmp_path):
    """The container the webhook injects, run for real: `dda sidecar` configured only by the
    injected env; its /readyz (the startupProbe) passes only once the app sees the files."""
    sys.path.insert(0, str(HERE))
    from k8s_tools import decode_patch, load_review

    from sidecar.webhook.mutate import WebhookConfig, mutate

    review = load_review("job_single_repo.json")
    review["request"]["object"]["metadata"]["annotations"]["dda-sidecar.io/revision"] = "v1"   # the sample's tag
    # this emulation is the privileged mode's (propagation); the csi mode's: tests/test_csi.py
    response = mutate(review, WebhookConfig.load(env={}, mode="privileged"))["response"]
    sidecar = next(op["value"][0] for op in decode_patch(response) if op["path"] == "/spec/initContainers")
    assert sidecar["args"] == ["sidecar"]
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    env.update(DDA_PORT=str(_free_port()), DDA_BIND="127.0.0.1")    # this machine's network is shared
    report = emulate(tmp_path, "bind", "--entrypoint", "sidecar", "--env-json", json.dumps(env))
    assert "error" not in report, report.get("error")
    assert report["app_saw_files_when_ready"] is True
    assert report["healthz"] == 200
    assert any(name.startswith("dda_") for name in report["metric_names"]), report["metric_names"]
    check(report)
