"""`dda`: the command line. Every flag also reads an environment variable (DDA_<FLAG>)."""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from .errors import PARTIAL_EXIT, DDAError, NotFound, OutputUnavailable, describe
from .redact import redact
from .settings import Settings, add_arguments, flag_values, load_config

Config = Settings      # older name, kept for importers
ENGINE_FLAGS = ("revision", "cache_dir", "cache_size", "chunk_size", "jobs", "deadline", "request_timeout", "retries",
                "ca_bundle", "verify")

ENV_HELP = """Environment: every flag has a DDA_ twin (--cache-size -> DDA_CACHE_SIZE, --rev -> DDA_REVISION,
URL -> DDA_REPO). Remote settings: DDA_REMOTE_<NAME>_<KEY> with KEY one of URL, ENDPOINT_URL, REGION,
ACCESS_KEY_ID, SECRET_ACCESS_KEY, USER, PASSWORD, TOKEN, AUTH, METHOD, SSL_VERIFY (NAME=DEFAULT: the default
remote). Private CA for git and every remote: --ca-bundle / DDA_CA_BUNDLE.
`dda ls` exits 3 when it listed the revision but some outputs are unavailable or some sizes could not be
learned (named on stderr; such a size shows as `-`). `dda get` writes every file it can and exits 1 naming the rest.
Git credentials: DDA_GIT_USER, DDA_GIT_TOKEN (or in the URL). A YAML config file: --config or DDA_CONFIG."""


def _common(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ENGINE_FLAGS)       # flags, env names and help come from sidecar.settings
    parser.add_argument("--config", dest="config_file", help="YAML config file (remote overrides, defaults)")
    parser.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dda", description="Direct Data Access to git+DVC repositories.",
                                     epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("ls", help="list a revision (names, sizes, git/dvc); downloads no data")
    ls.add_argument("args", nargs="*", metavar="URL [PATH]")
    ls.add_argument("-R", "--recursive", action="store_true")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    _common(ls)

    cat = sub.add_parser("cat", help="stream one file to stdout")
    cat.add_argument("args", nargs="+", metavar="URL PATH")
    _common(cat)

    get = sub.add_parser("get", help="download a file or a directory, in parallel")
    get.add_argument("args", nargs="+", metavar="URL PATH")
    get.add_argument("-o", "--out", help="destination (default: the path's last name)")
    get.add_argument("--no-progress", action="store_true")
    _common(get)

    sizes = sub.add_parser("sizes", help="publish a tracked directory's sizes to its remote (one read "
                                         "instead of a request per file for every later client)")
    sizes.add_argument("action", choices=["publish"])
    sizes.add_argument("args", nargs="*", metavar="URL [PATH]")
    _common(sizes)

    mount = sub.add_parser("mount", help="FUSE-mount a revision read-only (every file, fetched when read)")
    mount.add_argument("args", nargs="+", metavar="URL MOUNTPOINT")
    mount.add_argument("--daemon", "-d", action="store_true", help="run in the background once mounted")
    add_arguments(mount, ("subdir", "allow_non_empty", "log_file"))
    _common(mount)

    status = sub.add_parser("status", help="what a mount serves: repo, revision, commit, cache, counters")
    status.add_argument("mountpoint")
    status.add_argument("--json", action="store_true")

    refresh = sub.add_parser("refresh", help="move a mount to its branch's new tip (open files keep theirs)")
    refresh.add_argument("mountpoint")

    unmount = sub.add_parser("unmount", aliases=["umount"], help="unmount (the daemon then exits)")
    unmount.add_argument("mountpoint")
    unmount.add_argument("--lazy", "-l", action="store_true", help="detach now even if files are open")

    upload = sub.add_parser("upload", help="add files to a DVC-tracked directory without pulling it")
    upload.add_argument("args", nargs="+", metavar="URL FILE", help="repository URL, then files or directories")
    upload.add_argument("--to", required=True, help="directory in the repository (tracked by DVC, or new)")
    upload.add_argument("-m", "--message", help="commit message")
    upload.add_argument("--replace", action="store_true", help="allow replacing files that exist with other content")
    upload.add_argument("--author", help='commit author, "Name <email>" (default: dda upload <dda@localhost>)')
    upload.add_argument("--no-progress", action="store_true")
    upload.add_argument("--retry-for", type=float, default=None, metavar="SECONDS",
                        help="keep retrying this long while concurrent uploads move the branch first (default 600)")
    _common(upload)

    from .sidecar_cmd import add_parser as add_sidecar_parser   # `dda sidecar` (container entrypoint)

    add_sidecar_parser(sub, _common)

    demo = sub.add_parser("demo", help="build a sample DVC repository and stream it (no network)")
    demo.add_argument("--workdir", help="where to build the sample (default: a temporary directory)")
    demo.add_argument("-v", "--verbose", action="store_true")

    from .webhook.app import add_parser as add_webhook_parser  # `dda webhook` (Kubernetes admission)
    add_webhook_parser(sub)

    from .csi.command import add_parser as add_csi_parser   # `dda csi` (CSI node plugin)
    add_csi_parser(sub)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Name (and alias) -> parser of every `dda` subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """`dda`'s arguments, options and positionals in any order, as git and dvc take them
    (`dda upload URL --to DIR a.png b.png`): the subcommand's own parser runs in argparse's
    intermixed mode, which places every option first and then fills the positionals.
    Errors (usage, exit 2) are argparse's, named by the subcommand."""
    parser = parser or build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = _subcommands(parser)
    if argv and argv[0] in commands:
        ns = commands[argv[0]].parse_intermixed_args(argv[1:])
        ns.command = argv[0]
        return ns
    return parser.parse_args(argv)   # no subcommand, --help, or an unknown one: argparse says so


def _default_repo(ns: argparse.Namespace) -> str | None:
    """The repository the settings name when no URL argument is given (DDA_REPO, config file)."""
    return _config(ns, None).repo


def _split_repo_args(args: list[str], wants_path: bool, path_required: bool,
                     env_repo: str | None = None) -> tuple[str | None, str]:
    """Positional URL and PATH; URL may come from the `repo` setting (DDA_REPO) instead."""
    if len(args) >= 2:
        return args[0], args[1]
    if len(args) == 1:
        if path_required or env_repo:
            if not env_repo:
                raise DDAError("missing PATH (usage: dda cat URL PATH)")
            return None, args[0]
        return args[0], ""
    if path_required:
        raise DDAError("missing URL and PATH")
    return None, ""


def _config(ns: argparse.Namespace, repo: str | None) -> Settings:
    flags: dict[str, Any] = flag_values(ns)
    flags["repo"] = repo
    return load_config(flags, config_file=getattr(ns, "config_file", None))


async def _open(ns: argparse.Namespace, repo: str | None):  # type: ignore[no-untyped-def]
    from .engine import Engine

    return await Engine.open(_config(ns, repo))


async def cmd_ls(ns: argparse.Namespace) -> int:
    """List a revision. Exit 0; or PARTIAL_EXIT (3) when it listed everything it could but
    some outputs are unavailable (each named once on stderr, shown with kind `broken`) or some
    files' sizes could not be learned (each named on stderr, shown with size `-`, JSON null)."""
    from .fs import FileSystem

    repo, path = _split_repo_args(ns.args, True, False, _default_repo(ns))
    async with await _open(ns, repo) as engine:
        fs = FileSystem(engine)
        tree = engine.tree
        path = fs.normalize(path)
        kind = fs.kind(path)
        if kind is None:
            problem = tree.problem_at(path)
            if problem is not None:
                raise OutputUnavailable(problem.message(), path=path)
            raise NotFound(f"{path}: not in revision {fs.revision}", path=path)
        prefix = path + "/" if path else ""
        unsized = 0
        if kind != "dir":
            unsized += await _print_rows(fs, tree, [path], [], ns.json)
        elif ns.recursive:
            # Streamed: sizes learned and rows printed a batch at a time, in path order, so a
            # 1M-file tree needs memory for one batch, and what was sized stays sized.
            # Empty folders (a submodule, an empty tracked directory) and unavailable outputs
            # are few; each goes out with the batch it sorts into.
            dirs = sorted(d for d, names in tree.dirs.items() if d and (not names or d in tree.broken)
                          and (not path or d == path or d.startswith(prefix)))
            batch: list[str] = []
            for entry in fs.walk_files(path):
                batch.append(entry.path)
                if len(batch) >= LS_BATCH:
                    cut = 0
                    while cut < len(dirs) and dirs[cut] < batch[-1]:
                        cut += 1
                    unsized += await _print_rows(fs, tree, batch, dirs[:cut], ns.json)
                    batch, dirs = [], dirs[cut:]
            unsized += await _print_rows(fs, tree, batch, dirs, ns.json)
        else:
            items = fs.listdir(path)
            unsized += await _print_rows(fs, tree, [i.path for i in items if i.kind != "dir"],
                                         [i.path for i in items if i.kind == "dir"], ns.json)
        sys.stdout.flush()
        return PARTIAL_EXIT if _report_problems(engine, path) or unsized else 0


LS_BATCH = 4096


# Lone surrogates: the bytes of a name that is not UTF-8 (git takes any), decoded with
# surrogateescape. Written raw they would make the line invalid UTF-8 (RFC 8259 needs UTF-8).
_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_line(item: dict[str, Any]) -> str:
    """`item` as one JSON line, valid UTF-8 whatever the names: UTF-8 names stay readable, a
    non-UTF-8 byte becomes a \\udcXX escape (json.loads + os.fsencode give the bytes back)."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(item, ensure_ascii=False))


async def _print_rows(fs, tree, files: list[str], dirs: list[str], as_json: bool) -> int:  # type: ignore[no-untyped-def]
    """Print `files` with their sizes (learned in bulk: one listing per remote folder, or
    bounded HEADs) and `dirs` (kind `broken` for an unavailable output), sorted by path.
    A file whose size could not be learned (object missing, its request past its own
    deadline) is printed with size `-` (JSON: null) and named on stderr once its batch is
    out; returns how many there were."""
    rows: list[tuple[str, str, int | None, Any]] = []
    failures: list[tuple[str, DDAError]] = []
    if files:
        for p, attr in await fs.stat_each(files):
            e = fs.entry(p)
            if isinstance(attr, DDAError):
                failures.append((p, attr))
                rows.append((p, e.kind, None, e))
            else:
                rows.append((p, e.kind, attr.size, e))
    rows += [(d, "broken" if d in tree.broken else "dir", None, None) for d in dirs]
    lines = []
    for p, kind, size, e in sorted(rows, key=lambda r: r[0]):
        if as_json:
            item: dict[str, Any] = {"path": p, "kind": kind, "size": size}
            if e is not None:
                item["exec"] = bool(e.mode & 0o100)
                if e.is_symlink:
                    item["target"] = e.target
            lines.append(_json_line(item))
        else:
            shown = p + "/" if kind == "dir" or (kind == "broken" and p in tree.dirs) else p
            lines.append(f"{kind:<4} {'-' if size is None else size:>12}  {shown}")
    if lines:
        print("\n".join(lines))
    if failures:
        sys.stdout.flush()     # the rows first, then what is wrong with some of them
    for p, err in failures:
        _say_failure(p, err)
    return len(failures)


async def cmd_sizes(ns: argparse.Namespace) -> int:
    """`dda sizes publish URL [PATH]`: write each tracked directory's size index next to its
    manifest on the remote (see sidecar.sizeindex)."""
    repo, path = _split_repo_args(ns.args, True, False, _default_repo(ns))
    async with await _open(ns, repo) as engine:
        for out_path, key, count in await engine.publish_sizes(path):
            print(f"{out_path}: published {count} sizes to {key}")
    return 0


def _say_error(message: str) -> None:
    """One `dda: error:` line on stderr. A reader of stderr that left (`2>&1 | head -1`) must
    not turn a failure into exit 0: the line is dropped, the exit code stands."""
    try:
        print(f"dda: error: {redact(message)}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def _say_failure(path: str, err: BaseException) -> None:
    """One `dda: error: PATH: CAUSE` line (PATH not repeated when the cause names it)."""
    message = describe(err).message
    _say_error(message if path in message else f"{path}: {message}")


def _report_problems(engine: Any, path: str) -> int:
    """Name each unavailable output at, under or above `path` once on stderr; PARTIAL_EXIT (3)
    if there was one (the rest was listed or written), else 0."""
    prefix = path + "/" if path else ""
    relevant = [pr for pr in engine.problems
                if (pr.path is None and not path) or (pr.path is not None and (
                    not path or pr.path == path or pr.path.startswith(prefix) or path.startswith(pr.path + "/")))]
    for problem in relevant:
        _say_error(problem.message())
    return PARTIAL_EXIT if relevant else 0


async def cmd_cat(ns: argparse.Namespace) -> int:
    from .fs import FileSystem

    repo, path = _split_repo_args(ns.args, True, True, _default_repo(ns))
    out = sys.stdout.buffer
    async with await _open(ns, repo) as engine:
        fs = FileSystem(engine)
        handle = await fs.open(fs.normalize(path), shown=False)   # a stream: the object has the last word
        try:
            async for piece in fs.iter_bytes(handle):
                # A slow reader on the pipe must not stall the loop (downloads, locks others wait on).
                await asyncio.to_thread(out.write, piece)
            await asyncio.to_thread(out.flush)
        finally:
            fs.release(handle)
    return 0


async def cmd_get(ns: argparse.Namespace) -> int:
    """`dda get URL PATH [-o DEST]`. Exit 0; 1 when some files could not be fetched (each
    named on stderr, every other one written); PARTIAL_EXIT (3) for unavailable outputs."""
    from .download import IncompleteDownload, download
    from .fs import FileSystem

    repo, path = _split_repo_args(ns.args, True, True, _default_repo(ns))
    async with await _open(ns, repo) as engine:
        fs = FileSystem(engine)
        try:
            await download(fs, path, Path(ns.out) if ns.out else None,
                           progress=not ns.no_progress and sys.stderr.isatty())
        except IncompleteDownload as err:    # like `dvc pull`: the others were written
            for p, cause in err.failures:
                _say_failure(p, cause)
            _report_problems(engine, fs.normalize(path))
            _say_error(f"{len(err.failures)} of {err.total} files not written (named above); the others were")
            return err.exit_code
        # everything else was written; outputs that cannot be shown are named (exit 3)
        return _report_problems(engine, fs.normalize(path))


def cmd_mount(ns: argparse.Namespace) -> int:
    from .fuse.mount import run_daemon, run_foreground

    if len(ns.args) == 1 and _default_repo(ns):
        repo, mountpoint = None, ns.args[0]
    elif len(ns.args) == 2:
        repo, mountpoint = ns.args
    else:
        raise DDAError("usage: dda mount URL MOUNTPOINT (URL may come from DDA_REPO)")
    config = _config(ns, repo)
    target = Path(mountpoint)
    if ns.daemon:
        log_file = Path(config.log_file) if config.log_file else config.cache_dir / "logs" / "mount.log"
        return run_daemon(config, target, config.subdir, config.allow_non_empty, log_file)
    return asyncio.run(run_foreground(config, target, config.subdir, config.allow_non_empty))


def cmd_status(ns: argparse.Namespace) -> int:
    from .fuse.mountpoint import is_stale

    path = Path(ns.mountpoint)
    if is_stale(path):
        raise DDAError(f"{path}: the mount's daemon is gone (stale mount); `dda unmount {path}` clears it")
    try:
        raw = os.getxattr(path, "user.dda.status")
    except OSError:
        raise DDAError(f"{path}: not a dda mount") from None
    status = json.loads(raw)
    if ns.json:
        print(json.dumps(status, indent=2))
        return 0
    gib = 1024 ** 3
    print(f"repo:      {status['repo']}")
    print(f"revision:  {status['revision']}  (commit {status['commit']})")
    if status.get("update_available"):
        print(f"update:    the branch has moved to {status['latest_commit']}; `dda refresh {path}` serves it")
    print(f"files:     {status['files']}" + (f"  (subdir {status['subdir']})" if status["subdir"] else ""))
    print(f"cache:     {status['cache_disk_bytes'] / gib:.2f} GiB on disk of {status['cache_budget_bytes'] / gib:.2f} GiB"
          f" ({status['cache_used_bytes'] / gib:.2f} GiB of data) in {status['cache_dir']}")
    print(f"reads:     {status['cache_hits']} cache hits, {status['cache_misses']} misses; "
          f"{status['bytes_served']} bytes served")
    print(f"remote:    {status['requests']} requests, {status['bytes_fetched']} bytes fetched, "
          f"{status['retries']} retries, errors {status['errors'] or 'none'}")
    for problem in status.get("problems") or []:
        print(f"problem:   {problem}")
    p = status["prefetch"]
    print(f"prefetch:  {p['issued_files']} files issued, {p['used_files']} used, {p['wasted_files']} wasted, "
          f"{p['readahead_chunks']} readahead chunks")
    return 0


def cmd_refresh(ns: argparse.Namespace) -> int:
    from .fuse.mountpoint import is_stale

    path = Path(ns.mountpoint)
    if is_stale(path):
        raise DDAError(f"{path}: the mount's daemon is gone (stale mount)")
    try:
        result = json.loads(os.getxattr(path, "user.dda.refresh"))
    except OSError as err:
        raise DDAError(f"{path}: not a dda mount, or the refresh failed ({err.strerror}); see the mount's log") from None
    if result.get("moved"):
        print(f"{path}: {result['old'][:12]} -> {result['new'][:12]}")
    else:
        print(f"{path}: already at the branch's tip ({(result.get('commit') or '?')[:12]})")
    return 0


def cmd_unmount(ns: argparse.Namespace) -> int:
    from .fuse.mountpoint import unmount

    unmount(Path(ns.mountpoint).resolve(), lazy=ns.lazy)
    return 0


async def cmd_upload(ns: argparse.Namespace) -> int:
    import re

    from .uploader import upload_async

    if _default_repo(ns) and not _looks_like_repo(ns.args[0]):
        repo, paths = None, ns.args
    else:
        repo, paths = ns.args[0], ns.args[1:]
    if not paths:
        raise DDAError("usage: dda upload URL FILE... --to DIR")
    author = None
    if ns.author:
        match = re.match(r"^\s*(.+?)\s*<([^>]+)>\s*$", ns.author)
        if not match:
            raise DDAError(f'--author {ns.author!r}: expected "Name <email>"')
        author = (match.group(1), match.group(2))
    config = _config(ns, repo)
    if ns.retry_for is not None and not ns.retry_for >= 0:
        raise DDAError(f"--retry-for {ns.retry_for}: expected seconds >= 0")
    extra = {"retry_for": ns.retry_for} if ns.retry_for is not None else {}
    result = await upload_async(config, ns.to, [Path(p) for p in paths], message=ns.message, replace=ns.replace,
                                author=author, progress=not ns.no_progress and sys.stderr.isatty(), **extra)
    for note in result.messages:
        print(f"dda: {note}")
    if result.files_added or result.files_replaced:
        print(f"{result.branch}: {result.commit[:12]} {result.dvc_file}: +{result.files_added} file(s)"
              + (f", {result.files_replaced} replaced" if result.files_replaced else "")
              + f"; uploaded {result.objects_uploaded} object(s), {result.bytes_uploaded} bytes"
              + (f" ({result.skipped_present} already on the remote)" if result.skipped_present else "")
              + (f"; landed on attempt {result.attempts} (others pushed first)" if result.attempts > 1 else ""))
    return 0


# What a write to stdout (or another file with no name in the error) fails with: a full
# disk, a quota, a file-size limit, a device error.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def _drop_unwritable_stdout() -> None:
    """Point stdout at /dev/null if it refuses what is buffered for it, so the interpreter's
    own flush at exit prints no second error after our one line."""
    try:
        sys.stdout.flush()
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _looks_like_repo(arg: str) -> bool:
    return "://" in arg or arg.endswith(".git") or (Path(arg) / ".git").exists() or Path(arg, "HEAD").is_file()


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(ns, "verbose", False) else logging.WARNING,
                        format="dda: %(levelname)s: %(message)s")
    try:
        if ns.command == "demo":
            from .demo import run_demo

            return run_demo(Path(ns.workdir) if ns.workdir else None)
        if ns.command == "mount":
            return cmd_mount(ns)
        if ns.command == "sidecar":
            from .sidecar_cmd import run as run_sidecar

            return run_sidecar(ns)
        if ns.command == "status":
            return cmd_status(ns)
        if ns.command == "refresh":
            return cmd_refresh(ns)
        if ns.command in ("unmount", "umount"):
            return cmd_unmount(ns)
        if ns.command == "webhook":
            from .webhook.app import run as run_webhook

            return run_webhook(ns)
        if ns.command == "csi":
            from .csi.command import run as run_csi

            return run_csi(ns)
        handler = {"ls": cmd_ls, "sizes": cmd_sizes, "cat": cmd_cat, "get": cmd_get, "upload": cmd_upload}[ns.command]
        code = asyncio.run(handler(ns))
        sys.stdout.flush()    # a write error (a full disk) is reported here, not at interpreter exit
        return code
    except DDAError as err:
        info = describe(err)
        _say_error(info.message)
        return info.exit_code
    except BrokenPipeError:
        # `dda cat ... | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        # `dda ls > file-on-a-full-disk` (ENOSPC, EIO, EDQUOT) or a local file that cannot be
        # written: one line, as `ls` says 'write error: No space left on device'.
        _drop_unwritable_stdout()
        if err.filename is None and err.errno in _WRITE_ERRNOS:
            _say_error(f"write error: {err.strerror}")
        else:
            _say_error(describe(err).message)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
