"""Build all tiny models into one folder (the fixture kit and `qwen-identity demo` share this)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .qwen3vl import save_tiny_qwen3vl
from .qwenimage import save_tiny_qwenimage
from .qwenimage21 import save_tiny_qwenimage21
from .tokenizer import build_tokenizer

QWEN3VL_DIRNAME = "tiny-qwen3-vl"
QWENIMAGE_DIRNAME = "tiny-qwen-image"
QWENIMAGE21_DIRNAME = "tiny-qwen-image-2.1"
# family name (core/families/) -> (folder name, builder) of its tiny diffusers pipeline
PIPELINES = {"qwen-image": (QWENIMAGE_DIRNAME, save_tiny_qwenimage),
             "qwen-image-2.1": (QWENIMAGE21_DIRNAME, save_tiny_qwenimage21)}
FAMILIES = tuple(PIPELINES)


@dataclass(frozen=True)
class TinyModels:
    qwen3vl: Path      # a Qwen3-VL checkpoint folder (config.json, model.safetensors, processor files)
    qwen_image: Path   # a diffusers Qwen-Image pipeline folder (model_index.json + components) of the family


def build_tiny_models(root: str | os.PathLike, seed: int = 0, family: str = "qwen-image") -> TinyModels:
    """Write (or reuse, when complete) the tiny checkpoints under `root`: Qwen3-VL and the Qwen-Image
    pipeline of `family` ("qwen-image": 1.x, "qwen-image-2.1")."""
    if family not in FAMILIES:
        raise ValueError(f"no tiny models for family {family!r}: use one of {', '.join(FAMILIES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(root)
    vl = root / QWEN3VL_DIRNAME
    dirname, save = PIPELINES[family]
    qi = root / dirname
    tokenizer = None
    if not (vl / "model.safetensors").is_file():
        tokenizer = tokenizer or build_tokenizer()
        save_tiny_qwen3vl(vl, tokenizer, seed=seed)
    if not (qi / "model_index.json").is_file():
        tokenizer = tokenizer or build_tokenizer()
        save(qi, tokenizer, seed=seed)
    return TinyModels(qwen3vl=vl, qwen_image=qi)
