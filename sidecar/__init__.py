"""DDA sidecar: stream any file of any revision of a git + DVC repository."""

__all__ = ["install_hooks", "uninstall_hooks", "upload"]


def __getattr__(name: str):  # PEP 562: `from sidecar import install_hooks` imports sidecar.hooks only then
    if name in ("install_hooks", "uninstall_hooks"):
        from . import hooks

        return getattr(hooks, name)
    if name == "upload":
        from .uploader import upload   # the module has another name: `sidecar.upload` stays the function

        return upload
    raise AttributeError(f"module 'sidecar' has no attribute {name!r}")
