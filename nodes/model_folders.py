"""The pack's model folders, registered with ComfyUI's `folder_paths` when it is there.

| key              | folder under ComfyUI/models | holds                                        |
|------------------|-----------------------------|----------------------------------------------|
| `qwen3_vl`       | `qwen3_vl/` (also `LLM/`)   | Qwen3-VL checkpoint folders (config.json...) |
| `identity_heads` | `identity_heads/`           | residual heads (`*.safetensors`)             |
| `diffusers`      | `diffusers/` (ComfyUI's own)| diffusers Qwen-Image pipeline folders        |

Outside ComfyUI (tests, CLI) the same lookups fall back to `QWEN_IDENTITY_MODELS_DIR/<folder>`.
"""

from __future__ import annotations

import os
from pathlib import Path

FOLDERS = {
    "qwen3_vl": ("qwen3_vl", "LLM"),
    "identity_heads": ("identity_heads",),
    "diffusers": ("diffusers",),
}
HEAD_EXTENSIONS = {".safetensors"}
NO_FOLDER = "(none found: type a path or hub id in model_path)"  # a loader dropdown with nothing in it


def folder_paths_module():
    """ComfyUI's `folder_paths`, or None outside ComfyUI."""
    try:
        import folder_paths  # type: ignore[import-not-found]
    except ImportError:
        return None
    return folder_paths


def register_model_folders() -> None:
    """Tell ComfyUI about the pack's folders (idempotent; a no-op outside ComfyUI)."""
    fp = folder_paths_module()
    if fp is None:
        return
    for key, subdirs in FOLDERS.items():
        for sub in subdirs:
            path = os.path.join(fp.models_dir, sub)
            if key == "identity_heads":
                fp.add_model_folder_path(key, path)
                fp.folder_names_and_paths[key] = (fp.folder_names_and_paths[key][0], HEAD_EXTENSIONS)
            elif key not in fp.folder_names_and_paths or path not in fp.folder_names_and_paths[key][0]:
                fp.add_model_folder_path(key, path)


def model_dirs(key: str) -> list[Path]:
    """Folders searched for `key` (ComfyUI's registered paths, else QWEN_IDENTITY_MODELS_DIR)."""
    fp = folder_paths_module()
    if fp is not None:
        try:
            return [Path(p) for p in fp.get_folder_paths(key)]
        except KeyError:
            pass
    root = os.environ.get("QWEN_IDENTITY_MODELS_DIR")
    return [Path(root) / sub for sub in FOLDERS[key]] if root else []


def list_model_folders(key: str) -> list[str]:
    """Names of model folders (sub-folders with config.json or model_index.json) for a dropdown."""
    names: set[str] = set()
    for d in model_dirs(key):
        if d.is_dir():
            for child in d.iterdir():
                if child.is_dir() and ((child / "config.json").is_file() or (child / "model_index.json").is_file()):
                    names.add(child.name)
    return sorted(names)


def chosen_model_source(model: str, model_path: str, key: str, what: str, no_choice: str, placeholder: str) -> str:
    """The model a loader node should load: the typed `model_path` (any folder or a hub id) when filled in,
    else the dropdown value, which may come from someone else's workflow and so must stay inside the
    models folders of `key`. `placeholder` is the dropdown's "nothing found" entry; `no_choice` the error."""
    from ..core.errors import UserInputError
    from ..core.safe_paths import resolve_inside

    typed = (model_path or "").strip()
    if typed:
        return typed
    if not model or model == placeholder:
        raise UserInputError(no_choice)
    return str(resolve_inside(model, model_dirs(key), what=what))


def list_model_files(key: str, extensions=HEAD_EXTENSIONS) -> list[str]:
    """Relative file names in the folders of `key` (ComfyUI's own listing when available)."""
    fp = folder_paths_module()
    if fp is not None:
        try:
            return sorted(fp.get_filename_list(key))
        except KeyError:
            pass
    names: set[str] = set()
    for d in model_dirs(key):
        if d.is_dir():
            for p in d.rglob("*"):
                if p.is_file() and p.suffix in extensions:
                    names.add(p.relative_to(d).as_posix())
    return sorted(names)
