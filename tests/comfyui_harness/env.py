"""Where the ComfyUI checkout is, and how to import `comfy.*` in this process (CPU only)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional

SETUP_HINT = ("`./run test` runs these tests when the vendored ComfyUI tarball is beside the checkout "
              "(../shared/vendor/ComfyUI-*.tar.xz, or QWEN_IDENTITY_COMFYUI_TARBALL); with your own checkout: "
              "`scripts/setup_comfyui.sh /path/to/ComfyUI /path/to/venv` then "
              "`COMFYUI_DIR=/path/to/ComfyUI /path/to/venv/bin/python -m pytest -m comfyui` (docs/testing.md)")
# Set by ./run test's ComfyUI session (scripts/run_tests.sh): a test that would skip for want of ComfyUI fails.
REQUIRE_ENV = "QWEN_IDENTITY_REQUIRE_COMFYUI"
# The test being set up (tests/conftest.py sets it), so require_comfyui can check the test is marked.
CURRENT_TEST = None


def comfyui_dir() -> Optional[Path]:
    """The ComfyUI checkout named by COMFYUI_DIR, or None when unset."""
    value = os.environ.get("COMFYUI_DIR")
    return Path(value).resolve() if value else None


def skip_reason() -> Optional[str]:
    """Why tests needing a real ComfyUI cannot run here (None when they can)."""
    d = comfyui_dir()
    if d is None:
        return f"COMFYUI_DIR is not set (needs a ComfyUI checkout); {SETUP_HINT}"
    if not (d / "main.py").is_file() or not (d / "comfy").is_dir():
        return f"COMFYUI_DIR={d} is not a ComfyUI checkout (no main.py / comfy/)"
    return None


def missing_comfy_deps() -> Optional[str]:
    """A message when this interpreter lacks ComfyUI's requirements (None when they import)."""
    import importlib.util

    missing = [m for m in ("torchsde", "einops", "aiohttp", "scipy", "psutil", "safetensors")
               if importlib.util.find_spec(m) is None]
    if missing:
        return (f"this Python ({sys.executable}) lacks ComfyUI's requirements {missing}; run the suite with "
                f"the venv made by scripts/setup_comfyui.sh")
    return None


def import_comfy_in_process():
    """Put COMFYUI_DIR on sys.path and force CPU before `comfy.model_management` is imported."""
    d = comfyui_dir()
    if d is None:
        raise RuntimeError("COMFYUI_DIR is not set")
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    from comfy.cli_args import args

    args.cpu = True  # else comfy.model_management looks for an NVIDIA driver at import
    import comfy.model_management  # noqa: F401

    return d


def chromium_path() -> Optional[str]:
    """The system Chromium (Debian: /usr/bin/chromium); Playwright's own browsers are never installed."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name:
            found = shutil.which(name) or (name if os.path.isfile(name) else None)
            if found:
                return found
    return None


def require_comfyui():
    """In a test/fixture: skip (printing why) without COMFYUI_DIR; fail when this Python lacks ComfyUI's
    requirements (the suite was asked to run but cannot), when QWEN_IDENTITY_REQUIRE_COMFYUI is set (CI
    must run every real-ComfyUI test), or when the test is not marked `comfyui` (then `./run test` would
    leave it out of the session that has ComfyUI). tests/conftest.py marks every test that calls this
    function in its body or in one of its fixtures; a call hidden in a helper needs
    `@pytest.mark.comfyui` on the test."""
    import pytest

    item = CURRENT_TEST
    if item is not None and item.get_closest_marker("comfyui") is None:
        pytest.fail(f"{item.nodeid} needs a real ComfyUI but is not marked: add @pytest.mark.comfyui so "
                    f"`./run test` runs it in the ComfyUI session")
    reason = skip_reason()
    if reason:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but this test cannot run: {reason}")
        print(f"SKIP (needs a real ComfyUI): {reason}")
        pytest.skip(reason)
    missing = missing_comfy_deps()
    if missing:
        pytest.fail(missing)
