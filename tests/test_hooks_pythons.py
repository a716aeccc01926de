"""install_hooks() on Python 3.12 and 3.13 (pathlib and glob changed there): the hooks
suite again under each interpreter that scripts/bootstrap.sh prepared (DDA_EXTRA_PYTHONS)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHONS = [p for p in os.environ.get("DDA_EXTRA_PYTHONS", "").split(":") if p]


@pytest.mark.skipif(not PYTHONS, reason="no Python 3.12/3.13 prepared (scripts/bootstrap.sh test does it)")
@pytest.mark.parametrize("python", PYTHONS)
def test_hooks_suite_on(python, tmp_path):
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version in ("3.12", "3.13")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([python, "-m", "pytest", str(ROOT / "tests/test_hooks.py"), "-q", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "t"), "-k", "not fixture_repositories"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
