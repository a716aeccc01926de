"""An Engine on a repository, opened the way `dda` opens one (tests that drive the engine)."""
from __future__ import annotations

import asyncio
from pathlib import Path

from sidecar.engine import Engine
from sidecar.config import load_config


def engine_at(repo: Path, cache: Path, env: dict[str, str], **flags) -> "asyncio.Future[Engine]":
    """`Engine.open` of `repo` at branch main with cache `cache`, settings from `env` and
    `flags` (setting name -> value); use as `async with await engine_at(...) as engine`."""
    return Engine.open(load_config({"repo": str(repo), "revision": "main", "cache_dir": str(cache), **flags},
                                   env=env))
