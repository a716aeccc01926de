"""Only here to ship the .pth file that re-installs install_hooks() in spawn/forkserver
worker processes (a .pth must sit at the top of site-packages, which pyproject metadata
alone cannot express). Everything else lives in pyproject.toml."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        pth = Path(__file__).parent / "sidecar" / "dda_sidecar_hooks.pth"
        self.copy_file(str(pth), str(Path(self.build_lib) / pth.name))


setup(cmdclass={"build_py": BuildPyWithPth})
