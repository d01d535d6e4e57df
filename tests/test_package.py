"""The folder is a ComfyUI node pack and an installable package with the `qwen-identity` command."""

import ast
import importlib.util
import re
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

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
