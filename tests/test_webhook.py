"""The mutating admission webhook: pure JSONPatch logic on real AdmissionReview payloads, then
the same payloads through the HTTPS server (trustme certificates) and `dda webhook` itself.
Every mutated pod must take its patch cleanly (jsonpatch) and validate against the Kubernetes
1.29 OpenAPI schema in strict mode (kubernetes-validate)."""
from __future__ import annotations

import copy
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import jsonpatch
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k8s_tools import ADMISSION, ca_and_server_cert, decode_patch, load_review, validate_k8s  # noqa: E402

from sidecar.webhook.app import WebhookServer  # noqa: E402
from sidecar.webhook.mutate import (  # noqa: E402
    BadReview,
    WebhookConfig,
    mutate,
    parse_quantity,
    repo_problem,
)

# The tests written for the privileged mode keep it explicitly (the default is csi, tested below).
CONFIG = WebhookConfig.load(env={}, image="registry.example.com/dda-sidecar:0.1.0", mode="privileged")
FIXTURES = sorted(p.name for p in ADMISSION.glob("*.json"))


def run(review: dict, config: WebhookConfig = CONFIG) -> dict:
    answer = mutate(copy.deepcopy(review), config)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == review["request"]["uid"]
    return answer["response"]


def apply(review: dict, config: WebhookConfig = CONFIG) -> tuple[dict, list[dict]]:
    response = run(review, config)
    assert response["allowed"], response
    ops = decode_patch(response)
    pod = jsonpatch.apply_patch(review["request"]["object"], ops)
    assert validate_k8s(pod) == "schema"
    return pod, ops


def container(pod: dict, name: str) -> dict:
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise KeyError(name)


def env(c: dict) -> dict:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def secret_volume(pod: dict, c: dict) -> dict | None:
    """The Secret volume a container mounts at the documented path (None: no Secret)."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for m in c.get("volumeMounts", []):
        if m["mountPath"] == "/etc/dda-sidecar/secret":
            assert m["readOnly"] is True and env(c)["DDA_SECRET_DIR"] == m["mountPath"]
            return volumes[m["name"]]["secret"]
    return None


# ------------------------------------------------------------------ pure logic, real payloads


def test_fixtures_are_realistic_admission_reviews():
    assert len(FIXTURES) >= 8
    for name in FIXTURES:
        review = load_review(name)
        request = review["request"]
        assert review["apiVersion"] == "admission.k8s.io/v1" and review["kind"] == "AdmissionReview"
        assert request["resource"] == {"group": "", "version": "v1", "resource": "pods"}
        assert request["operation"] in ("CREATE", "UPDATE") and request["uid"]
        # the pods themselves are valid Kubernetes objects before we touch them
        assert validate_k8s(request["object"]) == "schema", name


def test_single_repository_native_sidecar():
    review = load_review("job_single_repo.json")
    pod, ops = apply(review)
    side = pod["spec"]["initContainers"][0]
    assert side["name"] == "dda-sidecar" and side["restartPolicy"] == "Always"
    assert side["image"] == "registry.example.com/dda-sidecar:0.1.0" and side["args"] == ["sidecar"]
    assert side["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 9400}
    assert side["startupProbe"]["periodSeconds"] * side["startupProbe"]["failureThreshold"] == 300
    assert side["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert side["ports"] == [{"name": "dda-metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert side["securityContext"]["privileged"] is True and side["securityContext"]["runAsNonRoot"] is False
    assert side["resources"]["limits"]["memory"] == "2Gi"
    e = env(side)
    assert e["DDA_REPO"] == "https://dagshub.com/owner/dataset.git" and e["DDA_REVISION"] == "v1.2"
    assert e["DDA_MOUNT"] == "/data" and e["DDA_CACHE_DIR"] == "/dda-cache" and e["DDA_PORT"] == "9400"
    assert "envFrom" not in side
    assert {"name": "dda-data", "mountPath": "/data", "mountPropagation": "Bidirectional"} in side["volumeMounts"]
    trainer = container(pod, "trainer")
    assert {"name": "dda-data", "mountPath": "/data", "mountPropagation": "HostToContainer",
            "readOnly": True} in trainer["volumeMounts"]
    assert trainer["volumeMounts"][0]["name"].startswith("kube-api-access")   # existing mounts untouched
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dda-data"] == {"name": "dda-data", "emptyDir": {}}
    assert volumes["dda-cache"]["emptyDir"]["sizeLimit"] == "20Gi"
    # cache budget clamped below the volume's limit (90% by default)
    budget = int(e["DDA_CACHE_SIZE"].rstrip("M")) * 2**20
    assert budget <= 0.9 * parse_quantity("20Gi") < parse_quantity("20Gi")
    # JSON-pointer escaping of the annotation key, and the injection marker
    assert {"op": "add", "path": "/metadata/annotations/dda-sidecar.io~1injected", "value": "dda-sidecar"} in ops
    assert pod["metadata"]["annotations"]["dda-sidecar.io/injected"] == "dda-sidecar"


def test_several_repositories_containers_init_containers_and_security_contexts():
    review = load_review("deployment_multi_repo.json")
    before = review["request"]["object"]
    pod, _ = apply(review)
    inits = [c["name"] for c in pod["spec"]["initContainers"]]
    assert inits == ["dda-sidecar-images", "dda-sidecar-labels", "fetch-config"]   # ours start first
    images, labels = container(pod, "dda-sidecar-images"), container(pod, "dda-sidecar-labels")
    assert env(images)["DDA_MOUNT"] == "/data/images" and env(labels)["DDA_MOUNT"] == "/workspace/labels"
    assert env(labels)["DDA_REPO"] == "git@github.com:acme/labels.git" and env(labels)["DDA_REVISION"] == "3f2c1ab"
    assert env(images)["DDA_SUBDIR"] == "data/images" and "DDA_SUBDIR" not in env(labels)
    # the Secret as read-only files of its own sidecar only, never envFrom (issue 16)
    assert secret_volume(pod, images) == {"secretName": "dagshub-creds", "defaultMode": 0o400}
    assert "envFrom" not in images and "envFrom" not in labels and secret_volume(pod, labels) is None
    # the app already listens on 9400: the sidecars take the next free ports, names unique
    assert [p["containerPort"] for p in images["ports"] + labels["ports"]] == [9401, 9402]
    assert [p["name"] for p in images["ports"] + labels["ports"]] == ["dda-metrics", "dda-metrics-1"]
    # every app container and the pod's own init container see both repositories, read-only
    for name in ("fetch-config", "trainer", "tensorboard", "log-shipper"):
        mounts = {m["name"]: m for m in container(pod, name)["volumeMounts"]}
        for vol, path in (("dda-data-images", "/data/images"), ("dda-data-labels", "/workspace/labels")):
            assert mounts[vol]["mountPath"] == path and mounts[vol]["mountPropagation"] == "HostToContainer"
            assert mounts[vol]["readOnly"] is True
    # per-pod cache size, one shared cache volume
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dda-cache"]["emptyDir"]["sizeLimit"] == "50Gi"
    assert [v["name"] for v in pod["spec"]["volumes"][:5]] == [v["name"] for v in before["spec"]["volumes"]]
    # the pod keeps runAsNonRoot; the sidecar overrides it for itself only (FUSE needs root)
    assert pod["spec"]["securityContext"] == before["spec"]["securityContext"]
    assert images["securityContext"]["runAsUser"] == 0 and images["securityContext"]["runAsNonRoot"] is False
    assert container(pod, "trainer")["securityContext"] == container(before, "trainer")["securityContext"]
    assert pod["metadata"]["annotations"]["dda-sidecar.io/injected"] == "dda-sidecar-images,dda-sidecar-labels"


def test_pod_without_volumes_or_init_containers():
    pod, ops = apply(load_review("pod_no_volumes.json"))
    paths = {op["path"] for op in ops}
    assert {"/spec/volumes", "/spec/initContainers", "/spec/containers/0/volumeMounts"} <= paths
    side = pod["spec"]["initContainers"][0]
    assert env(side)["DDA_REPO"].startswith("ssh://git@gitlab.example.com:2222/")
    assert secret_volume(pod, side) == {"secretName": "corpus-creds", "defaultMode": 0o400} and "envFrom" not in side
    assert pod["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/home/jovyan/corpus"


@pytest.mark.parametrize("name", ["job_single_repo.json", "deployment_multi_repo.json", "pod_no_volumes.json"])
def test_idempotent_under_reinvocation(name):
    review = load_review(name)
    pod, _ = apply(review)
    again = copy.deepcopy(review)
    again["request"]["object"] = pod
    assert "patch" not in run(again) and run(again)["allowed"]
    for mode in ({"native_sidecar": "false"}, {"cache_mode": "hostPath"}, {"mode": "privileged"},
                 {"mode": "privileged", "native_sidecar": "false"}):
        config = WebhookConfig.load(env={}, **mode)
        pod, _ = apply(review, config)
        again["request"]["object"] = pod
        assert "patch" not in run(again, config)


def test_already_injected_fixture_gives_an_empty_patch():
    response = run(load_review("already_injected.json"))
    assert response["allowed"] and "patch" not in response and "warnings" not in response


def test_reinvocation_after_another_webhook_added_a_container():
    review = load_review("already_injected.json")
    review["request"]["object"]["spec"]["containers"].append({"name": "istio-proxy", "image": "istio/proxyv2:1.23.2"})
    pod, ops = apply(review)
    assert ops == [{"op": "add", "path": "/spec/containers/1/volumeMounts", "value": [
        {"name": "dda-data", "mountPath": "/data", "mountPropagation": "HostToContainer", "readOnly": True}]}]
    review["request"]["object"] = pod
    assert "patch" not in run(review)


def test_fallback_without_native_sidecars():
    config = WebhookConfig.load(env={"DDA_WEBHOOK_NATIVE_SIDECAR": "false"})
    review = load_review("deployment_multi_repo.json")
    pod, _ = apply(review, config)
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["dda-sidecar-images", "dda-sidecar-labels", "trainer", "tensorboard", "log-shipper"]
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["fetch-config"]
    assert not any("dda-data" in m["name"] for m in pod["spec"]["initContainers"][0]["volumeMounts"])
    side = pod["spec"]["containers"][0]
    assert "restartPolicy" not in side
    hook = side["lifecycle"]["postStart"]["exec"]["command"]
    assert hook[:3] == ["python", "-m", "sidecar.webhook.wait_ready"] and "9401" in hook
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "trainer"
    for name in ("trainer", "tensorboard", "log-shipper"):
        assert {m["name"] for m in container(pod, name)["volumeMounts"]} >= {"dda-data-images", "dda-data-labels"}


def test_node_shared_hostpath_cache():
    config = WebhookConfig.load(env={"DDA_WEBHOOK_CACHE_MODE": "hostPath", "DDA_WEBHOOK_CACHE_SIZE": "200Gi",
                                     "DDA_WEBHOOK_CACHE_HOST_PATH": "/mnt/nvme/dda"})
    review = load_review("job_single_repo.json")
    pod, _ = apply(review, config)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dda-cache"]["hostPath"] == {"path": "/mnt/nvme/dda", "type": "DirectoryOrCreate"}
    assert env(pod["spec"]["initContainers"][0])["DDA_CACHE_SIZE"] == f"{200 * 1024}M"
    # a per-pod cache size means nothing on a node-shared cache: a warning, not an error
    review["request"]["object"]["metadata"]["annotations"]["dda-sidecar.io/cache-size"] = "10Gi"
    response = run(review, config)
    assert response["allowed"] and "patch" in response and "ignored" in response["warnings"][0]


def test_bad_annotations_are_rejected_with_messages_naming_them():
    review = load_review("bad_annotations.json")
    response = run(review)
    assert response["allowed"] is False and "patch" not in response
    message = response["status"]["message"]
    assert response["status"]["code"] == 400
    for fragment in ("dda-sidecar.io/repo: the repository URL embeds credentials",
                     "dda-sidecar.io/mount-path: 'data' must be an absolute path",
                     "dda-sidecar.io/secret: 'Dataset_Creds' is not a valid Secret name",
                     "dda-sidecar.io/revison: unknown dda-sidecar annotation"):
        assert fragment in message, message
    assert "ghp_SECRET123" not in json.dumps(response)        # a credential is never echoed


def test_bad_annotations_admitted_with_warnings_by_policy():
    config = WebhookConfig.load(env={"DDA_WEBHOOK_ON_INVALID": "warn"})
    response = run(load_review("bad_annotations.json"), config)
    assert response["allowed"] is True and "patch" not in response
    assert len(response["warnings"]) == 4 and all(w.startswith("dda-sidecar not injected: annotation dda-sidecar.io/")
                                                  for w in response["warnings"])
    assert "ghp_SECRET123" not in json.dumps(response)


BAD_VALUES = [
    ("repo", "http://example.com/o/r.git", "plain http"),
    ("repo", "file:///srv/repo", "scheme 'file'"),
    ("repo", "/srv/repo", "not a repository URL"),
    ("repo", "https://token@github.com/o/r.git", "embeds credentials"),
    ("repo", "ssh://git:pw@github.com/o/r.git", "embeds credentials"),
    ("repo", "https://github.com/o/r.git?private_token=x", "query string"),
    ("repo", "https://github.com", "names no repository path"),
    ("repo", "https://bad_host!/o/r", "valid host"),
    ("repo", "https://github.com/o/r .git", "whitespace"),
    ("repo", "", "is empty"),
    ("revision", "main..evil", "not a valid git ref"),
    ("revision", "-rf", "not a branch"),
    ("revision", "refs/heads/x.lock", "not a valid git ref"),
    ("revision", "$(reboot)", "not a branch"),
    ("mount-path", "/", "must not be /"),
    ("mount-path", "/etc/data", "reserved system directory /etc"),
    ("mount-path", "/tmp", "system directory /tmp"),
    ("mount-path", "/data/../etc", "normalized"),
    ("mount-path", "/data/", "normalized"),
    ("mount-path", "/var/run/secrets/kubernetes.io/serviceaccount", "reserved"),
    ("subdir", "../etc", "plain relative path"),
    ("subdir", "data//images", "plain relative path"),
    ("secret", "My-Secret", "not a valid Secret name"),
    ("secret", "a" * 254, "not a valid Secret name"),
    ("cache-size", "lots", "not a Kubernetes quantity"),
    ("cache-size", "100Mi", "below the 512Mi minimum"),
    ("inject", "maybe", "expected \"true\" or \"false\""),
    ("repo.Images", "https://github.com/o/r.git", "lowercase DNS label"),
    ("repo.a-very-long-repository-name", "https://github.com/o/r.git", "at most 20"),
    ("revision.other", "main", "set without dda-sidecar.io/repo.other"),
]


@pytest.mark.parametrize("key,value,fragment", BAD_VALUES, ids=[f"{k}={v[:30]}" for k, v, _ in BAD_VALUES])
def test_each_invalid_annotation(key, value, fragment):
    review = load_review("job_single_repo.json")
    annotations = review["request"]["object"]["metadata"]["annotations"]
    if key.partition(".")[0] == "repo" and "." not in key:
        annotations.pop("dda-sidecar.io/repo")
    annotations[f"dda-sidecar.io/{key}"] = value
    response = run(review)
    assert response["allowed"] is False, response
    message = response["status"]["message"]
    assert f"annotation dda-sidecar.io/{key}" in message and fragment in message, message
    if key == "repo" and value:
        assert value not in message          # URLs are never quoted back


def test_mount_path_collisions():
    review = load_review("deployment_multi_repo.json")
    annotations = review["request"]["object"]["metadata"]["annotations"]
    annotations["dda-sidecar.io/mount-path.images"] = "/checkpoints"
    message = run(review)["status"]["message"]
    assert "mount-path.images: '/checkpoints' collides with volumeMount '/checkpoints' of container 'trainer'" in message
    annotations["dda-sidecar.io/mount-path.images"] = "/workspace/labels/x"
    assert "overlaps '/workspace/labels'" in run(review)["status"]["message"]
    # the unnamed repository's default /data contains a named one's default /data/<name>
    annotations["dda-sidecar.io/mount-path.images"] = "/data/images"
    annotations["dda-sidecar.io/repo"] = "https://github.com/acme/more.git"
    assert "overlaps" in run(review)["status"]["message"]
    # a mount inside an existing volume (/workspace) is fine; one that hides a mount is not
    annotations.pop("dda-sidecar.io/repo")
    annotations["dda-sidecar.io/mount-path.images"] = "/"
    assert "must not be /" in run(review)["status"]["message"]


@pytest.mark.parametrize("url", ["https://dagshub.com/owner/dataset.git", "https://gitlab.example.com:8443/g/sub/r",
                                 "ssh://git@github.com/o/r.git", "git@github.com:o/r.git", "git://git.example.org/r.git",
                                 "github.com:o/r.git"])
def test_good_repository_urls(url):
    assert repo_problem(url) is None


def test_opt_out_and_not_annotated_and_other_operations():
    for name in ("opt_out.json", "not_annotated.json", "update.json"):
        response = run(load_review(name))
        assert response == {"uid": load_review(name)["request"]["uid"], "allowed": True}, name
    review = load_review("job_single_repo.json")
    review["request"]["object"]["metadata"]["annotations"]["dda-sidecar.io/inject"] = "false"
    assert "patch" not in run(review)
    review["request"]["object"]["metadata"]["annotations"]["dda-sidecar.io/inject"] = "true"
    assert "patch" in run(review)
    review["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    assert "patch" not in run(review)


def test_malformed_pods_never_crash_the_webhook():
    base = load_review("job_single_repo.json")
    breakers = [
        lambda pod: pod.update(spec=None),
        lambda pod: pod["spec"].update(containers="nope"),
        lambda pod: pod["spec"].update(volumes={"a": 1}),
        lambda pod: pod["metadata"].update(annotations=["x"]),
        lambda pod: pod["metadata"]["annotations"].update({"dda-sidecar.io/repo": 42}),
        lambda pod: pod["spec"]["containers"][0].update(volumeMounts=[None, {"mountPath": 3}]),
        lambda pod: pod["spec"]["containers"].append("not a container"),
        lambda pod: pod.clear(),
    ]
    for config in (CONFIG, WebhookConfig.load(env={"DDA_WEBHOOK_ON_INVALID": "warn"})):
        for breaker in breakers:
            review = copy.deepcopy(base)
            breaker(review["request"]["object"])
            response = run(review, config)
            assert isinstance(response["allowed"], bool)
        review = copy.deepcopy(base)
        review["request"]["object"] = "a string"
        assert run(review, config)["allowed"] is False


def test_not_an_admission_review_is_a_bad_request():
    for body in (None, [], {"kind": "Pod"}, {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1",
                                                "request": {"uid": "x"}},
                 {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}}):
        with pytest.raises(BadReview):
            mutate(body, CONFIG)


def test_configuration_errors_name_the_setting():
    with pytest.raises(ValueError, match="on_invalid"):
        WebhookConfig.load(env={"DDA_WEBHOOK_ON_INVALID": "shrug"})
    with pytest.raises(ValueError, match="cache_size"):
        WebhookConfig.load(env={"DDA_WEBHOOK_CACHE_SIZE": "10Mi"})
    with pytest.raises(ValueError, match="resources"):
        WebhookConfig.load(env={"DDA_WEBHOOK_SIDECAR_RESOURCES": "[1]"})
    config = WebhookConfig.load(env={"DDA_WEBHOOK_SIDECAR_RESOURCES": '{"limits": {"memory": "4Gi"}}'})
    assert config.resources == {"limits": {"memory": "4Gi"}}


# ------------------------------------------------------------------ over HTTPS


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    ca, cert = ca_and_server_cert()
    d = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(d / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(d / "tls.crt"))
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    return d, ca


@pytest.fixture(scope="module")
def server(tls):
    d, _ = tls
    with WebhookServer(CONFIG, d / "tls.crt", d / "tls.key", host="127.0.0.1", port=0) as srv:
        yield srv


def _client(port: int, ca_file: Path) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)


def _post(port: int, ca_file: Path, body: bytes, path: str = "/mutate") -> tuple[int, bytes]:
    conn = _client(port, ca_file)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


@pytest.mark.parametrize("name", FIXTURES)
def test_https_answers_every_fixture(server, tls, name):
    review = load_review(name)
    status, body = _post(server.port, tls[0] / "ca.crt", json.dumps(review).encode())
    assert status == 200
    answer = json.loads(body)
    assert answer["response"] == run(review)
    if "patch" in answer["response"]:
        pod = jsonpatch.apply_patch(review["request"]["object"], decode_patch(answer["response"]))
        assert validate_k8s(pod) == "schema"


def test_https_bad_input_and_health(server, tls):
    ca_file = tls[0] / "ca.crt"
    assert _post(server.port, ca_file, b"{not json")[0] == 400
    assert _post(server.port, ca_file, b'{"kind": "Pod"}')[0] == 400
    assert _post(server.port, ca_file, b"{}", path="/elsewhere")[0] == 404
    # a plain-HTTP client and a client that hangs up mid-handshake do not hurt the server
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert not raw.recv(100).startswith(b"HTTP/")     # no plain-text answer
        except ConnectionResetError:
            pass
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    # an oversize body is refused before it is read
    conn = _client(server.port, ca_file)
    conn.putrequest("POST", "/mutate")
    conn.putheader("Content-Length", str(64 * 1024 * 1024))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    conn = _client(server.port, ca_file)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b"ok\n"
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    conn.close()
    assert 'dda_webhook_admissions_total{result="bad_request"}' in metrics
    assert "dda_webhook_admission_duration_seconds_count" in metrics


def test_certificate_rotation_is_picked_up(tmp_path):
    ca, cert = ca_and_server_cert()
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca1.crt"))
    with WebhookServer(CONFIG, tmp_path / "tls.crt", tmp_path / "tls.key", host="127.0.0.1", port=0,
                       reload_every=0) as srv:
        conn = _client(srv.port, tmp_path / "ca1.crt")
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        ca2, cert2 = ca_and_server_cert()
        time.sleep(0.01)
        cert2.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
        cert2.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
        os.utime(tmp_path / "tls.crt", (time.time() + 5, time.time() + 5))
        ca2.cert_pem.write_to_path(str(tmp_path / "ca2.crt"))
        conn = _client(srv.port, tmp_path / "ca2.crt")
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dda_webhook_command(tls):
    d, _ = tls
    port = _free_port()
    dda = str(Path(sys.executable).parent / "dda")
    environment = {**os.environ, "DDA_WEBHOOK_TLS_CERT": str(d / "tls.crt"), "DDA_WEBHOOK_TLS_KEY": str(d / "tls.key"),
                   "DDA_WEBHOOK_ON_INVALID": "warn"}
    proc = subprocess.Popen([dda, "webhook", "--listen", f"127.0.0.1:{port}", "--sidecar-image", "img:1",
                             "--mode", "privileged"],
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = _client(port, d / "ca.crt")
                conn.request("GET", "/healthz")
                assert conn.getresponse().status == 200
                conn.close()
                break
            except (ConnectionRefusedError, ssl.SSLError, OSError):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.1)
        status, body = _post(port, d / "ca.crt", (ADMISSION / "bad_annotations.json").read_bytes())
        answer = json.loads(body)["response"]
        assert status == 200 and answer["allowed"] and answer["warnings"]          # flags and env both apply
        status, body = _post(port, d / "ca.crt", (ADMISSION / "job_single_repo.json").read_bytes())
        assert decode_patch(json.loads(body)["response"])[3]["value"][0]["image"] == "img:1"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "serving https://127.0.0.1:" in err and "result=injected" in err


def test_dda_webhook_refuses_bad_configuration(tmp_path):
    dda = str(Path(sys.executable).parent / "dda")
    proc = subprocess.run([dda, "webhook", "--tls-cert", str(tmp_path / "missing.crt"), "--tls-key",
                           str(tmp_path / "missing.key"), "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0 and "missing.crt" in proc.stderr
    proc = subprocess.run([dda, "webhook", "--cache-size", "1Mi"], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "cache_size" in proc.stderr


@pytest.mark.parametrize("name", FIXTURES)
def test_secret_never_reaches_env_nor_app_containers(name):
    """No envFrom anywhere, no secretKeyRef beyond the Secret's documented keys; the Secret's
    volume is mounted by its sidecar only; ssh material goes by path."""
    review = load_review(name)
    response = run(review)
    if not response.get("patch"):
        return
    pod = jsonpatch.apply_patch(review["request"]["object"], decode_patch(response))
    before = review["request"]["object"]["spec"]
    ours = [c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
            if c["name"].startswith("dda-sidecar")]
    secrets = {v["name"] for v in pod["spec"].get("volumes", []) if "secret" in v} - \
        {v["name"] for v in before.get("volumes", []) if "secret" in v}
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        mounted_secrets = {m["name"] for m in c.get("volumeMounts", [])} & secrets
        if c in ours:
            assert "envFrom" not in c
            assert not any("valueFrom" in e for e in c["env"])
            if mounted_secrets:
                assert env(c)["DDA_SSH_KEY_FILE"] == "/etc/dda-sidecar/secret/ssh-privatekey"
                assert env(c)["DDA_SSH_KNOWN_HOSTS_FILE"] == "/etc/dda-sidecar/secret/known_hosts"
        else:
            assert not mounted_secrets, c["name"]


def test_ephemeral_storage_request_matches_the_cache_volume():
    pod, _ = apply(load_review("deployment_multi_repo.json"))
    images, labels = container(pod, "dda-sidecar-images"), container(pod, "dda-sidecar-labels")
    size = {v["name"]: v for v in pod["spec"]["volumes"]}["dda-cache"]["emptyDir"]["sizeLimit"]
    assert images["resources"]["requests"]["ephemeral-storage"] == size == "50Gi"
    assert "ephemeral-storage" not in labels["resources"]["requests"]   # one cache volume, asked for once
    assert images["resources"]["requests"]["memory"] == CONFIG.resources["requests"]["memory"]
    pod, _ = apply(load_review("job_single_repo.json"))
    assert pod["spec"]["initContainers"][0]["resources"]["requests"]["ephemeral-storage"] == "20Gi"
    hostpath = WebhookConfig.load(env={}, cache_mode="hostPath")
    pod, _ = apply(load_review("job_single_repo.json"), hostpath)
    assert "ephemeral-storage" not in pod["spec"]["initContainers"][0]["resources"]["requests"]
    # a request set by the chart's values is kept
    mine = WebhookConfig.load(env={}, resources={"requests": {"ephemeral-storage": "1Gi"}})
    pod, _ = apply(load_review("job_single_repo.json"), mine)
    assert pod["spec"]["initContainers"][0]["resources"]["requests"] == {"ephemeral-storage": "1Gi"}


def test_fallback_mode_shares_the_process_namespace_so_the_sidecar_can_exit():
    fallback = WebhookConfig.load(env={}, native_sidecar="false")
    pod, _ = apply(load_review("job_single_repo.json"), fallback)
    side = pod["spec"]["containers"][0]
    assert pod["spec"]["shareProcessNamespace"] is True and env(side)["DDA_EXIT_WITH_APP"] == "true"
    # native sidecars stop after the app by themselves: nothing of this
    pod, _ = apply(load_review("job_single_repo.json"))
    assert "shareProcessNamespace" not in pod["spec"] and "DDA_EXIT_WITH_APP" not in env(pod["spec"]["initContainers"][0])
    # a pod that refuses a shared namespace keeps its choice
    review = load_review("job_single_repo.json")
    review["request"]["object"]["spec"]["shareProcessNamespace"] = False
    pod, _ = apply(review, fallback)
    assert pod["spec"]["shareProcessNamespace"] is False and "DDA_EXIT_WITH_APP" not in env(pod["spec"]["containers"][0])


# ------------------------------------------------------------------ csi mode (the default)

CSI = WebhookConfig.load(env={}, image="registry.example.com/dda-sidecar:0.1.0")
RESTRICTED_CONTAINER = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"}}


def _host_path(pod: dict, c: dict, path: str, kubelet: Path, uid: str) -> Path:
    """Where `path` inside container `c` lies on the node, for emptyDir volumes (the kubelet's
    layout: <root>/pods/<uid>/volumes/kubernetes.io~empty-dir/<volume>/...)."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for m in sorted(c.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        if path == m["mountPath"] or path.startswith(m["mountPath"] + "/"):
            assert "emptyDir" in volumes[m["name"]], m
            rest = path[len(m["mountPath"]):].lstrip("/")
            return kubelet / "pods" / uid / "volumes" / "kubernetes.io~empty-dir" / m["name"] / rest
    raise AssertionError(f"{path} is on no volume of {c['name']}")


def test_csi_mode_is_the_default():
    assert WebhookConfig.load(env={}).mode == "csi" and CSI.csi_driver == "csi.dda-sidecar.io"
    with pytest.raises(ValueError, match="mode"):
        WebhookConfig.load(env={"DDA_WEBHOOK_MODE": "root"})


@pytest.mark.parametrize("native", [True, False], ids=["native", "fallback"])
def test_csi_mode_volume_sidecar_and_the_node_plugins_socket(native, tmp_path):
    """Each repository is a CSI ephemeral volume of our driver that the app containers mount
    read-only; its sidecar runs unprivileged and does not mount it; the socket the sidecar
    waits on is where the node plugin, given the kubelet's target path and volume context,
    offers the descriptor."""
    from sidecar.csi.node import POD_UID, NodePlugin

    config = CSI if native else WebhookConfig.load(env={}, native_sidecar="false")
    review = load_review("deployment_multi_repo.json")
    pod, _ = apply(review, config)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    kubelet = tmp_path / "kubelet"
    plugin = NodePlugin("node-a", kubelet)
    uid = "7d3c2c4e-0b8a-4c57-9a43-5c1f1f0f3a11"
    sockets = set()
    for name, path, repo in (("images", "/data/images", "https://dagshub.com/acme/images.git"),
                             ("labels", "/workspace/labels", "git@github.com:acme/labels.git")):
        vol = volumes[f"dda-data-{name}"]
        assert set(vol) == {"name", "csi"} and vol["csi"]["driver"] == "csi.dda-sidecar.io"
        assert vol["csi"]["readOnly"] is True
        attributes = vol["csi"]["volumeAttributes"]
        assert attributes["repo"] == repo and attributes["socketVolume"] == "dda-csi"
        assert (attributes["uid"], attributes["gid"]) == ("65534", "65534")
        assert all(isinstance(v, str) for v in attributes.values())
        # never a credential, nor the Secret: only the sidecar reads it
        assert not {k.lower() for k in attributes} & {"secret", "token", "password", "user"}
        assert "dagshub-creds" not in json.dumps(attributes)
        side = container(pod, f"dda-sidecar-{name}")
        assert side["securityContext"] == {**RESTRICTED_CONTAINER, "runAsUser": 65534, "runAsGroup": 65534,
                                           "privileged": False, "readOnlyRootFilesystem": True}
        assert f"dda-data-{name}" not in {m["name"] for m in side["volumeMounts"]}   # no self-deadlock
        assert {m["mountPath"] for m in side["volumeMounts"]} >= {"/dda-csi", "/dda-cache", "/tmp"}
        e = env(side)
        assert e["DDA_MOUNT"] == path and e["DDA_CACHE_DIR"] == "/dda-cache"
        # the kubelet's call: target path of this volume and the volume context it builds
        target = kubelet / "pods" / uid / "volumes" / "kubernetes.io~csi" / f"dda-data-{name}" / "mount"
        offered = plugin._socket_path(target, {**attributes, POD_UID: uid})
        assert _host_path(pod, side, e["DDA_FUSE_FD_SOCKET"], kubelet, uid) == offered
        sockets.add(offered)
        for app in ("trainer", "tensorboard", "log-shipper"):
            mounts = {m["name"]: m for m in container(pod, app)["volumeMounts"]}
            assert mounts[f"dda-data-{name}"] == {"name": f"dda-data-{name}", "mountPath": path, "readOnly": True}
    assert len(sockets) == 2
    # the socket folder is disk-backed (a tmpfs mounted later would hide the plugin's socket)
    assert volumes["dda-csi"]["emptyDir"].get("medium", "") == ""
    assert volumes["dda-cache"]["emptyDir"]["sizeLimit"] == "50Gi"
    # the pod's own security context is left alone
    assert pod["spec"]["securityContext"] == review["request"]["object"]["spec"]["securityContext"]


def test_csi_mode_reinvocation_adds_plain_mounts():
    review = load_review("job_single_repo.json")
    pod, _ = apply(review, CSI)
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "istio/proxyv2:1.23.2"})
    again = copy.deepcopy(review)
    again["request"]["object"] = pod
    pod2, ops = apply(again, CSI)
    assert ops == [{"op": "add", "path": "/spec/containers/1/volumeMounts", "value": [
        {"name": "dda-data", "mountPath": "/data", "readOnly": True}]}]
    again["request"]["object"] = pod2
    assert "patch" not in run(again, CSI)


def test_csi_driver_name_reaches_the_volume():
    pod, _ = apply(load_review("job_single_repo.json"), WebhookConfig.load(env={"DDA_WEBHOOK_CSI_DRIVER": "dda.corp.io"}))
    volume = {v["name"]: v for v in pod["spec"]["volumes"]}["dda-data"]
    assert volume["csi"]["driver"] == "dda.corp.io"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files owned by root, read as 65534)")
def test_csi_mode_sidecar_can_read_its_secret():
    """The kubelet writes a Secret volume's files as root with its defaultMode; the csi-mode
    sidecar (uid 65534, no capabilities) must read the documented keys and the ssh key, and
    only its own container mounts the volume."""
    pod, _ = apply(load_review("deployment_multi_repo.json"), CSI)
    side = container(pod, "dda-sidecar-images")
    secret = secret_volume(pod, side)
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="dda-secret-", dir="/tmp"))   # pytest's tmp_path is root's alone
    base.chmod(0o755)
    folder = base / "secret"
    folder.mkdir()
    for name, value in (("DDA_GIT_TOKEN", "tok"), ("ssh-privatekey", "KEY")):
        (folder / name).write_text(value)
        os.chmod(folder / name, secret["defaultMode"])
    code = ("import sys; from sidecar.secretfiles import read_secret_dir; "
            "print(read_secret_dir(sys.argv[1]), open(sys.argv[1] + '/ssh-privatekey').read())")
    security = side["securityContext"]
    proc = subprocess.run(["setpriv", f"--reuid={security['runAsUser']}", f"--regid={security['runAsGroup']}",
                           "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", code,
                           str(folder)], capture_output=True, text=True, timeout=60, cwd="/",
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    shutil.rmtree(base)
    assert proc.returncode == 0 and proc.stdout.strip() == "{'DDA_GIT_TOKEN': 'tok'} KEY", proc.stdout + proc.stderr
    mounting = [c["name"] for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
                if any(m["name"] == "dda-secret-images" for m in c.get("volumeMounts", []))]
    assert mounting == ["dda-sidecar-images"]
