"""The Pod Security Standards (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
levels "baseline" and "restricted", as checks on a pod spec: one function per control of the
standard, each returning what it finds wrong. `violations(obj, "restricted")` takes a Pod or a
workload with a pod template (Deployment, DaemonSet, Job, ...) and returns one line per problem
(empty: the pod passes). Linux pods only (the Windows exemptions of the standard are not modelled).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

LEVELS = ("baseline", "restricted")

# Baseline "Capabilities": what may be added beyond the runtime's default set.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
# Baseline "Sysctls": the safe set.
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
# Baseline "SELinux": allowed seLinuxOptions.type values.
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
# Restricted "Volume Types": every volume must be one of these.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
KINDS = ("initContainers", "containers", "ephemeralContainers")


def pod_spec(obj: dict) -> dict:
    """The pod spec of a Pod, or of a workload's pod template (CronJob: its job's template)."""
    if obj.get("kind") == "Pod" or "containers" in obj.get("spec", {}):
        return obj["spec"]
    spec = obj["spec"]
    if "jobTemplate" in spec:
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def pod_annotations(obj: dict) -> dict:
    if obj.get("kind") == "Pod" or "containers" in obj.get("spec", {}):
        return obj.get("metadata", {}).get("annotations") or {}
    spec = obj["spec"]
    if "jobTemplate" in spec:
        spec = spec["jobTemplate"]["spec"]
    return spec["template"].get("metadata", {}).get("annotations") or {}


def containers(spec: dict) -> Iterator[tuple[str, dict]]:
    for kind in KINDS:
        for c in spec.get(kind) or []:
            yield f"{kind}[{c.get('name')}]", c


def _sc(c: dict) -> dict:
    return c.get("securityContext") or {}


# ------------------------------------------------------------------ baseline


def host_process(spec: dict, _: dict) -> list[str]:
    found = []
    if ((spec.get("securityContext") or {}).get("windowsOptions") or {}).get("hostProcess"):
        found.append("spec.securityContext.windowsOptions.hostProcess is true")
    for where, c in containers(spec):
        if (_sc(c).get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}: windowsOptions.hostProcess is true")
    return found


def host_namespaces(spec: dict, _: dict) -> list[str]:
    return [f"spec.{field} is true" for field in ("hostNetwork", "hostPID", "hostIPC") if spec.get(field)]


def privileged_containers(spec: dict, _: dict) -> list[str]:
    return [f"{where}: securityContext.privileged is true" for where, c in containers(spec) if _sc(c).get("privileged")]


def capabilities_baseline(spec: dict, _: dict) -> list[str]:
    found = []
    for where, c in containers(spec):
        extra = set((_sc(c).get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if extra:
            found.append(f"{where}: adds capabilities {sorted(extra)} beyond the baseline set")
    return found


def host_path_volumes(spec: dict, _: dict) -> list[str]:
    return [f"volume {v.get('name')}: hostPath" for v in spec.get("volumes") or [] if "hostPath" in v]


def _probe_hosts(c: dict) -> Iterator[str]:
    for key in ("livenessProbe", "readinessProbe", "startupProbe"):
        handler = c.get(key) or {}
        for kind in ("httpGet", "tcpSocket"):
            if (handler.get(kind) or {}).get("host"):
                yield f"{key}.{kind}.host"
    for key in ("postStart", "preStop"):
        handler = (c.get("lifecycle") or {}).get(key) or {}
        for kind in ("httpGet", "tcpSocket"):
            if (handler.get(kind) or {}).get("host"):
                yield f"lifecycle.{key}.{kind}.host"


def host_ports(spec: dict, _: dict) -> list[str]:
    return [f"{where}: hostPort {p['hostPort']}" for where, c in containers(spec)
            for p in c.get("ports") or [] if p.get("hostPort")]


def host_probes(spec: dict, _: dict) -> list[str]:
    return [f"{where}: {field} is set" for where, c in containers(spec) for field in _probe_hosts(c)]


def apparmor(spec: dict, annotations: dict) -> list[str]:
    found = []
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or str(value).startswith("localhost/")):
            found.append(f"annotation {key}: {value}")
    profiles = [("spec.securityContext", (spec.get("securityContext") or {}).get("appArmorProfile"))]
    profiles += [(where, _sc(c).get("appArmorProfile")) for where, c in containers(spec)]
    for where, profile in profiles:
        if profile and profile.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: appArmorProfile {profile.get('type')}")
    return found


def selinux(spec: dict, _: dict) -> list[str]:
    found = []
    options = [("spec.securityContext", (spec.get("securityContext") or {}).get("seLinuxOptions"))]
    options += [(where, _sc(c).get("seLinuxOptions")) for where, c in containers(spec)]
    for where, o in options:
        if not o:
            continue
        if o.get("type", "") not in SELINUX_TYPES:
            found.append(f"{where}: seLinuxOptions.type {o['type']}")
        for field in ("user", "role"):
            if o.get(field):
                found.append(f"{where}: seLinuxOptions.{field} is set")
    return found


def proc_mount(spec: dict, _: dict) -> list[str]:
    return [f"{where}: procMount {_sc(c)['procMount']}" for where, c in containers(spec)
            if _sc(c).get("procMount", "Default") != "Default"]


def seccomp_baseline(spec: dict, _: dict) -> list[str]:
    found = []
    if ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type") == "Unconfined":
        found.append("spec.securityContext.seccompProfile is Unconfined")
    for where, c in containers(spec):
        if (_sc(c).get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"{where}: seccompProfile Unconfined")
    return found


def sysctls(spec: dict, _: dict) -> list[str]:
    return [f"sysctl {s.get('name')} is not in the safe set"
            for s in (spec.get("securityContext") or {}).get("sysctls") or [] if s.get("name") not in SAFE_SYSCTLS]


# ------------------------------------------------------------------ restricted


def volume_types(spec: dict, _: dict) -> list[str]:
    found = []
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds or not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {v.get('name')}: type {sorted(kinds)} is not allowed")
    return found


def privilege_escalation(spec: dict, _: dict) -> list[str]:
    return [f"{where}: allowPrivilegeEscalation is not false" for where, c in containers(spec)
            if _sc(c).get("allowPrivilegeEscalation") is not False]


def running_as_non_root(spec: dict, _: dict) -> list[str]:
    pod = (spec.get("securityContext") or {}).get("runAsNonRoot")
    found = []
    if pod is False:
        found.append("spec.securityContext.runAsNonRoot is false")
    for where, c in containers(spec):
        mine = _sc(c).get("runAsNonRoot")
        if mine is False or (mine is None and pod is not True):
            found.append(f"{where}: runAsNonRoot is not true (nor set true for the pod)")
    return found


def running_as_non_root_user(spec: dict, _: dict) -> list[str]:
    found = []
    if (spec.get("securityContext") or {}).get("runAsUser") == 0:
        found.append("spec.securityContext.runAsUser is 0")
    found += [f"{where}: runAsUser is 0" for where, c in containers(spec) if _sc(c).get("runAsUser") == 0]
    return found


def seccomp_restricted(spec: dict, _: dict) -> list[str]:
    allowed = ("RuntimeDefault", "Localhost")
    pod = ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    found = []
    if pod is not None and pod not in allowed:
        found.append(f"spec.securityContext.seccompProfile is {pod}")
    for where, c in containers(spec):
        mine = (_sc(c).get("seccompProfile") or {}).get("type")
        if (mine is not None and mine not in allowed) or (mine is None and pod not in allowed):
            found.append(f"{where}: seccompProfile is not RuntimeDefault or Localhost (nor set for the pod)")
    return found


def capabilities_restricted(spec: dict, _: dict) -> list[str]:
    found = []
    for where, c in containers(spec):
        caps = _sc(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{where}: capabilities.drop does not include ALL")
        extra = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if extra:
            found.append(f"{where}: adds capabilities {sorted(extra)} (restricted allows NET_BIND_SERVICE only)")
    return found


Check = Callable[[dict, dict], list[str]]
CHECKS: dict[str, list[tuple[str, Check]]] = {
    "baseline": [("HostProcess", host_process), ("Host Namespaces", host_namespaces),
                 ("Privileged Containers", privileged_containers), ("Capabilities", capabilities_baseline),
                 ("HostPath Volumes", host_path_volumes), ("Host Ports", host_ports),
                 ("Host Probes / Lifecycle Hooks", host_probes), ("AppArmor", apparmor), ("SELinux", selinux),
                 ("/proc Mount Type", proc_mount), ("Seccomp", seccomp_baseline), ("Sysctls", sysctls)],
    "restricted": [("Volume Types", volume_types), ("Privilege Escalation", privilege_escalation),
                   ("Running as Non-root", running_as_non_root),
                   ("Running as Non-root user", running_as_non_root_user), ("Seccomp", seccomp_restricted),
                   ("Capabilities", capabilities_restricted)],
}


def violations(obj: dict, level: str = "restricted") -> list[str]:
    """Every rule of `level` (restricted includes baseline) the pod breaks, one line each as
    '<Control>: <what>'. Empty: the pod passes."""
    assert level in LEVELS, level
    spec, annotations = pod_spec(obj), pod_annotations(obj)
    levels = LEVELS[: LEVELS.index(level) + 1]
    return [f"{name}: {problem}" for lv in levels for name, check in CHECKS[lv] for problem in check(spec, annotations)]
