"""Import this checkout as the package `qwen_identity` (the way ComfyUI/pip see it), from any directory.

The benchmark lives beside the pack, not inside it: `bench/` is not part of the installed package.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_pack(name: str = "qwen_identity"):
    """Return the pack's top-level module, importing this checkout under `name` if needed."""
    if name in sys.modules:
        return sys.modules[name]
    try:  # an installed copy that IS this checkout (pip -e) is fine; anything else is not ours
        mod = importlib.import_module(name)
        if Path(mod.__file__).resolve().parent == ROOT:
            return mod
        del sys.modules[name]
    except ImportError:
        pass
    link_root = Path(tempfile.mkdtemp(prefix="qwen_identity_bench_"))
    (link_root / name).symlink_to(ROOT, target_is_directory=True)
    sys.path.insert(0, str(link_root))
    return importlib.import_module(name)
