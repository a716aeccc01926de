"""Compatibility names: the settings model lives in `sidecar.settings` (one model, one parser
per kind of value). `Config` is that model; import from `sidecar.settings` in new code."""
from __future__ import annotations

from .settings import (REMOTE_KEYS, Settings, default_cache_dir, load_config, parse_duration, parse_size,
                       remote_settings_key)

Config = Settings

__all__ = ["Config", "REMOTE_KEYS", "Settings", "default_cache_dir", "load_config", "parse_duration",
           "parse_size", "remote_settings_key"]
