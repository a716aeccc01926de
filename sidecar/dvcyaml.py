"""`.dvc` files written the way DVC writes them: edited in place, not regenerated.

DVC loads a `.dvc` file's text with ruamel.yaml's round-trip loader, applies the changed values
to that structure and dumps it again (dvc/stage/serialize.py `to_single_stage_file`,
dvc/utils/serialize/_yaml.py). Doing the same keeps comments, user keys (`desc`, `meta`, ...),
key order and layout exactly as `dvc add`/`dvc commit` keep them, byte for byte.
"""
from __future__ import annotations

import io
import posixpath
from collections import OrderedDict
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from .errors import DvcFileError


def _yaml() -> YAML:
    yaml = YAML()   # round-trip, as DVC's _get_yaml()
    yaml.default_flow_style = False
    yaml.Representer.add_representer(OrderedDict, yaml.Representer.represent_dict)
    return yaml


def dump(data: Any) -> bytes:
    """YAML text of `data` (a plain dict or a round-trip structure), as DVC dumps it."""
    stream = io.StringIO()
    _yaml().dump(data, stream)
    return stream.getvalue().encode("utf-8")


def update_output(text: bytes, source: str, out_path: str, values: dict[str, Any]) -> bytes:
    """`text` of the .dvc file `source` with `values` (md5, size, nfiles, ...) set on the output
    whose repository-relative path is `out_path`; every other byte as DVC would keep it.

    Raises DvcFileError when the text is not YAML or declares no such output."""
    try:
        data = YAML(typ="rt").load(text.decode("utf-8"))
    except (YAMLError, UnicodeDecodeError) as err:
        raise DvcFileError(f"{source}: not a valid .dvc file ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("outs"), list):
        raise DvcFileError(f"{source}: has no 'outs' list")
    wdir = data.get("wdir") or "."
    base = posixpath.join(posixpath.dirname(source), wdir if isinstance(wdir, str) else ".")
    found = False
    for raw in data["outs"]:
        if isinstance(raw, dict) and posixpath.normpath(posixpath.join(base, str(raw.get("path", "")))) == out_path:
            for key, value in values.items():
                # DVC's apply_diff: a key that changed is replaced in place; a new key goes last.
                if key not in raw or raw[key] != value:
                    raw[key] = value
            found = True
    if not found:
        raise DvcFileError(f"{source}: declares no output {out_path!r}")
    return dump(data)
