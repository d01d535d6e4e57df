"""Test kit: the network tripwire, the package under test, and tiny offline models (session-scoped).

- The tripwire is installed before anything else imports; a session in which any code tried to
  reach the network fails at the end even if the library swallowed the error.
- The checkout is imported as `qwen_identity` (through a symlink), so tests always test this
  working tree, as ComfyUI would load it; subprocesses get the same through `cli_env`.
- `tiny_models` builds random-weight Qwen3-VL and Qwen-Image checkpoints once per session, in the
  real on-disk layout; tests load them through the product's own loaders.
"""

from __future__ import annotations

import ast
import atexit
import functools
import inspect
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import netguard_core  # noqa: E402

netguard_core.install()

_PKG_ROOT = Path(tempfile.mkdtemp(prefix="qwen_identity_pkg_"))
atexit.register(shutil.rmtree, _PKG_ROOT, True)
(_PKG_ROOT / "qwen_identity").symlink_to(ROOT, target_is_directory=True)
sys.path.insert(0, str(_PKG_ROOT))

import pytest  # noqa: E402


# ---- tests that need a real ComfyUI -----------------------------------------------------------------
# `./run test` runs them in a second session, in ComfyUI's venv (scripts/run_tests.sh, docs/testing.md).
# They are the tests marked `comfyui`; every test that calls `require_comfyui()` in its body or in one of
# its fixtures is marked here automatically, so a new one is picked up without anyone listing it.

@functools.lru_cache(maxsize=None)
def _calls_require_comfyui(func) -> bool:
    """Whether the code of `func` calls require_comfyui() (a call in its syntax tree; text in docstrings or
    comments does not count)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name == "require_comfyui":
                return True
    return False


def _needs_real_comfyui(item) -> bool:
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        funcs += [d.func for defs in info.name2fixturedefs.values() for d in defs]
    return any(f is not None and _calls_require_comfyui(f) for f in funcs)


@pytest.hookimpl(tryfirst=True)   # before `-m` deselects
def pytest_configure(config):
    config.addinivalue_line(
        "markers", "newest_comfyui_only: a real-ComfyUI test of the pack's own tooling (the bench), which "
                   "./run test runs against the newest vendored ComfyUI only")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("comfyui") is None and _needs_real_comfyui(item):
            item.add_marker(pytest.mark.comfyui)
    out = os.environ.get("QWEN_IDENTITY_COMFYUI_TESTS_OUT")
    if out:   # ./run test's first session names the files its ComfyUI session must run
        files = sorted({item.nodeid.split("::")[0] for item in items if item.get_closest_marker("comfyui")})
        Path(out).write_text("".join(f + "\n" for f in files))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    from comfyui_harness import env as comfy_env

    comfy_env.CURRENT_TEST = item


def pytest_sessionfinish(session, exitstatus):
    if netguard_core.ATTEMPTS:
        sys.stderr.write("\nnetwork access was attempted during the tests:\n  " + "\n  ".join(netguard_core.ATTEMPTS) + "\n")
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _no_features_from_an_earlier_test():
    """ExtractIdentityFeatures keeps results per (photos, model, settings) across runs (a re-queue does not
    run Qwen3-VL again); each test starts without another test's results, so a test that breaks or
    cancels the model sees the model run."""
    cache = sys.modules.get("qwen_identity.nodes.feature_cache")
    if cache is not None:
        cache.FEATURE_CACHE.clear()


@pytest.fixture(scope="session")
def cli_env() -> dict:
    """Environment for subprocesses: the same package, offline, with the tripwire."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "netguard"), str(_PKG_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (torch_threads.one_torch_thread; modules whose module-scoped
    fixtures train use it at module scope)."""
    from torch_threads import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture
def run_cli(capsys):
    """run_cli(argv) -> (exit code, stdout, stderr) of `qwen-identity` run in this process."""
    from qwen_identity.cli import main

    def run(argv: list[str]):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of the tiny Qwen3-VL and Qwen-Image checkpoints (built once per session)."""
    from qwen_identity.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_qwen3vl_dir(tiny_models) -> Path:
    return tiny_models.qwen3vl


@pytest.fixture(scope="session")
def tiny_qwenimage_dir(tiny_models) -> Path:
    return tiny_models.qwen_image


@pytest.fixture(scope="session")
def tiny_qwenimage21_dir(tiny_models) -> Path:
    """A tiny Qwen-Image 2.1 diffusers folder (QwenImage21Pipeline), built beside the other tiny models."""
    from qwen_identity.tiny_models import build_tiny_models

    return build_tiny_models(tiny_models.qwen3vl.parent, family="qwen-image-2.1").qwen_image


@pytest.fixture(scope="session")
def tiny_text_encoder(tiny_qwenimage_dir):
    """(text_encoder, tokenizer) of the tiny Qwen-Image, loaded by the product's loader."""
    from qwen_identity.core.generation.prompt_encoding import load_text_encoder

    return load_text_encoder(tiny_qwenimage_dir)


@pytest.fixture
def make_dataset(tmp_path):
    """make_dataset(identities=3, views=2, **kw) -> list of seed_* folders under tmp_path/data."""
    from qwen_identity.tiny_models.dataset import make_seed_dirs

    def make(identities: int = 3, views: int = 2, **kw):
        return make_seed_dirs(tmp_path / "data", identities=identities, views=views, **kw)

    return make
