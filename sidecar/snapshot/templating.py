"""dvc.yaml templating as DVC's parser does it (dvc/parsing/: `vars`, `params.yaml`,
`${...}` interpolation, `foreach` and `matrix` stages), over blobs already read from git.

Only what decides the checkout is rendered: a stage's `wdir` and its `outs`/`metrics`/
`plots` (paths and flags such as `cache`, `remote`, `push`). Commands and deps are not.
Every error raises DvcFileError naming the file and the stage, as `dvc pull` fails on them.
"""
from __future__ import annotations

import json
import posixpath
import re
import tomllib
from copy import deepcopy
from itertools import product
from typing import Any, Callable, Iterator

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from ..errors import DvcFileError
from .paths import join_inside

DEFAULT_PARAMS = "params.yaml"
# DVC's KEYCRE: `${...}`, not preceded by a backslash (`\${` is a literal `${`).
_KEY = re.compile(r"(?<!\\)\$\{(?P<inner>.*?)\}")
_EXPR = re.compile(r"^[^.\[\]]+(?:\.[^.\[\]]+|\[[^.\[\]]+\])*$")
_PRIMITIVE = (int, float, str, bytes, bool)
RENDERED = ("wdir", "outs", "metrics", "plots")
# Bounds against hostile files (DVC itself has none): stages one dvc.yaml may generate, and
# the length of one rendered string (a path is far shorter).
MAX_GENERATED = 100_000
MAX_RENDERED = 65_536

ReadFile = Callable[[str], "bytes | None"]


def is_templated(value: object) -> bool:
    return isinstance(value, str) and bool(_KEY.search(value))


def _to_str(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _select(context: dict[str, Any], expr: str, where: str) -> Any:
    expr = expr.strip()
    if not _EXPR.match(expr):
        raise DvcFileError(f"{where}: cannot parse '${{{expr}}}'")
    found: Any = context
    for part in expr.replace("[", ".").replace("]", "").split("."):
        part = part.strip()
        try:
            found = found[int(part)] if isinstance(found, list) else found[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise DvcFileError(f"{where}: could not find '{expr}'") from None
    return found


class _Picked:
    """A scalar that `foreach`/`matrix` data took from the context: DVC names a stage after
    it with Python's str() (its Value node), not with its rendering (`True`, not `true`)."""
    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


def _pick(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _pick(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pick(v) for v in value]
    return _Picked(value)


def _unpick(value: Any) -> Any:
    if isinstance(value, _Picked):
        return value.value
    if isinstance(value, dict):
        return {k: _unpick(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpick(v) for v in value]
    return value


def _name(value: Any) -> str:
    return str(value.value) if isinstance(value, _Picked) else _to_str(value)


def render_str(text: str, context: dict[str, Any], where: str, key: str | None = None, pick: bool = False) -> Any:
    """`${a.b}` / `${a[0]}` substituted; an exact `${x}` keeps x's type (a bool stays a bool)."""
    matches = list(_KEY.finditer(text))
    if not matches:
        return text.replace(r"\${", "${")
    if len(matches) == 1 and matches[0].group(0) == text:
        value = _select(context, matches[0]["inner"], where)
        _check_primitive(value, key, where)
        return _pick(value) if pick else value
    out, at = "", 0
    for match in matches:
        value = _select(context, match["inner"], where)
        _check_primitive(value, key, where)
        out += text[at:match.start()] + _to_str(value)
        at = match.end()
        if len(out) > MAX_RENDERED:
            raise DvcFileError(f"{where}: a rendered value is longer than {MAX_RENDERED} characters")
    return (out + text[at:]).replace(r"\${", "${")


def _check_primitive(value: Any, key: str | None, where: str) -> None:
    if value is not None and not isinstance(value, _PRIMITIVE) and key is not None and "foreach" not in key:
        raise DvcFileError(f"{where}: cannot interpolate data of type '{type(value).__name__}'")


def render(value: Any, context: dict[str, Any], where: str, key: str | None = None, pick: bool = False) -> Any:
    """Strings, lists and mapping keys and values rendered (DVC's `recurse`). `pick`: mark
    what exact `${x}` took from the context (foreach/matrix data, see _Picked)."""
    if isinstance(value, str):
        return render_str(value, context, where, key, pick)
    if isinstance(value, (list, tuple)):
        return [render(v, context, where, key, pick) for v in value]
    if isinstance(value, dict):
        return {_unpick(render(k, context, where, key)): render(v, context, where, key, pick)
                for k, v in value.items()}
    return value


def _merge(into: dict[str, Any], update: dict[str, Any], where: str, path: str = "") -> None:
    """DVC's merge: nested mappings merge; redefining any other key is an error."""
    for k, v in update.items():
        if not isinstance(k, str):
            continue   # DVC ignores non-string keys for interpolation
        if isinstance(into.get(k), dict) and isinstance(v, dict):
            _merge(into[k], v, where, f"{path}{k}.")
        elif k in into:
            raise DvcFileError(f"{where}: cannot redefine '{path}{k}' (already defined)")
        else:
            into[k] = deepcopy(v)


def _load_params(path: str, text: bytes, where: str) -> dict[str, Any]:
    suffix = posixpath.splitext(path)[1].lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text.decode("utf-8"))
        elif suffix == ".py":
            raise DvcFileError(f"{where}: params file {path!r}: Python params files are not supported")
        else:   # DVC reads everything else as YAML (ruamel, safe)
            data = YAML(typ="safe", pure=True).load(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, YAMLError, tomllib.TOMLDecodeError, RecursionError):
        raise DvcFileError(f"{where}: params file {path!r} cannot be parsed") from None
    if not isinstance(data, dict):
        raise DvcFileError(f"{where}: params file {path!r}: expected a mapping")
    return data


class _Vars:
    """The context of one dvc.yaml: what `vars` and params files define."""

    def __init__(self, read: ReadFile, source: str, root: str):
        self.read, self.source, self.root = read, source, root
        self.loaded: dict[str, list[str] | None] = {}   # file -> keys taken (None: all)

    def load(self, context: dict[str, Any], items: object, wdir: str, where: str,
             default: str | None = None) -> None:
        if default is not None:
            path = posixpath.join(wdir, default) if wdir else default
            if self.read(path) is not None:
                self._file(context, default, wdir, where)
        if items is None:
            return
        if not isinstance(items, list):
            raise DvcFileError(f"{where}: 'vars' must be a list")
        for i, item in enumerate(items):
            if isinstance(item, str):
                if is_templated(item):
                    raise DvcFileError(f"{where}: vars[{i}]: interpolating is not allowed")
                self._file(context, item, wdir, f"{where}: vars[{i}]")
            elif isinstance(item, dict):
                if any(is_templated(v) for v in _strings(item)):
                    raise DvcFileError(f"{where}: vars[{i}]: interpolating is not allowed")
                _merge(context, item, f"{where}: vars[{i}]")
            else:
                raise DvcFileError(f"{where}: vars[{i}]: expected a file name or a mapping")

    def _file(self, context: dict[str, Any], item: str, wdir: str, where: str) -> None:
        name, _, keys_text = item.partition(":")
        path = join_inside(wdir, name, where, "vars", self.root)
        keys = [k for k in keys_text.split(",") if k] or None
        if path in self.loaded:
            before = self.loaded[path]
            if keys is None and before is None:
                return   # the whole file twice is allowed
            if keys is None or before is None or set(keys) & set(before):
                raise DvcFileError(f"{where}: cannot load {item!r}: it is loaded already")
        text = self.read(path)
        if text is None:
            raise DvcFileError(f"{where}: params file {path!r} does not exist")
        data = _load_params(path, text, where)
        if keys is not None:
            missing = [k for k in keys if k not in data]
            if missing:
                raise DvcFileError(f"{where}: could not find {missing[0]!r} in {path!r}")
            data = {k: data[k] for k in keys}
        _merge(context, data, where)
        self.loaded[path] = None if keys is None else [*(self.loaded.get(path) or []), *keys]


def _strings(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    else:
        yield value


def _foreach_items(data: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    """(name suffix, {item[, key]}) as DVC's ForeachDefinition normalizes them."""
    if isinstance(data, dict):
        return [(_to_str(k), {"item": _unpick(v), "key": _to_str(k)}) for k, v in data.items()]
    if isinstance(data, list):
        composite = any(isinstance(v, (dict, list)) for v in data)
        return [(_to_str(i) if composite else _name(v), {"item": _unpick(v)}) for i, v in enumerate(data)]
    raise DvcFileError(f"{where}: 'foreach' expected list/dictionary, got {type(_unpick(data)).__name__}")


def _matrix_items(data: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    """DVC's MatrixDefinition: the product of every key's list; the name suffix joins each
    value (`k<index>` for a composite value) with '-'; `item` maps each key to its value."""
    if not isinstance(data, dict):
        raise DvcFileError(f"{where}: 'matrix' expected a dictionary, got {type(_unpick(data)).__name__}")
    for k, v in data.items():
        if not isinstance(v, list):
            raise DvcFileError(f"{where}: matrix.{k}: expected a list, got {type(_unpick(v)).__name__}")
    count = 1
    for v in data.values():
        count *= len(v)
    if count > MAX_GENERATED:
        raise DvcFileError(f"{where}: 'matrix' makes {count} stages (at most {MAX_GENERATED} are read)")
    found = []
    for combination in product(*(list(enumerate(v)) for v in data.values())):
        item, fragments = {}, []
        for k, (i, v) in zip(data.keys(), combination):
            item[k] = _unpick(v)
            fragments.append(f"{k}{i}" if isinstance(v, (dict, list)) else _name(v))
        key = "-".join(fragments)
        found.append((key, {"item": item, "key": key}))
    return found


def resolve_stages(data: dict[str, Any], source: str, read: ReadFile,
                   root: str = "") -> dict[str, tuple[str, dict[str, Any]]]:
    """Stages of a loaded dvc.yaml at `source`, as dvc.lock names them (`name`, `name@key`):
    name -> (working directory, the stage with `outs`/`metrics`/`plots` rendered).
    `read(path)`: a repository file's bytes, or None when absent."""
    folder = posixpath.dirname(source)
    context: dict[str, Any] = {}
    files = _Vars(read, source, root)
    files.load(context, data.get("vars"), folder, f"{source}: vars", default=DEFAULT_PARAMS)
    stages = data.get("stages") or {}
    if not isinstance(stages, dict):
        raise DvcFileError(f"{source}: 'stages' must be a mapping")
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    try:
        _resolve_all(stages, context, files, folder, source, root, found)
    except RecursionError:
        raise DvcFileError(f"{source}: nested too deeply") from None
    return found


def _resolve_all(stages: dict[str, Any], context: dict[str, Any], files: "_Vars", folder: str, source: str,
                 root: str, found: dict[str, tuple[str, dict[str, Any]]]) -> None:
    for name, stage in stages.items():
        where = f"{source}: stage {name!r}"
        if not isinstance(stage, dict):
            raise DvcFileError(f"{where}: expected a mapping")
        if "matrix" in stage:
            template = {k: v for k, v in stage.items() if k != "matrix"}
            items = _matrix_items(render(stage["matrix"], context, where, pick=True), where)   # any type, as DVC
        elif "foreach" in stage:
            template = stage.get("do")
            if not isinstance(template, dict):
                raise DvcFileError(f"{where}: 'do' must be a mapping")
            items = _foreach_items(render(stage["foreach"], context, where, pick=True), where)
        else:
            found[str(name)] = _entry(stage, context, files, folder, where, root)
            continue
        for suffix, extra in items:
            local = {k: v for k, v in context.items() if k not in extra}
            local.update(extra)
            generated = f"{name}@{suffix}"
            found[generated] = _entry(template, local, files, folder, f"{source}: stage {generated!r}", root)
            if len(found) > MAX_GENERATED:
                raise DvcFileError(f"{source}: more than {MAX_GENERATED} stages")


def _entry(stage: dict[str, Any], context: dict[str, Any], files: _Vars, folder: str, where: str,
           root: str) -> tuple[str, dict[str, Any]]:
    wdir_raw = stage.get("wdir")
    wdir = folder
    if wdir_raw:
        rendered = render(wdir_raw, context, f"{where}: wdir", "wdir")
        wdir = join_inside(folder, _to_str(rendered), where, "wdir", root)
    if stage.get("vars"):
        context = deepcopy(context)
        saved = files.loaded
        files.loaded = deepcopy(saved)   # a stage's vars are its own
        try:
            files.load(context, stage.get("vars"), wdir, f"{where}: vars")
        finally:
            files.loaded = saved
    body = {k: render(stage[k], context, f"{where}: {k}", k) for k in RENDERED[1:] if k in stage}
    return wdir, body


def files_needed(data: Any, source: str) -> set[str]:
    """Repository paths of the params files a loaded dvc.yaml may read (to fetch them first):
    `params.yaml` beside it and every `vars` file, top-level and per stage (a stage's relative
    to its literal `wdir`). Paths that leave the repository are left to the resolver to refuse."""
    folder = posixpath.dirname(source)
    found = {posixpath.join(folder, DEFAULT_PARAMS) if folder else DEFAULT_PARAMS}
    if not isinstance(data, dict):
        return found

    def add(items: object, wdir: str) -> None:
        for item in items if isinstance(items, list) else []:
            if isinstance(item, str):
                found.add(posixpath.normpath(posixpath.join(wdir, item.partition(":")[0])))

    add(data.get("vars"), folder)
    for stage in (data.get("stages") or {}).values() if isinstance(data.get("stages"), dict) else []:
        if not isinstance(stage, dict):
            continue
        body = stage.get("do") if isinstance(stage.get("do"), dict) else stage
        wdir = body.get("wdir") if isinstance(body.get("wdir"), str) else ""
        base = posixpath.normpath(posixpath.join(folder, wdir)) if wdir and not is_templated(wdir) else folder
        add(body.get("vars"), base)
    return {p for p in found if p != ".." and not p.startswith("../")}
