"""`python -m sidecar.webhook.selftest --url https://SVC.NS.svc:443 --ca ca.crt`: the chart's
`helm test`. Verifies the TLS certificate against the CA (and the service's DNS name), checks
/healthz, and sends one AdmissionReview that must come back with a sidecar patch."""
from __future__ import annotations

import argparse
import base64
import json
import ssl
import sys
import urllib.request
import uuid

SAMPLE_POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"generateName": "dda-selftest-", "namespace": "default",
                 "annotations": {"dda-sidecar.io/repo": "https://dagshub.com/owner/dataset.git"}},
    "spec": {"containers": [{"name": "app", "image": "busybox"}]},
}


def selftest(url: str, ca_file: str) -> list[str]:
    ctx = ssl.create_default_context(cafile=ca_file)
    url = url.rstrip("/")
    with urllib.request.urlopen(url + "/healthz", context=ctx, timeout=10) as answer:
        assert answer.status == 200, f"/healthz answered {answer.status}"
    uid = str(uuid.uuid4())
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "default",
        "operation": "CREATE", "object": SAMPLE_POD, "dryRun": True}}
    request = urllib.request.Request(url + "/mutate", data=json.dumps(review).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, context=ctx, timeout=10) as answer:
        response = json.loads(answer.read())["response"]
    assert response["uid"] == uid and response["allowed"], f"unexpected answer: {response}"
    patch = json.loads(base64.b64decode(response["patch"]))
    sidecars = [op["value"] for op in patch if op["path"] in ("/spec/initContainers", "/spec/containers/0")]
    sidecars = [c for v in sidecars for c in (v if isinstance(v, list) else [v])]
    assert any(c.get("name") == "dda-sidecar" for c in sidecars), f"no sidecar in the patch: {patch}"
    return [f"TLS verified, /healthz ok, AdmissionReview {uid} answered with {len(patch)} patch operations",
            f"sidecar image {sidecars[0]['image']}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.webhook.selftest")
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", required=True)
    ns = parser.parse_args(argv)
    try:
        for line in selftest(ns.url, ns.ca):
            print(line)
    except Exception as err:  # report, do not trace: this is a test's verdict
        print(f"dda-sidecar webhook selftest FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
