"""ComfyUI node classes: thin adapters over `core/`.

Each node module defines `NODE_CLASS_MAPPINGS` and `NODE_DISPLAY_NAME_MAPPINGS`; this package merges
them. ComfyUI modules (`comfy.*`, `folder_paths`) are imported lazily inside the functions that need
them, so every class imports (and most run) without ComfyUI.
"""

from __future__ import annotations

import importlib

from .model_folders import register_model_folders  # noqa: F401

# One line per node module; a module is listed once it exists.
NODE_MODULES: list[str] = [
    "qwen3vl_nodes",
    "head_nodes",
    "inject_nodes",
    "region_nodes",
    "sampling_nodes",
    "accelerate_nodes",
    "grid_nodes",
    "eval_nodes",
    "tune_nodes",
]

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _name in NODE_MODULES:
    _mod = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))
