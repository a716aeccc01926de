"""`dda csi`: run the CSI node plugin (a DaemonSet's privileged container)."""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..settings import add_arguments, flag_values, load_config

CSI_FLAGS = ("csi_endpoint", "csi_node_id", "csi_kubelet_dir", "csi_driver_name")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("csi", help="CSI node plugin: mounts /dev/fuse for pods' unprivileged sidecars",
                       description="Serve the CSI Identity and Node services on a unix socket: NodePublishVolume "
                                   "mounts a FUSE connection at the pod's volume and hands its descriptor to the "
                                   "pod's sidecar (`dda sidecar --fuse-fd-socket`); NodeUnpublishVolume unmounts.")
    add_arguments(p, CSI_FLAGS)
    p.add_argument("--config", dest="config_file", help="YAML config file [DDA_CONFIG]")
    p.add_argument("-v", "--verbose", action="store_true", help="log every call (info level)")
    return p


def run(ns: argparse.Namespace) -> int:
    from .node import serve, socket_path

    config = load_config(flag_values(ns, CSI_FLAGS), env=os.environ, config_file=getattr(ns, "config_file", None))
    try:
        socket_path(config.csi_endpoint)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if os.geteuid() != 0:
        raise ConfigError("dda csi mounts FUSE file systems for pods: run it as root (a privileged DaemonSet)")
    node_id = config.csi_node_id or os.environ.get("KUBE_NODE_NAME") or socket.gethostname()
    return asyncio.run(serve(config.csi_endpoint, node_id, Path(config.csi_kubelet_dir), config.csi_driver_name))
