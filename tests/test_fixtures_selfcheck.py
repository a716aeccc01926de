"""Fast checks that the fixture servers and repositories are real."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import urllib.error
import urllib.request

import pytest
import yaml

from repos import _env


def _auth_header(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _get(url: str, headers: dict[str, str] | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# --------------------------------------------------------------------------- git


@pytest.mark.parametrize("name", ["dvc3", "dvc2"])
def test_git_ls_remote_and_blobless_clone(name, fixture_repos, git_server, tmp_path):
    if name not in fixture_repos:
        pytest.skip("DVC 2 not installed")
    repo = fixture_repos[name]
    env = _env(tmp_path)
    m = git_server.mark()
    out = subprocess.run(["git", "ls-remote", repo.git_url], capture_output=True, text=True, env=env, check=True).stdout
    refs = {line.split("\t")[1] for line in out.splitlines()}
    assert "refs/heads/main" in refs
    assert "refs/tags/v1" in refs
    for branch in repo.branches.values():
        assert f"refs/heads/{branch}" in refs
    assert set(repo.branches) == {"local", "http", "s3"}
    reqs = git_server.requests_since(m)
    assert any(r.uri == f"/git/{name}.git/info/refs" and r.status == 200 for r in reqs)

    dest = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "-q", "--filter=blob:none", "--no-checkout", repo.git_url, str(dest)],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    assert subprocess.run(
        ["git", "-C", str(dest), "config", "remote.origin.partialclonefilter"],
        capture_output=True, text=True, env=env,
    ).stdout.strip() == "blob:none"  # fmt: skip
    # fetch one blob lazily over HTTP
    cfg = subprocess.run(
        ["git", "-C", str(dest), "show", "origin/remote-http:.dvc/config"], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "remote = http" in cfg
    assert "dvcpass" not in cfg and "s3secret" not in cfg


def test_git_private_location_needs_credentials(fixture_repos, git_server, tmp_path):
    env = _env(tmp_path)
    bad = subprocess.run(["git", "ls-remote", git_server.private_url("dvc3")], capture_output=True, text=True, env=env)
    assert bad.returncode != 0
    good = subprocess.run(
        ["git", "ls-remote", git_server.private_url("dvc3", with_credentials=True)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert "refs/heads/main" in good.stdout


# --------------------------------------------------------------------------- HTTP remote


def test_http_remote_auth_range_and_counter(fixture_repos, http_remote):
    repo = fixture_repos["dvc3"]
    root = repo.remote_roots["http"]
    obj = next(p for p in sorted(root.rglob("*")) if p.is_file() and p.stat().st_size > 100)
    rel = obj.relative_to(http_remote.root).as_posix()
    url = f"{http_remote.url}/{rel}"
    assert "@" not in http_remote.url

    m = http_remote.mark()
    status, _, _ = _get(url)
    assert status == 401
    auth = _auth_header(http_remote.user, http_remote.password)
    status, _, body = _get(url, auth)
    assert status == 200
    data = obj.read_bytes()
    assert body == data
    # DVC 3 object names are the md5 of the content
    assert hashlib.md5(body).hexdigest() == "".join(obj.relative_to(root).parts[-2:])

    status, headers, part = _get(url, {**auth, "Range": "bytes=10-49"})
    assert status == 206
    assert part == data[10:50]
    assert headers.get("Content-Range") == f"bytes 10-49/{len(data)}"

    reqs = http_remote.requests_since(m)
    assert [(r.method, r.status) for r in reqs] == [("GET", 401), ("GET", 200), ("GET", 206)]
    assert all(r.uri == f"/dvc/{rel}" for r in reqs)
    assert reqs[1].bytes_sent == len(data)
    assert reqs[2].bytes_sent == 40
    assert http_remote.requests_since(http_remote.mark()) == []


def test_http_remote_stop_start(http_remote):
    url = http_remote.url + "/"
    auth = _auth_header(http_remote.user, http_remote.password)
    http_remote.stop()
    try:
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(urllib.request.Request(url, headers=auth), timeout=2)
    finally:
        http_remote.start()
    status, _, _ = _get(url, auth)
    assert status == 200


# --------------------------------------------------------------------------- S3 remote


def test_s3_remote_lists_and_serves(fixture_repos, s3_remote):
    repo = fixture_repos["dvc3"]
    client = s3_remote.client()
    prefix = repo.remote_urls["s3"].removeprefix(f"s3://{s3_remote.bucket}/") + "/"
    m = s3_remote.mark()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_remote.bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    on_disk = sorted(p.relative_to(s3_remote.bucket_dir).as_posix() for p in repo.remote_roots["s3"].rglob("*") if p.is_file())
    assert sorted(keys) == on_disk
    assert any(k.startswith(prefix + "files/md5/") for k in keys)

    key = max(on_disk, key=lambda k: (s3_remote.bucket_dir / k).stat().st_size)
    data = (s3_remote.bucket_dir / key).read_bytes()
    resp = client.get_object(Bucket=s3_remote.bucket, Key=key, Range="bytes=5-104")
    assert resp["Body"].read() == data[5:105]
    reqs = s3_remote.requests_since(m)
    assert reqs and reqs[0].method == "GET" and reqs[0].uri == f"/{s3_remote.bucket}"
    assert reqs[-1].uri == f"/{s3_remote.bucket}/{key}"
    assert reqs[-1].status in (200, 206)
    assert reqs[-1].bytes_sent == 100

    # wrong secret is refused
    import botocore.exceptions

    bad = s3_remote.client()
    bad._request_signer._credentials.secret_key = "wrong"
    with pytest.raises(botocore.exceptions.ClientError):
        bad.list_objects_v2(Bucket=s3_remote.bucket, Prefix=prefix)


# --------------------------------------------------------------------------- repositories


REQUIRED = [
    "README.md",
    "src/train.py",
    ".dvc/config",
    ".dvcignore",
    ".dvc/.gitignore",
    "data/.gitignore",
    "models/.gitignore",
    "out/.gitignore",
    "dvc.yaml",
    "dvc.lock",
    "data/images.dvc",
    "data/images/cats/my cat ü.bin",
    "data/images/日本語.bin",
    "data/images/dogs/small/puppy_00.bin",
    "data/images/dogs/empty.bin",
    "data/labels.csv",
    "data/labels.csv.dvc",
    "data/empty.txt",
    "data/empty.txt.dvc",
    "out/prepared.txt",
    "out/features/feat_0.txt",
    "out/features/nested/summary.txt",
    "models/model.bin",
    "models/model.bin.dvc",
]


@pytest.mark.parametrize("name", ["dvc3", "dvc2"])
def test_expected_files(name, fixture_repos):
    if name not in fixture_repos:
        pytest.skip("DVC 2 not installed")
    repo = fixture_repos[name]
    files = repo.expected_files()
    missing = [f for f in REQUIRED if f not in files]
    assert not missing
    assert not any(f.startswith((".git/", ".dvc/cache/", ".dvc/tmp/")) or f == ".dvc/config.local" for f in files)
    assert files["data/empty.txt"].stat().st_size == 0
    assert files["models/model.bin"].stat().st_size > 2_000_000
    assert b"\r\n" in files["data/labels.csv"].read_bytes()
    n_images = sum(1 for f in files if f.startswith("data/images/"))
    assert n_images >= 30

    cfg = files[".dvc/config"].read_text()
    assert "SECRET" not in cfg
    assert "remote = local" in cfg

    lock = yaml.safe_load(files["dvc.lock"].read_text())
    outs = {o["path"] for o in lock["stages"]["prepare"]["outs"]}
    assert outs == {"out/prepared.txt", "out/features"}

    model = yaml.safe_load(files["models/model.bin.dvc"].read_text())["outs"][0]
    assert model["remote"] == "extra"
    # the per-output remote object lives on "extra" only
    md5 = model["md5"]
    sub = ("files/md5/" if name == "dvc3" else "") + f"{md5[:2]}/{md5[2:]}"
    assert (repo.remote_roots["extra"] / sub).is_file()
    for kind in ("local", "http", "s3"):
        assert not (repo.remote_roots[kind] / sub).exists(), kind

    labels = yaml.safe_load(files["data/labels.csv.dvc"].read_text())["outs"][0]
    raw_md5 = hashlib.md5(files["data/labels.csv"].read_bytes()).hexdigest()
    if name == "dvc3":
        assert labels.get("hash") == "md5"
        assert labels["md5"] == raw_md5
        assert (repo.remote_roots["local"] / "files" / "md5" / raw_md5[:2] / raw_md5[2:]).is_file()
    else:
        assert "hash" not in labels
        # DVC 2 hashes text with CRLF -> LF normalisation
        lf_md5 = hashlib.md5(files["data/labels.csv"].read_bytes().replace(b"\r\n", b"\n")).hexdigest()
        assert labels["md5"] == lf_md5 != raw_md5
        obj = repo.remote_roots["local"] / labels["md5"][:2] / labels["md5"][2:]
        assert obj.read_bytes() == files["data/labels.csv"].read_bytes()


@pytest.mark.parametrize("name", ["dvc3", "dvc2"])
def test_branches_select_remote(name, fixture_repos, tmp_path):
    if name not in fixture_repos:
        pytest.skip("DVC 2 not installed")
    repo = fixture_repos[name]
    env = _env(tmp_path)
    for kind, branch in repo.branches.items():
        cfg = subprocess.run(
            ["git", "--git-dir", str(repo.local_path), "show", f"{branch}:.dvc/config"],
            capture_output=True, text=True, env=env, check=True,
        ).stdout  # fmt: skip
        assert f"remote = {kind}" in cfg
        # every remote holds the same objects (except the per-output "extra" one)
    listing = {
        kind: sorted(p.relative_to(repo.remote_roots[kind]).as_posix() for p in repo.remote_roots[kind].rglob("*") if p.is_file())
        for kind in ("local", "http", "s3")
    }
    assert listing["local"] and listing["local"] == listing["http"] == listing["s3"]


def test_tmp_cache_is_fresh(tmp_cache):
    assert tmp_cache.is_dir() and not any(tmp_cache.iterdir())


@pytest.mark.slow
def test_big_repo(big_repo):
    files = big_repo.expected_files()
    many = [f for f in files if f.startswith("data/many/")]
    assert len(many) == 10_000
    assert files["data/large.bin"].stat().st_size == 200 * 1024 * 1024
    assert "data/large.bin.dvc" in files and "data/many.dvc" in files
    dir_out = yaml.safe_load(files["data/many.dvc"].read_text())["outs"][0]
    assert dir_out["nfiles"] == 10_000 and dir_out["md5"].endswith(".dir")
    assert set(big_repo.branches) == {"local", "http", "s3"}
    n_local = sum(1 for p in big_repo.remote_roots["local"].rglob("*") if p.is_file())
    n_s3 = sum(1 for p in big_repo.remote_roots["s3"].rglob("*") if p.is_file())
    assert n_local == n_s3 >= 10_002
