"""Security: no code runs from any user file, and names from workflows stay inside their folders.

- A source scan (AST, every .py of the pack) for the ways a file can run code when loaded:
  `torch.load` without `weights_only=True`, pickle/marshal/shelve/dill/joblib loads, `yaml.load`,
  `np.load(allow_pickle=True)`, builtin `eval`/`exec`, `trust_remote_code=True` anywhere or as a default.
- Files that carry a pickle whose unpickling would create a marker file, under every name the pack
  reads (head, feature cache, training state, Qwen3-VL weights, diffusers weights): refused with a clear
  error, the marker never appears.
- `trust_remote_code` is off unless a caller turns it on for one model, and then it warns.
- Every dropdown (combo) input that names a file or folder resolves through `core.safe_paths`:
  hostile names (`..`, absolute paths, NUL, deep `a/../../`) never leave the models folders.
- No node writes files (so none can write outside ComfyUI's output folder).
"""

from __future__ import annotations

import ast
import importlib
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_identity.core.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "__pycache__", "node_modules", ".hypothesis"}


def _pack_sources() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(out)


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


UNSAFE_LOADS = {"pickle.load", "pickle.loads", "cPickle.load", "cPickle.loads", "marshal.load", "marshal.loads",
                "shelve.open", "dill.load", "dill.loads", "joblib.load", "pickle.Unpickler", "Unpickler",
                "pd.read_pickle", "pandas.read_pickle"}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every construct of `source` that can run code from a file (see the module docstring)."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if (isinstance(node.func, ast.Name) and name in ("eval", "exec")) or name in ("builtins.eval", "builtins.exec"):
                problems.append(f"{where}: {name}()")
            elif name.endswith("torch.load"):
                if not _is_true(kw.get("weights_only")):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif name in UNSAFE_LOADS:
                problems.append(f"{where}: {name}()")
            elif name.endswith("yaml.load") and "Loader" not in kw:
                problems.append(f"{where}: yaml.load without a safe Loader")
            elif name.endswith("np.load") or name.endswith("numpy.load"):
                if _is_true(kw.get("allow_pickle")):
                    problems.append(f"{where}: np.load(allow_pickle=True)")
            if _is_true(kw.get("trust_remote_code")):
                problems.append(f"{where}: trust_remote_code=True")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults)
            defaults += list(node.args.kw_defaults)
            for a, d in zip(args, defaults):
                if a.arg == "trust_remote_code" and d is not None and not (isinstance(d, ast.Constant) and d.value is False):
                    problems.append(f"{where}: {node.name}(trust_remote_code=...) defaults to something other than False")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve") for n in names):
                problems.append(f"{where}: imports {', '.join(names)}")
    return problems


def test_source_scan_finds_each_unsafe_construct():
    """The scanner can fail: each construct it must catch is caught, and safe code passes."""
    bad = {
        "import torch\ntorch.load('x')": "torch.load",
        "import torch\ntorch.load('x', weights_only=False)": "torch.load",
        "import pickle\npickle.loads(b'')": "pickle",
        "eval('1')": "eval",
        "import builtins\nbuiltins.eval('1')": "eval",
        "exec('x=1')": "exec",
        "import yaml\nyaml.load(s)": "yaml.load",
        "import numpy as np\nnp.load('x', allow_pickle=True)": "allow_pickle",
        "m.from_pretrained(p, trust_remote_code=True)": "trust_remote_code=True",
        "def f(trust_remote_code=True): pass": "defaults",
        "from marshal import loads": "imports",
    }
    for src, what in bad.items():
        found = unsafe_calls(src)
        assert found and what in " ".join(found), (src, found)
    safe = ("import torch\ntorch.load('x', weights_only=True)\nmodel.eval()\nm.to(d).eval()\nyaml.load(s, Loader=yaml.SafeLoader)\n"
            "def f(trust_remote_code: bool = False): pass\nm.from_pretrained(p, trust_remote_code=flag)\n")
    assert unsafe_calls(safe) == []


def test_no_code_execution_from_files_anywhere_in_the_pack():
    files = _pack_sources()
    assert len(files) > 40 and any(f.parent.name == "core" for f in files)
    # test modules may build hostile pickles on purpose (like this one); everything else is scanned
    problems = [p for f in files if not (f.parent == ROOT / "tests" and f.name.startswith("test_"))
                for p in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------- hostile pickles under our names
class _Payload:
    """Unpickling this creates MARKER: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bytes(marker: Path) -> bytes:
    p = _Payload()
    p.marker = str(marker)
    return pickle.dumps({"proj.weight": p})


def test_pickles_renamed_to_our_file_names_never_run(tmp_path):
    from qwen_identity.core.identity.features import load_feature_cache
    from qwen_identity.core.residual.head import load_head
    from qwen_identity.training.checkpoint import load_train_state

    marker = tmp_path / "PWNED"
    data = _pickle_bytes(marker)
    for name, loader in [("head.safetensors", load_head), ("features.safetensors", load_feature_cache),
                         ("train_state.safetensors", load_train_state), ("head.pt", load_head)]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(UserInputError) as e:
            loader(path)
        assert str(path) in str(e.value) or path.name in str(e.value)
        assert path.read_bytes() == data
    assert not marker.exists()


def test_model_folders_with_pickle_weights_are_refused(tiny_qwen3vl_dir, tiny_qwenimage_dir, tmp_path):
    """Qwen3-VL and diffusers folders whose weights are a pickle (.bin): refused, nothing runs."""
    from qwen_identity.core.identity.qwen3vl import load_qwen3vl
    from qwen_identity.core.generation.sampling import load_qwen_image_pipeline

    marker = tmp_path / "PWNED"
    vl = tmp_path / "vl"
    shutil.copytree(tiny_qwen3vl_dir, vl)
    (vl / "model.safetensors").unlink()
    (vl / "pytorch_model.bin").write_bytes(_pickle_bytes(marker))
    with pytest.raises(UserInputError, match="pickle|safetensors"):
        load_qwen3vl(str(vl), device="cpu")

    qi = tmp_path / "qi"
    shutil.copytree(tiny_qwenimage_dir, qi)
    for sub in ("transformer", "text_encoder"):
        for f in (qi / sub).glob("*.safetensors*"):
            f.unlink()
        name = "diffusion_pytorch_model.bin" if sub == "transformer" else "pytorch_model.bin"
        (qi / sub / name).write_bytes(_pickle_bytes(marker))
    with pytest.raises(UserInputError, match="cannot load the Qwen-Image pipeline.*safetensors"):
        load_qwen_image_pipeline(str(qi), device="cpu")   # refused for having no safetensors, never unpickled
    from qwen_identity.core.generation.prompt_encoding import load_text_encoder
    with pytest.raises(UserInputError, match="text encoder.*safetensors"):
        load_text_encoder(qi)
    assert not marker.exists()


def test_trust_remote_code_is_off_by_default_and_warns_when_turned_on(tiny_qwen3vl_dir):
    import inspect

    from qwen_identity.core.identity.qwen3vl import load_qwen3vl

    assert inspect.signature(load_qwen3vl).parameters["trust_remote_code"].default is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        bundle = load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu")  # no warning by default
    assert bundle.feature_dim > 0
    with pytest.warns(UserWarning, match="trust_remote_code=True for .*code shipped inside"):
        load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu", trust_remote_code=True)


def test_no_cli_flag_or_node_input_turns_remote_code_on():
    from qwen_identity.cli import build_parser
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    helps = build_parser().format_help()
    sub = build_parser()._subparsers._group_actions[0].choices
    assert all("remote" not in p.format_help() for p in sub.values()) and "remote" not in helps
    for name, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        assert not any("remote" in k for k in inputs), name


# --------------------------------------------------------------------- dropdown names stay inside
def _loader_cases():
    """(node class, combo input name, model_dirs key, call(name)) for every pack node with a file/folder combo."""
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    calls = {
        "LoadResidualHead": ("head_name", "identity_heads", lambda n: NODE_CLASS_MAPPINGS["LoadResidualHead"]().load(n, "")),
        "LoadQwen3VL": ("model", "qwen3_vl", lambda n: NODE_CLASS_MAPPINGS["LoadQwen3VL"]().load(n, "", device="cpu")),
        "LoadQwenImageDiffusers": ("model", "diffusers",
                                   lambda n: NODE_CLASS_MAPPINGS["LoadQwenImageDiffusers"]().load(n, "", device="cpu")),
    }
    return calls


def test_every_file_or_folder_dropdown_is_covered(tmp_path, monkeypatch):
    """Every combo input whose choices come from a models-folder listing is one of the cases fuzzed below."""
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    models = tmp_path / "models"
    for sub in ("qwen3_vl", "identity_heads", "diffusers"):
        (models / sub / "zz_sentinel_dir").mkdir(parents=True)
        (models / sub / "zz_sentinel_dir" / "config.json").write_text("{}")
        (models / sub / "zz_sentinel_dir" / "model_index.json").write_text("{}")
        (models / sub / "zz_sentinel.safetensors").write_bytes(b"")
    monkeypatch.setenv("QWEN_IDENTITY_MODELS_DIR", str(models))
    found = set()
    for name, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for key, val in {**spec.get("required", {}), **spec.get("optional", {})}.items():
            if isinstance(val[0], (list, tuple)) and any("zz_sentinel" in str(c) for c in val[0]):
                found.add((name, key))
    cases = _loader_cases()
    assert found == {(n, c[0]) for n, c in cases.items()}


HOSTILE_PARTS = st.sampled_from(["..", ".", "", "a", "zz", "etc", "passwd", "/", "\\", "~", "x.safetensors", "%2e%2e",
                                 "..\\..", "\x00", " ", "...."])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(HOSTILE_PARTS, min_size=1, max_size=6), absolute=st.booleans(),
       which=st.sampled_from(["LoadResidualHead", "LoadQwen3VL", "LoadQwenImageDiffusers"]))
def test_hostile_dropdown_values_never_leave_the_models_folders(tmp_path_factory, monkeypatch, parts, absolute, which):
    root = tmp_path_factory.mktemp("contain")
    models = root / "models"
    for sub in ("qwen3_vl", "identity_heads", "diffusers"):
        (models / sub).mkdir(parents=True)
    outside = root / "secret.safetensors"   # a file next to (outside) the models folder
    outside.write_bytes(b"not a head")
    (root / "etc").mkdir()
    (root / "etc" / "config.json").write_text("{}")
    monkeypatch.setenv("QWEN_IDENTITY_MODELS_DIR", str(models))
    name = "/".join(parts)
    if absolute:
        name = str(root) + "/" + name
    call = _loader_cases()[which][2]
    seen = []
    import qwen_identity.core.files.safe_paths as sp

    real = sp.resolve_inside

    def spy(n, bases, what="file"):
        p = real(n, bases, what)
        seen.append(p)
        return p
    for mod in ("qwen_identity.nodes.head_nodes", "qwen_identity.nodes.qwen3vl_nodes"):  # module-level imports
        if hasattr(importlib.import_module(mod), "resolve_inside"):
            monkeypatch.setattr(f"{mod}.resolve_inside", spy)
    monkeypatch.setattr("qwen_identity.core.files.safe_paths.resolve_inside", spy)  # imports at call time
    with pytest.raises(UserInputError):
        call(name)
    base = Path(os.path.abspath(models))
    for p in seen:   # whatever was resolved lies inside the models folder
        assert base in Path(os.path.abspath(p)).parents


# The only files nodes write, each where a ComfyUI user expects it and each tested for its own guard:
# TrainIdentityHead's save_name (a bare name into models/identity_heads/, a path refused: tests/test_tune_nodes.py)
# and the example photos copied into ComfyUI's input folder when the pack loads (never overwriting a file:
# tests/test_example_photos.py).
ALLOWED_NODE_WRITERS = {("tune_nodes.py", "save_head"), ("example_photos.py", "target.mkdir"),
                        ("example_photos.py", "atomic_write_bytes")}


def test_no_node_writes_files():
    """Nodes return IMAGE/STRING; apart from the writers above, none writes to disk, so none can write
    outside ComfyUI's folders."""
    nodes_dir = ROOT / "nodes"
    writers = []
    for f in nodes_dir.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), None)
                mode = next((k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)), mode)
                if ((name.split(".")[-1] in ("save", "write_bytes", "write_text", "atomic_write", "atomic_write_json",
                                             "atomic_write_bytes", "save_file", "save_head", "save_feature_cache",
                                             "mkdir", "makedirs")
                        or (name == "open" and mode and any(c in str(mode) for c in "wax+")))
                        and (f.name, name) not in ALLOWED_NODE_WRITERS):
                    writers.append(f"{f.name}:{node.lineno}: {name}")
    assert not writers, ("a node writes files; it must write only inside folder_paths.get_output_directory() "
                         "via core.safe_paths.resolve_inside:\n" + "\n".join(writers))
