"""`dvc import`ed outputs: find where `dvc pull` gets their data, the source repository's
remote at the recorded `rev_lock`, following imports of imports (bounded)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import DDAError, OutputUnavailable
from ..redact import strip_userinfo
from .build import DvcLayout, read_dvc_layout
from .dvcfiles import DvcOut, ImportSource
from .git import GitSource

MAX_DEPTH = 8


@dataclass(frozen=True)
class ImportOrigin:
    """The source repository's DVC layout and the output there that holds the data."""
    url: str
    layout: DvcLayout
    repo_dir: Path | None   # the source's folder when it is on this machine (relative remotes)
    out: DvcOut


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return bool(pa.scheme) and (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


async def resolve_import(source: ImportSource, *, cache_dir: Path, main_url: str, user: str | None,
                         token: str | None, ca_bundle: str | None, depth: int = 0) -> ImportOrigin:
    """The origin of an imported output. Git credentials of the main repository are sent
    only to the same scheme, host and port. Raises OutputUnavailable with the cause."""
    if depth >= MAX_DEPTH:
        raise OutputUnavailable(f"import of {source.path!r} from {source.url}: imports nested deeper than "
                                f"{MAX_DEPTH} levels")
    same = _same_origin(source.url, main_url)
    where = f"import from {strip_userinfo(source.url)[0]} at {source.rev_lock[:12] or 'HEAD'}"
    try:
        git = GitSource(source.url, cache_dir, user=user if same else None, token=token if same else None,
                        ca_bundle=ca_bundle)
    except DDAError as err:
        raise OutputUnavailable(f"{where}: {err}") from None
    try:
        commit, _ = await git.resolve(source.rev_lock or None)
        entries = await git.ls_tree(commit)
        await git.start_reader()
        layout = await read_dvc_layout(entries, git.read_blob)
    except DDAError as err:
        raise OutputUnavailable(f"{where}: {err}") from None
    finally:
        await git.aclose()
    found = next((o for o in layout.outputs
                  if source.path == o.path or source.path.startswith(o.path + "/")), None)
    if found is None:
        raise OutputUnavailable(f"{where}: {source.path!r} is not a DVC output there")
    if found.unavailable is not None:
        raise OutputUnavailable(f"{where}: {found.unavailable}")
    if found.imported is not None:
        return await resolve_import(found.imported, cache_dir=cache_dir, main_url=source.url, user=None,
                                    token=None, ca_bundle=ca_bundle, depth=depth + 1)
    return ImportOrigin(git.display_url, layout, git.local_path, found)
