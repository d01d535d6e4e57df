"""ExtractIdentityFeatures' results, kept per (photos, model, settings) so a re-queue never reruns Qwen3-VL.

ComfyUI reruns a node whenever its cached output is gone: another workflow ran in between, the loader
above it ran again (a new QWEN3VL object for the same model), or the server runs without an output
cache. The features depend only on the photos' pixels, the model's files, the precision, device,
attention and the extraction settings, so those are the key: the pixels by sha256, the model as the
offline caches key it (folder name, config hash, weight file names and sizes; a single file by path,
size and time). A few recent results (small: N x D features and the preview) are kept in memory.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..core.files.dataset_fingerprint import cache_key
from ..core.pipeline.cache_keys import dtype_key, model_key

_log = logging.getLogger(__name__)


def pixels_sha256(images: torch.Tensor) -> str:
    t = images.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def bundle_key(bundle) -> dict[str, Any]:
    """The model part of the key: its files, precision, device type and attention implementation."""
    path = getattr(bundle, "path", None)
    if path is not None and Path(path).is_file():
        st = Path(path).stat()
        files: dict[str, Any] = {"file": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    elif path is not None:
        files = model_key(str(path))
    else:
        files = {"source": bundle.model_id}
    config = getattr(getattr(bundle, "model", None), "config", None)
    return {"model": files, "model_id": bundle.model_id, "dtype": dtype_key(bundle.dtype),
            "device": torch.device(bundle.device).type, "attention": getattr(config, "_attn_implementation", None)}


class FeatureCache:
    """A small LRU of extraction results keyed by `key(bundle, images, **settings)`."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self.hits = 0

    def key(self, bundle, images, **settings) -> str | None:
        if not isinstance(images, torch.Tensor):
            return None   # not an IMAGE tensor: extraction reports the problem
        return cache_key("identity_features", bundle_key(bundle), pixels_sha256(images), settings)

    def get(self, key: str | None):
        if key is None or key not in self._entries:
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        _log.info("ExtractIdentityFeatures: same photos, model and settings as an earlier run; reusing its "
                  "features (Qwen3-VL not run)")
        return self._entries[key]

    def put(self, key: str | None, value):
        if key is not None:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


FEATURE_CACHE = FeatureCache()
