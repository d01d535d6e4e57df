"""The folder is a ComfyUI node pack and an installable package with the `qwen-identity` command."""

import ast
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ["core", "nodes", "training", "cli", "tiny_models"]


def python_files():
    files = [ROOT / "__init__.py", ROOT / "version.py"]
    for d in SOURCE_DIRS:
        files += sorted((ROOT / d).rglob("*.py"))
    return files


def load_as_comfyui_does(name: str):
    """ComfyUI's load_custom_node: spec_from_file_location(<name>, <folder>/__init__.py)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_imports_under_any_folder_name():
    name = f"custom_nodes_pack_{uuid.uuid4().hex[:8]}"
    mod = load_as_comfyui_does(name)
    assert isinstance(mod.NODE_CLASS_MAPPINGS, dict)
    assert isinstance(mod.NODE_DISPLAY_NAME_MAPPINGS, dict)
    assert set(mod.NODE_DISPLAY_NAME_MAPPINGS) <= set(mod.NODE_CLASS_MAPPINGS)
    for cls in mod.NODE_CLASS_MAPPINGS.values():
        assert hasattr(cls, "INPUT_TYPES") and hasattr(cls, "FUNCTION") and hasattr(cls, "RETURN_TYPES")


def test_no_absolute_import_of_comfyui_names_or_own_package():
    """`nodes` belongs to ComfyUI; the pack imports its own modules relatively."""
    banned = {"nodes", "qwen_identity"}
    for f in python_files():
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            assert not banned & set(names), f"{f.relative_to(ROOT)}:{node.lineno} imports {names} absolutely"


def _imports(f: Path):
    """(line, absolute module) of every import in `f`, relative ones resolved against its package."""
    package = list(f.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module or ""
                continue
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            if node.level - 1 > len(package):
                yield node.lineno, "<outside the package>"
                continue
            mod = ".".join(["qwen_identity", *base] + ([node.module] if node.module else []))
            if node.module:
                yield node.lineno, mod
            else:
                for a in node.names:
                    yield node.lineno, f"{mod}.{a.name}"


def test_core_never_imports_comfyui():
    comfy = {"comfy", "folder_paths", "comfy_api", "comfy_extras", "server", "execution", "nodes"}
    for f in sorted((ROOT / "core").rglob("*.py")):
        for line, mod in _imports(f):
            where = f"{f.relative_to(ROOT)}:{line}"
            if mod.startswith("qwen_identity"):
                assert mod.startswith(("qwen_identity.core", "qwen_identity.version")), f"{where} reaches outside core: {mod}"
            else:
                assert mod.split(".")[0] not in comfy, f"{where} imports ComfyUI ({mod})"


def test_offline_side_never_imports_the_node_layer():
    """cli/, training/ and bench/ sit on the core; the ComfyUI adapters in nodes/ are not theirs to use."""
    for top in ("cli", "training", "bench"):
        for f in sorted((ROOT / top).rglob("*.py")):
            for line, mod in _imports(f):
                assert not mod.startswith("qwen_identity.nodes"), f"{f.relative_to(ROOT)}:{line} imports {mod}"
                assert mod.split(".")[0] not in {"comfy", "folder_paths", "nodes"} or top == "bench", (
                    f"{f.relative_to(ROOT)}:{line} imports ComfyUI ({mod})")


def test_pyproject_metadata():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    from qwen_identity.version import __version__

    # one source for the version: version.py, read by setuptools (attr) and by the Comfy registry (a text file)
    assert "version" not in data["project"] and "version" in data["project"]["dynamic"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "qwen_identity.version.__version__"}
    assert data["tool"]["comfy"]["version"]["path"] == "version.py"
    # comfy-cli reads it with a line-anchored regex, without running Python
    found = re.findall(r"^__version__[\t ]*=[\t ]*\"([^\"\\\n]*)\"", (ROOT / "version.py").read_text(), re.M)
    assert found == [__version__]
    from setuptools.config.pyprojecttoml import read_configuration

    expanded = read_configuration(ROOT / "pyproject.toml", expand=True)["project"]
    assert expanded["version"] == __version__
    # PEP 639: an SPDX expression plus the license file it names (setuptools >= 77)
    assert data["project"]["license"] == "Apache-2.0" and data["project"]["license-files"] == ["LICENSE"]
    assert any(r.replace(" ", "") == "setuptools>=77" for r in data["build-system"]["requires"])
    assert not any(c.startswith("License ::") for c in data["project"].get("classifiers", []))
    lic = (ROOT / "LICENSE").read_text()
    assert "Apache License" in lic and "Version 2.0, January 2004" in lic and "END OF TERMS AND CONDITIONS" in lic
    assert data["project"]["scripts"]["qwen-identity"] == "qwen_identity.cli:main"
    deps = " ".join(data["project"]["dependencies"])
    for dep in ("torch", "transformers", "diffusers", "safetensors", "pillow", "numpy", "tqdm"):
        assert re.search(rf"\b{dep}\b", deps), dep
    comfy = data["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(comfy)
    assert "test" in data["project"]["optional-dependencies"]


def test_requirements_txt_matches_pyproject():
    """ComfyUI users install requirements.txt; it must carry the runtime deps (torch is theirs)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    req = {re.split(r"[<>=!~ ;\[]", line)[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")}
    wanted = {re.split(r"[<>=!~ ;\[]", d)[0].lower() for d in data["project"]["dependencies"]} - {"torch", "torchvision"}
    assert wanted <= req, wanted - req


def test_cli_help_and_version(cli_env):
    out = subprocess.run([sys.executable, "-m", "qwen_identity.cli", "--help"], env=cli_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from qwen_identity.cli import SUBCOMMANDS

    for name in SUBCOMMANDS:
        assert name in out.stdout
    out = subprocess.run([sys.executable, "-m", "qwen_identity.cli", "--version"], env=cli_env, capture_output=True,
                         text=True, timeout=120)
    from qwen_identity.version import __version__

    assert out.returncode == 0 and __version__ in out.stdout


def test_cli_unknown_subcommand_exits_2(cli_env):
    out = subprocess.run([sys.executable, "-m", "qwen_identity.cli", "frobnicate"], env=cli_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- the built wheel
# Folders whose every file ships as package data (what ComfyUI and the CLI read at run time).
DATA_DIRS = ["workflows", "web", "example_photos"]
_NOT_SOURCE = {".git", ".venv", ".comfyui", "build", "dist", "tests", "bench", "__pycache__", "outputs", "demo_output"}


def _source_modules() -> list[str]:
    """Every module of the checkout's package tree, found on disk (not from the package list under test)."""
    mods = ["qwen_identity"]
    for init in sorted(ROOT.rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and (rel.parts[0] in _NOT_SOURCE or rel.parts[0].startswith(".")):
            continue
        pkg = ".".join(["qwen_identity", *rel.parts])
        if not all((ROOT.joinpath(*rel.parts[:i + 1]) / "__init__.py").is_file() for i in range(len(rel.parts))):
            continue  # a folder under a non-package folder is not importable as part of qwen_identity
        mods += [pkg] if rel.parts else []
        mods += [f"{pkg}.{f.stem}" for f in sorted(init.parent.glob("*.py")) if f.name not in ("__init__.py", "__main__.py")
                 and f.name != "setup.py"]
    return sorted(set(mods))


def _copy_source(dst: Path) -> Path:
    """The checkout without VCS/venv/build folders, so building writes nothing into the working tree."""
    import shutil

    def ignore(folder, names):
        top = Path(folder) == ROOT
        return [n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and (n in _NOT_SOURCE
                or n.startswith(".")))]

    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)
    return dst


@pytest.mark.slow
def test_built_wheel_installs_imports_every_module_and_runs_the_command(tmp_path, cli_env):
    """`pip install` of the package: the wheel holds every module and data file; it imports and runs outside the checkout."""
    import zipfile

    src = _copy_source(tmp_path / "src")
    wheels = tmp_path / "wheels"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300, env=cli_env)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = wheels.glob("comfyui_qwen_identity-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    for mod in _source_modules():
        parts = mod.split(".")
        assert ("/".join(parts) + ".py" in names or "/".join(parts) + "/__init__.py" in names), f"{mod} is not in the wheel"
    for d in DATA_DIRS:
        for f in sorted((ROOT / d).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                assert f"qwen_identity/{f.relative_to(ROOT).as_posix()}" in names, f"{f.relative_to(ROOT)} is not in the wheel"
    assert not any(n.startswith(("qwen_identity/tests/", "qwen_identity/bench/")) or n == "qwen_identity/setup.py"
                   for n in names), sorted(n for n in names if "tests/" in n or "bench/" in n or "setup.py" in n)

    target = tmp_path / "target"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300, env=cli_env)
    assert out.returncode == 0, out.stdout + out.stderr

    # outside the checkout: only the installed copy (and the tripwire) on the path
    env = dict(cli_env, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "netguard"), str(target)]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import importlib, sys\n"
              f"mods = {_source_modules()!r}\n"
              "for m in mods:\n"
              "    importlib.import_module(m)\n"
              "import qwen_identity\n"
              "print(qwen_identity.__file__)\n"
              "print(len(qwen_identity.NODE_CLASS_MAPPINGS))\n"
              "from qwen_identity.cli.modal_runner import image_packages\n"
              "print(image_packages())\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert Path(lines[0]).resolve() == (target / "qwen_identity" / "__init__.py").resolve(), lines[0]
    assert int(lines[1]) > 0
    # the Modal image's package list comes from the installed metadata (no pyproject.toml beside it)
    assert "diffusers" in lines[2] and "dlib-bin" in lines[2] and "modal" not in lines[2]

    command = target / "bin" / "qwen-identity"
    assert command.is_file(), sorted(p.name for p in (target / "bin").iterdir()) if (target / "bin").is_dir() else "no bin/"
    out = subprocess.run([sys.executable, str(command), "--help"], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    from qwen_identity.cli import SUBCOMMANDS

    for name in SUBCOMMANDS:
        assert name in out.stdout
