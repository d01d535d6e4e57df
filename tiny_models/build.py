"""Build all tiny models into one folder (the fixture kit and `qwen-identity demo` share this)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .qwen3vl import save_tiny_qwen3vl
from .qwenimage import save_tiny_qwenimage
from .tokenizer import build_tokenizer

QWEN3VL_DIRNAME = "tiny-qwen3-vl"
QWENIMAGE_DIRNAME = "tiny-qwen-image"


@dataclass(frozen=True)
class TinyModels:
    qwen3vl: Path      # a Qwen3-VL checkpoint folder (config.json, model.safetensors, processor files)
    qwen_image: Path   # a diffusers Qwen-Image pipeline folder (model_index.json + components)


def build_tiny_models(root: str | os.PathLike, seed: int = 0) -> TinyModels:
    """Write (or reuse, when complete) the tiny checkpoints under `root`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(root)
    vl, qi = root / QWEN3VL_DIRNAME, root / QWENIMAGE_DIRNAME
    tokenizer = None
    if not (vl / "model.safetensors").is_file():
        tokenizer = tokenizer or build_tokenizer()
        save_tiny_qwen3vl(vl, tokenizer, seed=seed)
    if not (qi / "model_index.json").is_file():
        tokenizer = tokenizer or build_tokenizer()
        save_tiny_qwenimage(qi, tokenizer, seed=seed)
    return TinyModels(qwen3vl=vl, qwen_image=qi)
