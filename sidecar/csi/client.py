"""Calling a CSI plugin as the kubelet does: real CSI messages over gRPC on its unix socket.
For tests and for checking a running plugin by hand."""
from __future__ import annotations

from typing import Any

import grpc

from . import csi_pb2 as pb


class CsiClient:
    """`CsiClient("unix:///csi/csi.sock").call("Node", "NodePublishVolume", request)`; the
    response message, or grpc.RpcError with the plugin's status code and message."""

    def __init__(self, endpoint: str, timeout: float = 30.0):
        self.channel = grpc.insecure_channel(endpoint if endpoint.startswith("unix:") else f"unix://{endpoint}")
        self.timeout = timeout

    def call(self, service: str, method: str, request: Any = None) -> Any:
        desc = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method]
        request_cls = getattr(pb, desc.input_type.name)
        response_cls = getattr(pb, desc.output_type.name)
        stub = self.channel.unary_unary(f"/{desc.containing_service.full_name}/{method}",
                                        request_serializer=request_cls.SerializeToString,
                                        response_deserializer=response_cls.FromString)
        return stub(request if request is not None else request_cls(), timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CsiClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
