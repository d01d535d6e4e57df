"""Model families: one adapter per image-model family, found from the model itself (never a user flag).

`FAMILIES` lists the adapters (core/families/base.py says what one provides). `detect_family(source)`
reads whatever is at hand: a diffusers folder (model_index.json's pipeline class, else the
transformer's config), a transformer config dict, a state dict (or its keys), a ComfyUI
latent_format class name (or the latent_format object), or a loaded model object (transformer,
VAE, text encoder, pipeline). `family_named` reads a name written into a head's metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ModelMismatchError, UserInputError
from .base import Denoiser, FamilyDefaults, ModelFamily
from .qwen_image_1 import QWEN_IMAGE_1
from .qwen_image_21 import QWEN_IMAGE_21

FAMILIES: tuple[ModelFamily, ...] = (QWEN_IMAGE_1, QWEN_IMAGE_21)
DEFAULT_FAMILY = QWEN_IMAGE_1

__all__ = ["FAMILIES", "DEFAULT_FAMILY", "QWEN_IMAGE_1", "QWEN_IMAGE_21", "Denoiser", "FamilyDefaults", "ModelFamily", "detect_family",
           "family_named", "family_of_width", "family_names", "find_family"]


def family_names() -> list[str]:
    return [f.name for f in FAMILIES]


def family_named(name: str) -> ModelFamily:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise UserInputError(f"unknown model family {name!r}: this pack knows {', '.join(family_names())}. "
                         "Update the pack if the head or model comes from a newer version.")


def family_of_width(hidden_size: int) -> ModelFamily | None:
    """The family whose (real) text width is `hidden_size`, if any (old heads record only H)."""
    return next((f for f in FAMILIES if f.text_width == int(hidden_size)), None)


def _known() -> str:
    return "; ".join(f"{f.title} ({', '.join(f.pipeline_classes + f.transformer_classes)})" for f in FAMILIES)


def _from_folder(folder: Path) -> ModelFamily | None:
    from ..runtime.model_sources import read_config

    if (folder / "model_index.json").is_file():
        index = read_config(folder)
        for f in FAMILIES:
            if f.matches_index(index):
                return f
    for candidate in (folder / "transformer", folder):
        if (candidate / "config.json").is_file():
            found = _from_config(read_config(candidate))
            if found is not None:
                return found
    return None


def _from_config(config: Mapping[str, Any]) -> ModelFamily | None:
    for f in FAMILIES:
        if f.matches_transformer_config(dict(config)) or f.matches_index(dict(config)):
            return f
    return None


def _from_keys(keys) -> ModelFamily | None:
    keys = [str(k) for k in keys]
    for f in FAMILIES:
        if f.matches_state_dict(keys):
            return f
    return None


def _from_latent_format(name: str) -> ModelFamily | None:
    return next((f for f in FAMILIES if name in f.comfy_latent_formats), None)


def find_family(source: Any) -> ModelFamily | None:
    """detect_family, or None when nothing matches (for checks that only apply to a known model)."""
    try:
        return detect_family(source)
    except UserInputError:
        return None


def detect_family(source: Any, what: str = "model") -> ModelFamily:
    """The family of `source` (see the module docstring); a UserInputError naming what was read when
    nothing matches."""
    found: ModelFamily | None = None
    described = type(source).__name__
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        found, described = _from_folder(Path(source)), f"the folder {source}"
    elif isinstance(source, str):
        found, described = _from_latent_format(source), f"ComfyUI latent format {source!r}"
    elif isinstance(source, Mapping):
        values = list(source.values())[:1]
        if values and hasattr(values[0], "shape"):        # a state dict
            found, described = _from_keys(source.keys()), "a state dict"
        else:
            found, described = _from_config(source), f"a config naming {source.get('_class_name')!r}"
    elif isinstance(source, (list, tuple, set, frozenset)) and all(isinstance(k, str) for k in source):
        found, described = _from_keys(source), "a state dict's keys"
    else:
        found = next((f for f in FAMILIES if f.matches_module(source)), None)
        if found is None and type(source).__module__.startswith("comfy"):
            found = _from_latent_format(type(source).__name__)   # a ComfyUI latent_format object
        if found is None:
            config = getattr(source, "config", None)
            if isinstance(config, Mapping):
                found = _from_config(config)
    if found is None:
        raise ModelMismatchError(f"the {what} ({described}) is not a model family this pack knows: {_known()}. "
                                 "Use a Qwen-Image model.")
    return found
