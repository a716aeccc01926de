"""A corpus of repository shapes, each authored with the real DVC CLI (3, and 2 where it
matters), with its reference checkout (`git clone` + `dvc pull`) next to it.

Every shape is one small repository on local disk (git served by path, DVC remotes are
local folders), so the differential test needs no servers. A shape is a function that
writes content and runs DVC in a fresh working tree; `build_shape` does the rest.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from repos import DVC3_BIN, _env, _run, dvc2_bin


@dataclass
class Shape:
    name: str
    dvc_version: str
    repo: Path        # the git repository (a working tree; dda reads it by path)
    reference: Path   # git clone + dvc pull (in each DVC root) of the same commit


Author = Callable[[Path, Callable[..., subprocess.CompletedProcess], Callable[..., subprocess.CompletedProcess], Path], None]


def _write(path: Path, data: bytes | str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)


# --------------------------------------------------------------------------- shapes

def shape_stage_wdir(work: Path, dvc, git, remotes: Path) -> None:
    """13.1 + 13.2: a dvc.yaml in data/ with `wdir: ../`, a cached output and an
    uncached metrics file (committed to git, never pushed)."""
    _write(work / "data" / "data.txt", "some data\n")
    dvc("add", "data/data.txt")
    _write(work / "derive.py", "import shutil\nshutil.copy('data/data.txt', 'data/derived.txt')\n"
                               "open('metrics.json', 'w').write('{\"a\": 1}')\n")
    (work / "data" / "dvc.yaml").write_text(
        "stages:\n"
        "  derive:\n"
        "    wdir: ../\n"
        "    cmd: python3 derive.py\n"
        "    deps:\n    - data/data.txt\n"
        "    outs:\n    - data/derived.txt\n"
        "    metrics:\n    - metrics.json:\n        cache: false\n")
    dvc("repro", "data/dvc.yaml")
    git("add", "-A")


def shape_foreach(work: Path, dvc, git, remotes: Path) -> None:
    """foreach stages (dvc.lock names them `name@key`), one uncached per item, and an
    executable output (`isexec`)."""
    (work / "params.yaml").write_text("x: 1\n")
    _write(work / "gen.py", "import sys\nname = sys.argv[1]\nopen(name + '.txt', 'w').write(name + '\\n')\n"
                            "open(name + '.log', 'w').write('log ' + name + '\\n')\n")
    (work / "dvc.yaml").write_text(
        "stages:\n"
        "  gen:\n"
        "    foreach: [one, two]\n"
        "    do:\n"
        "      cmd: python3 gen.py ${item}\n"
        "      outs:\n      - ${item}.txt\n      - ${item}.log:\n          cache: false\n")
    dvc("repro")
    _write(work / "tool.sh", "#!/bin/sh\necho tool\n", 0o755)
    dvc("add", "tool.sh")
    git("add", "-A")


def shape_names(work: Path, dvc, git, remotes: Path) -> None:
    """13.7: backslashes are ordinary characters, in a tracked directory and in git; a
    submodule is an empty directory, and so is a DVC-tracked directory with no file (an
    empty manifest); a git symlink and an executable git file."""
    for base in ("tracked", "plain"):
        _write(work / base / "back\\slash.txt", f"{base} backslash\n")
        _write(work / base / "sub\\dir\\deep.txt", f"{base} deep\n")
        _write(work / base / "normal" / "a.txt", f"{base} a\n")
    dvc("add", "tracked")
    (work / "nothing").mkdir()
    dvc("add", "nothing")
    _write(work / "run.sh", "#!/bin/sh\necho hi\n", 0o755)
    os.symlink("plain/normal/a.txt", work / "link.txt")
    # A submodule: a gitlink entry (its content is not part of a plain clone).
    sub = work.parent / (work.name + "-submodule")
    if sub.exists():
        shutil.rmtree(sub)
    sub.mkdir()
    _run(["git", "init", "-q", "-b", "main"], sub, _env(work.parent))
    _write(sub / "inner.txt", "inner\n")
    _run(["git", "add", "-A"], sub, _env(work.parent))
    _run(["git", "commit", "-q", "-m", "inner"], sub, _env(work.parent))
    git("-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "vendor/lib")
    git("add", "-A")


def shape_subrepos(work: Path, dvc, git, remotes: Path) -> None:
    """13.5: a monorepo whose audio/ and text/ are DVC subrepositories (`dvc init --subdir`),
    each with its own default remote; the top has none."""
    for name in ("audio", "text"):
        (work / name).mkdir()
        _run([dvc.bin, "init", "-q", "--subdir"], work / name, dvc.env)
        store = remotes / name
        store.mkdir(parents=True, exist_ok=True)
        _run([dvc.bin, "remote", "add", "-d", "store", str(store)], work / name, dvc.env)
        _write(work / name / "clips" / f"{name}1.bin", os.urandom(300))
        _write(work / name / "clips" / f"{name}2.bin", os.urandom(200))
        _write(work / name / "notes.txt", f"{name} notes\n")
        _run([dvc.bin, "add", "-q", "clips", "notes.txt"], work / name, dvc.env)
        _run([dvc.bin, "push", "-q"], work / name, dvc.env)
    git("add", "-A")


def shape_imports(work: Path, dvc, git, remotes: Path) -> None:
    """13.3: `dvc import` of a directory and a file from a source repository (data on the
    source's remote only), and an import of an import through a middle repository."""
    env = dvc.env

    def repo(path: Path, store: Path) -> _Dvc:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        _run(["git", "init", "-q", "-b", "main"], path, env)
        d = _Dvc(dvc.bin, path, env)
        d("init", "-q")
        store.mkdir(parents=True, exist_ok=True)
        d("remote", "add", "-d", "store", str(store))
        return d

    source = work.parent / "source"
    src = repo(source, remotes / "source")
    _write(source / "datasets" / "cats" / "a.txt", "meow\n")
    _write(source / "datasets" / "cats" / "deep" / "b.bin", os.urandom(700))
    _write(source / "datasets" / "one.txt", "single\n")
    src("add", "-q", "datasets/cats", "datasets/one.txt")
    _run(["git", "add", "-A"], source, env)
    _run(["git", "commit", "-q", "-m", "source"], source, env)
    src("push", "-q")
    middle = work.parent / "middle"
    mid = repo(middle, remotes / "middle")
    mid("import", "-q", str(source), "datasets/one.txt", "-o", "relayed.txt")
    _run(["git", "add", "-A"], middle, env)
    _run(["git", "commit", "-q", "-m", "middle"], middle, env)
    dvc("import", "-q", str(source), "datasets/cats", "-o", "cats")
    (work / "inputs").mkdir()
    dvc("import", "-q", str(source), "datasets/one.txt", "-o", "inputs/one.txt")
    dvc("import", "-q", str(middle), "relayed.txt", "-o", "relayed.txt")
    git("add", "-A")


_GEN = ("import os, sys\nfor p in sys.argv[1:]:\n    os.makedirs(os.path.dirname(p) or '.', exist_ok=True)\n"
        "    open(p, 'w').write('made ' + p + '\\n')\n")


def shape_templating(work: Path, dvc, git, remotes: Path) -> None:
    """Must-work 1: `matrix` and `foreach` over params, `vars` (a file with selected keys, a
    mapping, a stage's own file), `${item.x}`/`${key}`, and templated output flags: a
    `cache: ${...}` false output (from git), a `remote: ${...}` output (on a second remote),
    `persist`. Names and flags must come out as DVC's parser renders them."""
    extra = remotes / "extra"
    extra.mkdir(parents=True, exist_ok=True)
    dvc("remote", "add", "extra", str(extra))
    _write(work / "gen.py", _GEN)
    (work / "params.yaml").write_text("flags:\n  keep: false\nmodels:\n  small: {size: 3}\n  big: {size: 5}\n")
    (work / "extra.yaml").write_text("sub:\n  dir: out\nunused: 1\n")
    _write(work / "sub" / "stage.yaml", "names:\n  first: one\nmetric: score.json\n")
    (work / "dvc.yaml").write_text(
        "vars:\n"
        "  - extra.yaml:sub\n"
        "  - second: extra\n"
        "    grid_dir: grid\n"
        "stages:\n"
        "  train:\n"
        "    foreach: ${models}\n"
        "    do:\n"
        "      cmd: python3 gen.py ${sub.dir}/${key}.bin ${sub.dir}/${key}-${item.size}.log\n"
        "      outs:\n"
        "      - ${sub.dir}/${key}.bin\n"
        "      - ${sub.dir}/${key}-${item.size}.log:\n"
        "          cache: false\n"
        + ("  grid:\n"   # `matrix` came with DVC 3
           "    matrix:\n"
           "      os: [linux, mac]\n"
           "      n: [1, 2]\n"
           "    cmd: python3 gen.py ${grid_dir}/${item.os}-${item.n}.txt ${grid_dir}/${key}.meta\n"
           "    outs:\n"
           "    - ${grid_dir}/${item.os}-${item.n}.txt:\n"
           "        remote: ${second}\n"
           "    - ${grid_dir}/${key}.meta:\n"
           "        cache: false\n"
           "        persist: true\n" if dvc.bin == DVC3_BIN else
           "  grid:\n"
           "    foreach: [linux, mac]\n"
           "    do:\n"
           "      cmd: python3 gen.py ${grid_dir}/${item}.txt ${grid_dir}/${item}.meta\n"
           "      outs:\n"
           "      - ${grid_dir}/${item}.txt:\n"
           "          remote: ${second}\n"
           "      - ${grid_dir}/${item}.meta:\n"
           "          cache: false\n"
           "          persist: true\n")
        + "  local:\n"
        "    vars: [stage.yaml]\n"
        "    wdir: sub\n"
        "    cmd: python3 ../gen.py ${names.first}.txt ${metric}\n"
        "    outs:\n    - ${names.first}.txt\n"
        "    metrics:\n    - ${metric}:\n        cache: false\n")
    dvc("repro", "-q")
    git("add", "-A")


def shape_import_url(work: Path, dvc, git, remotes: Path) -> None:
    """13.3 / must-work 1: `dvc import-url` of local files and a directory (its source beside
    the repository, `../src`, the same from the reference clone), as pushed by `dvc push`,
    with `--to-remote`, and with `--no-download` (a file: `dvc pull` reads it from the source)."""
    src = work.parent / "src"
    _write(src / "table.csv", "a,b\n1,2\n")
    _write(src / "raw" / "x.txt", "x\n")
    _write(src / "raw" / "deep" / "y.bin", os.urandom(300))
    _write(src / "lazy.txt", "read at pull time\n")
    _write(src / "direct.txt", "straight to the remote\n")
    dvc("import-url", "-q", "../src/table.csv", "table.csv")
    (work / "data").mkdir()
    dvc("import-url", "-q", "../../src/raw", "data/raw")
    if dvc.bin == DVC3_BIN:   # DVC 2's pull rewrites such a .dvc file (records the md5): not a checkout
        dvc("import-url", "-q", "--no-download", "../src/lazy.txt", "lazy.txt")
    dvc("import-url", "-q", "--to-remote", "../src/direct.txt", "direct.txt")
    git("add", "-A")


def shape_fields(work: Path, dvc, git, remotes: Path) -> None:
    """Must-work 1, the other fields DVC writes: a CRLF text file (DVC 2 hashes it with
    md5-dos2unix), `desc`/`type`/`labels`/`meta` on .dvc and dvc.yaml outputs, a frozen and an
    always-changed stage, params, cached metrics and plots (with plot props), `persist`,
    `push: false` (on the remote from an earlier push), top-level params/metrics/plots, and
    with DVC 3 `artifacts` and `datasets`. None of them changes what `dvc pull` checks out."""
    v3 = dvc.bin == DVC3_BIN
    _write(work / "crlf.txt", b"line one\r\nline two\r\n")
    _write(work / "blob.bin", b"\x00\x01\r\n\xff" * 50)
    dvc("add", "-q", "crlf.txt", "blob.bin")
    described = (work / "blob.bin.dvc").read_text().replace(
        "  path: blob.bin\n",
        "  path: blob.bin\n  desc: raw bytes\n  meta:\n    owner: data-team\n"
        + ("  type: raw\n  labels: [a, b]\n" if v3 else ""))
    (work / "blob.bin.dvc").write_text("desc: a described file\nmeta: {source: tests}\n" + described)
    (work / "params.yaml").write_text("seed: 7\nsplit: {ratio: 0.5}\n")
    _write(work / "gen.py", _GEN)
    (work / "dvc.yaml").write_text(
        "stages:\n"
        "  prepare:\n"
        "    desc: writes the model\n"
        "    meta: {note: free-form}\n"
        "    cmd: python3 gen.py model.bin metrics.json plot.csv log.txt\n"
        "    params: [seed, split.ratio]\n"
        "    deps: [gen.py]\n"
        "    outs:\n"
        "    - model.bin:\n"
        "        desc: the model\n"
        + ("        type: model\n        labels: [prod]\n        meta: {framework: none}\n" if v3 else "")
        + "    - log.txt:\n        persist: true\n"
        "    metrics:\n    - metrics.json\n"
        "    plots:\n    - plot.csv:\n        x: a\n        y: b\n"
        "  again:\n"
        "    cmd: python3 gen.py always/out.txt\n"
        "    always_changed: true\n"
        "    outs: [always]\n"
        "params: [params.yaml]\n"
        "metrics: [metrics.json]\n"
        "plots:\n- plot.csv:\n    x: a\n"
        + ("artifacts:\n  model:\n    path: model.bin\n    type: model\n    desc: registered\n"
           "    labels: [prod]\n"
           "datasets:\n- name: ds\n  type: dvc\n  url: https://example.com/ds.git\n  path: data\n" if v3 else ""))
    dvc("repro", "-q")
    dvc("freeze", "-q", "again")
    dvc("push", "-q")
    # `push: false` set after the data was pushed: `dvc pull` still reads it from there.
    text = (work / "dvc.yaml").read_text().replace("    - log.txt:\n        persist: true\n",
                                                    "    - log.txt:\n        persist: true\n        push: false\n")
    (work / "dvc.yaml").write_text(text)
    git("add", "-A")


SHAPES: dict[str, Author] = {
    "stage_wdir": shape_stage_wdir,
    "foreach": shape_foreach,
    "names": shape_names,
    "subrepos": shape_subrepos,
    "imports": shape_imports,
    "templating": shape_templating,
    "import_url": shape_import_url,
    "fields": shape_fields,
}
# Shapes DVC 2 authors too (its lock/yaml and hash rules differ).
DVC2_SHAPES = ("stage_wdir", "foreach", "names", "subrepos", "import_url", "fields", "templating")   # DVC 2.58 cannot `dvc pull` the imports shape (its reference)


class _Dvc:
    def __init__(self, bin: str, work: Path, env: dict):
        self.bin, self.work, self.env = bin, work, env

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return _run([self.bin, *args], self.work, self.env)


def dvc_roots(checkout: Path) -> list[Path]:
    """Folders of a checkout holding a .dvc/ directory."""
    roots = []
    for dirpath, dirnames, _ in os.walk(checkout):
        if ".git" in dirnames:
            dirnames.remove(".git")
        if ".dvc" in dirnames:
            roots.append(Path(dirpath))
            dirnames.remove(".dvc")
    return roots


def build_shape(name: str, workdir: Path, version: str = "3") -> Shape:
    """Author shape `name` with DVC `version` under `workdir` and make its reference."""
    dvc_bin = DVC3_BIN if version == "3" else dvc2_bin()
    assert dvc_bin, "DVC 2 is not installed"
    root = workdir / f"{name}-dvc{version}"
    if root.exists():
        shutil.rmtree(root)
    work = root / "repo"
    work.mkdir(parents=True)
    env = _env(root)
    git = lambda *a: _run(["git", *a], work, env)  # noqa: E731
    dvc = _Dvc(dvc_bin, work, env)
    git("init", "-q", "-b", "main")
    git("config", "core.autocrlf", "false")
    remotes = root / "remotes"
    if name != "subrepos":
        dvc("init", "-q")
        (remotes / "default").mkdir(parents=True)
        dvc("remote", "add", "-d", "store", str(remotes / "default"))
    SHAPES[name](work, dvc, git, remotes)
    git("add", "-A")
    git("commit", "-q", "-m", f"shape {name}")
    if name != "subrepos":
        dvc("push", "-q")
    reference = root / "reference"
    _run(["git", "clone", "-q", str(work), str(reference)], root, env)
    for dvc_root in dvc_roots(reference):
        _run([dvc_bin, "pull", "-q"], dvc_root, env)
    return Shape(name, version, work, reference)


# --------------------------------------------------------------------------- the listing

_SKIP = {"cache", "tmp", "config.local"}


def reference_listing(checkout: Path) -> dict[str, dict]:
    """What a user sees in a checkout: every file, symlink and empty directory with its
    type, size, exec bit and symlink target (excluding .git and DVC's cache/tmp)."""
    found: dict[str, dict] = {}
    for dirpath, dirnames, filenames in os.walk(checkout):
        here = Path(dirpath)
        rel_dir = here.relative_to(checkout).as_posix()
        if here.name == ".dvc":
            dirnames[:] = [d for d in dirnames if d not in _SKIP]
            filenames = [f for f in filenames if f not in _SKIP]
        dirnames[:] = [d for d in dirnames if d != ".git"]
        filenames = [f for f in filenames if f != ".git"]   # a submodule's .git file is not a clone's
        if rel_dir != "." and not dirnames and not filenames:
            found[rel_dir] = {"type": "dir"}
        for d in list(dirnames):
            if (here / d).is_symlink():
                filenames.append(d)
                dirnames.remove(d)
        for f in filenames:
            p = here / f
            rel = (p.relative_to(checkout)).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = {"type": "symlink", "target": os.readlink(p)}
            else:
                found[rel] = {"type": "file", "size": st.st_size, "exec": bool(st.st_mode & 0o100)}
    return found
