"""The chart's sidecar resource requests are measured, not guessed: an epoch read through a real
`dda sidecar` (tests/resources_probe.py, an HTTP remote, 4 readers) must fit the memory request,
and the request must not be several times what the sidecar uses (512Mi was 6x)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from sidecar.webhook.mutate import parse_quantity as quantity_bytes
from resources_probe import measure

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
VALUES = Path(__file__).resolve().parent.parent / "helm" / "dda-sidecar" / "values.yaml"


def test_memory_request_fits_a_measured_epoch(tmp_path):
    requests = yaml.safe_load(VALUES.read_text())["sidecar"]["resources"]["requests"]
    result = measure(tmp_path, images=1000, readers=4)
    assert result["files"] == 1000 and result["bytes"] > 80_000 * 1000
    peak = result["peak_rss_mib"] * 2**20
    request = quantity_bytes(requests["memory"])
    print(f"\nsidecar under a 1000-file epoch: {result}")
    assert peak < request, f"peak RSS {result['peak_rss_mib']} MiB is over the chart's request {requests['memory']}"
    assert request < 3 * peak, f"the request {requests['memory']} is over 3x the measured peak ({result})"
