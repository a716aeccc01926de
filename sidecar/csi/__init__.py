"""CSI node plugin (`dda csi`): the privileged half of the unprivileged sidecar mode.

csi.proto: the CSI spec's messages we use (package csi.v1); csi_pb2.py is generated from it
by grpcio-tools and committed (tests/test_csi.py checks it matches). node.py: the Identity and
Node services. fusefd.py: /dev/fuse and mount(2). handoff.py: the descriptor over SCM_RIGHTS.
client.py: the kubelet's side, for tests.
"""
