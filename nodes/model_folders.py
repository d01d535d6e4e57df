"""Registers the pack's model folders with ComfyUI's `folder_paths` and makes ComfyUI's registry the
folder lookup of the core (`core/runtime/model_folders.py`, which owns the folders and the lookups)."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.runtime.model_folders import FOLDERS, HEAD_EXTENSIONS, set_folder_lookup


def folder_paths_module():
    """ComfyUI's `folder_paths`, or None outside ComfyUI."""
    try:
        import folder_paths  # type: ignore[import-not-found]
    except ImportError:
        return None
    return folder_paths


class ComfyFolderLookup:
    """The core's FolderLookup answered from ComfyUI's `folder_paths` (None for keys it does not know)."""

    def __init__(self, fp):
        self.fp = fp

    def folder_paths(self, key: str) -> list[Path] | None:
        try:
            return [Path(p) for p in self.fp.get_folder_paths(key)]
        except KeyError:
            return None

    def file_names(self, key: str) -> list[str] | None:
        try:
            return list(self.fp.get_filename_list(key))
        except KeyError:
            return None


def register_model_folders() -> None:
    """Tell ComfyUI about the pack's folders and answer the core's lookups from ComfyUI (idempotent;
    a no-op outside ComfyUI)."""
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
    set_folder_lookup(ComfyFolderLookup(fp))
