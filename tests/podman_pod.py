"""Playing a webhook-mutated pod with `podman kube play` (podman 4.3, Debian 12).

`for_podman()` changes the mutated pod only where podman 4.3 cannot run a Kubernetes pod as
the kubelet would; each change says why:

- Native sidecars (init containers with restartPolicy Always) become the first regular
  containers: podman rejects probes on init containers and would wait for an init container
  to exit. The kubelet's startupProbe gate is played by the app itself, which waits for the
  sidecar's /readyz before reading.
- Volumes become hostPath folders of the test's: an emptyDir as a folder of mode 0777 (what
  the kubelet makes), the privileged mode's data emptyDir as an rshared bind mount (podman
  propagates a mount between containers only through an rshared host folder), a Secret as a
  folder of its files with the volume's defaultMode (podman 4.3 panics on a Secret volume
  backed by a podman secret made from a Secret manifest), a
  CSI volume as the target path the node plugin published (the kubelet bind-mounts it), and
  the service-account token's projected volume is dropped with its mounts (no API server).
- hostNetwork: the test's servers listen on 127.0.0.1 and this machine has no CNI bridge; the
  containers' `ports` go ("PortMappings can only be used with Bridge or slirp4netns
  networking"), they are the host's ports anyway.
- metadata.name from generateName (podman names containers <pod>-<container>).

Pitfalls met (also in docs/ARCHITECTURE.md):
- podman needs catatonit for a pod's infra container (Debian's podman only recommends it;
  `--no-install-recommends` leaves it out).
- `podman kube down` (4.3) SIGKILLs the containers with no SIGTERM: a privileged sidecar then
  cannot unmount and its FUSE mount stays, dead, in the host folder. The kubelet deletes a pod
  with SIGTERM and a grace period: `podman pod stop` then `kube down` (PlayedPod.stop, down). In
  csi mode NodeUnpublishVolume removes the mount even after a SIGKILL.
- A FUSE mount whose server has not answered the kernel's INIT blocks every stat of it, and
  `podman kube play` stats each bind source while it creates the containers: played after
  NodePublishVolume, it hangs. The csi test plays the kubelet's order instead: the pod is
  created (`kube play --start=false`) while the target is still an empty folder, then
  NodePublishVolume, then the sidecar is started and becomes ready, then the app (a native
  sidecar's start order; the kubelet never stats inside a published target).
- A multi-line script inline in a container's command made podman 4.3 fail to read the pod
  ("error converting YAML to JSON: did not find expected '-' indicator"): it goes base64.
"""
from __future__ import annotations

import copy
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

from podman_image import Podman


def mount_points(under: Path | str) -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount at or below `under`, from the test's own
    /proc/self/mountinfo (the host's mount namespace)."""
    under = str(under).rstrip("/")
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            fstype = fields[fields.index("-") + 1]
            if point == under or point.startswith(under + "/"):
                out.append((point, fstype))
    return out


def podman_mounts() -> set[str]:
    """Mount points podman made in the host's namespace (container storage, shm, its netns;
    other programs' network namespaces in /run/netns are not ours)."""
    return {point for top in ("/var/lib/containers", "/run/containers", "/run/netns", "/run/libpod")
            for point, _ in mount_points(top)
            if not point.startswith("/run/netns/") or point.startswith(("/run/netns/netns-", "/run/netns/cni-"))}


def rshared_bind(path: Path) -> None:
    """`path` bind-mounted onto itself and made rshared, so mounts made below it in a
    container with Bidirectional (rshared) propagation reach the host and other containers."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "--make-rshared", str(path)], check=True)


def unmount_all(under: Path) -> None:
    """Lazily unmount everything at or below `under`, deepest first (finalizers)."""
    for point, _ in sorted(mount_points(under), key=lambda m: -len(m[0])):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _dir(path: Path, mode: int = 0o777) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


def for_podman(pod: dict, volumes_dir: Path, *, secrets_data: dict[str, dict[str, str]] | None = None,
               csi_targets: dict[str, Path] | None = None, emptydir_paths: dict[str, Path] | None = None,
               shared: tuple[str, ...] = ()) -> dict:
    """The pod as podman 4.3 can play it (module docstring). `secrets_data`: Secret name ->
    {key: value}; `csi_targets`: volume name -> the published target path; `emptydir_paths`:
    volume name -> a given folder (the kubelet's emptyDir path, where the node plugin put its
    socket); `shared`: emptyDir volumes made rshared binds (mount propagation)."""
    pod = copy.deepcopy(pod)
    meta, spec = pod["metadata"], pod["spec"]
    if "name" not in meta:
        meta["name"] = meta.pop("generateName", "pod-") + secrets.token_hex(3)
    for key in ("ownerReferences", "managedFields", "creationTimestamp"):
        meta.pop(key, None)
    pod.pop("status", None)
    spec["hostNetwork"] = True

    native = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    spec["initContainers"] = [c for c in spec.get("initContainers", []) if c not in native]
    if not spec["initContainers"]:
        del spec["initContainers"]
    for c in native:
        del c["restartPolicy"]
    spec["containers"] = native + spec["containers"]
    for c in spec["containers"] + spec.get("initContainers", []):
        # with host networking podman refuses port mappings; the ports are the host's anyway
        c.pop("ports", None)

    dropped = set()
    volumes = []
    for v in spec.get("volumes", []):
        name = v["name"]
        if "projected" in v:
            dropped.add(name)
            continue
        if "emptyDir" in v:
            path = (emptydir_paths or {}).get(name) or _dir(volumes_dir / name)
            if name in shared:
                rshared_bind(path)
                path.chmod(0o777)
            volumes.append({"name": name, "hostPath": {"path": str(path), "type": "Directory"}})
        elif "secret" in v:
            path = _dir(volumes_dir / name, 0o755)
            mode = v["secret"].get("defaultMode", 0o644)
            for key, value in (secrets_data or {})[v["secret"]["secretName"]].items():
                (path / key).write_text(value)
                (path / key).chmod(mode)
            volumes.append({"name": name, "hostPath": {"path": str(path), "type": "Directory"}})
        elif "csi" in v:
            # no `type`: podman would stat the target, a FUSE mount whose server (the sidecar)
            # has not started yet, and wait for it forever
            volumes.append({"name": name, "hostPath": {"path": str((csi_targets or {})[name])}})
        else:
            volumes.append(v)
    spec["volumes"] = volumes
    for c in spec["containers"] + spec.get("initContainers", []):
        c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] not in dropped]
    return pod


class PlayedPod:
    """`podman kube play` of one pod YAML; `down()` is `podman kube down`; `close()` removes
    whatever is left (finalizers)."""

    def __init__(self, podman: Podman, pod: dict, workdir: Path):
        self.podman, self.pod = podman, pod
        self.name = pod["metadata"]["name"]
        self.yaml = workdir / f"{self.name}.yaml"
        # JSON (YAML's subset): podman 4.3's YAML reader failed on PyYAML's dump of this pod
        self.yaml.write_text(json.dumps(pod, indent=1))
        self.played = False

    def container(self, name: str) -> str:
        return f"{self.name}-{name}"

    def play(self, start: bool = True) -> float:
        """Seconds `podman kube play` took (`start=False`: the pod is created, not started).
        Raises with podman's stderr."""
        started = time.monotonic()
        self.played = True
        proc = self.podman.run("kube", "play", f"--start={str(start).lower()}", str(self.yaml), check=False,
                               timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"podman kube play failed ({proc.returncode}): "
                                 f"{(proc.stdout + proc.stderr).decode(errors='replace')[-4000:]}")
        return time.monotonic() - started

    def start(self, container: str | None = None) -> None:
        """`podman start` of one container (with the pod's infra container), or the whole pod."""
        if container:
            self.podman.run("start", self.container(container), timeout=120)
        else:
            self.podman.run("pod", "start", self.name, timeout=120)

    def wait(self, container: str, timeout: float = 300) -> int:
        """The container's exit code once it has exited."""
        out = self.podman.text("wait", self.container(container), timeout=timeout).strip()
        return int(out.splitlines()[-1])

    def logs(self, container: str) -> str:
        proc = self.podman.run("logs", self.container(container), check=False)
        return (proc.stdout + proc.stderr).decode(errors="replace")

    def inspect(self, container: str, fmt: str) -> str:
        return self.podman.text("inspect", "--format", fmt, self.container(container)).strip()

    def state(self, container: str) -> str:
        return self.inspect(container, "{{.State.Status}}")

    def kill(self, container: str, signal: str = "TERM") -> None:
        self.podman.run("kill", "--signal", signal, self.container(container))

    def down(self) -> None:
        """`podman kube down`. In podman 4.3 it kills the containers at once (SIGKILL, no
        SIGTERM and no grace period), unlike the kubelet deleting a pod: see delete()."""
        self.podman.run("kube", "down", str(self.yaml), timeout=120)

    def stop(self, grace: int = 30) -> None:
        """SIGTERM to every container, SIGKILL after `grace` seconds (`podman pod stop`): the
        kubelet's way of deleting a pod, before `down()`."""
        self.podman.run("pod", "stop", "--time", str(grace), self.name, timeout=grace + 60)

    def exists(self) -> bool:
        return self.podman.run("pod", "exists", self.name, check=False).returncode == 0

    def containers(self) -> list[str]:
        return self.podman.text("ps", "-a", "--filter", f"pod={self.name}", "--format", "{{.Names}}").split()

    def close(self) -> None:
        if self.played and self.exists():
            self.podman.run("pod", "rm", "--force", "--time", "5", self.name, check=False, timeout=120)


def host_process_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict (a container's process, seen from the host)."""
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line)


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out
