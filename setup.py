"""Build hook: the wheel carries the Alembic migrations, maintained in the repository's
top-level ``migrations/``, as ``pie/_migrations`` (``pie.migrate`` finds them there when the
package is installed from a wheel; an editable install uses the checkout's copy)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithMigrations(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "pie" / "_migrations"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(HERE / "migrations", target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithMigrations})
