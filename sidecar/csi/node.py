"""The CSI node plugin (`dda csi`): the Identity and Node services of the CSI spec over gRPC
on a unix socket, for ephemeral inline volumes (GKE's Cloud Storage FUSE CSI driver's design).

NodePublishVolume opens /dev/fuse, mounts it at the kubelet's target path and offers the
descriptor on a unix socket in the pod's emptyDir (`socketVolume`), where the pod's unprivileged
sidecar (`dda sidecar --fuse-fd-socket`) collects it and serves FUSE on /dev/fd/N. The plugin is
the only privileged part; it never reads the repository. NodeUnpublishVolume unmounts (lazily
when busy), whether or not the sidecar is still there.

volume_context (the pod's CSI volume attributes, plus the kubelet's pod info with
podInfoOnMount): `csi.storage.k8s.io/pod.uid` (required), `socketVolume` (the emptyDir's name,
default "dda-csi"), `uid`/`gid` (the sidecar's user, default 65534).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
from google.protobuf import wrappers_pb2

from ..fuse.mountpoint import mount_entry
from . import csi_pb2 as pb
from .fusefd import FuseMountError, open_and_mount, unmount
from .handoff import listen, serve_once

log = logging.getLogger(__name__)

DRIVER_NAME = "csi.dda-sidecar.io"
POD_UID = "csi.storage.k8s.io/pod.uid"
SOCKET_VOLUME = "socketVolume"
DEFAULT_SOCKET_VOLUME = "dda-csi"
NOBODY = 65534
_UID = re.compile(r"^[0-9a-fA-F-]{1,64}$")             # a pod's metadata.uid
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")   # a volume name (DNS label)


class Invalid(Exception):
    """A request the plugin refuses: INVALID_ARGUMENT with this one-line message."""


@dataclass
class Handoff:
    """A published volume whose descriptor waits for the sidecar to collect it."""
    fd: int
    sock: socket.socket
    path: Path
    task: "asyncio.Task[None] | None" = None
    closed: bool = field(default=False)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        os.close(self.fd)
        self.sock.close()
        try:
            self.path.unlink()
        except OSError:
            pass


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dda-sidecar")
    except Exception:
        return "0"


class NodePlugin:
    """The state of one node plugin: the kubelet's root and the handoffs still pending."""

    def __init__(self, node_id: str, kubelet_dir: Path, driver_name: str = DRIVER_NAME):
        self.node_id = node_id
        self.kubelet_dir = Path(os.path.realpath(kubelet_dir))
        self.driver_name = driver_name
        self.pending: dict[Path, Handoff] = {}

    # ---------------------------------------------------------------- Identity

    async def GetPluginInfo(self, request: Any, context: Any) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=self.driver_name, vendor_version=_version())

    async def GetPluginCapabilities(self, request: Any, context: Any) -> pb.GetPluginCapabilitiesResponse:
        return pb.GetPluginCapabilitiesResponse()   # a node-only plugin: no controller service

    async def Probe(self, request: Any, context: Any) -> pb.ProbeResponse:
        ready = os.path.exists("/dev/fuse")
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))

    # ---------------------------------------------------------------- Node

    async def NodeGetInfo(self, request: Any, context: Any) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(node_id=self.node_id)

    async def NodeGetCapabilities(self, request: Any, context: Any) -> pb.NodeGetCapabilitiesResponse:
        return pb.NodeGetCapabilitiesResponse()   # no staging, no stats, no expansion

    def _target(self, text: str) -> Path:
        """The target path, its parent resolved, inside <kubelet_dir>/pods/ (never elsewhere).
        The target itself is not resolved: stat of a hung FUSE mount would block."""
        if not text or not text.startswith("/"):
            raise Invalid(f"target_path must be an absolute path, got {text[:200]!r}")
        path = Path(os.path.normpath(text))
        target = Path(os.path.realpath(path.parent)) / path.name
        if not target.is_relative_to(self.kubelet_dir / "pods") or path.name in ("", ".", ".."):
            raise Invalid(f"target_path {text[:200]!r} is not under {self.kubelet_dir / 'pods'}")
        return target

    def _socket_path(self, target: Path, ctx: dict[str, str]) -> Path:
        uid = ctx.get(POD_UID, "")
        if not _UID.match(uid):
            raise Invalid(f"volume_context has no valid {POD_UID} (is podInfoOnMount set on the CSIDriver?)")
        # kubelet: <root>/pods/<pod uid>/volumes/...: the pod info must name the pod whose
        # volume this is, so a descriptor is never offered in another pod's emptyDir
        parts = target.relative_to(self.kubelet_dir / "pods").parts
        if not parts or parts[0] != uid:
            raise Invalid(f"target_path is not a volume of pod {uid} ({POD_UID})")
        volume = ctx.get(SOCKET_VOLUME, DEFAULT_SOCKET_VOLUME)
        if not _LABEL.match(volume):
            raise Invalid(f"volume_context {SOCKET_VOLUME}: not a volume name: {volume[:80]!r}")
        # kubelet: <root>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume name>/mount
        name = target.parent.name if target.name == "mount" else target.name
        if not _LABEL.match(name):
            name = "volume"
        return self.kubelet_dir / "pods" / uid / "volumes" / "kubernetes.io~empty-dir" / volume / f"{name}.sock"

    @staticmethod
    def _owner(ctx: dict[str, str]) -> tuple[int, int]:
        try:
            uid, gid = int(ctx.get("uid", NOBODY)), int(ctx.get("gid", ctx.get("uid", NOBODY)))
        except ValueError:
            raise Invalid("volume_context uid/gid: expected whole numbers") from None
        if not (0 < uid < 2**31 and 0 < gid < 2**31):
            raise Invalid(f"volume_context uid/gid out of range (root is refused): {uid}:{gid}")
        return uid, gid

    async def NodePublishVolume(self, request: Any, context: Any) -> pb.NodePublishVolumeResponse:
        if not request.volume_id:
            raise Invalid("volume_id is empty")
        if request.volume_capability.HasField("block"):
            raise Invalid("block volumes are not supported (dda serves a file system)")
        target = self._target(request.target_path)
        ctx = dict(request.volume_context)
        path = self._socket_path(target, ctx)
        uid, gid = self._owner(ctx)
        entry = mount_entry(target, resolve=False)
        if entry is not None and entry[1] == "fuse.dda":
            return pb.NodePublishVolumeResponse()   # published already: idempotent, as the spec asks
        target.mkdir(parents=True, exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)   # the kubelet may set the emptyDir up after us
        fd = await asyncio.to_thread(open_and_mount, target, uid, gid, True)
        try:
            sock = listen(path, uid, gid)
        except BaseException:
            os.close(fd)
            await asyncio.to_thread(unmount, target)
            raise
        handoff = Handoff(fd, sock, path)
        self.pending[target] = handoff
        note = {"volume_id": request.volume_id, "target_path": str(target)}
        handoff.task = asyncio.create_task(self._hand_over(target, handoff, note))
        log.warning("published %s at %s; descriptor offered on %s", request.volume_id, target, path)
        return pb.NodePublishVolumeResponse()

    async def _hand_over(self, target: Path, handoff: Handoff, note: dict[str, str]) -> None:
        try:
            pid = await serve_once(handoff.sock, handoff.fd, note)
            log.warning("handed the FUSE descriptor of %s to pid %d", target, pid)
        except asyncio.CancelledError:
            raise
        except OSError as err:
            log.error("handing the FUSE descriptor of %s over failed: %s", target, err)
        finally:
            if self.pending.get(target) is handoff:
                del self.pending[target]
            handoff.close()   # our copy: the sidecar holds the connection from now on

    async def NodeUnpublishVolume(self, request: Any, context: Any) -> pb.NodeUnpublishVolumeResponse:
        if not request.volume_id:
            raise Invalid("volume_id is empty")
        target = self._target(request.target_path)
        handoff = self.pending.pop(target, None)
        if handoff is not None:
            handoff.close()
        for _ in range(8):   # stacked mounts: until none of ours is left
            entry = mount_entry(target, resolve=False)
            if entry is None or not entry[1].startswith("fuse"):
                break
            outcome = await asyncio.to_thread(unmount, target)
            log.warning("unpublished %s: %s %s", request.volume_id, outcome, target)
        try:
            target.rmdir()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise Invalid(f"{target}: cannot remove the target directory: {err.strerror}") from None
        return pb.NodeUnpublishVolumeResponse()

    def close(self) -> None:
        for handoff in list(self.pending.values()):
            handoff.close()
        self.pending.clear()


# -------------------------------------------------------------------- gRPC wiring

Handler = Callable[[Any, Any], Awaitable[Any]]


def _guard(method: Handler) -> Handler:
    """Our errors as gRPC status codes with one line; never a traceback to the kubelet."""

    async def call(request: Any, context: Any) -> Any:
        try:
            return await method(request, context)
        except Invalid as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except (FuseMountError, OSError) as err:
            await context.abort(grpc.StatusCode.INTERNAL, str(err) if isinstance(err, FuseMountError)
                                else f"{getattr(err, 'filename', '') or ''}: {err.strerror or err}")

    return call


def handlers(plugin: NodePlugin) -> list[grpc.GenericRpcHandler]:
    """gRPC handlers of the Identity and Node services, built from csi.proto's descriptors (the
    method and message names are the spec's)."""
    out = []
    for service in ("Identity", "Node"):
        desc = pb.DESCRIPTOR.services_by_name[service]
        methods = {
            m.name: grpc.unary_unary_rpc_method_handler(
                _guard(getattr(plugin, m.name)),
                request_deserializer=getattr(pb, m.input_type.name).FromString,
                response_serializer=getattr(pb, m.output_type.name).SerializeToString)
            for m in desc.methods}
        out.append(grpc.method_handlers_generic_handler(desc.full_name, methods))
    return out


def socket_path(endpoint: str) -> Path:
    """unix:///csi/csi.sock or /csi/csi.sock -> /csi/csi.sock (ValueError for anything else)."""
    path = endpoint[len("unix://"):] if endpoint.startswith("unix://") else endpoint
    if not path.startswith("/"):
        raise ValueError(f"CSI endpoint must be unix:///absolute/path, got {endpoint!r}")
    return Path(path)


async def serve(endpoint: str, node_id: str, kubelet_dir: Path, driver_name: str = DRIVER_NAME,
                ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns 0. The socket file is replaced if stale and removed
    at the end."""
    path = socket_path(endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    plugin = NodePlugin(node_id, kubelet_dir, driver_name)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(handlers(plugin))
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    os.chmod(path, 0o600)
    log.warning("CSI node plugin %s for node %s on unix://%s (kubelet %s)", driver_name, node_id, path,
                plugin.kubelet_dir)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready:
        ready()
    try:
        await stop.wait()
    finally:
        await server.stop(grace=2.0)
        plugin.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    return 0
