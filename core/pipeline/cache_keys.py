"""The one key scheme of the offline caches: content + model + settings + dtype.

A feature-cache entry (`OUT/cache/features.safetensors`, `qwen-identity extract --out`) is keyed by
the photos' sha256 (not their path: moving a dataset keeps its cache, editing a photo invalidates it),
the Qwen3-VL model, the feature settings and the dtype the model ran in (bf16 and fp32 features differ,
so a bf16 cache is never reused by an fp32 run). Training targets are keyed the same way by the
text encoder, the prompts, K, the length policy and the dtype.

A model's part of the key: a local folder (a path, or a name in the models folders) is its folder
name, the sha256 of its config.json / model_index.json and the names and sizes of its weight files,
so the same folder reached by path or by name gives the same key; a hub id that is not downloaded is
the id itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..files.dataset_fingerprint import cache_key, file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def _local_folder(source: str, search_dirs: Iterable) -> Path | None:
    p = Path(str(source)).expanduser()
    if p.is_dir():
        return p
    for d in search_dirs:
        for name in (str(source), str(source).rsplit("/", 1)[-1]):
            if (Path(d) / name).is_dir():
                return Path(d) / name
    return None


def model_key(source: str, search_dirs: Iterable = ()) -> dict[str, Any]:
    """A model's identity for cache keys (see the module docstring); never downloads anything."""
    folder = _local_folder(str(source), search_dirs)
    if folder is None:
        return {"source": str(source)}
    key: dict[str, Any] = {"folder": folder.resolve().name}
    for name in ("config.json", "model_index.json"):
        if (folder / name).is_file():
            key["config"] = file_sha256(folder / name)
            break
    key["weights"] = sorted((str(f.relative_to(folder)), f.stat().st_size) for f in folder.rglob("*")
                            if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    return key


def dtype_key(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "")


def feature_key(qwen3_vl_model: str, settings, photo_hashes: Sequence[str], dtype: torch.dtype | str,
                search_dirs: Iterable = ()) -> str:
    """The key of one identity's features: photos' sha256 + Qwen3-VL model + feature settings + dtype."""
    return cache_key("features", model_key(qwen3_vl_model, search_dirs), settings.to_meta(), list(photo_hashes),
                     dtype_key(dtype))


def photo_hashes(photos: Iterable) -> list[str]:
    return [file_sha256(p) for p in photos]


def target_key(qwen_image_model: str, base_prompt: str, prompts: Sequence[str], tokens: int, policy: str,
               dtype: torch.dtype | str, search_dirs: Iterable = ()) -> str:
    """The key of a set of training targets: text encoder + prompts + K + length policy + dtype."""
    return cache_key("targets", model_key(qwen_image_model, search_dirs), base_prompt, list(prompts), int(tokens),
                     policy, dtype_key(dtype))
