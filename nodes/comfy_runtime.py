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


# --- a Qwen3-VL bundle under ComfyUI's model management ----------------------------------------------
# Inside ComfyUI the transformers model is wrapped in ComfyUI's own ModelPatcher (`host_handle`), and
# ComfyUI moves it: `load_models_gpu` before extraction (which first frees what the other loaded models
# must give up), its loaded-models list afterwards, so "Unload models", `free_memory` before sampling
# (the memory estimate) and --lowvram/--novram see and evict it like a checkpoint of its own. Where no
# ModelPatcher is importable (a ComfyUI stand-in in tests, or none), the older direct moves below apply.

class HostedQwen3VL(torch.nn.Module):
    """The transformers model as ModelPatcher expects one: a settable `device` attribute and `get_dtype()`
    (a transformers model's `device` is a read-only property). Holds the same parameters, not a copy."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        self._dtype = dtype

    def get_dtype(self) -> torch.dtype:
        return self._dtype


def comfy_devices(requested: str):
    """(run device, RAM device) for LoadQwen3VL's `device` input inside ComfyUI.

    auto = where ComfyUI runs its own text encoders (`text_encoder_device()`: the GPU, or the CPU with
    --lowvram/--novram/--cpu), parked in `text_encoder_offload_device()` (RAM) when not in use."""
    from ..core.runtime.devices import resolve_device

    mm = model_management()
    if requested == "auto":
        pick = getattr(mm, "text_encoder_device", None) or mm.get_torch_device
        run = resolve_device(pick())
    else:
        run = resolve_device(requested)
    offload = getattr(mm, "text_encoder_offload_device", lambda: torch.device("cpu"))()
    return run, (run if run.type == "cpu" else resolve_device(offload))


def hand_to_comfyui(bundle) -> bool:
    """Wrap the bundle's model (now in RAM) in a ModelPatcher so ComfyUI loads and offloads it; False without one."""
    mm = model_management()
    try:
        import comfy.model_patcher  # type: ignore[import-not-found]
    except ImportError:
        return False
    if mm is None:
        return False
    hosted = HostedQwen3VL(bundle.model, bundle.dtype)
    ram = next(bundle.model.parameters()).device
    bundle.host_handle = comfy.model_patcher.ModelPatcher(hosted, load_device=bundle.device, offload_device=ram,
                                                          size=mm.module_size(hosted))
    return True


def _on(device: torch.device, target: torch.device) -> bool:
    return device.type == target.type and (device.index or 0) == (target.index or 0)


def _loaded_entry(mm, patcher):
    for i, entry in enumerate(mm.current_loaded_models):
        if entry.model is patcher:
            return i, entry
    return None, None


def unload_from_comfyui(bundle) -> bool:
    """Take the bundle's model out of ComfyUI's loaded models (back to RAM); False if it was not loaded."""
    mm = model_management()
    patcher = getattr(bundle, "host_handle", None)
    if mm is None or patcher is None:
        return False
    i, entry = _loaded_entry(mm, patcher)
    if entry is None:
        return False
    entry.model_unload()
    mm.current_loaded_models.pop(i)
    mm.soft_empty_cache()
    return True


def is_loaded_by_comfyui(bundle) -> bool:
    mm = model_management()
    patcher = getattr(bundle, "host_handle", None)
    return mm is not None and patcher is not None and _loaded_entry(mm, patcher)[1] is not None


# --- without a ModelPatcher: a bundle on the GPU only while it is used (keep_loaded=False) ------------
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
    """After use. Under ComfyUI's management: keep_loaded leaves it among ComfyUI's loaded models (ComfyUI
    evicts it when another model needs the memory), else it is unloaded now. Otherwise keep_loaded=False
    moves the model off the GPU and gives the cache back."""
    if getattr(bundle, "host_handle", None) is not None:
        if not getattr(bundle, "keep_loaded", True):
            unload_from_comfyui(bundle)
        return
    if getattr(bundle, "keep_loaded", True) or bundle.device.type == "cpu":
        return
    bundle.model.to("cpu")
    mm = model_management()
    if mm is not None:
        mm.soft_empty_cache()
    elif bundle.device.type == "cuda":
        torch.cuda.empty_cache()


def ensure_on_device(bundle) -> None:
    """Put the model on its device for use: through ComfyUI's `load_models_gpu` when it manages the model
    (whole: the transformers layers cannot run partly offloaded), else by moving a bundle that `release`
    parked on the CPU back, after making room for it."""
    patcher = getattr(bundle, "host_handle", None)
    mm = model_management()
    if patcher is not None and mm is not None:
        mm.load_models_gpu([patcher], force_full_load=True)
        if not all(_on(p.device, bundle.device) for p in bundle.model.parameters()):
            # --novram keeps every weight off the GPU even for a full load; a GPU chosen on the node wins
            patcher.patch_model(device_to=bundle.device, lowvram_model_memory=0)
        return
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
