"""The one settings model of dda: engine, mount, sidecar, hooks, loader and webhook.

Every setting has one name (the field name below). It is the YAML key in the config file,
`DDA_<NAME>` in the environment, the flag listed in its metadata, and, for settings a pod may
choose, the annotation `dda-sidecar.io/<name with ->` and a Helm value under `sidecar.`.
Precedence (last wins): defaults < config file < environment < flags.

Remote overrides read DDA_REMOTE_<NAME>_<KEY> (NAME upper-cased, '-' and '.' as '_'), e.g.
DDA_REMOTE_STORAGE_URL; NAME may be DEFAULT for the default remote. One parser each for sizes,
durations and booleans lives here; everything else (CLI, webhook, hooks) calls into it.

`python -m sidecar.settings --markdown` prints the README's configuration table;
`--write-readme` replaces it between the markers in README.md.
"""
from __future__ import annotations

import argparse
import contextvars
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Mapping

import yaml
from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError

ENV_PREFIX = "DDA_"
ANNOTATION_PREFIX = "dda-sidecar.io/"
REMOTE_KEYS = (
    "url", "endpoint_url", "region", "access_key_id", "secret_access_key", "session_token",
    "user", "password", "token", "auth", "custom_auth_header", "method", "profile", "ssl_verify",
)
SECRET_REMOTE_KEYS = ("password", "token", "secret_access_key", "session_token", "custom_auth_header")
CHUNK_BLOCK = 128 * 1024              # the store's CRC block (sidecar/store/chunks.py BLOCK)
CHUNK_MAX = 125 * CHUNK_BLOCK         # what one chunk header can describe (chunks.py MAX_BLOCKS)
GROUPS = ("engine", "mount", "sidecar", "hooks", "loader", "webhook", "csi")

# ------------------------------------------------------------------------------ parsers

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_QUANTITY_FACTORS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                     "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def parse_size(text: str | int, what: str = "size") -> int:
    """'50G' -> 53687091200 bytes. Units are binary (K=1024), as `du -h` and DVC users expect;
    'Ki'/'KiB'/'KB' mean the same. Raises ConfigError naming `what`."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: cannot read {text!r} as a size (examples: 500M, 50G, 1T)")
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{what}: cannot read {text!r} as a size (examples: 500M, 50G, 1T)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** "_kmgtp".index(unit or "_"))


def parse_quantity(text: str) -> int:
    """A Kubernetes resource quantity ('20Gi', '500M' = 500e6, '1073741824') in bytes; what
    the kubelet means by an emptyDir sizeLimit. Raises ValueError."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (examples: 512Mi, 20Gi, 1Ti)")
    return int(float(match.group(1)) * _QUANTITY_FACTORS[match.group(2)])


def parse_duration(text: str | float, what: str = "duration") -> float:
    """'60', '60s', '1.5m', '250ms', '1h' -> seconds (float, > 0). Raises ConfigError naming `what`."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: cannot read {text!r} as seconds")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise ConfigError(f"{what}: cannot read {text!r} as seconds (examples: 30, 90s, 2m)")
        value = float(match.group(1)) * _DURATION_FACTORS[(match.group(2) or "s").lower()]
    if value <= 0:
        raise ConfigError(f"{what}: must be positive, got {text!r}")
    return value


def parse_bool(text: str | bool | None, what: str = "flag", default: bool = False) -> bool:
    """'true/yes/on/1' and 'false/no/off/0' (any case); None or '' -> default."""
    if isinstance(text, bool):
        return text
    if text is None or str(text).strip() == "":
        return default
    value = str(text).strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ConfigError(f"{what}: expected true or false, got {str(text)[:40]!r}")


def parse_whole(text: str | int, what: str = "number", minimum: int = 0, maximum: int | None = None) -> int:
    """A whole number in [minimum, maximum]. Raises ConfigError naming `what`."""
    try:
        if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
            raise ValueError
        number = int(str(text).strip()) if not isinstance(text, (int, float)) else int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a whole number, got {str(text)[:40]!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{what}: out of range ({bound}): {text!r}")
    return number


def check_chunk_size(value: int, what: str = "chunk_size") -> int:
    if value % CHUNK_BLOCK or not CHUNK_BLOCK <= value <= CHUNK_MAX:
        raise ConfigError(f"{what}: must be a multiple of 128K between 128K and {CHUNK_MAX // 1024}K, got {value}")
    return value


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dda"


# Pydantic wraps ValueError (ConfigError is not one) into ValidationError: adapt each parser.
def _v(parse: Callable[..., Any], *args: Any, **kwargs: Any) -> BeforeValidator:
    def validate(value: Any, info: Any = None) -> Any:
        if value is None:
            return None
        try:
            return parse(value, *args, **kwargs)
        except ConfigError as err:
            raise ValueError(str(err).split(": ", 1)[-1]) from None
    return BeforeValidator(validate)


def _path(value: Any) -> Path:
    return Path(os.path.expanduser(str(value)))


def _csv(value: Any) -> list[str]:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, (list, tuple)):
        return [str(p) for p in value]
    raise ConfigError(f"expected a comma-separated list, got {value!r}")


def _json_object(value: Any) -> dict[str, Any]:
    data = json.loads(value) if isinstance(value, str) else value
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object")
    return data


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if str(value) not in choices:
            raise ConfigError(f"expected {' or '.join(choices)}, got {str(value)[:40]!r}")
        return str(value)
    return parse


def _k8s_size(value: Any) -> str:
    try:
        if parse_quantity(str(value)) < 512 * 2**20:
            raise ConfigError(f"{value} is below the 512Mi minimum")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return str(value).strip()


def _fraction(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a number, got {value!r}") from None
    if not 0.1 <= number <= 1.0:
        raise ConfigError(f"expected 0.1..1.0, got {number}")
    return number


def _absolute(value: Any) -> str:
    if not str(value).startswith("/"):
        raise ConfigError(f"must be absolute, got {str(value)[:80]!r}")
    return str(value)


Size = Annotated[int, _v(parse_size)]
ChunkSize = Annotated[int, _v(lambda v: check_chunk_size(parse_size(v)))]
Seconds = Annotated[float, _v(parse_duration)]
Bool = Annotated[bool, _v(parse_bool)]
Jobs = Annotated[int, _v(parse_whole, minimum=1, maximum=1024)]
Retries = Annotated[int, _v(parse_whole, minimum=0, maximum=100)]
Port = Annotated[int, _v(parse_whole, minimum=0, maximum=65535)]
SidecarPort = Annotated[int, _v(parse_whole, minimum=1024, maximum=65000)]
PathSetting = Annotated[Path, _v(_path)]
CsvList = Annotated[list[str], _v(_csv)]
JsonObject = Annotated[dict[str, Any], _v(_json_object)]
K8sSize = Annotated[str, _v(_k8s_size)]
Fraction = Annotated[float, _v(_fraction)]
AbsolutePath = Annotated[str, _v(_absolute)]


def setting(default: Any = None, doc: str = "", *, group: str, flags: tuple[str, ...] = (),
            annotation: bool | str = False, helm: str | None = None, env: str | None = None, secret: bool = False,
            shown: str | None = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A field with the metadata every frontend reads: group (who uses it), flags, whether a pod
    annotation may set it (True: dda-sidecar.io/<name with ->, passed through to the sidecar's
    environment; a string: the annotation the webhook turns into it its own way), its Helm
    value, an env name other than DDA_<NAME>, secrecy, and the default as the README shows it."""
    extra = {"group": group, "flags": list(flags), "annotation": annotation, "helm": helm, "env": env,
             "secret": secret, "shown": shown}
    kwargs: dict[str, Any] = {"description": doc, "json_schema_extra": extra, "repr": not secret}
    if default_factory is not None:
        return Field(default_factory=default_factory, **kwargs)
    return Field(default, **kwargs)


# ------------------------------------------------------------------------------ the model


class Settings(BaseSettings):
    """Every setting of every dda process. `Settings(...)` alone takes only what it is given
    (defaults for the rest); `Settings.load()` reads flags, environment and config file."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=False)

    # engine: what to read and how to fetch it
    repo: str | None = setting(None, "git URL or local path of the repository (the URL argument of "
                               "`dda ls/cat/get/mount/upload`)", group="engine", flags=("--repo",),
                               annotation="repo", shown="—")
    revision: str | None = setting(None, "branch, tag or commit (DDA_REV is accepted too)", group="engine",
                                   flags=("--rev", "--revision"), annotation="revision",
                                   shown="remote's default branch")
    cache_dir: PathSetting = setting(None, "cache directory", group="engine", flags=("--cache-dir",),
                                     default_factory=default_cache_dir, shown="~/.cache/dda")
    cache_size: Size = setting(20 * 1024**3, "cache budget (K/M/G/T, binary); in a pod: the cache volume's "
                               "budgetFraction", group="engine", flags=("--cache-size",), annotation="cache-size",
                               helm="sidecar.cache.size", shown="20G")
    chunk_size: ChunkSize = setting(8 * 1024**2, "bytes per ranged request and cache chunk (multiple of 128K)",
                                    group="engine", flags=("--chunk-size",), annotation=True,
                                    helm="sidecar.chunkSize", shown="8M")
    jobs: Jobs = setting(16, "requests in flight per remote", group="engine", flags=("--jobs", "-j"),
                         annotation=True, helm="sidecar.jobs")
    deadline: Seconds = setting(60.0, "seconds a read may wait for a remote before it fails", group="engine",
                                flags=("--deadline",), annotation=True, helm="sidecar.deadline", shown="60")
    request_timeout: Seconds = setting(30.0, "seconds one HTTP request may take", group="engine",
                                       flags=("--request-timeout",), shown="30")
    retries: Retries = setting(5, "retries of a failed request", group="engine", flags=("--retries",),
                               annotation=True, helm="sidecar.retries")
    verify: Annotated[str, _v(_choice("stream", "before-read"))] = setting(
        "stream", "objects larger than one chunk: stream = a reader takes bytes as they arrive and the read "
        "that reaches the end fails if the md5 does not match; before-read = no byte before the md5 is known",
        group="engine", flags=("--verify",))
    git_user: str | None = setting(None, "git user name (or in the URL; never a flag)", group="engine",
                                   shown="")
    git_token: str | None = setting(None, "git password or token (or in the URL; never a flag)",
                                    group="engine", secret=True, shown="")
    ca_bundle: str | None = setting(None, "PEM file of private CAs that git and every remote trust besides the "
                                    "public ones (a remote's own ssl_verify in .dvc/config still wins for it)",
                                    group="engine", flags=("--ca-bundle",), shown="")
    remotes: dict[str, dict[str, str]] = setting(
        None, "per-remote overrides: NAME is the remote's name in .dvc/config, KEY one of the remote keys below",
        group="engine", secret=True, default_factory=dict, shown="", env="DDA_REMOTE_<NAME>_<KEY>")

    # mount (`dda mount`, `dda sidecar`)
    mount: str | None = setting(None, "mountpoint", group="mount", flags=("--mount",), annotation="mount-path",
                                helm="sidecar.defaultMountPath", shown="")
    subdir: str = setting("", "mount only this directory of the repository", group="mount",
                          flags=("--subdir",), annotation="subdir", shown="")
    allow_non_empty: Bool = setting(False, "mount over a non-empty directory", group="mount",
                                    flags=("--allow-non-empty",))
    log_file: str | None = setting(None, "daemon log of `dda mount -d`", group="mount", flags=("--log-file",),
                                   shown="CACHE_DIR/logs/mount.log")

    # sidecar (`dda sidecar`)
    port: Port = setting(9400, "HTTP port of /metrics, /healthz, /readyz and the loader API (0: any)",
                         group="sidecar", flags=("--port",), helm="sidecar.metricsPort")
    bind: str = setting("0.0.0.0", "HTTP address of /metrics, /healthz and /readyz; the loader API (/v1/...) "
                        "answers on 127.0.0.1 only", group="sidecar", flags=("--bind",))
    exit_with_app: Bool = setting(False, "stop once the pod's app containers have exited (fallback, non-native "
                                  "sidecar; needs shareProcessNamespace; set by the webhook)", group="sidecar")
    secret_dir: str | None = setting(None, "folder of the mounted Secret: only its documented keys are read "
                                     "(set by the webhook)", group="sidecar", shown="")
    ssh_key_file: str | None = setting(None, "ssh private key for ssh:// git URLs (set by the webhook from the "
                                       "Secret's ssh-privatekey)", group="sidecar", shown="")
    ssh_known_hosts_file: str | None = setting(None, "known_hosts for ssh:// git URLs (the Secret's known_hosts)",
                                               group="sidecar", shown="")
    fuse_fd_socket: str | None = setting(None, "CSI mode: unix socket on which the node plugin hands over the FUSE "
                                         "descriptor; the sidecar then mounts nothing and needs no privileges "
                                         "(`mount` becomes optional: where the app containers see the volume, "
                                         "for hinted paths) (set by the webhook)", group="sidecar", flags=("--fuse-fd-socket",))

    # CSI node plugin (`dda csi`)
    csi_endpoint: str = setting("unix:///csi/csi.sock", "gRPC endpoint the kubelet calls (a unix socket)",
                                group="csi", flags=("--csi-endpoint",))
    csi_node_id: str | None = setting(None, "node ID reported to the kubelet (NodeGetInfo)", group="csi",
                                      flags=("--node-id",), shown="the host name")
    csi_kubelet_dir: AbsolutePath = setting("/var/lib/kubelet", "the kubelet's root directory: target paths and the "
                                            "pods' emptyDirs (the descriptor sockets) lie under it", group="csi",
                                            flags=("--kubelet-dir",))
    csi_driver_name: str = setting("csi.dda-sidecar.io", "CSI driver name (the CSIDriver object's)", group="csi",
                                   flags=("--driver-name",))

    # hooks (`install_hooks()`)
    hooks_root: str | None = setting(None, "local directory standing for the repository root", group="hooks",
                                     shown="the checkout's top, else the current directory")
    hooks_exclude: CsvList | None = setting(None, "globs never served from the repository (comma-separated)",
                                            group="hooks", shown="")

    # loader (training side)
    sidecar_url: str = setting("http://127.0.0.1:9400", "where sidecar.loader reports to", group="loader")

    # webhook (`dda webhook`): what it injects into every pod
    webhook_listen: str = setting("0.0.0.0:8443", "HOST:PORT the webhook serves on", group="webhook",
                                  flags=("--listen",))
    webhook_tls_cert: str = setting("/tls/tls.crt", "serving certificate", group="webhook", flags=("--tls-cert",))
    webhook_tls_key: str = setting("/tls/tls.key", "serving key", group="webhook", flags=("--tls-key",))
    webhook_sidecar_image: str = setting("dda-sidecar:0.1.0", "image of the injected sidecar (Helm: `image`, "
                                         "or `sidecar.image`)", group="webhook",
                                         flags=("--sidecar-image",), helm="image.repository")
    webhook_sidecar_pull_policy: str = setting("IfNotPresent", "its imagePullPolicy", group="webhook",
                                               flags=("--sidecar-pull-policy",), helm="image.pullPolicy")
    webhook_sidecar_resources: JsonObject = setting(
        None, "its resources (JSON)", group="webhook", flags=("--sidecar-resources",), helm="sidecar.resources",
        # measured (tests/resources_probe.py): ~176 MiB peak RSS (process tree) and ~0.6 cores over an epoch
        default_factory=lambda: {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        shown="500m CPU, 256Mi-2Gi")
    webhook_native_sidecar: Bool = setting(True, "native sidecar (Kubernetes >= 1.29) or the fallback",
                                           group="webhook", flags=("--native-sidecar",), helm="sidecar.nativeSidecar")
    webhook_mode: Annotated[str, _v(_choice("csi", "privileged"))] = setting(
        "csi", "how injected sidecars get FUSE: csi (the node plugin `dda csi` mounts /dev/fuse and hands it to "
        "an unprivileged sidecar; the pod passes Pod Security \"restricted\") or privileged (the sidecar mounts "
        "FUSE itself as a privileged root container)", group="webhook", flags=("--mode",), helm="sidecar.mode")
    webhook_csi_driver: str = setting("csi.dda-sidecar.io", "CSI driver of the injected data volumes (csi mode; "
                                      "the node plugin's `csi_driver_name`)", group="webhook",
                                      flags=("--csi-driver",), helm="csi.driverName")
    webhook_on_invalid: Annotated[str, _v(_choice("deny", "warn"))] = setting(
        "deny", "invalid annotations: deny the pod, or admit it uninjected with a warning", group="webhook",
        flags=("--on-invalid",), helm="webhook.onInvalidAnnotation")
    webhook_cache_mode: Annotated[str, _v(_choice("emptyDir", "hostPath"))] = setting(
        "emptyDir", "emptyDir (per pod) or hostPath (shared by a node's pods)", group="webhook",
        flags=("--cache-mode",), helm="sidecar.cache.mode")
    webhook_cache_size: K8sSize = setting("20Gi", "emptyDir sizeLimit, or the hostPath budget (Kubernetes "
                                          "quantity; pods: annotation cache-size)", group="webhook",
                                          flags=("--cache-size",), helm="sidecar.cache.size")
    webhook_cache_host_path: AbsolutePath = setting("/var/lib/dda-cache", "hostPath of a node-shared cache",
                                                    group="webhook", flags=("--cache-host-path",),
                                                    helm="sidecar.cache.hostPath")
    webhook_cache_fraction: Fraction = setting(0.9, "cache budget / emptyDir sizeLimit", group="webhook",
                                               flags=("--cache-fraction",), helm="sidecar.cache.budgetFraction")
    webhook_metrics_port: SidecarPort = setting(9400, "first sidecar port (the next repositories: +1, ...)",
                                                group="webhook", flags=("--metrics-port",), helm="sidecar.metricsPort")
    webhook_default_mount_path: str = setting("/data", "mount path unless annotated (repo.<name>: /data/<name>)",
                                              group="webhook", flags=("--default-mount-path",),
                                              helm="sidecar.defaultMountPath")
    webhook_startup_timeout: Annotated[int, _v(parse_whole, minimum=1)] = setting(
        300, "seconds the startupProbe waits for /readyz", group="webhook", flags=("--startup-timeout",),
        helm="sidecar.startupTimeoutSeconds")
    # Engine settings the webhook hands to every sidecar it injects (None: the sidecar's default);
    # a pod's annotation dda-sidecar.io/<setting> overrides them.
    webhook_jobs: Jobs | None = setting(None, "`jobs` of injected sidecars", group="webhook",
                                        flags=("--sidecar-jobs",), helm="sidecar.jobs", shown="")
    webhook_deadline: Seconds | None = setting(None, "`deadline` of injected sidecars", group="webhook",
                                               flags=("--sidecar-deadline",), helm="sidecar.deadline", shown="")
    webhook_retries: Retries | None = setting(None, "`retries` of injected sidecars", group="webhook",
                                              flags=("--sidecar-retries",), helm="sidecar.retries", shown="")
    webhook_chunk_size: ChunkSize | None = setting(None, "`chunk_size` of injected sidecars", group="webhook",
                                                   flags=("--sidecar-chunk-size",), helm="sidecar.chunkSize",
                                                   shown="")

    # -- sources ----------------------------------------------------------------------------------
    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        ctx = _LOADING.get()
        if ctx is None:             # Settings(...): exactly what the caller gave, no ambient state
            return (init_settings,)
        env, file_values = ctx
        # first wins: flags > environment > config file > defaults
        return (init_settings, _EnvSource(settings_cls, env), _ValuesSource(settings_cls, file_values))

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
             config_file: str | Path | None = None) -> "Settings":
        """Defaults < config file (`config_file`, else DDA_CONFIG, else ~/.config/dda/config.yaml
        if present) < environment (`env`, default os.environ) < `flags` (None values ignored).
        Raises ConfigError with one line naming the setting."""
        env = os.environ if env is None else env
        file_values = _read_config_file(config_file, env)
        given = {k: v for k, v in (flags or {}).items() if v is not None and k in cls.model_fields}
        token = _LOADING.set((env, file_values))
        try:
            return cls(**given)
        except ValidationError as err:
            raise ConfigError(_one_line(err)) from None
        finally:
            _LOADING.reset(token)

    # -- helpers the engine uses -------------------------------------------------------------------
    def secrets(self) -> list[str]:
        """Every credential these settings hold (to redact from messages)."""
        found = [self.git_token]
        for values in self.remotes.values():
            found.extend(values.get(key) for key in SECRET_REMOTE_KEYS)
        return [s for s in found if s]

    def remote_override(self, name: str, is_default: bool) -> dict[str, str]:
        merged: dict[str, str] = {}
        if is_default:
            merged.update(self.remotes.get("default", {}))
        merged.update(self.remotes.get(name, {}))
        return merged


_LOADING: contextvars.ContextVar[tuple[Mapping[str, str], dict[str, Any]] | None] = \
    contextvars.ContextVar("dda_settings_loading", default=None)


def env_name(name: str) -> str:
    """The environment variable of setting `name`."""
    return meta(name).get("env") or ENV_PREFIX + name.upper()


def meta(name: str) -> dict[str, Any]:
    extra = Settings.model_fields[name].json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def names(group: str | None = None) -> list[str]:
    """Setting names in declaration order, optionally of one group."""
    return [n for n in Settings.model_fields if group is None or meta(n)["group"] == group]


def annotation_settings() -> list[str]:
    """Settings a pod may choose by annotation (dda-sidecar.io/<name with ->)."""
    return [n for n in Settings.model_fields if meta(n).get("annotation") is True]


def annotation_key(name: str) -> str:
    return name.replace("_", "-")


def parse_value(name: str, value: Any) -> Any:
    """`value` parsed and checked as setting `name` would be; ConfigError naming it otherwise."""
    try:
        return _adapter(name).validate_python(value)
    except ValidationError as err:
        raise ConfigError(f"{name}: {_one_line(err).split(': ', 1)[-1]}") from None


@functools.lru_cache(maxsize=None)
def _adapter(name: str) -> TypeAdapter[Any]:
    field = Settings.model_fields[name]
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return TypeAdapter(kind)


def from_env(name: str, env: Mapping[str, str] | None = None) -> Any:
    """One setting from the environment alone (its DDA_ variable, parsed), else its default;
    for code that needs one value without loading everything (the training-side loader)."""
    text = (os.environ if env is None else env).get(env_name(name))
    if text:
        return parse_value(name, text)
    return Settings.model_fields[name].get_default(call_default_factory=True)


def env_text(name: str, value: Any) -> str:
    """How `value` of setting `name` is written into an environment variable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _one_line(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "settings"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown setting"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


class _EnvSource(PydanticBaseSettingsSource):
    """DDA_<NAME> for every setting (empty values ignored), DDA_REV for the revision, and
    DDA_REMOTE_<NAME>_<KEY> remote overrides, read from the given mapping."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]):
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.env.get(env_name(field_name)), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in self.settings_cls.model_fields:
            if name == "remotes":
                continue
            value = self.env.get(env_name(name))
            if value:
                values[name] = value
        if "revision" not in values and self.env.get("DDA_REV"):
            values["revision"] = self.env["DDA_REV"]
        remotes = env_remotes(self.env)
        if remotes:
            values["remotes"] = remotes
        return values


class _ValuesSource(PydanticBaseSettingsSource):
    """Values already read from the YAML config file."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]):
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def env_remotes(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """DDA_REMOTE_<NAME>_<KEY> variables -> {name: {key: value}}."""
    found: dict[str, dict[str, str]] = {}
    keys = sorted(REMOTE_KEYS, key=len, reverse=True)  # match SECRET_ACCESS_KEY before KEY-like suffixes
    for var, value in env.items():
        if not var.startswith("DDA_REMOTE_"):
            continue
        rest = var[len("DDA_REMOTE_"):]
        for key in keys:
            suffix = "_" + key.upper()
            if rest.endswith(suffix) and len(rest) > len(suffix):
                found.setdefault(rest[: -len(suffix)].lower(), {})[key] = value
                break
    return found


def remote_settings_key(name: str) -> str:
    """A remote's name as the override keys spell it ('my-remote.x' -> 'my_remote_x')."""
    return re.sub(r"[-.]", "_", name).lower()


def _read_config_file(config_file: str | Path | None, env: Mapping[str, str]) -> dict[str, Any]:
    path = config_file or env.get("DDA_CONFIG")
    if not path:
        candidate = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "dda" / "config.yaml"
        try:
            path = candidate if candidate.is_file() else None
        except OSError:   # a HOME this user may not search (setpriv keeps root's HOME): no default file
            path = None
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    values: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key == "remotes":
            if not isinstance(value, dict):
                raise ConfigError(f"config file {path}: 'remotes' must map remote names to settings")
            remotes: dict[str, dict[str, str]] = {}
            for name, settings in value.items():
                if not isinstance(settings, dict):
                    raise ConfigError(f"config file {path}: remotes.{name} must be a mapping")
                unknown = set(settings) - set(REMOTE_KEYS)
                if unknown:
                    raise ConfigError(f"config file {path}: remotes.{name}: unknown keys {sorted(unknown)}")
                remotes[remote_settings_key(str(name))] = {k: str(v) for k, v in settings.items()}
            values["remotes"] = remotes
        elif key in Settings.model_fields:
            values[key] = value
        else:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
    return values


def load_config(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                config_file: str | Path | None = None) -> Settings:
    """`Settings.load` (the name older callers use)."""
    return Settings.load(flags, env, config_file)


# ------------------------------------------------------------------------------ flags


def add_arguments(parser: argparse.ArgumentParser, settings: Iterable[str]) -> None:
    """Add the flags of `settings` to `parser`; each flag's dest is the setting's name and its
    default None, so an absent flag leaves the environment and config file in charge."""
    for name in settings:
        m = meta(name)
        field = Settings.model_fields[name]
        shown = m.get("shown")
        default = shown if shown is not None else _shown_default(name)
        help_text = f"{field.description} [{env_name(name)}]" + (f" (default {default})" if default else "")
        if name == "allow_non_empty":
            parser.add_argument(*m["flags"], dest=name, action="store_true", default=None, help=help_text)
        elif name == "webhook_native_sidecar":
            parser.add_argument(*m["flags"], dest=name, choices=("true", "false"), help=help_text)
        else:
            metavar = m["flags"][0].lstrip("-").upper().replace("-", "_")
            parser.add_argument(*m["flags"], dest=name, default=None, metavar=metavar, help=help_text)


def flag_values(ns: argparse.Namespace, settings: Iterable[str] | None = None) -> dict[str, Any]:
    """The settings given on the command line (absent flags are None and left out)."""
    wanted = settings if settings is not None else Settings.model_fields
    return {n: getattr(ns, n) for n in wanted if getattr(ns, n, None) is not None}


# ------------------------------------------------------------------------------ the README table

README_BEGIN = "<!-- settings-table:begin (generated by `python -m sidecar.settings --write-readme`) -->"
README_END = "<!-- settings-table:end -->"
_GROUP_TITLES = {"engine": "every command and `install_hooks()`", "mount": "`dda mount`, `dda sidecar`",
                 "sidecar": "`dda sidecar`", "hooks": "`install_hooks()`", "loader": "`sidecar.loader`",
                 "webhook": "`dda webhook` (what it injects; set by the Helm chart)",
                 "csi": "`dda csi` (the CSI node plugin of the unprivileged mode)"}


def _shown_default(name: str) -> str:
    field = Settings.model_fields[name]
    shown = meta(name).get("shown")
    if shown is not None:
        return shown
    value = field.get_default(call_default_factory=True)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def markdown_table() -> str:
    """The configuration table of README.md, from the model."""
    lines = ["| setting (YAML key) | flag | env | pod annotation | Helm value | default | |",
             "|---|---|---|---|---|---|---|",
             "| | `--config` | `DDA_CONFIG` | | | `~/.config/dda/config.yaml` | YAML file with any setting below |"]
    for group in GROUPS:
        lines.append(f"| **{group}** | | | | | | {_GROUP_TITLES[group]} |")
        for name in names(group):
            m = meta(name)
            flags = ", ".join(f"`{f}`" for f in m["flags"])
            key = m.get("annotation")
            key = annotation_key(name) if key is True else key
            annotation = f"`{ANNOTATION_PREFIX}{key}`" if key else ""
            helm = f"`{m['helm']}`" if m.get("helm") else ""
            default = _shown_default(name)
            default = f"`{default}`" if default and " " not in default and default != "—" else default
            doc = Settings.model_fields[name].description or ""
            lines.append(f"| `{name}` | {flags} | `{env_name(name)}` | {annotation} | {helm} | {default} | {doc} |")
    return "\n".join(lines) + "\n"


def readme_path() -> Path:
    return Path(__file__).resolve().parent.parent / "README.md"


def readme_with_table(text: str) -> str:
    """README text with the generated table between the markers (ConfigError without them)."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ConfigError(f"README: no {README_BEGIN!r} ... {README_END!r} markers")
    return text[: start + len(README_BEGIN)] + "\n" + markdown_table() + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.settings", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README's configuration table")
    parser.add_argument("--write-readme", action="store_true", help="write it into README.md between the markers")
    ns = parser.parse_args(argv)
    if ns.write_readme:
        path = readme_path()
        path.write_text(readme_with_table(path.read_text()))
        return 0
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
