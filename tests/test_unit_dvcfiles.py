"""Pure parsing of what DVC keeps in git."""
import json

import pytest

from sidecar.errors import DvcFileError
from sidecar.snapshot.dvcfiles import parse_dvc_config, parse_dvc_file, parse_dvc_lock, parse_manifest

MD5 = "0123456789abcdef0123456789abcdef"


def test_dvc3_dir_output_resolves_relative_to_the_dvc_file():
    outs = parse_dvc_file(f"outs:\n- md5: {MD5}.dir\n  size: 10\n  nfiles: 2\n  hash: md5\n  path: images\n".encode(),
                          "data/images.dvc")
    assert len(outs) == 1
    out = outs[0]
    assert (out.path, out.md5, out.is_dir, out.size, out.nfiles, out.legacy) == ("data/images", MD5, True, 10, 2, False)


def test_dvc2_output_is_legacy_and_keeps_per_output_remote():
    out, = parse_dvc_file(f"outs:\n- md5: {MD5}\n  size: 3\n  path: model.bin\n  remote: extra\n".encode(), "m/model.bin.dvc")
    assert out.legacy and out.remote == "extra" and out.path == "m/model.bin" and not out.is_dir


def test_cache_false_outputs_are_left_to_git():
    assert parse_dvc_file(f"outs:\n- md5: {MD5}\n  path: a\n  cache: false\n".encode(), "a.dvc") == []


@pytest.mark.parametrize("text,needle", [
    (b"outs: [", "not valid YAML at line"),
    (b"foo: 1\n", "'outs' must be a non-empty list"),
    (b"outs:\n- md5: nothex\n  path: a\n", "is not an md5 hash"),
    (f"outs:\n- md5: {MD5}\n  path: ../../etc/passwd\n".encode(), "points outside the repository"),
    (f"outs:\n- md5: {MD5}\n  size: -1\n  path: a\n".encode(), "'size' must be a non-negative integer"),
    (f"outs:\n- md5: {MD5}\n  hash: sha256\n  path: a\n".encode(), "unsupported hash"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_malformed_dvc_files_name_the_file_and_problem(text, needle):
    with pytest.raises(DvcFileError) as err:
        parse_dvc_file(text, "data/broken.dvc")
    assert str(err.value).startswith("data/broken.dvc")
    assert needle in str(err.value)


def test_dvc_lock_stage_outputs():
    text = f"""schema: '2.0'
stages:
  prepare:
    cmd: python prepare.py
    deps:
    - path: data/labels.csv
      md5: {MD5}
    outs:
    - path: out/prepared.txt
      md5: {MD5}
      size: 5
      hash: md5
    - path: out/features
      md5: {MD5}.dir
      size: 9
      nfiles: 3
      hash: md5
""".encode()
    outs = parse_dvc_lock(text, "dvc.lock")
    assert [(o.path, o.is_dir) for o in outs] == [("out/prepared.txt", False), ("out/features", True)]


def test_manifest_with_and_without_sizes():
    data = json.dumps([{"md5": MD5, "relpath": "a b/ü.bin"}, {"md5": MD5, "relpath": "c", "size": 4}]).encode()
    entries = parse_manifest(data, "x.dir")
    assert [(e.relpath, e.size) for e in entries] == [("a b/ü.bin", None), ("c", 4)]


@pytest.mark.parametrize("data,needle", [
    (b"{", "not a valid .dir manifest"),
    (b"{}", "must be a JSON list"),
    (b'[{"md5": "x", "relpath": "a"}]', "entry 0: 'md5'"),
    (json.dumps([{"md5": MD5, "relpath": "/abs"}]).encode(), "points outside"),
])
def test_malformed_manifest(data, needle):
    with pytest.raises(DvcFileError, match=needle):
        parse_manifest(data, "images.dvc: manifest")


def test_dvc_config_remotes_and_default():
    text = b"""[core]
    remote = storage
    autostage = true
['remote "storage"']
    url = s3://bucket/prefix
    endpointurl = http://127.0.0.1:9000
['remote "web"']
    url = https://dagshub.com/o/r.dvc
"""
    config = parse_dvc_config(text)
    assert config.default_remote == "storage"
    assert config.remotes["storage"].settings == {"url": "s3://bucket/prefix", "endpointurl": "http://127.0.0.1:9000"}
    assert config.remotes["web"].settings["url"].startswith("https://")


def test_dvc_config_default_must_exist():
    with pytest.raises(DvcFileError, match="default remote 'nope' is not defined"):
        parse_dvc_config(b"[core]\nremote = nope\n")


def test_import_url_outputs_record_their_source():
    out, = parse_dvc_file(f"frozen: true\ndeps:\n- md5: {MD5}\n  size: 5\n  hash: md5\n  path: ../src/a.txt\n"
                          f"outs:\n- md5: {MD5}\n  size: 5\n  hash: md5\n  path: a.txt\n".encode(), "d/a.txt.dvc")
    assert out.path == "d/a.txt" and out.md5 == MD5 and out.unavailable is None
    assert (out.url_source.url, out.url_source.base, out.url_source.md5) == ("../src/a.txt", "d", MD5)


def test_import_url_no_download_takes_the_dep_md5_or_is_unavailable():
    local, = parse_dvc_file(f"deps:\n- md5: {MD5}\n  size: 5\n  path: /data/a.txt\nouts:\n- path: a.txt\n".encode(),
                            "a.txt.dvc")
    assert local.md5 == MD5 and local.legacy and local.size == 5 and local.url_source is not None
    http, = parse_dvc_file(b"deps:\n- etag: '\"abc\"'\n  size: 5\n  path: https://h/x.csv\nouts:\n- hash: md5\n"
                           b"  path: x.csv\n", "x.csv.dvc")
    assert http.unavailable and "records no md5" in http.unavailable and "https://h/x.csv" in http.unavailable
    folder, = parse_dvc_file(f"deps:\n- md5: {MD5}.dir\n  hash: md5\n  path: ../raw\nouts:\n- hash: md5\n"
                             f"  path: raw\n".encode(), "raw.dvc")
    assert folder.is_dir and folder.unavailable and "--no-download" in folder.unavailable


def test_a_stage_file_with_a_command_is_not_an_import():
    out, = parse_dvc_file(f"cmd: python x.py\ndeps:\n- md5: {MD5}\n  path: x.py\nouts:\n- md5: {MD5}\n"
                          f"  path: y\n".encode(), "y.dvc")
    assert out.url_source is None


def test_repo_import_without_md5_is_kept_for_the_source_to_fill():
    out, = parse_dvc_file(b"frozen: true\ndeps:\n- path: datasets/cats\n  repo:\n    url: https://g/src.git\n"
                          b"    rev_lock: abc\nouts:\n- hash: md5\n  path: cats\n", "cats.dvc")
    assert out.md5 == "" and out.imported is not None and out.imported.path == "datasets/cats"
