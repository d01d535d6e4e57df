"""The pack's model folders and the lookups over them, without ComfyUI.

| key              | folder under ComfyUI/models | holds                                        |
|------------------|-----------------------------|----------------------------------------------|
| `qwen3_vl`       | `qwen3_vl/` (also `LLM/`)   | Qwen3-VL checkpoint folders (config.json...) |
| `identity_heads` | `identity_heads/`           | residual heads (`*.safetensors`)             |
| `diffusers`      | `diffusers/` (ComfyUI's own)| diffusers Qwen-Image pipeline folders        |

Outside ComfyUI (CLI, training, tests) the folders are `QWEN_IDENTITY_MODELS_DIR/<folder>`. Inside
ComfyUI the node layer (`nodes/model_folders.py`) registers the folders with ComfyUI's `folder_paths`
and installs it here as the `FolderLookup`, so the same functions answer from ComfyUI's registry
(extra_model_paths.yaml included). Core code never imports ComfyUI itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from ..errors import UserInputError
from ..files.safe_paths import resolve_inside
from .security import check_free_path

FOLDERS = {
    "qwen3_vl": ("qwen3_vl", "LLM"),
    "identity_heads": ("identity_heads",),
    "diffusers": ("diffusers",),
}
HEAD_EXTENSIONS = {".safetensors"}
NO_FOLDER = "(none found: type a path or hub id in model_path)"  # a loader dropdown with nothing in it


class FolderLookup(Protocol):
    """What a host application (ComfyUI) answers for a folder key; `None` means "not registered here"."""

    def folder_paths(self, key: str) -> list[Path] | None: ...

    def file_names(self, key: str) -> list[str] | None: ...


_lookup: FolderLookup | None = None


def set_folder_lookup(lookup: FolderLookup | None) -> None:
    """Install (or, with None, remove) the host's folder registry. Called by the node layer."""
    global _lookup
    _lookup = lookup


def model_dirs(key: str) -> list[Path]:
    """Folders searched for `key` (the host's registered paths, else QWEN_IDENTITY_MODELS_DIR)."""
    if _lookup is not None:
        found = _lookup.folder_paths(key)
        if found is not None:
            return found
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
    """The model a loader should load: the typed `model_path` (any folder or a hub id) when filled in,
    else the dropdown value, which may come from someone else's workflow and so must stay inside the
    models folders of `key`. `placeholder` is the dropdown's "nothing found" entry; `no_choice` the error."""
    typed = (model_path or "").strip()
    check_free_path(typed, "model_path", "a model from the list")
    if typed:
        return typed
    if not model or model == placeholder:
        raise UserInputError(no_choice)
    return str(resolve_inside(model, model_dirs(key), what=what))


def list_model_files(key: str, extensions=HEAD_EXTENSIONS) -> list[str]:
    """Relative file names in the folders of `key` (the host's own listing when available)."""
    if _lookup is not None:
        found = _lookup.file_names(key)
        if found is not None:
            return sorted(found)
    names: set[str] = set()
    for d in model_dirs(key):
        if d.is_dir():
            for p in d.rglob("*"):
                if p.is_file() and p.suffix in extensions:
                    names.add(p.relative_to(d).as_posix())
    return sorted(names)
