"""Write the core-node snapshot of one ComfyUI release (the /object_info entries of the core nodes the pack's
workflows use), as the offline workflow checks and the live-server test read it.

    COMFYUI_DIR=... python -m comfyui_harness.core_snapshot      (from tests/, in that ComfyUI's venv)

starts that ComfyUI (CPU, no custom nodes, empty models/ and input/, so file-listing combos are empty lists)
and writes comfyui_core_nodes_<version>.json beside comfyui_core_nodes.json (the first release's, which the
workflows are built against), with the same nodes and keys. Run it in that ComfyUI's venv (the frontend
version recorded is the one installed there).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

from .env import comfyui_dir
from .server import start_server
from .workflow_format import CORE_SNAPSHOT, snapshot_path


def comfyui_version(comfy_dir: Path) -> str:
    text = (Path(comfy_dir) / "comfyui_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def main() -> int:
    comfy = comfyui_dir()
    if comfy is None:
        print("set COMFYUI_DIR to the ComfyUI checkout", file=sys.stderr)
        return 2
    version = comfyui_version(comfy)
    import importlib.metadata

    first = {k: v for k, v in json.loads(CORE_SNAPSHOT.read_text()).items() if not k.startswith("_")}
    with tempfile.TemporaryDirectory(prefix="core_snapshot_") as base, start_server(comfy, base_dir=base) as srv:
        info = srv.object_info
    frontend = importlib.metadata.version("comfyui-frontend-package")
    names = list(first)
    missing = [n for n in names if n not in info]
    if missing:
        print(f"ComfyUI {version} has no {missing}", file=sys.stderr)
        return 1
    out = {"_about": f"INPUT/RETURN definitions of the ComfyUI core nodes the pack's workflows use, from "
                     f"/object_info of ComfyUI {version} (frontend {frontend}) started with an empty models/ and "
                     f"input/ folder: file-listing combos are empty lists. Written by "
                     f"tests/comfyui_harness/core_snapshot.py; tests/test_comfyui_integration.py checks it "
                     f"against the live server of that version."}
    # the same keys as the first snapshot (newer releases add display names, search aliases ...)
    out.update({n: {k: info[n][k] for k in first[n] if k in info[n]} for n in names})
    path = snapshot_path(version)
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
