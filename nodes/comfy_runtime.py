"""ComfyUI's runtime services for node adapters, imported lazily (None / no-ops outside ComfyUI).

Everything here is shared by more than one node file: ComfyUI's progress bar (with its Cancel
button), and moving a Qwen3-VL bundle on and off the GPU in cooperation with ComfyUI's own memory
manager (LoadQwen3VL loads, ExtractIdentityFeatures and ScoreIdentity use it). `comfy.*` is imported
inside the functions so the node classes import and run without ComfyUI.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..core.identity.qwen3vl import check_weight_files


def model_management():
    """`comfy.model_management`, or None outside ComfyUI."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return None
    return mm


def comfy_progress(total: int):
    """A progress(done, total) callback driving ComfyUI's progress bar and honouring its Cancel button."""
    mm = model_management()
    if mm is None:
        return None
    import comfy.utils  # type: ignore[import-not-found]

    bar = comfy.utils.ProgressBar(total)

    def progress(done: int, total_: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total_)

    return progress


# --- a Qwen3-VL bundle on the GPU only while it is used (keep_loaded=False) ------------------------
def weights_bytes(folder: Path | None, dtype: torch.dtype) -> int:
    """Rough device memory for the weights: file bytes scaled from bf16 storage to `dtype`, +20 %."""
    if folder is None:
        return 0
    try:
        size = sum(f.stat().st_size for f in check_weight_files(folder))
    except Exception:
        return 0
    return int(size * torch.tensor([], dtype=dtype).element_size() / 2 * 1.2)


def make_room(bytes_needed: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until `bytes_needed` are free on `device` (no-op without it)."""
    mm = model_management()
    if mm is not None and device.type != "cpu" and bytes_needed > 0:
        mm.free_memory(bytes_needed, device)


def release(bundle) -> None:
    """keep_loaded=False: move the model off the GPU and give the cache back to ComfyUI."""
    if getattr(bundle, "keep_loaded", True) or bundle.device.type == "cpu":
        return
    bundle.model.to("cpu")
    mm = model_management()
    if mm is not None:
        mm.soft_empty_cache()
    elif bundle.device.type == "cuda":
        torch.cuda.empty_cache()


def ensure_on_device(bundle) -> None:
    """Move a bundle that `release` parked on the CPU back to its device, after making room for it."""
    current = next(bundle.model.parameters()).device
    if current.type != bundle.device.type:
        make_room(weights_bytes(bundle.path, bundle.dtype), bundle.device)
        bundle.model.to(bundle.device)


@contextlib.contextmanager
def on_device(bundle):
    """`ensure_on_device` for the duration of a with-block, then `release`."""
    ensure_on_device(bundle)
    try:
        yield bundle
    finally:
        release(bundle)
