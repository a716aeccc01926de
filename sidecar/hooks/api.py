"""The public API: install_hooks(), refresh_hooks(), latest_commit(), uninstall_hooks(),
hooks_installed(), and the configuration an installation is built from."""
from __future__ import annotations

import os
import posixpath
from typing import Any, Iterable

from . import core, forking, patching
from .core import Hooks, HooksInfo, check_exclude
from .runtime import Runtime

# Settings that are credentials: they travel to children in the private file, never in DDA_HOOKS.
_SECRET_SETTINGS = ("git_user", "git_token")
_credentials: forking.CredentialFile | None = None


def _git_out(cwd: str, *args: str) -> str | None:
    import subprocess

    try:
        proc = subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _local_remote_settings(checkout: str) -> dict[str, dict[str, str]]:
    """Credentials a DVC user keeps in .dvc/config.local (`dvc remote modify --local`)."""
    path = os.path.join(checkout, ".dvc", "config.local")
    try:
        with patching.orig.open(path, "rb") as f:
            text = f.read()
    except OSError:
        return {}
    from ..settings import remote_settings_key
    from ..snapshot.dvcfiles import parse_dvc_config

    try:
        parsed = parse_dvc_config(text, path)
    except Exception:  # noqa: BLE001 - a broken config.local must not stop the hooks
        return {}
    return {remote_settings_key(name): dict(spec.settings) for name, spec in parsed.remotes.items()}


def _known_settings() -> set[str]:
    from ..settings import names

    return set(names("engine")) - {"repo", "revision", "remotes"}


def _build(repo: str | None, revision: str | None, root: str | os.PathLike[str] | None, exclude: Any,
           settings: dict[str, Any], remotes: dict[str, dict[str, str]] | None,
           env: Any) -> tuple[str, Any, list[str], dict[str, Any], dict[str, Any]]:
    """(root, Config, exclusions, public payload for DDA_HOOKS, secrets for children)."""
    from ..settings import load_config, remote_settings_key
    from ..errors import ConfigError
    from ..redact import strip_userinfo

    known = _known_settings()
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"install_hooks(): unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    exclude_list = check_exclude(exclude)
    flags = {k: v for k, v in settings.items() if v is not None}
    if revision is not None:
        flags["revision"] = revision
    config = load_config(flags, env)
    if exclude is None and config.hooks_exclude:
        exclude_list = list(config.hooks_exclude)
    cwd = os.getcwd()
    checkout_remotes: dict[str, dict[str, str]] = {}
    repo = repo or config.repo or None
    if root is None and config.hooks_root:
        root = config.hooks_root
    if repo is None:
        top = _git_out(str(root) if root is not None else cwd, "rev-parse", "--show-toplevel")
        if not top:
            raise ConfigError("install_hooks(): not inside a git checkout; pass a repository URL "
                              "(install_hooks('https://host/owner/repo.git')) or set DDA_REPO")
        repo = top                      # the checkout itself: works offline, even unpushed
        if root is None:
            root = top
        if config.revision is None:
            config.revision = _git_out(top, "rev-parse", "HEAD^{commit}")
    if os.path.isdir(os.path.join(str(repo), ".dvc")):
        checkout_remotes = _local_remote_settings(str(repo))   # children re-read it from the checkout
    config.repo = repo
    root_str = posixpath.normpath(os.path.abspath(os.fspath(root if root is not None else cwd)))
    merged: dict[str, dict[str, str]] = {}
    for source in (checkout_remotes, config.remotes, remotes or {}):
        for name, values in source.items():
            merged.setdefault(remote_settings_key(name), {}).update({k: str(v) for k, v in values.items()})
    config.remotes = merged
    public_repo, url_user, url_password = strip_userinfo(str(repo))
    secrets: dict[str, Any] = {}
    if url_user or url_password:
        secrets["repo"] = str(repo)
    if remotes:
        secrets["remotes"] = remotes
    plain = {k: str(v) for k, v in flags.items() if k != "revision"}
    hidden = {k: plain.pop(k) for k in _SECRET_SETTINGS if k in plain}
    if hidden:
        secrets["settings"] = hidden
    payload = {"repo": public_repo, "revision": config.revision, "root": root_str, "exclude": exclude_list,
               "settings": plain}
    return root_str, config, exclude_list, payload, secrets


def _install(repo: str | None, revision: str | None, root: Any, exclude: Any, remotes: Any, lazy: bool,
             settings: dict[str, Any], inherited_credentials: str | None = None) -> HooksInfo:
    global _credentials
    root_str, config, exclude_list, payload, secrets = _build(repo, revision, root, exclude, settings, remotes,
                                                              os.environ)
    hooks = Hooks(root=root_str, config=config, exclude=exclude_list, env_payload=payload)
    with forking.install_lock:
        if core.current is not None:
            uninstall_hooks()
        if not lazy:
            hooks.runtime = Runtime(config)        # fail here, loudly, not on the first read
            info = hooks.runtime.engine.info
            if info is not None:
                config.revision = info.commit      # workers see exactly this commit
                payload["revision"] = info.commit
        if inherited_credentials:
            payload["credentials"] = inherited_credentials     # the parent's file, still the parent's
        elif secrets:
            _credentials = forking.CredentialFile(secrets)
            payload["credentials"] = _credentials.path
        patching.apply_patches()
        core.current = hooks
        forking.export(payload)
    return hooks.info()


def install_from_payload(payload: dict[str, Any]) -> HooksInfo:
    """Install what a parent's DDA_HOOKS describes, with the credentials from its file."""
    settings = dict(payload.get("settings") or {})
    creds_path = payload.get("credentials")
    secrets = forking.read_credentials(creds_path) if creds_path else {}
    settings.update(secrets.get("settings") or {})
    return _install(secrets.get("repo") or payload.get("repo"), payload.get("revision"), payload.get("root"),
                    payload.get("exclude") or [], secrets.get("remotes") or None, True, settings,
                    inherited_credentials=creds_path if secrets else None)


def install_hooks(repo: str | None = None, revision: str | None = None,
                  root: str | os.PathLike[str] | None = None, *, exclude: Iterable[str] | None = None,
                  cache_dir: str | os.PathLike[str] | None = None,
                  remotes: dict[str, dict[str, str]] | None = None, lazy: bool = False,
                  **settings: Any) -> HooksInfo:
    """Serve the repository's files under `root` to this process (and its workers).

    repo      git URL or local path; default DDA_REPO, else the current git checkout (then the
              revision defaults to its HEAD commit and `root` to its top directory).
    revision  branch, tag or commit (default DDA_REVISION, else HEAD / the default branch).
    root      the local directory that stands for the repository root (default DDA_HOOKS_ROOT,
              else the checkout's top, else the current directory).
    exclude   list of globs relative to root (gitignore-like) never served from the repository
              (default: DDA_HOOKS_EXCLUDE, comma-separated).
    cache_dir, cache_size, jobs, deadline, ...: as `Config` (default: DDA_* variables).
    remotes   per-remote overrides {"name": {"user": ..., "password": ...}}.
    lazy      do not open the repository now (first use opens it).

    Installing again replaces the previous installation. Worker processes get the same
    hooks (fork: inherited; spawn: DDA_HOOKS and the .pth line); credentials reach them
    through a private 0600 file, never through their environment or argv.
    """
    if cache_dir is not None:
        settings["cache_dir"] = os.fspath(cache_dir)
    return _install(repo, revision, root, exclude, remotes, lazy, settings)


def _active_runtime() -> tuple[Hooks, Runtime]:
    hooks = core.current
    if hooks is None or hooks.in_loop_thread() or hooks.runtime is None:
        raise RuntimeError("install_hooks() first")
    return hooks, hooks.runtime


def latest_commit() -> str | None:
    """The tip of the branch the hooks follow, now; compare with `hooks_installed().commit`."""
    _, rt = _active_runtime()
    return rt.call(rt.fs.latest_commit())


def refresh_hooks() -> tuple[str, str] | None:
    """Serve the branch's new tip (after `dda upload` or a push): (old, new) commit, or None
    if it has not moved. Explicit by design: files never change under a reader by themselves;
    files already open keep reading the content they were opened on (pinned handles). New
    workers start on the new commit."""
    hooks, rt = _active_runtime()
    moved = rt.call(rt.fs.refresh())
    if moved is None:
        return None
    hooks.config.revision = moved.new_commit
    hooks.env_payload["revision"] = moved.new_commit
    forking.export(hooks.env_payload)
    return moved.old_commit, moved.new_commit


def uninstall_hooks() -> None:
    """Restore every patched function (the very same objects), close the engine and remove
    the credentials file children would have read."""
    global _credentials
    with forking.install_lock:
        hooks, core.current = core.current, None
        patching.restore_patches()
        os.environ.pop(forking.ENV_VAR, None)
        if _credentials is not None:
            _credentials.remove()
            _credentials = None
        if hooks is not None and hooks.runtime is not None and hooks.pid == os.getpid():
            hooks.runtime.close()
            hooks.runtime = None


def hooks_installed() -> HooksInfo | None:
    h = core.current
    return h.info() if h is not None else None


def close_at_exit() -> None:
    h = core.current
    if _credentials is not None:
        _credentials.remove()
    if h is not None and h.runtime is not None and h.pid == os.getpid():
        try:
            h.runtime.close(timeout=2.0)
        except Exception:  # noqa: BLE001
            pass
