"""`dda upload` against real `dvc add` + `dvc push`: for each case the same files are added both
ways on two branches of one repository (dvc in a full checkout, dda without one), each with its
own copy of the remote. Both must give byte-identical git trees (the .dvc file with its comments
and user fields, .gitignore) and byte-identical remotes (objects and .dir manifests), and a fresh
`git clone` + `dvc pull` of dda's branch must leave `dvc status` clean."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mounting import DDA
from repos import DVC3_BIN, _env, dvc2_bin

REMOTE = "store"


@dataclass
class Case:
    work: Path          # authoring checkout (branch main pushed)
    git_url: str
    bare: Path
    remote: Path        # the remote DVC pushed to
    dvc: str
    env: dict[str, str]


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc


def write(root: Path, files: dict[str, bytes | str]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)


def author(tmp: Path, git_server, name: str, dvc: str, files: dict[str, bytes | str], tracked: list[str],
           edit: Callable[[Path], None] | None = None) -> Case:
    """A repository made with real DVC: `files` written, `tracked` dirs `dvc add`ed, `edit` run
    on the checkout (to hand-edit .dvc files), committed and pushed to git and to a local remote."""
    env = _env(tmp)
    work = tmp / "work"
    work.mkdir()
    remote = tmp / "remote"
    remote.mkdir()
    run(["git", "init", "-q", "-b", "main"], work, env)
    run([dvc, "init", "-q"], work, env)
    run([dvc, "remote", "add", "-d", REMOTE, str(remote)], work, env)
    write(work, files)
    for path in tracked:
        run([dvc, "add", "-q", path], work, env)
    if edit:
        edit(work)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-q", "-m", "base"], work, env)
    run([dvc, "push", "-q"], work, env)
    bare = git_server.create_bare(name)
    run(["git", "push", "-q", git_server.url(name), "main"], work, env)
    return Case(work, git_server.url(name), bare, remote, dvc, env)


def via_dvc(case: Case, tmp: Path, batch: Path, dest: str, out: str) -> subprocess.CompletedProcess:
    """What a user does with DVC: clone, pull, copy `batch`'s contents into `dest`, `dvc add out`,
    `dvc push`, commit, push branch `viadvc`. Returns `dvc add`'s result (it may refuse)."""
    env, checkout = case.env, tmp / "dvc-checkout"
    run(["git", "clone", "-q", case.git_url, str(checkout)], tmp, env)
    run(["git", "checkout", "-q", "-b", "viadvc"], checkout, env)
    run([case.dvc, "pull", "-q"], checkout, env)
    shutil.copytree(batch, checkout / dest, dirs_exist_ok=True)
    added = run([case.dvc, "add", out], checkout, env, check=False)
    if added.returncode == 0:
        run([case.dvc, "push", "-q"], checkout, env)
        run(["git", "add", "-A"], checkout, env)
        run(["git", "commit", "-q", "-m", "via dvc"], checkout, env)
        run(["git", "push", "-q", "origin", "viadvc"], checkout, env)
    return added


def via_dda(case: Case, tmp: Path, batch: Path, dest: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`dda upload` of `batch` into `dest` on main, against its own copy of the base remote."""
    remote = tmp / "dda-remote"
    shutil.copytree(case.remote, remote)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DDA_")},
           "DDA_CACHE_DIR": str(tmp / "dda-cache"), f"DDA_REMOTE_{REMOTE.upper()}_URL": str(remote)}
    proc = subprocess.run([DDA, "upload", case.git_url, str(batch), "--to", dest, "--rev", "main"],
                          capture_output=True, text=True, env=env, timeout=300)
    return proc, remote


def remote_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def clean_after_fresh_pull(case: Case, tmp: Path, remote: Path, branch: str = "main") -> Path:
    checkout = tmp / f"fresh-{branch}"
    run(["git", "clone", "-q", "-b", branch, case.git_url, str(checkout)], tmp, case.env)
    run([case.dvc, "remote", "modify", "--local", REMOTE, "url", str(remote)], checkout, case.env)
    run([case.dvc, "pull", "-q"], checkout, case.env)
    status = run([case.dvc, "status"], checkout, case.env)
    assert "up to date" in status.stdout and "modified" not in status.stdout, status.stdout
    return checkout


def assert_same(case: Case, tmp: Path, batch: Path, dest: str, out: str) -> Path:
    added = via_dvc(case, tmp, batch, dest, out)
    assert added.returncode == 0, added.stderr
    proc, dda_remote = via_dda(case, tmp, batch, dest)
    assert proc.returncode == 0, proc.stderr
    git = ["git", "--git-dir", str(case.bare)]
    diff = run([*git, "diff", "--stat", "viadvc", "main"], tmp, case.env).stdout
    assert diff == "", diff   # every byte git holds: .dvc files (comments, user keys), .gitignore
    for dvcfile in run([*git, "ls-tree", "-r", "--name-only", "main"], tmp, case.env).stdout.split():
        if dvcfile.endswith(".dvc"):
            ours = run([*git, "show", f"main:{dvcfile}"], tmp, case.env).stdout
            assert ours == run([*git, "show", f"viadvc:{dvcfile}"], tmp, case.env).stdout
    assert remote_files(dda_remote) == remote_files(case.remote)   # objects and .dir manifests
    fresh = clean_after_fresh_pull(case, tmp, dda_remote)
    theirs = tmp / "dvc-checkout"   # also holds the ignored files it was given: compare what was pulled
    pulled = [p for p in (fresh / out).rglob("*") if p.is_file()]
    assert pulled
    for path in pulled:
        rel = path.relative_to(fresh)
        assert (theirs / rel).read_bytes() == path.read_bytes(), rel
    return fresh


BASE = {"data/d/a.bin": b"\x00first", "data/d/sub/b.txt": "line\r\nnext\r\n", "data/d/sub/deep/c.bin": b"\x01" * 70,
        "README.md": "readme\n"}


def batch_of(tmp: Path, files: dict[str, bytes | str]) -> Path:
    batch = tmp / "batch"
    write(batch, files)
    return batch


NEW = {"n1.bin": b"\x02new one", "crlf.txt": "a\r\nb\r\n", "sub/n2.bin": b"\x03" * 500,
       "sub/x/y/n3.txt": "deep\n", "ü nicode ☃.bin": b"\x04"}


def dvc_bins() -> list:
    return [pytest.param(DVC3_BIN, id="dvc3"),
            pytest.param("dvc2", id="dvc2", marks=pytest.mark.skipif(not dvc2_bin(), reason="DVC 2 missing"))]


def _bin(name: str) -> str:
    return dvc2_bin() if name == "dvc2" else name   # type: ignore[return-value]


@pytest.mark.parametrize("dvc", dvc_bins())
def test_new_directory(git_server, tmp_path, dvc):
    case = author(tmp_path, git_server, f"diff-new-{Path(dvc).name}-{tmp_path.name}", _bin(dvc), BASE, ["data/d"])
    assert_same(case, tmp_path, batch_of(tmp_path, NEW), "data/fresh", "data/fresh")


@pytest.mark.parametrize("dvc", dvc_bins())
def test_append(git_server, tmp_path, dvc):
    case = author(tmp_path, git_server, f"diff-app-{Path(dvc).name}-{tmp_path.name}", _bin(dvc), BASE, ["data/d"])
    assert_same(case, tmp_path, batch_of(tmp_path, NEW), "data/d", "data/d")


def test_nested_subfolder(git_server, tmp_path):
    case = author(tmp_path, git_server, f"diff-nest-{tmp_path.name}", DVC3_BIN, BASE, ["data/d"])
    assert_same(case, tmp_path, batch_of(tmp_path, NEW), "data/d/sub/deep/er", "data/d")


IGNORES = {".dvcignore": "*.tmp\n# a comment\n/data/d/sub/cache/\n",
           "data/.dvcignore": ".DS_Store\n!keep.tmp\nd/logs/*.log\n!d/logs/keep.log\n"}
IGNORED_BATCH = {"c1.bin": b"\x05c1", ".DS_Store": b"mac", "c2.bin.tmp": b"tmp", "keep.tmp": b"kept",
                 "sub/.DS_Store": b"mac2", "sub/y.bin": b"\x06y", "sub/cache/z.bin": b"\x07cached",
                 "logs/a.log": "log\n", "logs/keep.log": "keep\n", ".git/config": "[core]\n", "x/.hg/h": "h"}


@pytest.mark.parametrize("dvc", dvc_bins())
@pytest.mark.parametrize("dest", ["data/d", "data/fresh"])
def test_dvcignore_at_several_levels(git_server, tmp_path, dvc, dest):
    name = f"diff-ign-{Path(dvc).name}-{dest.replace('/', '_')}-{tmp_path.name}"
    case = author(tmp_path, git_server, name, _bin(dvc), {**BASE, **IGNORES}, ["data/d"])
    if dest == "data/fresh":   # the same rules, written for the new directory
        case_ignores = "data/.dvcignore"
        (case.work / case_ignores).write_text(IGNORES[case_ignores] + "fresh/logs/*.log\n!fresh/logs/keep.log\n"
                                              "/fresh/sub/cache/\n")
        run(["git", "commit", "-qam", "rules for fresh"], case.work, case.env)
        run(["git", "push", "-q", case.git_url, "main"], case.work, case.env)
    fresh = assert_same(case, tmp_path, batch_of(tmp_path, IGNORED_BATCH), dest, dest)
    got = sorted(p.relative_to(fresh / dest).as_posix() for p in (fresh / dest).rglob("*") if p.is_file())
    assert "c1.bin" in got and "keep.tmp" in got and "logs/keep.log" in got and "sub/y.bin" in got
    for gone in (".DS_Store", "c2.bin.tmp", "sub/.DS_Store", "sub/cache/z.bin", "logs/a.log", ".git/config"):
        assert gone not in got


def test_issue_example_dvcignore(git_server, tmp_path):
    """Issue 15.3 as filed: `*.tmp` and `.DS_Store` in .dvcignore; c1.bin, .DS_Store, c2.bin.tmp uploaded."""
    files = {**BASE, ".dvcignore": "*.tmp\n.DS_Store\n"}
    case = author(tmp_path, git_server, f"diff-ex-{tmp_path.name}", DVC3_BIN, files, ["data/d"])
    batch = batch_of(tmp_path, {"c1.bin": b"\x05c1", ".DS_Store": b"mac", "c2.bin.tmp": b"tmp"})
    fresh = assert_same(case, tmp_path, batch, "data/d", "data/d")
    assert sorted(p.name for p in (fresh / "data/d").rglob("*") if p.is_file()) == ["a.bin", "b.txt", "c.bin",
                                                                                   "c1.bin"]


def test_rules_added_after_the_dataset_drop_files_as_dvc_add_does(git_server, tmp_path):
    case = author(tmp_path, git_server, f"diff-late-{tmp_path.name}", DVC3_BIN,
                  {**BASE, "data/d/old.log": "old\n", "data/d/sub/keep.log": "keep\n"}, ["data/d"])
    (case.work / ".dvcignore").write_text("/data/d/*.log\n")
    run(["git", "add", ".dvcignore"], case.work, case.env)
    run(["git", "commit", "-qm", "ignore top-level logs"], case.work, case.env)
    run(["git", "push", "-q", case.git_url, "main"], case.work, case.env)
    fresh = assert_same(case, tmp_path, batch_of(tmp_path, {"new.bin": b"\x08new"}), "data/d", "data/d")
    assert (fresh / "data/d/sub/keep.log").is_file() and (fresh / "data/d/new.bin").is_file()


def test_dvcignore_inside_the_dataset_is_refused_like_dvc(git_server, tmp_path):
    case = author(tmp_path, git_server, f"diff-inner-{tmp_path.name}", DVC3_BIN, BASE, ["data/d"])
    batch = batch_of(tmp_path, {"ok.bin": b"ok", "sub/.dvcignore": "*.bin\n"})
    added = via_dvc(case, tmp_path, batch, "data/d", "data/d")
    assert added.returncode != 0 and ".dvcignore" in added.stderr
    tip = run(["git", "--git-dir", str(case.bare), "rev-parse", "main"], tmp_path, case.env).stdout
    proc, _ = via_dda(case, tmp_path, batch, "data/d")
    assert proc.returncode != 0 and ".dvcignore" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert run(["git", "--git-dir", str(case.bare), "rev-parse", "main"], tmp_path, case.env).stdout == tip


USER_DVCFILE = """\
# Photos from the field trip; owner: data team
# (keep these comments)
meta:
  owner: 'field-team'     # quoted on purpose
  tags: [raw, "2024"]
desc: Field photos
outs:
- md5: {md5}
  size: {size}
  nfiles: {nfiles}
  hash: md5
  path: d   # the folder
  desc: "every photo, unsorted"
  type: photos
  labels:
  - raw
  - field
  meta:
    source: camera-2
# end of file
"""


@pytest.mark.parametrize("dvc", dvc_bins())
def test_user_fields_and_comments_are_kept(git_server, tmp_path, dvc):
    import yaml

    def edit(work: Path) -> None:
        out = yaml.safe_load((work / "data/d.dvc").read_text())["outs"][0]
        text = USER_DVCFILE.format(md5=out["md5"], size=out["size"], nfiles=out["nfiles"])
        if "hash" not in out:   # DVC 2 writes no hash field
            text = text.replace("  hash: md5\n", "")
        (work / "data/d.dvc").write_text(text)

    case = author(tmp_path, git_server, f"diff-user-{Path(dvc).name}-{tmp_path.name}", _bin(dvc), BASE, ["data/d"],
                  edit=edit)
    assert_same(case, tmp_path, batch_of(tmp_path, NEW), "data/d", "data/d")
    text = run(["git", "--git-dir", str(case.bare), "show", "main:data/d.dvc"], tmp_path, case.env).stdout
    for kept in ("# Photos from the field trip", "# (keep these comments)", "# quoted on purpose", "type: photos",
                 "# the folder", "source: camera-2", "# end of file", "desc: Field photos"):
        assert kept in text, text


if __name__ == "__main__":   # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
