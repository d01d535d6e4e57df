"""Package list for `pip install`: every sub-package of this folder, found, never listed by hand.

The repository root is the package `qwen_identity` (`package-dir` in pyproject.toml), and setuptools'
`packages.find` in pyproject.toml cannot prefix what it finds with that name; so this file does it.
Everything else about the package lives in pyproject.toml.
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# tests/ (and its ComfyUI harness) are not shipped; bench/ is a folder of scripts, not a package.
SUBPACKAGES = find_packages(where=".", exclude=["tests", "tests.*"])


class BuildPy(build_py):
    """The root folder is the package, so this file would ship as `qwen_identity.setup`; leave it out."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "qwen_identity" and m[1] == "setup")]


setup(packages=["qwen_identity", *(f"qwen_identity.{name}" for name in SUBPACKAGES)], cmdclass={"build_py": BuildPy})
