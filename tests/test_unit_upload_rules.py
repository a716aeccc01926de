"""Upload's rules checked against DVC's own code, without servers: `.dvcignore` (our port vs
dvc.ignore.DvcIgnoreFilter on random trees), the `.dvc` edit (vs DVC's load/apply_diff/dump),
reserved `--to` paths, and the CLI taking options in any order."""
from __future__ import annotations

import posixpath
import random
from pathlib import Path

import pytest

from sidecar.cli import _subcommands, build_parser, parse_args
from sidecar.dvcignore import IgnoreFilter
from sidecar.dvcyaml import update_output
from sidecar.uploader import UploadError, check_target

PATTERNS = ["*.tmp", ".DS_Store", "!keep.tmp", "/top.bin", "sub/", "sub2/*.bin", "**/deep/*.x", "a/**/b",
            "!sub/important", "*.log", "!/data/*.log", "d/sub/x*", "\\#hash", "# comment", "", "b/", "*",
            "!*.bin", "/data/d/a", "deep", "!deep/keep.x", "?.x", "[ab].bin", "data/", "!data/", "x*/", ".dvcignore"]
NAMES = ["a", "b", "c.bin", "keep.tmp", "x.tmp", ".DS_Store", "top.bin", "sub", "sub2", "deep", "k.x", "e.log",
         "important", "#hash", "x1", "y.bin", ".git", ".hg"]


def _random_tree(root: Path, rng: random.Random) -> list[str]:
    files: list[str] = []

    def fill(rel: str, depth: int) -> None:
        for name in rng.sample(NAMES, rng.randint(2, 7)):
            path = posixpath.join(rel, name) if rel else name
            if depth < 3 and rng.random() < 0.45:
                (root / path).mkdir(exist_ok=True)
                fill(path, depth + 1)
            elif not (root / path).exists():
                (root / path).write_bytes(b"x")
                files.append(path)
        if rng.random() < 0.6:
            lines = rng.sample(PATTERNS, rng.randint(1, 5))
            (root / rel / ".dvcignore").write_text("\n".join(lines) + "\n")
            files.append(posixpath.join(rel, ".dvcignore") if rel else ".dvcignore")

    (root / "data" / "d").mkdir(parents=True)
    fill("", 0)
    fill("data", 1)
    fill("data/d", 2)
    return files


def _ours(root: Path) -> IgnoreFilter:
    def read(rel_dir: str) -> str | None:
        f = root / rel_dir / ".dvcignore"
        return f.read_text() if f.is_file() else None

    return IgnoreFilter(read)


@pytest.mark.parametrize("seed", range(40))
def test_dvcignore_agrees_with_dvc(tmp_path, seed):
    from dvc.fs import localfs
    from dvc.ignore import DvcIgnoreFilter

    root = tmp_path / "repo"
    root.mkdir()
    files = _random_tree(root, random.Random(seed))
    theirs = DvcIgnoreFilter(localfs, str(root))
    ours = _ours(root)
    for base in ("", "data", "data/d"):
        if not (root / base).is_dir():
            continue
        walked = {Path(p).relative_to(root).as_posix() for p in theirs.find(localfs, str(root / base))}
        under = [f for f in files if not base or f.startswith(base + "/")]
        mine = {f for f in under if not ours.walk_ignored(f, base)}
        if base and theirs.is_ignored(localfs, str(root / base)):
            continue   # `dvc add` refuses an ignored directory; we refuse it too (is_ignored below)
        assert mine == walked, (seed, base, sorted(mine ^ walked))
    for f in files:
        assert ours.is_ignored(f) == theirs.is_ignored(localfs, str(root / f)), (seed, f)
        parent = posixpath.dirname(f)
        if parent:
            assert ours.is_ignored(parent, is_dir=True) == theirs.is_ignored(localfs, str(root / parent)), \
                (seed, parent)


@pytest.mark.parametrize("bad", [".git", ".git/hooks", ".dvc", ".dvc/cache", "data/.git", "a/.hg/x", ".", "./",
                                 "..", "../x", "data/../../x", "/abs", "/", "", "data//x", "data/./x",
                                 "a\nb", "x\x00y"])
def test_reserved_targets_are_refused(bad):
    with pytest.raises(UploadError) as err:
        check_target(bad)
    assert "\n" not in str(err.value).replace("\\n", "") and "--to" in str(err.value)


@pytest.mark.parametrize("good,norm", [("data/images", "data/images"), ("data/images/", "data/images"),
                                       ("new", "new"), (".hidden/x", ".hidden/x"), ("a..b", "a..b")])
def test_plain_targets_pass(good, norm):
    assert check_target(good) == norm


DVCFILE = """\
# my dataset: keep this comment
meta:
  owner: "me"   # who
outs:
- md5: 00000000000000000000000000000000.dir
  size: 1
  nfiles: 9
  hash: md5
  path: d
  desc: "the d folder"
  remote: origin
  labels: [a, 'b']
# trailing comment
"""


def test_dvc_file_is_edited_as_dvc_edits_it():
    from dvc.stage.serialize import apply_diff
    from dvc.utils.serialize._yaml import dumps_yaml, parse_yaml_for_update

    values = {"md5": "0123456789abcdef0123456789abcdef.dir", "size": 12345, "nfiles": 10}
    ours = update_output(DVCFILE.encode(), "data/d.dvc", "data/d", values).decode()
    state = parse_yaml_for_update(DVCFILE, "d.dvc")
    wanted = {**state, "outs": [{**state["outs"][0], **values}]}
    saved = parse_yaml_for_update(DVCFILE, "d.dvc")
    apply_diff(wanted, saved)
    assert ours == dumps_yaml(saved)
    assert "# my dataset: keep this comment" in ours and "# trailing comment" in ours
    assert "desc: the d folder" in ours and "owner: me" in ours and "remote: origin" in ours


def test_dvc_file_keys_missing_go_last_and_wdir_counts():
    text = b"wdir: ..\nouts:\n- path: data/d\n  md5: 00000000000000000000000000000000.dir\n"
    out = update_output(text, "sub/d.dvc", "data/d", {"md5": "f" * 32 + ".dir", "size": 3, "nfiles": 1})
    assert out.decode() == f"wdir: ..\nouts:\n- path: data/d\n  md5: {'f' * 32}.dir\n  size: 3\n  nfiles: 1\n"


# -- the command line: options and arguments in any order ----------------------------------------

POSITIONALS = {"ls": ["URL", "data"], "cat": ["URL", "data/a"], "get": ["URL", "data"], "mount": ["URL", "/mnt/x"],
               "status": ["/mnt/x"], "refresh": ["/mnt/x"], "unmount": ["/mnt/x"], "umount": ["/mnt/x"],
               "upload": ["URL", "a.png", "b.png"], "sidecar": [], "demo": [], "webhook": [],
               "sizes": ["publish", "URL", "data"], "csi": []}
OPTIONS = {"ls": ["-R", "--json", "--rev", "v1"], "cat": ["--rev", "v1", "-j", "3"],
           "get": ["-o", "out", "--no-progress", "--rev", "v1"], "mount": ["--subdir", "s", "-d", "--rev", "v1"],
           "status": ["--json"], "refresh": [], "unmount": ["-l"], "umount": ["--lazy"],
           "upload": ["--to", "data/images", "-m", "msg", "--replace", "--rev", "main"],
           "sidecar": ["--repo", "URL", "--mount", "/m"], "demo": ["--workdir", "/tmp/w"],
           "webhook": ["--listen", "127.0.0.1:1"], "sizes": ["--rev", "v1", "-j", "2"],
           "csi": ["--csi-endpoint", "unix:///tmp/c.sock", "--node-id", "n1"]}


def test_every_subcommand_is_covered():
    assert set(_subcommands(build_parser())) == set(POSITIONALS)


@pytest.mark.parametrize("command", sorted(POSITIONALS))
def test_options_anywhere(command):
    pos, opts = POSITIONALS[command], OPTIONS[command]
    first = parse_args([command, *opts, *pos])
    orders = [[*pos, *opts], [*pos[:1], *opts, *pos[1:]], [*pos[:1], *opts[:2], *pos[1:], *opts[2:]]]
    for argv in orders:
        assert vars(parse_args([command, *argv])) == vars(first), argv
    assert first.command == command


def test_upload_options_between_files():
    ns = parse_args(["upload", "URL", "--to", "data/images", "a.png", "-m", "x", "b.png"])
    assert ns.args == ["URL", "a.png", "b.png"] and ns.to == "data/images" and ns.message == "x"
