"""Import this checkout as the package `qwen_identity` (the way ComfyUI/pip see it), from any directory.

The benchmark lives beside the pack, not inside it: `bench/` is not part of the installed package.
"""

from __future__ import annotations

import atexit
import importlib
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_pack(name: str = "qwen_identity"):
    """Return the pack's top-level module, importing THIS checkout under `name` (first on sys.path)."""
    mod = sys.modules.get(name)
    if mod is not None and Path(mod.__file__).resolve().parent == ROOT:
        return mod
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]  # another copy (e.g. an installed one) must not shadow this checkout
    link_root = Path(tempfile.mkdtemp(prefix="qwen_identity_bench_"))
    atexit.register(shutil.rmtree, link_root, True)   # removed when the process ends
    (link_root / name).symlink_to(ROOT, target_is_directory=True)
    sys.path.insert(0, str(link_root))
    importlib.invalidate_caches()
    return importlib.import_module(name)
