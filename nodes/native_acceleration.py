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
  so a patched weight is used without a recompile. The accelerator's state is shared by every clone of the
  accelerated MODEL (ComfyUI's clone deep-copies model_options; the state's deep copy is itself), so a LoRA
  loader after QwenImageAccelerate never copies the compiled blocks and their weights.
- fp8 weight dtypes (UNETLoader's fp8_e4m3fn / fp8_e5m2): ComfyUI's cast-on-use layers are traced into
  the compiled block like any other operation.
- Where compiling cannot pay, the call runs eager and says so in one log line per reason: ComfyUI loaded
  the weights only partly (`model_lowvram`, --lowvram/--novram, a card too small), a block parameter sits on
  another device, LoRA patches are applied on the fly (weight functions), or the blocks store their weights
  differently (some cast on use, as partial loading leaves them).
- Never a recompile per step: the compiled code depends on the blocks' weight layout (which layers cast on
  use, the stored dtypes) and the input shapes. Each layout is compiled at most once (at most MAX_LAYOUTS of
  them), and dynamo's own compile counter is read around every call: a compile on inputs and a layout that
  were compiled before means something the compiled code guards on changes between steps; after
  MAX_UNEXPECTED_RECOMPILES of those the MODEL runs eager until it is loaded again (one log line) instead
  of recompiling up to dynamo's limit and then running slower than eager.
- One set of compiled blocks per loaded transformer and settings: running QwenImageAccelerate again, or
  QwenImageSampleFromEmbeds with speed "fast" on every queue, reuses them.
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
    """What one accelerated MODEL has done (read by the bench and the tests), and its compiled blocks.

    One state belongs to one QwenImageAccelerate output and to every clone made of it afterwards: ComfyUI's
    `ModelPatcher.clone()` deep-copies `model_options`, and a deep copy of the state would copy the compiled
    blocks with their weights (a LoRA loader after QwenImageAccelerate then held the transformer twice on the
    GPU). `__deepcopy__` therefore returns the state itself."""

    backend: object
    mode: str
    dynamic: str
    calls: int = 0                 # accelerated apply_model calls
    eager_calls: int = 0           # calls that ran eager (weights not resident, or compiling stopped paying)
    first_call_s: float | None = None   # the first accelerated call, compile included
    fallback_reason: str | None = None
    compiles: int = 0              # dynamo frames compiled during this model's accelerated calls
    unexpected_recompiles: int = 0  # compiles on a call whose inputs and weight layout had been compiled before
    disabled_reason: str | None = None  # set once compiling stopped paying: every later call runs eager
    _compiled: "weakref.WeakKeyDictionary" = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _seen: set = field(default_factory=set, repr=False)      # (weight layout, input shapes) compiled before
    _layouts: set = field(default_factory=set, repr=False)   # weight layouts compiled for
    _logged: set = field(default_factory=set, repr=False)

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

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
        """This call runs eager: one log line per distinct reason, not one per step."""
        self.eager_calls += 1
        if reason not in self._logged:
            log.warning("QwenImageAccelerate: %s; running eager (uncompiled).", reason)
            self._logged.add(reason)
        self.fallback_reason = reason

    def disable(self, reason: str) -> None:
        self.disabled_reason = reason
        self.eager(reason)


# A weight layout may be compiled for at most this many times (e.g. bf16 resident, then cast-on-use after a
# reload): past it ComfyUI is moving weights between calls and compiling would not pay.
MAX_LAYOUTS = 3
# Compiles on repeated, already-compiled inputs tolerated before the model runs eager for good (a guard that
# fails on every step would otherwise recompile until dynamo's recompile limit and run slower than eager).
MAX_UNEXPECTED_RECOMPILES = 1


def dynamo_compiles() -> int:
    """Frames dynamo has compiled in this process so far (its own counter; a recompile counts as one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _blocks(diffusion_model):
    blocks = getattr(diffusion_model, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks) or not hasattr(diffusion_model, "txt_norm"):
        return None
    return blocks


def _block_layout(block: torch.nn.Module) -> tuple:
    """What the compiled code of one block depends on besides the input shapes: for each of ComfyUI's
    cast-on-use layers, whether it casts its weights on use and the stored weight dtype."""
    out = []
    for m in block.modules():
        if hasattr(m, "comfy_cast_weights"):
            w = getattr(m, "weight", None)
            out.append((bool(m.comfy_cast_weights), None if w is None else w.dtype))
    return tuple(out)


def _why_eager(base_model, blocks, device: torch.device) -> tuple[str | None, tuple | None]:
    """(why this call cannot gain from compiling, None) or (None, the blocks' common weight layout)."""
    if getattr(base_model, "model_lowvram", False):
        return "ComfyUI loaded the model only partly (low VRAM: weights stream in per layer)", None
    for p in blocks.parameters():
        if p.device != device:
            return f"some weights are on {p.device}, the computation on {device}", None
    layout = None
    for block in blocks:
        for m in block.modules():
            if getattr(m, "weight_function", None) or getattr(m, "bias_function", None):
                return "ComfyUI applies weight patches on the fly (a LoRA on weights that are not resident)", None
        this = _block_layout(block)
        if layout is None:
            layout = this
        elif this != layout:
            return ("the transformer blocks store their weights differently (some cast on use, as after "
                    "ComfyUI's partial loading)"), None
    return None, layout


def _input_key(args, kwargs) -> tuple:
    """Shapes and dtypes of the model call's tensors (the compiled code is specialised on them)."""
    def sig(v):
        return (tuple(v.shape), v.dtype, v.device.type) if torch.is_tensor(v) else None

    items = [sig(a) for a in args] + [(k, sig(v)) for k, v in sorted(kwargs.items()) if torch.is_tensor(v)]
    c = kwargs.get("c") if isinstance(kwargs.get("c"), dict) else None
    if c is None:
        c = next((a for a in args if isinstance(a, dict)), None)
    if c is not None:
        items += [(k, sig(v)) for k, v in sorted(c.items()) if torch.is_tensor(v)]
    return tuple(items)


def _wrapper(state: AccelerationState):
    """The APPLY_MODEL wrapper: compiled blocks in place for the duration of one model call."""

    def apply_model_wrapper(executor, *args, **kwargs):
        if state.disabled_reason:
            state.eager(state.disabled_reason)
            return executor(*args, **kwargs)
        base_model = executor.class_obj
        diffusion = getattr(base_model, "diffusion_model", None)
        blocks = _blocks(diffusion) if diffusion is not None else None
        x = args[0] if args else kwargs.get("x")
        if blocks is None or not torch.is_tensor(x):
            state.eager("the model is not ComfyUI's Qwen-Image transformer")
            return executor(*args, **kwargs)
        reason, layout = _why_eager(base_model, blocks, x.device)
        if reason:
            state.eager(reason)
            return executor(*args, **kwargs)
        if layout not in state._layouts and len(state._layouts) >= MAX_LAYOUTS:
            state.disable(f"the weights changed layout {len(state._layouts) + 1} times (ComfyUI moved or recast "
                          f"them between calls), so compiling no longer pays")
            return executor(*args, **kwargs)
        key = (layout, _input_key(args, kwargs))
        all_cuda = x.device.type == "cuda"
        originals = list(blocks)
        first = state.calls == 0
        before = dynamo_compiles()
        t = time.perf_counter()
        try:
            for i, block in enumerate(originals):
                blocks[i] = state.compiled(block, all_cuda)
            out = executor(*args, **kwargs)
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
        state.calls += 1
        compiled_now = dynamo_compiles() - before
        state.compiles += compiled_now
        if compiled_now and key in state._seen:
            state.unexpected_recompiles += 1
            if state.unexpected_recompiles > MAX_UNEXPECTED_RECOMPILES:
                state.disable("the compiled blocks recompiled on repeated calls with unchanged inputs (ComfyUI "
                              "changes something they depend on between steps), so compiling would be slower "
                              "than eager")
        state._seen.add(key)
        state._layouts.add(layout)
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
    state = _shared_state(diffusion, backend, mode, dynamic)
    m.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _wrapper(state))
    m.model_options[INFO_KEY] = state
    return m


# One state per loaded transformer and settings: a re-run of QwenImageAccelerate (an upstream widget changed)
# and every run of QwenImageSampleFromEmbeds with speed "fast" reuse the compiled blocks instead of wrapping
# the blocks in new compiled modules each time. Weak keys: an unloaded transformer takes its state with it.
_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _shared_state(diffusion, backend, mode: str, dynamic: str) -> AccelerationState:
    per_model = _STATES.setdefault(diffusion, {})
    key = (backend if isinstance(backend, str) else id(backend), mode, dynamic)
    state = per_model.get(key)
    if state is None or (not isinstance(backend, str) and state.backend is not backend):
        state = per_model[key] = AccelerationState(backend=backend, mode=mode, dynamic=dynamic)
    return state


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
