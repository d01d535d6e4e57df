"""Speed and true CFG for ComfyUI's own Qwen-Image MODEL, applied only through ComfyUI's hooks.

`accelerate(model, ...)` returns a CLONE of the ModelPatcher carrying one `apply_model` wrapper
(`comfy.patcher_extension.WrappersMP.APPLY_MODEL`, the hook ComfyUI's own TorchCompileModel uses). While a
sampler runs the model, the wrapper puts a `torch.compile`d version of each transformer block in the
block's place and restores the originals afterwards: a regional compile (one block's code, compiled once
and reused by all 60 blocks), never the whole model, and no ComfyUI module or class is modified.
Because ComfyUI's KSampler, SamplerCustom and every other sampler call `apply_model`, they all gain.

What keeps working, and why:
- LoRA and other weight patches, applied before or after: ComfyUI patches the blocks' weights in place or
  swaps their Parameters; compiled code reads parameters as inputs (PyTorch inlines nn.Module parameters),
  so a patched weight is used without a recompile.
- fp8 weight dtypes (UNETLoader's fp8_e4m3fn / fp8_e5m2): ComfyUI's cast-on-use layers are traced into
  the compiled block like any other operation.
- Partial loading (low VRAM): when ComfyUI left part of the weights off the compute device
  (`model_lowvram`, or a block parameter on another device), the call runs eager and says so in one log
  line; compiling the streaming code would gain nothing and recompile for every weight move.
- Resolution / batch changes: `dynamic="auto"` lets PyTorch recompile once with dynamic sizes after the
  first size change, so recompiles stay bounded (no recompile-limit failures); "static" recompiles per
  size, "dynamic" compiles size-generic code from the start.
- Interrupt and progress: untouched (they live in the sampler, between model calls).
- InjectResidual's identity conditioning: new text embeddings of the same shape reuse the compiled code.
- CUDA graphs: only through `mode="reduce-overhead"` (PyTorch's CUDA-graph trees) and only when every
  weight is on a CUDA device; anywhere else that mode falls back to the default one.

ComfyUI's Qwen-Image already applies RoPE in real arithmetic (a rotation-matrix product), so the
diffusers-path trick is not needed here. The per-step timestep modulation (`img_mod`/`txt_mod`) is left
inside the compiled block: precomputing it would need a step index inside the block, which ComfyUI's
hooks do not provide without replacing the block's forward (it is ~2 % of a 28-step image).

`set_true_cfg(model)` (also a clone) installs the seed's true CFG through ComfyUI's sampler CFG hook
(`model_options["sampler_cfg_function"]`, via `ModelPatcher.set_model_sampler_cfg_function`): the
combined prediction rescaled to the conditional one's per-token norm (`core/generation/true_cfg.py`).

ComfyUI modules are imported inside the functions; this module imports without ComfyUI.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

import torch

from ..core.errors import ModelMismatchError, UserInputError
from ..core.generation.true_cfg import true_cfg_spatial

WRAPPER_KEY = "qwen_identity.accelerate"
INFO_KEY = "qwen_identity_acceleration"          # model_options entry: the AccelerationState
BACKENDS = ("inductor", "aot_eager", "eager")
MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
DYNAMIC = {"auto": None, "static": False, "dynamic": True}
log = logging.getLogger("qwen_identity")


@dataclass
class AccelerationState:
    """What one accelerated MODEL has done (read by the bench and the tests)."""

    backend: object
    mode: str
    dynamic: str
    calls: int = 0                 # accelerated apply_model calls
    eager_calls: int = 0           # calls that fell back to eager (partial loading)
    first_call_s: float | None = None   # the first accelerated call, compile included
    fallback_reason: str | None = None
    _compiled: "weakref.WeakKeyDictionary" = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _logged: bool = field(default=False, repr=False)

    def compile_kwargs(self, all_cuda: bool) -> dict:
        mode = self.mode
        if mode == "reduce-overhead" and not all_cuda:   # CUDA graphs only where every weight is on a GPU
            mode = "default"
        kw = dict(backend=self.backend, dynamic=DYNAMIC[self.dynamic], fullgraph=False)
        if mode != "default" and self.backend == "inductor":
            kw["mode"] = mode
        return kw

    def compiled(self, block: torch.nn.Module, all_cuda: bool) -> torch.nn.Module:
        """The compiled stand-in of `block` (made once per block and configuration)."""
        kw = self.compile_kwargs(all_cuda)
        key = repr(sorted((k, str(v)) for k, v in kw.items()))
        per_block = self._compiled.setdefault(block, {})
        if key not in per_block:
            per_block[key] = torch.compile(block, **kw)
        return per_block[key]

    def eager(self, reason: str) -> None:
        self.eager_calls += 1
        if not self._logged or reason != self.fallback_reason:
            log.warning("QwenImageAccelerate: %s; this model call runs eager (uncompiled).", reason)
            self._logged = True
        self.fallback_reason = reason


def _blocks(diffusion_model):
    blocks = getattr(diffusion_model, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks) or not hasattr(diffusion_model, "txt_norm"):
        return None
    return blocks


def _partly_loaded(base_model, blocks, device: torch.device) -> str | None:
    """Why the weights are not all on the compute device (None when they are)."""
    if getattr(base_model, "model_lowvram", False):
        return "ComfyUI loaded the model only partly (low VRAM: weights stream in per layer)"
    for p in blocks.parameters():
        if p.device != device:
            return f"some weights are on {p.device}, the computation on {device}"
    return None


def _wrapper(state: AccelerationState):
    """The APPLY_MODEL wrapper: compiled blocks in place for the duration of one model call."""

    def apply_model_wrapper(executor, *args, **kwargs):
        base_model = executor.class_obj
        diffusion = getattr(base_model, "diffusion_model", None)
        blocks = _blocks(diffusion) if diffusion is not None else None
        x = args[0] if args else kwargs.get("x")
        if blocks is None or not torch.is_tensor(x):
            state.eager("the model is not ComfyUI's Qwen-Image transformer")
            return executor(*args, **kwargs)
        reason = _partly_loaded(base_model, blocks, x.device)
        if reason:
            state.eager(reason)
            return executor(*args, **kwargs)
        all_cuda = x.device.type == "cuda"
        originals = list(blocks)
        first = state.calls == 0
        t = time.perf_counter()
        try:
            for i, block in enumerate(originals):
                blocks[i] = state.compiled(block, all_cuda)
            out = executor(*args, **kwargs)
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
        state.calls += 1
        if first:
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            state.first_call_s = time.perf_counter() - t
        return out

    return apply_model_wrapper


def accelerate(model, backend: str = "inductor", mode: str = "default", dynamic: str = "auto"):
    """A clone of the Qwen-Image MODEL whose transformer blocks run compiled (see the module docstring).

    `backend` may also be a torch.compile backend callable (the tests count compilations with one)."""
    import comfy.patcher_extension as pe

    if isinstance(backend, str) and backend not in BACKENDS:
        raise UserInputError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}.")
    if mode not in MODES:
        raise UserInputError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}.")
    if dynamic not in DYNAMIC:
        raise UserInputError(f"unknown dynamic {dynamic!r}: use one of {', '.join(DYNAMIC)}.")
    try:
        diffusion = model.get_model_object("diffusion_model")
    except Exception:  # noqa: BLE001 - not a ModelPatcher
        diffusion = None
    if diffusion is None or _blocks(diffusion) is None:
        raise ModelMismatchError("QwenImageAccelerate needs ComfyUI's Qwen-Image MODEL (UNETLoader with a "
                                 "Qwen-Image file, optionally through LoRA loaders); this MODEL has no Qwen-Image "
                                 "transformer blocks.")
    m = model.clone()
    state = AccelerationState(backend=backend, mode=mode, dynamic=dynamic)
    m.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _wrapper(state))
    m.model_options[INFO_KEY] = state
    return m


def acceleration_state(model) -> AccelerationState | None:
    """The AccelerationState of an accelerated MODEL (None when it is not accelerated)."""
    return getattr(model, "model_options", {}).get(INFO_KEY)


# ------------------------------------------------------------------------------------------ true CFG
def true_cfg_function(args: dict) -> torch.Tensor:
    """ComfyUI `sampler_cfg_function`: args["cond"]/["uncond"] are x - denoised (σ·velocity for Qwen-Image's
    flow model); the result is in the same space. The norm rescale does not depend on σ."""
    cond, uncond = args["cond"], args["uncond"]
    return true_cfg_spatial(cond, uncond, float(args["cond_scale"]))


def set_true_cfg(model):
    """A clone of `model` whose CFG is the seed's true CFG (the combined prediction rescaled to the
    conditional one's per-token norm). At cfg 1 ComfyUI skips the negative and no CFG runs, as before."""
    m = model.clone()
    m.set_model_sampler_cfg_function(true_cfg_function)
    return m
