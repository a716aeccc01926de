"""dvc.yaml templating (snapshot/templating.py) against DVC's own parser (dvc.parsing.DataResolver):
the same stage names, working directories and rendered outputs for each case."""
from __future__ import annotations

import os
import posixpath
import subprocess
from pathlib import Path

import pytest
import yaml

from sidecar.errors import DvcFileError
from sidecar.snapshot.dvcfiles import parse_dvc_yaml
from sidecar.snapshot.templating import files_needed, resolve_stages

dvc_parsing = pytest.importorskip("dvc.parsing")

FILES = {
    "params.yaml": "models:\n  small: {size: 3}\n  big: {size: 5}\nlist: [a, b]\nflag: true\nnum: 1.5\n",
    "extra.yaml": "sub:\n  dir: out\nother: 2\n",
    "conf.json": '{"j": {"k": "jv"}}',
    "conf.toml": "[t]\nname = 'tv'\n",
    "sub/stage.yaml": "names:\n  first: one\n",
}

CASES = {
    "foreach_params_mapping": """
stages:
  train:
    foreach: ${models}
    do:
      cmd: echo
      outs:
      - out/${key}-${item.size}.bin
      - out/${key}.log: {cache: false}
""",
    "foreach_list_scalars_and_dicts": """
stages:
  a:
    foreach: [x, 1, true]
    do: {cmd: echo, outs: ["a/${item}"]}
  b:
    foreach: [{n: p}, {n: q}]
    do: {cmd: echo, outs: ["b/${item.n}"]}
  c:
    foreach: ["${flag}", "${num}", false]
    do: {cmd: echo, outs: ["c/${item}"]}
  d:
    foreach: ${list}
    do: {cmd: echo, outs: ["d/${item}-${list[0]}"]}
""",
    "matrix": """
vars:
  - grid: g
stages:
  m:
    matrix:
      os: [linux, mac]
      n: [1, 2]
      cfg: [{x: 1}]
    cmd: echo
    outs:
    - ${grid}/${item.os}-${item.n}-${item.cfg.x}.txt: {remote: r, persist: true}
    - ${grid}/${key}.meta: {cache: false}
""",
    "matrix_from_params": """
stages:
  m:
    matrix:
      l: ${list}
      f: ["${flag}", "${num}", "x${num}"]
    cmd: echo
    outs: ["mp/${item.l}-${item.f}-${key}"]
""",
    "vars_files_and_keys": """
vars:
  - extra.yaml:sub
  - conf.json
  - conf.toml
  - local: lv
stages:
  s:
    cmd: echo
    outs: ["${sub.dir}/${j.k}-${t.name}-${local}-${flag}-${num}-${list[1]}"]
    metrics: [{"${sub.dir}/m.json": {cache: false}}]
    plots: ["p-${list.0}.csv"]
""",
    "stage_vars_and_wdir": """
vars:
  - where: sub
stages:
  s:
    wdir: ${where}
    vars: [stage.yaml]
    cmd: echo
    outs: ["${names.first}.txt", "esc-\\\\${names.first}"]
""",
}


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpl")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    from dvc.repo import Repo
    Repo.init(str(root))
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _read(root: Path):
    def read(path: str) -> bytes | None:
        p = root / path
        return p.read_bytes() if p.is_file() else None
    return read


def _dvc_resolved(root: Path, text: str) -> dict:
    from dvc.parsing import DataResolver
    from dvc.repo import Repo
    repo = Repo(str(root))
    try:
        stages = DataResolver(repo, str(root), yaml.safe_load(text)).resolve()["stages"]
    finally:
        repo.close()
    found = {}
    for name, stage in stages.items():
        wdir = posixpath.normpath(os.path.relpath(os.path.join(str(root), stage.get("wdir", ".")), str(root)))
        found[name] = (wdir if wdir != "." else "", {k: stage[k] for k in ("outs", "metrics", "plots") if k in stage})
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_stages_render_as_dvc_renders_them(dvc_repo, case):
    text = CASES[case]
    ours = resolve_stages(yaml.safe_load(text), "dvc.yaml", _read(dvc_repo))
    assert ours == _dvc_resolved(dvc_repo, text)


def test_flags_of_templated_outputs_reach_the_declarations(dvc_repo):
    decls = parse_dvc_yaml(CASES["matrix"].encode(), "dvc.yaml", read=_read(dvc_repo))
    assert sorted(decls) == ["m@linux-1-cfg0", "m@linux-2-cfg0", "m@mac-1-cfg0", "m@mac-2-cfg0"]
    flags = decls["m@mac-2-cfg0"].outs
    assert flags["g/m@mac-2-cfg0.meta".replace("m@", "")].cache is False
    assert flags["g/mac-2-1.txt"].remote == "r" and flags["g/mac-2-1.txt"].cache is True


@pytest.mark.parametrize("text,needle", [
    ("stages:\n  s:\n    cmd: e\n    outs: ['${nope}']\n", "could not find 'nope'"),
    ("vars: [missing.yaml]\nstages: {}\n", "'missing.yaml' does not exist"),
    ("vars: [extra.yaml:nokey]\nstages: {}\n", "could not find 'nokey'"),
    ("vars: [{other: 3}, extra.yaml]\nstages: {}\n", "cannot redefine 'other'"),
    ("vars: ['../x.yaml']\nstages: {}\n", "outside the repository"),
    ("stages:\n  s:\n    foreach: 3\n    do: {cmd: e}\n", "expected list/dictionary"),
    ("stages:\n  s:\n    foreach: ${flag}\n    do: {cmd: e}\n", "expected list/dictionary, got bool"),
    ("stages:\n  s:\n    cmd: e\n    outs: ['${models}']\n", "cannot interpolate data of type 'dict'"),
])
def test_template_errors_name_the_file_and_stage(dvc_repo, text, needle):
    with pytest.raises(DvcFileError) as err:
        parse_dvc_yaml(text.encode(), "dvc.yaml", read=_read(dvc_repo))
    assert str(err.value).startswith("dvc.yaml") and needle in str(err.value)


def test_files_needed_lists_params_and_vars_files():
    data = yaml.safe_load("vars: [a.yaml:k, c/b.json]\nstages:\n  s:\n    wdir: w\n    vars: [s.yaml]\n    cmd: e\n")
    assert files_needed(data, "d/dvc.yaml") == {"d/params.yaml", "d/a.yaml", "d/c/b.json", "d/w/s.yaml"}


def test_hostile_templates_fail_with_one_line():
    """Bounds DVC does not have: a matrix that multiplies out (50**8 stages), a string that
    grows by repetition."""
    matrix = "stages:\n  m:\n    matrix:\n" + "".join(f"      k{i}: [{', '.join(map(str, range(50)))}]\n"
                                                      for i in range(8)) + "    cmd: e\n"
    with pytest.raises(DvcFileError, match="makes .* stages"):
        parse_dvc_yaml(matrix.encode(), "dvc.yaml")
    big = "vars:\n  - s: " + "x" * 60000 + "\nstages:\n  a:\n    cmd: e\n    outs: ['${s}${s}']\n"
    with pytest.raises(DvcFileError, match="longer than"):
        parse_dvc_yaml(big.encode(), "dvc.yaml")
