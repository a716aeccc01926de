"""Pure admission logic: an AdmissionReview (admission.k8s.io/v1) dict in, the response dict out.

A pod asks for data with annotations (prefix `dda-sidecar.io/`):

    dda-sidecar.io/repo: https://dagshub.com/owner/dataset.git     # required
    dda-sidecar.io/revision: v1.2                                   # optional
    dda-sidecar.io/mount-path: /data                                # optional
    dda-sidecar.io/secret: dataset-creds                            # optional
    dda-sidecar.io/subdir: data/images                              # optional: mount only this directory
    dda-sidecar.io/jobs, deadline, retries, chunk-size              # optional engine settings (sidecar.settings)
    dda-sidecar.io/repo.<name>, revision.<name>, ...                # more repositories
    dda-sidecar.io/cache-size: 50Gi                                 # optional, emptyDir cache only
    dda-sidecar.io/inject: "false"                                  # opt out (label or annotation)

For each repository one sidecar container (`dda sidecar`) is injected: a native sidecar (an
init container with restartPolicy Always, Kubernetes >= 1.29) by default, or, in fallback
mode, the first regular container with a postStart hook that holds the app containers until
the mount is ready. Everything here is deterministic and side-effect free.

Two ways to FUSE (`webhook_mode`):
- csi (default): each repository is a CSI ephemeral inline volume of our driver; the node
  plugin (`dda csi`, a privileged DaemonSet) mounts /dev/fuse at the volume and hands the
  descriptor over a unix socket in the pod's emptyDir `dda-csi` to the sidecar, which serves it
  as uid 65534 with no capabilities, no privilege escalation, a read-only root and the
  RuntimeDefault seccomp profile: the pod passes Pod Security "restricted". The sidecar does
  not mount the data volume itself: the runtime's stat of a FUSE mount nobody serves yet would
  hang its own start.
- privileged: the sidecar mounts FUSE itself (privileged, root) on an emptyDir that reaches
  the app containers through Bidirectional/HostToContainer mount propagation.
"""
from __future__ import annotations

import base64
import copy
import json
import logging
import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..errors import ConfigError
from ..settings import (Settings, annotation_key, annotation_settings, env_name, env_text, parse_quantity,
                        parse_value)

log = logging.getLogger(__name__)

PREFIX = "dda-sidecar.io/"
INJECT = PREFIX + "inject"
INJECTED = PREFIX + "injected"
CACHE_SIZE = PREFIX + "cache-size"
# Engine settings a pod may choose, per repository (dda-sidecar.io/jobs, .../jobs.<name>): the
# settings marked `annotation` in sidecar.settings.
SETTING_KEYS = {annotation_key(name): name for name in annotation_settings()}
PER_REPO = ("repo", "revision", "mount-path", "secret", "subdir", *SETTING_KEYS)
POD_WIDE = ("inject", "injected", "cache-size")
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"

CONTAINER = "dda-sidecar"          # + "-<name>" for named repositories
DATA_VOLUME = "dda-data"           # + "-<name>"
CACHE_VOLUME = "dda-cache"
SOCKET_VOLUME = "dda-csi"          # csi mode: the emptyDir where the node plugin offers the descriptors
SOCKET_PATH = "/dda-csi"           # inside the sidecars only
TMP_VOLUME = "dda-tmp"             # csi mode: a writable /tmp under the read-only root
TMP_SIZE = "256Mi"
NOBODY = 65534                     # csi mode: the sidecar's user and group
CACHE_PATH = "/dda-cache"          # inside the sidecar only
SECRET_VOLUME = "dda-secret"       # + "-<name>": the repository's Secret, files in its sidecar only
SECRET_PATH = "/etc/dda-sidecar/secret"
PORT_NAME = "dda-metrics"          # + "-<i>" for the i-th extra repository

MAX_NAME = 20                      # keeps container/volume names well under 63 characters
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")
_SCP_LIKE = re.compile(r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[A-Za-z0-9.-]+):(?P<path>[A-Za-z0-9._~][A-Za-z0-9._~/-]*)$")
_REF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]{0,254}$")
_MOUNT_CHARS = re.compile(r"^/[A-Za-z0-9._/-]*$")
MIN_CACHE = 512 * 2**20
# Paths a data mount must not cover: the container's own system directories.
_RESERVED_TREES = ("/proc", "/sys", "/dev", "/etc", "/bin", "/sbin", "/usr", "/lib", "/lib32", "/lib64",
                   "/libx32", "/boot", "/run", "/var/run", "/var/lib/kubelet", CACHE_PATH)
_RESERVED_EXACT = ("/tmp", "/var", "/home", "/root", "/opt", "/srv", "/mnt")


class BadReview(ValueError):
    """The body is not an AdmissionReview we can answer (the server answers HTTP 400)."""


@dataclass(frozen=True)
class WebhookConfig:
    """What the chart decides for every injected sidecar: a view of the `webhook_*` settings of
    `sidecar.settings.Settings` (env DDA_WEBHOOK_*, defaults and parsing live there)."""

    image: str
    image_pull_policy: str
    resources: Mapping[str, Any]
    native_sidecar: bool
    on_invalid: str                      # deny | warn
    cache_mode: str                      # emptyDir | hostPath
    cache_size: str                      # emptyDir sizeLimit, or the budget on a hostPath cache
    cache_host_path: str
    cache_fraction: float                # budget = sizeLimit * fraction (emptyDir mode)
    metrics_port: int
    default_mount_path: str
    startup_timeout: int                 # seconds the startupProbe waits for /readyz
    # engine settings given to every injected sidecar (None: the sidecar's own default)
    sidecar_settings: Mapping[str, Any] = field(default_factory=dict)
    mode: str = "csi"                    # csi | privileged
    csi_driver: str = "csi.dda-sidecar.io"

    # field here -> setting in sidecar.settings
    SETTINGS = {
        "image": "webhook_sidecar_image", "image_pull_policy": "webhook_sidecar_pull_policy",
        "resources": "webhook_sidecar_resources", "native_sidecar": "webhook_native_sidecar",
        "on_invalid": "webhook_on_invalid", "cache_mode": "webhook_cache_mode", "cache_size": "webhook_cache_size",
        "cache_host_path": "webhook_cache_host_path", "cache_fraction": "webhook_cache_fraction",
        "metrics_port": "webhook_metrics_port", "default_mount_path": "webhook_default_mount_path",
        "startup_timeout": "webhook_startup_timeout", "mode": "webhook_mode", "csi_driver": "webhook_csi_driver",
    }
    ENV = {name: env_name(setting) for name, setting in SETTINGS.items()}

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "WebhookConfig":
        """Defaults < environment < overrides (flags, by the names above or the settings' own).
        Raises ValueError naming the setting."""
        flags = {cls.SETTINGS.get(k, k): v for k, v in overrides.items() if v is not None}
        try:
            settings = Settings.load(flags, env)
        except ConfigError as err:
            raise ValueError(f"webhook configuration: {err}") from None
        return cls.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> "WebhookConfig":
        values = {name: getattr(settings, setting) for name, setting in cls.SETTINGS.items()}
        passed = {name: getattr(settings, "webhook_" + name) for name in annotation_settings()}
        config = cls(**values, sidecar_settings={k: v for k, v in passed.items() if v is not None})
        problem = _mount_path_problem(config.default_mount_path)
        if problem:
            raise ValueError(f"webhook configuration: webhook_default_mount_path: {problem}")
        return config


@dataclass(frozen=True)
class RepoSpec:
    name: str                # "" for the unnamed repository
    repo: str
    revision: str | None
    mount_path: str
    secret: str | None
    subdir: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)   # engine settings from annotations

    def key(self, base: str) -> str:
        return f"{PREFIX}{base}" + (f".{self.name}" if self.name else "")

    @property
    def container(self) -> str:
        return f"{CONTAINER}-{self.name}" if self.name else CONTAINER

    @property
    def volume(self) -> str:
        return f"{DATA_VOLUME}-{self.name}" if self.name else DATA_VOLUME

    @property
    def secret_volume(self) -> str:
        return f"{SECRET_VOLUME}-{self.name}" if self.name else SECRET_VOLUME

    @property
    def socket(self) -> str:
        """csi mode: where the sidecar collects the descriptor. The node plugin offers it at
        <pod's emptyDir SOCKET_VOLUME>/<CSI volume name>.sock (sidecar.csi.node)."""
        return f"{SOCKET_PATH}/{self.volume}.sock"


# ---------------------------------------------------------------- validation of values


def repo_problem(url: str) -> str | None:
    """Why `url` is not an acceptable repository URL (None if it is). Never quotes the URL:
    a rejected URL may hold a credential."""
    if not url.strip():
        return "is empty"
    if len(url) > 2048:
        return "is longer than 2048 characters"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "contains whitespace or control characters"
    creds = ("embeds credentials; put them in the Secret named by dda-sidecar.io/secret "
             "(keys DDA_GIT_USER and DDA_GIT_TOKEN)")
    if "://" in url:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return "is not a valid URL (bad host or port)"
        scheme = parts.scheme.lower()
        if scheme not in ("https", "ssh", "git"):
            if scheme == "http":
                return "uses plain http; use https:// (credentials and data would travel unencrypted)"
            return f"has scheme {scheme!r}; expected https://, ssh:// or git://"
        if "@" in parts.netloc:
            userinfo = parts.netloc.rsplit("@", 1)[0]
            if scheme != "ssh" or ":" in userinfo:
                return creds
        if not parts.hostname or not _HOST.match(parts.hostname):
            return "has no valid host name"
        if port == 0:
            return "has an invalid port"
        if parts.query or parts.fragment:
            return "must not carry a query string or fragment"
        if parts.path.strip("/") == "":
            return "names no repository path (expected host/owner/repo.git)"
        return None
    match = _SCP_LIKE.match(url)
    if not match or not _HOST.match(match.group("host")):
        if "@" in url and ":" in url.split("@", 1)[0]:
            return creds
        return ("is not a repository URL; expected https://host/owner/repo.git, "
                "ssh://git@host/owner/repo.git or git@host:owner/repo.git")
    return None


def revision_problem(rev: str) -> str | None:
    if not _REF.match(rev):
        return "is not a branch, tag or commit name (letters, digits, . _ - / +; at most 255)"
    if ".." in rev or "//" in rev or "@{" in rev or rev.endswith(("/", ".", ".lock")):
        return "is not a valid git ref name"
    return None


def kernel_path(path: str) -> str:
    """`path` as the kernel resolves it (no symlinks): repeated '/' collapsed (posixpath keeps a
    leading '//', the kernel does not), '.' dropped, '..' applied (at '/' it stays at '/'),
    trailing '/' removed. Every check compares these, so '//etc' and '/data/../etc' are '/etc'."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def _reserved_problem(path: str) -> str | None:
    for tree in _RESERVED_TREES:
        if path == tree or path.startswith(tree + "/"):
            return f"is inside the reserved system directory {tree}"
    if path in _RESERVED_EXACT:
        return f"would hide the system directory {path}; use a subdirectory such as {path}/data"
    return None


def _mount_path_problem(path: str) -> str | None:
    if not path.startswith("/"):
        return "must be an absolute path"
    if len(path) > 1024 or not _MOUNT_CHARS.match(path):
        return "may only contain letters, digits, '.', '_', '-' and '/'"
    resolved = kernel_path(path)
    if resolved == "/":
        return "must not be / (the container's root)"
    reserved = _reserved_problem(resolved)
    if resolved != path:
        return ("must be a normalized path (no '..', '.', '//' or trailing '/'): it resolves to "
                f"{resolved!r}" + (f", which {reserved}" if reserved else ""))
    return reserved


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


# ---------------------------------------------------------------- pod helpers


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _is_ours(container: Any) -> bool:
    name = _dict(container).get("name")
    return isinstance(name, str) and (name == CONTAINER or name.startswith(CONTAINER + "-"))


def _already_injected(pod: dict) -> bool:
    spec = _dict(pod.get("spec"))
    if INJECTED in _dict(_dict(pod.get("metadata")).get("annotations")):
        return True
    if any(_is_ours(c) for c in _list(spec.get("containers")) + _list(spec.get("initContainers"))):
        return True
    return any(_dict(v).get("name") == CACHE_VOLUME or str(_dict(v).get("name", "")).startswith(DATA_VOLUME)
               for v in _list(spec.get("volumes")))


def escape(key: str) -> str:
    """A JSON-pointer reference token (RFC 6901): '~' -> '~0', '/' -> '~1'."""
    return key.replace("~", "~0").replace("/", "~1")


# ---------------------------------------------------------------- annotations -> specs


def parse_annotations(pod: dict, config: WebhookConfig) -> tuple[list[RepoSpec], list[str], list[str]]:
    """(repositories, errors, warnings). Errors name the annotation and the problem."""
    meta = _dict(pod.get("metadata"))
    annotations = _dict(meta.get("annotations"))
    spec = _dict(pod.get("spec"))
    errors: list[str] = []
    warnings: list[str] = []
    grouped: dict[str, dict[str, str]] = {}
    for key in sorted(k for k in annotations if isinstance(k, str) and k.startswith(PREFIX)):
        value = annotations[key]
        if not isinstance(value, str):
            errors.append(f"annotation {key}: value must be a string")
            continue
        suffix = key[len(PREFIX):]
        base, dot, name = suffix.partition(".")
        if base in POD_WIDE and not dot:
            continue
        if base not in PER_REPO:
            known = ", ".join(PREFIX + k for k in PER_REPO + POD_WIDE)
            errors.append(f"annotation {key}: unknown dda-sidecar annotation (known: {known}; "
                          f"for more repositories add .<name>, e.g. {PREFIX}repo.images)")
            continue
        if dot and (not _DNS_LABEL.match(name) or len(name) > MAX_NAME):
            errors.append(f"annotation {key}: repository name {name!r} must be a lowercase DNS label "
                          f"(a-z, 0-9, '-') of at most {MAX_NAME} characters")
            continue
        grouped.setdefault(name, {})[base] = value.strip()

    specs: list[RepoSpec] = []
    for name in sorted(grouped):
        values = grouped[name]
        key = lambda base: f"{PREFIX}{base}" + (f".{name}" if name else "")  # noqa: E731
        if "repo" not in values:
            for base in values:
                errors.append(f"annotation {key(base)}: set without {key('repo')}")
            continue
        problem = repo_problem(values["repo"])
        if problem:
            errors.append(f"annotation {key('repo')}: the repository URL {problem}")
        revision = values.get("revision") or None
        if "revision" in values:
            problem = revision_problem(values["revision"]) if values["revision"] else "is empty"
            if problem:
                errors.append(f"annotation {key('revision')}: {values['revision'][:80]!r} {problem}")
        default_mount = config.default_mount_path + (f"/{name}" if name else "")
        mount_path = values.get("mount-path", default_mount)
        problem = _mount_path_problem(mount_path)
        if problem:
            errors.append(f"annotation {key('mount-path')}: {mount_path[:120]!r} {problem}")
        secret = values.get("secret") or None
        if "secret" in values and (not secret or len(secret) > 253 or not _DNS_SUBDOMAIN.match(secret)):
            errors.append(f"annotation {key('secret')}: {values['secret'][:80]!r} is not a valid Secret name "
                          f"(lowercase DNS-1123 subdomain)")
        subdir = values.get("subdir", "").strip("/")
        if subdir and (not _MOUNT_CHARS.match("/" + subdir) or posixpath.normpath(subdir) != subdir
                       or subdir.startswith("..")):
            errors.append(f"annotation {key('subdir')}: {values['subdir'][:120]!r} must be a plain relative path "
                          f"inside the repository (no '..')")
        chosen: dict[str, Any] = {}
        for base, setting in SETTING_KEYS.items():
            if base in values:
                try:
                    chosen[setting] = parse_value(setting, values[base])
                except ConfigError as err:
                    errors.append(f"annotation {key(base)}: {str(err).split(': ', 1)[-1]}")
        specs.append(RepoSpec(name, values["repo"], revision, mount_path, secret, subdir, chosen))

    # Mount paths: not nested in each other, not colliding with what the containers mount.
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            if _nested(kernel_path(a.mount_path), kernel_path(b.mount_path)):
                errors.append(f"annotation {a.key('mount-path')}: {a.mount_path!r} overlaps {b.mount_path!r} of "
                              f"{b.key('repo')}; give each repository its own {PREFIX}mount-path.<name>")
    for kind in ("initContainers", "containers"):
        for c in _list(spec.get(kind)):
            for m in _list(_dict(c).get("volumeMounts")):
                raw = _dict(m).get("mountPath")
                if not isinstance(raw, str):
                    continue
                existing = kernel_path(raw)   # '//data/' is the kernel's '/data'
                for s in specs:
                    mine = kernel_path(s.mount_path)
                    if mine == existing or existing.startswith(mine.rstrip("/") + "/"):
                        errors.append(f"annotation {s.key('mount-path')}: {s.mount_path!r} collides with volumeMount "
                                      f"{raw!r} of container {_dict(c).get('name')!r}")

    if CACHE_SIZE in annotations and isinstance(annotations[CACHE_SIZE], str):
        try:
            if parse_quantity(annotations[CACHE_SIZE]) < MIN_CACHE:
                errors.append(f"annotation {CACHE_SIZE}: {annotations[CACHE_SIZE]!r} is below the 512Mi minimum")
            elif config.cache_mode != "emptyDir":
                warnings.append(f"annotation {CACHE_SIZE} is ignored: the cluster's cache is a node-shared hostPath")
        except ValueError as err:
            errors.append(f"annotation {CACHE_SIZE}: {err}")
    inject = annotations.get(INJECT)
    if inject is not None and str(inject).strip().lower() not in ("true", "false"):
        errors.append(f"annotation {INJECT}: expected \"true\" or \"false\", got {str(inject)[:40]!r}")
    elif str(inject).strip().lower() == "true" and not grouped:
        errors.append(f"annotation {INJECT} is \"true\" but the pod names no repository ({PREFIX}repo)")
    return specs, errors, warnings


# ---------------------------------------------------------------- the patch


def _sidecar(spec: RepoSpec, index: int, port: int, config: WebhookConfig, budget: int,
             cache_request: str | None = None, exit_with_app: bool = False) -> dict:
    # The sidecar's settings (sidecar.settings names them): what the annotations and the chart
    # decided, then engine settings (the chart's webhook_jobs, ... unless the pod's annotations choose).
    chosen: dict[str, Any] = {"repo": spec.repo, "revision": spec.revision, "subdir": spec.subdir,
                              "mount": spec.mount_path, "cache_dir": CACHE_PATH,
                              "cache_size": f"{max(budget // 2**20, 1)}M", "port": port, "bind": "0.0.0.0"}
    chosen.update(sorted({**config.sidecar_settings, **spec.settings}.items()))
    env = [{"name": env_name(k), "value": env_text(k, v)} for k, v in chosen.items() if v not in (None, "")]
    if spec.secret:
        # The Secret as read-only files; the sidecar takes only the documented keys from it
        # (sidecar.secretfiles). Never envFrom: every key would become a variable, LD_PRELOAD,
        # PYTHONPATH or GIT_SSH_COMMAND included, acting before any code of ours runs.
        env += [{"name": "DDA_SECRET_DIR", "value": SECRET_PATH},
                {"name": "DDA_SSH_KEY_FILE", "value": f"{SECRET_PATH}/ssh-privatekey"},
                {"name": "DDA_SSH_KNOWN_HOSTS_FILE", "value": f"{SECRET_PATH}/known_hosts"}]
    if config.mode == "csi":
        env.append({"name": "DDA_FUSE_FD_SOCKET", "value": spec.socket})
    if exit_with_app:
        # Fallback mode: the sidecar sees the pod's processes (shareProcessNamespace) and stops
        # once the app containers' processes have exited, so a Job's pod completes.
        env.append({"name": "DDA_EXIT_WITH_APP", "value": "true"})
    resources = copy.deepcopy(dict(config.resources))
    if cache_request:
        # The cache emptyDir counts against the node's ephemeral storage: request what it may
        # fill, so the scheduler places the pod where it fits (the first sidecar asks for the
        # pod's one shared cache volume).
        requests = dict(resources.get("requests") or {})
        requests.setdefault("ephemeral-storage", cache_request)
        resources["requests"] = requests
    probe = {"httpGet": {"path": "/readyz", "port": port}}
    container: dict[str, Any] = {
        "name": spec.container,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": ["sidecar"],
        "env": env,
        "ports": [{"name": PORT_NAME if index == 0 else f"{PORT_NAME}-{index}", "containerPort": port,
                   "protocol": "TCP"}],
        "startupProbe": {**probe, "periodSeconds": 1, "timeoutSeconds": 1,
                         "failureThreshold": config.startup_timeout},
        "readinessProbe": {**probe, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 3},
        "resources": resources,
        "securityContext": _security_context(config.mode),
        "volumeMounts": _sidecar_mounts(spec, config.mode),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.secret:
        container["volumeMounts"].append({"name": spec.secret_volume, "mountPath": SECRET_PATH, "readOnly": True})
    if config.native_sidecar:
        container["restartPolicy"] = "Always"
    else:
        # Fallback: the kubelet starts regular containers in order and runs each postStart hook
        # to completion before starting the next one, so the app waits for the mount.
        container["lifecycle"] = {"postStart": {"exec": {"command": [
            "python", "-m", "sidecar.webhook.wait_ready", "--port", str(port),
            "--timeout", str(config.startup_timeout)]}}}
    return container


def _security_context(mode: str) -> dict:
    if mode == "csi":
        # The node plugin mounted FUSE; serving a descriptor needs no privilege at all. Every
        # field Pod Security "restricted" asks of a container is set here, so the pod's own
        # securityContext (or its absence) does not matter.
        return {"runAsUser": NOBODY, "runAsGroup": NOBODY, "runAsNonRoot": True, "privileged": False,
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    # FUSE needs /dev/fuse and CAP_SYS_ADMIN; Bidirectional propagation needs privileged.
    return {"privileged": True, "allowPrivilegeEscalation": True, "runAsUser": 0,
            "runAsGroup": 0, "runAsNonRoot": False, "readOnlyRootFilesystem": False}


def _sidecar_mounts(spec: RepoSpec, mode: str) -> list[dict]:
    if mode == "csi":
        # No data volume here: the runtime stats a mount while setting up a container, and this
        # one answers only once this very container serves it.
        return [{"name": SOCKET_VOLUME, "mountPath": SOCKET_PATH},
                {"name": CACHE_VOLUME, "mountPath": CACHE_PATH},
                {"name": TMP_VOLUME, "mountPath": "/tmp"}]
    return [{"name": spec.volume, "mountPath": spec.mount_path, "mountPropagation": "Bidirectional"},
            {"name": CACHE_VOLUME, "mountPath": CACHE_PATH}]


def _data_volume(spec: RepoSpec, config: WebhookConfig) -> dict:
    """The volume the app containers mount. csi: an ephemeral inline volume of our driver; its
    attributes say which repository (never a credential: the Secret stays with the sidecar)
    and where the node plugin offers the descriptor (sidecar.csi.node reads socketVolume, uid
    and gid; the kubelet adds the pod's uid). privileged: an emptyDir the sidecar mounts over."""
    if config.mode != "csi":
        return {"name": spec.volume, "emptyDir": {}}
    attributes = {"repo": spec.repo}
    if spec.revision:
        attributes["revision"] = spec.revision
    if spec.subdir:
        attributes["subdir"] = spec.subdir
    attributes.update({"socketVolume": SOCKET_VOLUME, "uid": str(NOBODY), "gid": str(NOBODY)})
    return {"name": spec.volume, "csi": {"driver": config.csi_driver, "readOnly": True,
                                         "volumeAttributes": attributes}}


def _used_ports(spec: dict) -> set[int]:
    ports = set()
    for c in _list(spec.get("containers")) + _list(spec.get("initContainers")):
        for p in _list(_dict(c).get("ports")):
            if isinstance(_dict(p).get("containerPort"), int):
                ports.add(p["containerPort"])
    return ports


def _app_mount(spec: RepoSpec, mode: str) -> dict:
    if mode == "csi":   # the volume is the mount itself: no propagation needed
        return {"name": spec.volume, "mountPath": spec.mount_path, "readOnly": True}
    return {"name": spec.volume, "mountPath": spec.mount_path, "mountPropagation": "HostToContainer",
            "readOnly": True}


def _add_mounts(ops: list[dict], kind: str, index: int, container: dict, mounts: list[dict]) -> None:
    if not mounts:
        return
    base = f"/spec/{kind}/{index}/volumeMounts"
    if not isinstance(container.get("volumeMounts"), list):
        ops.append({"op": "add", "path": base, "value": mounts})
    else:
        ops.extend({"op": "add", "path": base + "/-", "value": m} for m in mounts)


def build_patch(pod: dict, specs: list[RepoSpec], config: WebhookConfig) -> list[dict]:
    meta = _dict(pod.get("metadata"))
    spec = _dict(pod.get("spec"))
    annotations = _dict(meta.get("annotations"))
    ops: list[dict] = []

    # 1. app containers (and, with native sidecars, the pod's own init containers, which start
    #    after ours) see every repository read-only, HostToContainer. Indices are those of the
    #    original lists: these ops run before the sidecars are inserted.
    mounts = [_app_mount(s, config.mode) for s in specs]
    if config.native_sidecar:
        for i, c in enumerate(_list(spec.get("initContainers"))):
            _add_mounts(ops, "initContainers", i, _dict(c), mounts)
    for i, c in enumerate(_list(spec.get("containers"))):
        _add_mounts(ops, "containers", i, _dict(c), mounts)

    # 2. volumes: one per repository (csi: the CSI volume; privileged: an emptyDir the mount
    #    propagates through), one cache; csi: the socket emptyDir and a /tmp.
    if config.cache_mode == "emptyDir":
        size = annotations.get(CACHE_SIZE) if isinstance(annotations.get(CACHE_SIZE), str) else None
        size = (size or config.cache_size).strip()
        cache_volume = {"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": size}}
        budget = math.floor(parse_quantity(size) * config.cache_fraction)
    else:
        cache_volume = {"name": CACHE_VOLUME, "hostPath": {"path": config.cache_host_path, "type": "DirectoryOrCreate"}}
        budget = parse_quantity(config.cache_size)
    volumes = [_data_volume(s, config) for s in specs]
    if config.mode == "csi":
        # Disk-backed (never medium: Memory): a tmpfs mounted by the kubelet after the node
        # plugin created a socket in the folder would hide it.
        volumes += [{"name": SOCKET_VOLUME, "emptyDir": {"sizeLimit": "1Mi"}},
                    {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": TMP_SIZE}}]
    volumes.append(cache_volume)
    # The kubelet writes a Secret's files as root: the unprivileged sidecar (csi mode) can read
    # them only if everyone may; only that sidecar mounts the volume.
    mode = 0o444 if config.mode == "csi" else 0o400
    volumes += [{"name": s.secret_volume, "secret": {"secretName": s.secret, "defaultMode": mode}}
                for s in specs if s.secret]
    if isinstance(spec.get("volumes"), list):
        ops.extend({"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes)
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})

    # 3. the sidecars, first in start order.
    used = _used_ports(spec)
    # Fallback: a shared process namespace lets the sidecar see when the app is done; a pod
    # that says shareProcessNamespace: false keeps it (and its sidecar then runs on).
    exit_with_app = not config.native_sidecar and spec.get("shareProcessNamespace") is not False
    if exit_with_app and spec.get("shareProcessNamespace") is not True:
        ops.append({"op": "add", "path": "/spec/shareProcessNamespace", "value": True})
    sidecars, port = [], config.metrics_port
    for index, s in enumerate(specs):
        while port in used:
            port += 1
        cache_request = cache_volume["emptyDir"]["sizeLimit"] if index == 0 and "emptyDir" in cache_volume else None
        sidecars.append(_sidecar(s, index, port, config, budget, cache_request, exit_with_app))
        used.add(port)
    kind = "initContainers" if config.native_sidecar else "containers"
    if isinstance(spec.get(kind), list):
        ops.extend({"op": "add", "path": f"/spec/{kind}/{i}", "value": c} for i, c in enumerate(sidecars))
    else:
        ops.append({"op": "add", "path": f"/spec/{kind}", "value": sidecars})

    # 4. annotations: the injection marker (and, in fallback mode, keep `kubectl logs/exec`
    #    pointed at the app rather than at the sidecar now first in the list).
    marks = {INJECTED: ",".join(s.container for s in specs)}
    apps = _list(spec.get("containers"))
    if not config.native_sidecar and DEFAULT_CONTAINER not in annotations and apps and _dict(apps[0]).get("name"):
        marks[DEFAULT_CONTAINER] = apps[0]["name"]
    if not isinstance(meta.get("annotations"), dict):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": marks})
    else:
        ops.extend({"op": "add", "path": "/metadata/annotations/" + escape(k), "value": v} for k, v in marks.items())
    # 5. a label, so a PodMonitor can select the injected pods.
    if not isinstance(meta.get("labels"), dict):
        ops.append({"op": "add", "path": "/metadata/labels", "value": {INJECTED: "true"}})
    else:
        ops.append({"op": "add", "path": "/metadata/labels/" + escape(INJECTED), "value": "true"})
    return ops


def reinvocation_patch(pod: dict) -> list[dict]:
    """An already-injected pod: add our data mounts only to app containers that lack them (a
    later webhook may have added a container). Usually empty."""
    spec = _dict(pod.get("spec"))
    found: dict[str, dict] = {}
    everyone = _list(spec.get("initContainers")) + _list(spec.get("containers"))
    # privileged mode: the sidecar mounts its data volume (the app side is HostToContainer);
    # csi mode: only the app containers do, so the first one that has it shows the mount
    for ours in (True, False):
        for c in everyone:
            if _is_ours(c) != ours:
                continue
            for m in _list(_dict(c).get("volumeMounts")):
                m = _dict(m)
                name = m.get("name")
                if isinstance(name, str) and name.startswith(DATA_VOLUME) and isinstance(m.get("mountPath"), str):
                    mount = {"name": name, "mountPath": m["mountPath"]}
                    if ours or "mountPropagation" in m:
                        mount["mountPropagation"] = "HostToContainer"
                    found.setdefault(name, {**mount, "readOnly": True})
    volumes = {_dict(v).get("name") for v in _list(spec.get("volumes"))}
    wanted = [m for name, m in found.items() if name in volumes]
    ops: list[dict] = []
    for kind in ("containers",):
        for i, c in enumerate(_list(spec.get(kind))):
            c = _dict(c)
            if _is_ours(c):
                continue
            have = {_dict(m).get("name") for m in _list(c.get("volumeMounts"))}
            paths = {kernel_path(p) for m in _list(c.get("volumeMounts"))
                     if isinstance(p := _dict(m).get("mountPath"), str)}
            _add_mounts(ops, kind, i, c, [m for m in wanted if m["name"] not in have
                                          and kernel_path(m["mountPath"]) not in paths])
    return ops


# ---------------------------------------------------------------- the review


def _response(uid: str, allowed: bool = True, ops: list[dict] | None = None, message: str | None = None,
              warnings: list[str] | None = None) -> dict:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode()
    if not allowed:
        response["status"] = {"code": 400, "status": "Failure", "reason": "BadRequest", "message": message or ""}
    if warnings:
        response["warnings"] = [w[:500] for w in warnings]
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def decide(pod: dict, config: WebhookConfig) -> tuple[bool, list[dict], str | None, list[str]]:
    """(allowed, ops, denial message, warnings) for one pod."""
    meta = _dict(pod.get("metadata"))
    labels, annotations = _dict(meta.get("labels")), _dict(meta.get("annotations"))
    if str(labels.get(INJECT, "")).strip().lower() == "false" or str(annotations.get(INJECT, "")).strip().lower() == "false":
        return True, [], None, []
    if not any(isinstance(k, str) and k.startswith(PREFIX) for k in annotations):
        return True, [], None, []
    if _already_injected(pod):
        return True, reinvocation_patch(pod), None, []
    specs, errors, warnings = parse_annotations(pod, config)
    if errors:
        if config.on_invalid == "warn":
            return True, [], None, [f"dda-sidecar not injected: {e}" for e in errors] + warnings
        return False, [], "dda-sidecar: " + "; ".join(errors), warnings
    if not specs:
        return True, [], None, warnings
    return True, build_patch(pod, specs, config), None, warnings


def mutate(review: Any, config: WebhookConfig) -> dict:
    """AdmissionReview request -> AdmissionReview response. Raises BadReview only when the body
    is no AdmissionReview at all; any other problem becomes an answer."""
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise BadReview("expected an AdmissionReview object")
    if review.get("apiVersion") != "admission.k8s.io/v1":
        raise BadReview(f"unsupported apiVersion {str(review.get('apiVersion'))[:60]!r}; expected admission.k8s.io/v1")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("the AdmissionReview has no request.uid")
    uid = request["uid"]
    try:
        kind = _dict(request.get("kind"))
        if (kind.get("kind") != "Pod" or kind.get("group", "") != "" or request.get("operation") != "CREATE"
                or request.get("subResource")):
            return _response(uid)
        pod = request.get("object")
        if not isinstance(pod, dict):
            return _response(uid, False, message="dda-sidecar: the request carries no pod object")
        allowed, ops, message, warnings = decide(pod, config)
        return _response(uid, allowed, ops, message, warnings)
    except Exception as err:  # never crash the API server's call: answer by policy
        log.exception("admission of request %s failed", uid)
        text = f"dda-sidecar: internal error while injecting ({type(err).__name__})"
        if config.on_invalid == "warn":
            return _response(uid, True, warnings=[text + "; the pod was admitted without the sidecar"])
        return _response(uid, False, message=text)
