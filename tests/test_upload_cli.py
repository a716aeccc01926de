"""`dda upload` from the command line, end to end on a small repository made with real DVC:
options in any order (for upload and the commands that read), reserved `--to` paths refused in
one line with the branch untouched, and eight concurrent uploads to one directory all landing."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from mounting import DDA
from repos import DVC3_BIN
from test_upload_differential import BASE, REMOTE, author, clean_after_fresh_pull, run, write


def dda_env(tmp: Path, case, cache: str = "cache") -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("DDA_")},
            "DDA_CACHE_DIR": str(tmp / cache), f"DDA_REMOTE_{REMOTE.upper()}_URL": str(case.remote)}


def tip(case) -> str:
    return run(["git", "--git-dir", str(case.bare), "rev-parse", "main"], case.work, case.env).stdout.strip()


FILES = {**BASE, ".dvcignore": "*.tmp\nprivate/\n"}


@pytest.fixture
def case(git_server, tmp_path):
    return author(tmp_path, git_server, f"cli-{tmp_path.name}", DVC3_BIN, FILES, ["data/d"])


@pytest.fixture(scope="module")
def unchanged_case(git_server, tmp_path_factory):
    """One repository for the tests that must leave it as it was."""
    tmp = tmp_path_factory.mktemp("cli-unchanged")
    return author(tmp, git_server, f"cli-{tmp.name}", DVC3_BIN, FILES, ["data/d"])


def test_options_after_and_between_positionals(case, tmp_path):
    env = dda_env(tmp_path, case)
    write(tmp_path, {"a.png": b"\x89PNG a", "b.png": b"\x89PNG b"})
    proc = subprocess.run([DDA, "upload", case.git_url, "--to", "data/images", str(tmp_path / "a.png"),
                           "-m", "two images", str(tmp_path / "b.png"), "--rev", "main"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "+2 file(s)" in proc.stdout
    log = run(["git", "--git-dir", str(case.bare), "log", "-1", "--format=%s", "main"], tmp_path, case.env).stdout
    assert log.strip() == "two images"
    # the reading commands too: options before, between and after the positionals
    ls = subprocess.run([DDA, "ls", case.git_url, "--json", "data/images", "--rev", "main"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ls.returncode == 0, ls.stderr
    assert {yaml.safe_load(line)["path"] for line in ls.stdout.splitlines()} == {"data/images/a.png",
                                                                                 "data/images/b.png"}
    cat = subprocess.run([DDA, "cat", case.git_url, "data/images/b.png", "--rev", "main"],
                         capture_output=True, env=env, timeout=120)
    assert cat.returncode == 0 and cat.stdout == b"\x89PNG b", cat.stderr
    out = tmp_path / "got"
    get = subprocess.run([DDA, "get", case.git_url, "--rev", "main", "data/images", "-o", str(out), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert get.returncode == 0, get.stderr
    assert (out / "a.png").read_bytes() == b"\x89PNG a"


@pytest.mark.parametrize("to", [".git", ".git/hooks", ".", "..", "../outside", "/tmp/abs", ".dvc", ".dvc/cache",
                                "data/.git", "data/../..", "", "private", "private/x", "data/x.tmp"])
def test_reserved_destinations_are_refused(unchanged_case, tmp_path, to):
    case = unchanged_case
    write(tmp_path, {"one.txt": "one\n"})
    before = tip(case)
    proc = subprocess.run([DDA, "upload", case.git_url, str(tmp_path / "one.txt"), "--to", to, "--rev", "main"],
                          capture_output=True, text=True, env=dda_env(tmp_path, case), timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dda: error: --to"), proc.stderr
    assert tip(case) == before


def test_eight_concurrent_uploads_all_land(case, tmp_path):
    n = 8
    batches = {}
    for i in range(n):
        files = {f"w{i}_a.bin": os.urandom(2000 + i), f"w{i}_b.txt": f"writer {i}\r\n",
                 f"sub{i % 3}/w{i}_c.bin": os.urandom(500)}
        write(tmp_path / f"batch{i}", files)
        batches[i] = files
    env = dda_env(tmp_path, case)   # one cache directory shared by all, as on one machine
    t0 = time.monotonic()
    procs = [subprocess.Popen([DDA, "upload", case.git_url, str(tmp_path / f"batch{i}"), "--to", "data/d",
                               "--rev", "main", "-m", f"batch {i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(n)]
    outs = [p.communicate(timeout=900) for p in procs]
    elapsed = time.monotonic() - t0
    assert all(p.returncode == 0 for p in procs), outs
    assert any("landed on attempt" in out for out, _ in outs), outs   # they did collide and retry
    log = run(["git", "--git-dir", str(case.bare), "log", "--format=%s", "main"], tmp_path, case.env).stdout
    assert all(f"batch {i}" in log.splitlines() for i in range(n)), log
    fresh = clean_after_fresh_pull(case, tmp_path, case.remote)
    for i, files in batches.items():
        for rel, data in files.items():
            assert (fresh / "data/d" / rel).read_bytes() == (data.encode() if isinstance(data, str) else data)
    out = yaml.safe_load((fresh / "data/d.dvc").read_text())["outs"][0]
    assert out["nfiles"] == 3 + 3 * n
    attempts = sorted(int(out.split("landed on attempt ")[1].split()[0]) if "landed on attempt" in out else 1
                      for out, _ in outs)
    print(f"\n[upload] {n} concurrent uploads landed in {elapsed:.1f}s; attempts each: {attempts}")


def test_a_deadline_not_a_count_and_giving_up_says_so_in_one_line(case, tmp_path):
    """With no time to retry (`--retry-for 0`) writers that lose the race give up at once, in one
    line; whoever landed is complete. (The test above shows the same writers all land with time.)"""
    n = 8
    for i in range(n):
        write(tmp_path / f"batch{i}", {f"g{i}.bin": os.urandom(100 + i)})
    env = dda_env(tmp_path, case)
    procs = [subprocess.Popen([DDA, "upload", case.git_url, str(tmp_path / f"batch{i}"), "--to", "data/d",
                               "--rev", "main", "--retry-for", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(n)]
    outs = [p.communicate(timeout=600) for p in procs]
    failed = [err for p, (_, err) in zip(procs, outs) if p.returncode != 0]
    assert failed, outs   # eight at once do collide
    for err in failed:
        assert len(err.strip().splitlines()) == 1 and "kept moving" in err and "rerun" in err, err
    listing = subprocess.run([DDA, "ls", case.git_url, "data/d", "--rev", "main"], capture_output=True, text=True,
                             env=env, timeout=120).stdout
    landed = [i for i, p in enumerate(procs) if p.returncode == 0]
    assert landed and all(f"g{i}.bin" in listing for i in landed), listing
