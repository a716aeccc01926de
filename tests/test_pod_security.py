"""Pod Security Standards on what we ship: the webhook-mutated pod in csi mode passes
"restricted" (given an app that does), the privileged mode is flagged, and of the chart's
workloads only the CSI node plugin DaemonSet is privileged. The checker (tests/pod_security.py)
is shown to fail on each rule first."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import jsonpatch
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k8s_tools import decode_patch, load_review  # noqa: E402
from pod_security import CHECKS, violations  # noqa: E402
from test_helm import CHART, by_kind, helm, render  # noqa: E402,F401  (helm: the fixture)

from sidecar.webhook.mutate import WebhookConfig, mutate  # noqa: E402

RESTRICTED_CONTAINER = {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def good_pod() -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": {}},
            "spec": {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 80}],
                                     "readinessProbe": {"httpGet": {"path": "/", "port": 80}},
                                     "securityContext": {"allowPrivilegeEscalation": False,
                                                         "capabilities": {"drop": ["ALL"]}}}],
                     "volumes": [{"name": "d", "emptyDir": {}}, {"name": "c", "csi": {"driver": "x.io"}}]}}


def _c(pod: dict) -> dict:
    return pod["spec"]["containers"][0].setdefault("securityContext", {})


# (what to break, the lowest level that forbids it, the control that must say so)
BREAKERS = [
    (lambda p: p["spec"]["securityContext"].update(windowsOptions={"hostProcess": True}), "baseline", "HostProcess"),
    (lambda p: p["spec"].update(hostNetwork=True), "baseline", "Host Namespaces"),
    (lambda p: p["spec"].update(hostPID=True), "baseline", "Host Namespaces"),
    (lambda p: p["spec"].update(hostIPC=True), "baseline", "Host Namespaces"),
    (lambda p: _c(p).update(privileged=True), "baseline", "Privileged Containers"),
    (lambda p: _c(p).update(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}), "baseline", "Capabilities"),
    (lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "baseline", "HostPath Volumes"),
    (lambda p: p["spec"]["containers"][0]["ports"][0].update(hostPort=80), "baseline", "Host Ports"),
    (lambda p: p["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(host="10.0.0.1"), "baseline",
     "Host Probes / Lifecycle Hooks"),
    (lambda p: p["metadata"]["annotations"].update({"container.apparmor.security.beta.kubernetes.io/app":
                                                    "unconfined"}), "baseline", "AppArmor"),
    (lambda p: _c(p).update(appArmorProfile={"type": "Unconfined"}), "baseline", "AppArmor"),
    (lambda p: _c(p).update(seLinuxOptions={"type": "spc_t"}), "baseline", "SELinux"),
    (lambda p: p["spec"]["securityContext"].update(seLinuxOptions={"user": "system_u"}), "baseline", "SELinux"),
    (lambda p: _c(p).update(procMount="Unmasked"), "baseline", "/proc Mount Type"),
    (lambda p: _c(p).update(seccompProfile={"type": "Unconfined"}), "baseline", "Seccomp"),
    (lambda p: p["spec"]["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "baseline",
     "Sysctls"),
    (lambda p: p["spec"]["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}), "restricted",
     "Volume Types"),
    (lambda p: _c(p).pop("allowPrivilegeEscalation"), "restricted", "Privilege Escalation"),
    (lambda p: p["spec"]["securityContext"].pop("runAsNonRoot"), "restricted", "Running as Non-root"),
    (lambda p: _c(p).update(runAsNonRoot=False), "restricted", "Running as Non-root"),
    (lambda p: _c(p).update(runAsUser=0), "restricted", "Running as Non-root user"),
    (lambda p: p["spec"]["securityContext"].pop("seccompProfile"), "restricted", "Seccomp"),
    (lambda p: _c(p).update(capabilities={"drop": ["NET_RAW"]}), "restricted", "Capabilities"),
    (lambda p: _c(p).update(capabilities={"drop": ["ALL"], "add": ["CHOWN"]}), "restricted", "Capabilities"),
    (lambda p: p["spec"].setdefault("initContainers", []).append({"name": "i", "image": "i:1"}), "restricted",
     "Privilege Escalation"),
]


def test_the_checker_fails_on_each_rule():
    assert violations(good_pod(), "restricted") == []
    controls = {name for level in CHECKS.values() for name, _ in level}
    covered = set()
    for i, (breaker, level, control) in enumerate(BREAKERS):
        pod = good_pod()
        breaker(pod)
        found = violations(pod, level)
        assert any(v.startswith(control + ": ") for v in found), (i, control, found)
        covered.add(control)
        if level == "restricted":
            assert not any(v.startswith(control + ": ") for v in violations(pod, "baseline")), (i, control)
    assert covered == controls, controls - covered


def restricted_app(name: str) -> dict:
    """An admission fixture whose app containers are themselves restricted-compliant."""
    review = load_review(name)
    spec = review["request"]["object"]["spec"]
    for kind in ("initContainers", "containers"):
        for c in spec.get(kind, []):
            c["securityContext"] = {**RESTRICTED_CONTAINER, **(c.get("securityContext") or {})}
    assert violations(review["request"]["object"], "restricted") == [], name
    return review


def mutated(review: dict, config: WebhookConfig) -> dict:
    response = mutate(copy.deepcopy(review), config)["response"]
    assert response["allowed"], response
    return jsonpatch.apply_patch(review["request"]["object"], decode_patch(response))


@pytest.mark.parametrize("native", ["true", "false"], ids=["native", "fallback"])
@pytest.mark.parametrize("name", ["job_single_repo.json", "deployment_multi_repo.json", "pod_no_volumes.json"])
def test_webhook_csi_pod_passes_restricted(name, native):
    pod = mutated(restricted_app(name), WebhookConfig.load(env={}, native_sidecar=native))
    assert any("csi" in v for v in pod["spec"]["volumes"])
    assert violations(pod, "restricted") == []


def test_privileged_mode_and_a_node_shared_cache_are_flagged():
    review = restricted_app("job_single_repo.json")
    found = violations(mutated(review, WebhookConfig.load(env={}, mode="privileged")), "baseline")
    assert any(v.startswith("Privileged Containers: initContainers[dda-sidecar]") for v in found), found
    found = violations(mutated(review, WebhookConfig.load(env={}, mode="privileged")), "restricted")
    for control in ("Privilege Escalation", "Running as Non-root", "Running as Non-root user", "Capabilities"):
        assert any(v.startswith(f"{control}: initContainers[dda-sidecar]") for v in found), (control, found)
    # csi mode with a hostPath cache: the cache volume alone breaks baseline (documented)
    found = violations(mutated(review, WebhookConfig.load(env={}, cache_mode="hostPath")), "restricted")
    assert found == ["HostPath Volumes: volume dda-cache: hostPath",
                     "Volume Types: volume dda-cache: type ['hostPath'] is not allowed"], found


WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet", "Job", "CronJob", "Pod")


@pytest.mark.parametrize("values", [None, *sorted((CHART / "ci").glob("*.yaml"))],
                         ids=lambda v: "no-values" if v is None else v.stem)
def test_chart_only_the_node_plugin_is_privileged(helm, values):
    kinds = by_kind(render(helm, values, kube="1.25.0" if values and "fallback" in values.name else "1.29.0"))
    workloads = {f"{d['kind']}/{d['metadata']['name']}": d for k in WORKLOADS for d in kinds.get(k, [])}
    assert "Deployment/dda-dda-sidecar" in workloads
    privileged = {name for name, d in workloads.items() if violations(d, "baseline")}
    not_restricted = {name for name, d in workloads.items() if violations(d, "restricted")}
    csi = values is None or "privileged" not in values.name
    node = {"DaemonSet/dda-dda-sidecar-csi-node"} if csi else set()
    assert privileged == not_restricted == node, {n: violations(workloads[n]) for n in not_restricted}
    if csi:
        found = violations(workloads["DaemonSet/dda-dda-sidecar-csi-node"], "baseline")
        assert any(v.startswith("Privileged Containers: containers[node]") for v in found), found
        assert not any("node-driver-registrar" in v and "Privileged" in v for v in found), found
