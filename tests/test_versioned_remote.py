"""13.4: a cloud-versioned S3 remote (`version_aware`), served by moto with a versioned
bucket. DVC writes `files:` lists with `cloud: {store: {etag, version_id}}` and keeps objects
at their own paths; every revision reads the versions it recorded, like `dvc pull`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corpus import reference_listing
from repos import DVC3_BIN, _env, _run
from servers import _terminate, free_port, wait_for_port

pytest.importorskip("moto")
DDA = str(Path(sys.executable).parent / "dda")
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    with open(log, "wb") as out:
        proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(port, proc, [log], "moto_server")
    url = f"http://127.0.0.1:{port}"
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, **{k.lower(): v for k, v in KEYS.items() if k != "AWS_DEFAULT_REGION"},
                      region_name="us-east-1")
    s3.create_bucket(Bucket="versioned")
    s3.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    yield url
    _terminate(proc, group=True)


@pytest.fixture(scope="module")
def versioned_repo(moto, tmp_path_factory):
    """Commit v1: images/ and labels.csv pushed; commit v2: both changed and pushed again
    (same keys, new versions). References: clone + dvc pull of each."""
    root = tmp_path_factory.mktemp("versioned")
    env = {**_env(root), **KEYS}
    work = root / "work"
    work.mkdir()
    run = lambda *a, cwd=work: _run(list(a), cwd, env)  # noqa: E731
    run("git", "init", "-q", "-b", "main")
    run(DVC3_BIN, "init", "-q")
    run(DVC3_BIN, "remote", "add", "-d", "store", "s3://versioned/prefix")
    run(DVC3_BIN, "remote", "modify", "store", "endpointurl", moto)
    run(DVC3_BIN, "remote", "modify", "store", "version_aware", "true")
    (work / "images" / "sub").mkdir(parents=True)
    (work / "images" / "a.bin").write_bytes(os.urandom(3000))
    (work / "images" / "sub" / "b.txt").write_text("first b\n")
    (work / "labels.csv").write_text("id,label\n1,cat\n")
    run(DVC3_BIN, "add", "-q", "images", "labels.csv")
    run(DVC3_BIN, "push", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "v1")
    run("git", "tag", "v1")
    (work / "images" / "sub" / "b.txt").write_text("second b, longer\n")
    (work / "labels.csv").write_text("id,label\n1,dog\n2,cat\n")
    run(DVC3_BIN, "add", "-q", "images", "labels.csv")
    run(DVC3_BIN, "push", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "v2")
    assert "version_id" in (work / "labels.csv.dvc").read_text() and "files:" in (work / "images.dvc").read_text()
    refs = {}
    for rev in ("v1", "main"):
        ref = root / f"ref-{rev}"
        run("git", "clone", "-q", "-b", rev, str(work), str(ref), cwd=root)
        run(DVC3_BIN, "pull", "-q", cwd=ref)
        refs[rev] = ref
    return work, refs


@pytest.mark.parametrize("rev", ["v1", "main"])
def test_versioned_outputs_read_by_version_id(versioned_repo, tmp_path, rev):
    work, refs = versioned_repo
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDA_")}
    env.update(KEYS, DDA_CACHE_DIR=str(tmp_path / "cache"))
    got = tmp_path / "got"
    proc = subprocess.run([DDA, "get", str(work), ".", "--rev", rev, "-o", str(got)], capture_output=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    expected = reference_listing(refs[rev])
    assert reference_listing(got) == {p: v for p, v in expected.items() if v["type"] != "dir"}
    for path, item in expected.items():
        if item["type"] == "file":
            assert (got / path).read_bytes() == (refs[rev] / path).read_bytes(), path
    listing = subprocess.run([DDA, "ls", str(work), "images", "-R", "--rev", rev], capture_output=True, env=env,
                             timeout=120)
    assert listing.returncode == 0 and b"images/sub/b.txt" in listing.stdout
