"""One typed configuration. CLI flags, env vars (DDA_*), a YAML file and, later, pod
annotations and Helm values all map onto `Config`.

Precedence (last wins): defaults < config file < environment < command-line flags.
Every field FOO_BAR reads env var DDA_FOO_BAR. Remote overrides read
DDA_REMOTE_<NAME>_<KEY> (NAME upper-cased, '-' and '.' as '_'), e.g.
DDA_REMOTE_STORAGE_URL, DDA_REMOTE_STORAGE_PASSWORD; NAME may be DEFAULT for the
default remote.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
REMOTE_KEYS = (
    "url", "endpoint_url", "region", "access_key_id", "secret_access_key", "session_token",
    "user", "password", "token", "auth", "custom_auth_header", "method", "profile",
)


def parse_size(text: str | int, what: str = "size") -> int:
    """'50G' -> 53687091200. Units are binary (K=1024), as `du -h` and DVC users expect."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{what}: cannot read {text!r} as a size (examples: 500M, 50G, 1T)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** "_kmgtp".index(unit or "_"))


def parse_duration(text: str | float, what: str) -> float:
    try:
        value = float(str(text).rstrip("s"))
    except ValueError:
        raise ConfigError(f"{what}: cannot read {text!r} as seconds") from None
    if value <= 0:
        raise ConfigError(f"{what}: must be positive, got {text!r}")
    return value


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dda"


@dataclass
class Config:
    repo: str | None = None
    revision: str | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_size: int = 20 * 1024**3
    chunk_size: int = 8 * 1024**2
    jobs: int = 16                      # requests in flight per remote
    deadline: float = 60.0              # seconds a read may wait for the remote
    request_timeout: float = 30.0       # one HTTP request
    retries: int = 5
    # Objects larger than one chunk: "stream" lets a reader take bytes as they arrive (the read
    # that reaches the end fails if the md5 does not match); "before-read" returns no byte of
    # such an object before its md5 is known. See the README, "What is verified".
    verify: str = "stream"
    git_user: str | None = None
    git_token: str | None = None
    remotes: dict[str, dict[str, str]] = field(default_factory=dict)

    def secrets(self) -> list[str]:
        found = [self.git_token]
        for settings in self.remotes.values():
            for key in ("password", "token", "secret_access_key", "session_token", "custom_auth_header"):
                found.append(settings.get(key))
        return [s for s in found if s]

    def remote_override(self, name: str, is_default: bool) -> dict[str, str]:
        merged: dict[str, str] = {}
        if is_default:
            merged.update(self.remotes.get("default", {}))
        merged.update(self.remotes.get(name, {}))
        return merged


_FIELD_TYPES = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "cache_dir":
        return Path(os.path.expanduser(str(value)))
    if name in ("cache_size", "chunk_size"):
        return parse_size(value, name)
    if name in ("jobs", "retries"):
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a whole number, got {value!r}") from None
        if number < (0 if name == "retries" else 1):
            raise ConfigError(f"{name}: out of range: {value!r}")
        return number
    if name in ("deadline", "request_timeout"):
        return parse_duration(value, name)
    if name == "verify":
        if str(value) not in ("stream", "before-read"):
            raise ConfigError(f"verify: expected 'stream' or 'before-read', got {value!r}")
        return str(value)
    return str(value)


def _env_remotes(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
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


def _normalize_remote_name(name: str) -> str:
    return re.sub(r"[-.]", "_", name).lower()


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Config:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    remotes: dict[str, dict[str, str]] = {}

    path = config_file or env.get("DDA_CONFIG")
    if not path:
        candidate = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "dda" / "config.yaml"
        path = candidate if candidate.is_file() else None
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise ConfigError(f"config file {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: not valid YAML ({err.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        for key, value in data.items():
            key = str(key).replace("-", "_")
            if key == "remotes":
                if not isinstance(value, dict):
                    raise ConfigError(f"config file {path}: 'remotes' must map remote names to settings")
                for name, settings in value.items():
                    if not isinstance(settings, dict):
                        raise ConfigError(f"config file {path}: remotes.{name} must be a mapping")
                    unknown = set(settings) - set(REMOTE_KEYS)
                    if unknown:
                        raise ConfigError(f"config file {path}: remotes.{name}: unknown keys {sorted(unknown)}")
                    remotes[_normalize_remote_name(name)] = {k: str(v) for k, v in settings.items()}
            elif key in _FIELD_TYPES:
                values[key] = value
            else:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")

    for name in _FIELD_TYPES:
        if name == "remotes":
            continue
        var = "DDA_" + name.upper()
        if env.get(var):
            values[name] = env[var]
    # DDA_REPO / DDA_REVISION are the documented names; DDA_REV is accepted too.
    if env.get("DDA_REV") and "revision" not in values:
        values["revision"] = env["DDA_REV"]
    for name, settings in _env_remotes(env).items():
        remotes.setdefault(name, {}).update(settings)

    for key, value in (flags or {}).items():
        if value is not None and key in _FIELD_TYPES:
            values[key] = value

    config = Config()
    for key, value in values.items():
        setattr(config, key, _coerce(key, value))
    config.remotes = remotes
    return config


def remote_settings_key(name: str) -> str:
    return _normalize_remote_name(name)
