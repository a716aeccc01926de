"""Session fixtures: real git/HTTP/S3 servers and DVC-authored repositories."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repos import (  # noqa: E402
    DVC2_MISSING_REASON,
    FixtureRepo,
    build_big_repo,
    build_fixture_repos,
    dvc2_bin,
)
from servers import GitHttpServer, HttpRemoteServer, S3RemoteServer  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: large fixtures (200 MB file, 10,000-file directory)")


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dda-fixtures", numbered=True)


@pytest.fixture(scope="session")
def git_server(session_dir):
    srv = GitHttpServer(session_dir / "git-server").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def http_remote(session_dir):
    srv = HttpRemoteServer(session_dir / "http-remote").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def s3_remote(session_dir):
    srv = S3RemoteServer(session_dir / "s3-remote").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def fixture_repos(session_dir, git_server, http_remote, s3_remote) -> dict[str, FixtureRepo]:
    t0 = time.monotonic()
    repos = build_fixture_repos(session_dir / "repos", git_server, http_remote, s3_remote)
    print(f"\n[fixtures] built {sorted(repos)} in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return repos


@pytest.fixture(scope="session")
def dvc3_repo(fixture_repos) -> FixtureRepo:
    return fixture_repos["dvc3"]


@pytest.fixture(scope="session")
def dvc2_repo(fixture_repos) -> FixtureRepo:
    if "dvc2" not in fixture_repos:
        pytest.skip(DVC2_MISSING_REASON)
    return fixture_repos["dvc2"]


@pytest.fixture(scope="session", params=["dvc3", "dvc2"])
def any_repo(request, fixture_repos) -> FixtureRepo:
    """Parametrised over both DVC versions (dvc2 skipped when DVC 2 is missing)."""
    if request.param not in fixture_repos:
        pytest.skip(DVC2_MISSING_REASON)
    return fixture_repos[request.param]


@pytest.fixture(scope="session")
def big_repo(session_dir, git_server, http_remote, s3_remote) -> FixtureRepo:
    return build_big_repo(session_dir / "repos", git_server, http_remote, s3_remote)


@pytest.fixture()
def mp(tmp_path) -> Path:
    """An empty mountpoint; whatever is still mounted there at the end is lazily unmounted."""
    from mounting import mounted

    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)])


@pytest.fixture
def tmp_cache(tmp_path) -> Path:
    """A fresh, empty cache directory (created) private to the test."""
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def have_dvc2() -> bool:
    return dvc2_bin() is not None


# ---------------------------------------------------------------- the pod tests' image
# tests/test_pod_play.py needs the image built from our install steps (several minutes, mostly
# downloads and unpacking): when those tests are collected, the build starts in the background
# at once, overlapping the tests that run before them; their fixture waits for it (a lock).
_image_build = None


def pytest_collection_finish(session):
    global _image_build
    import os
    import shutil

    if os.environ.get("DDA_IMAGE_PREBUILD", "1") == "0" or os.geteuid() != 0 or not shutil.which("podman"):
        return
    if not any(item.path.name == "test_pod_play.py" for item in session.items):
        return
    if len({item.path.name for item in session.items}) < 2:
        return   # only the pod tests: nothing to overlap with
    from podman_image import start_background_build

    _image_build = start_background_build(Path("/var/tmp/dda-sidecar-test-image.log"))


def pytest_sessionfinish(session, exitstatus):
    if _image_build is not None and _image_build.poll() is None:
        _image_build.terminate()   # the build removes its containers and folders
        try:
            _image_build.wait(120)
        except subprocess.TimeoutExpired:
            _image_build.kill()
