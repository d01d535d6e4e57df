"""Speed work for the diffusers path's sampling loop (`core/generation/sampling.py`), kept apart from it.

The loop there is the reference (it equals diffusers' `QwenImagePipeline` at the same seeds); what is
here makes it faster without changing its arithmetic. Both switches are off by default
(`bench/RESULTS.md` has the measurements):
- `compile_transformer` / `compile=True`: compiles the transformer's repeated blocks once (`torch.compile`,
  regional, static shapes). It fuses the many small element-wise kernels between the matrix products. The
  first call of each new batch/text shape pays the compile (tens of seconds on a GPU); it pays off for grids
  and repeated runs. It changes the pipeline's transformer in place (for every later user of it).
- `GraphedForward` / `cuda_graphs=True` (CUDA only, ignored elsewhere and under CPU offload hooks): records
  the transformer forward of each batch plan once in a CUDA graph and replays it every step, so the
  Python/launch overhead of ~1,700 kernels per forward is paid once, not 28 times. It holds the
  activations of one forward in a private memory pool for the duration of the call.
With either option (and no offload hooks) the blocks' timestep modulation (`img_mod`/`txt_mod`, a third of
the weights) is computed for all steps at once instead of once per step (`PrecomputedModulation`), and
compiled forwards apply RoPE in real arithmetic (`real_rope`: Inductor has no complex kernels).
None of this changes the arithmetic (no precision loss); outputs match the plain path within bf16 noise.

ComfyUI's own Qwen-Image model is accelerated separately, through ComfyUI's hooks
(`nodes/native_acceleration.py`); this module knows only diffusers' transformer.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


def rope_real(x: torch.Tensor, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1) -> torch.Tensor:
    """diffusers' `apply_rotary_emb_qwen` for complex frequencies, in real arithmetic.

    (a + ib)(c + is) = (ac - bs) + i(as + bc) on interleaved pairs, in float32 like the original.
    TorchInductor generates no code for complex operators (it falls back to one eager kernel per call,
    ~4 % of a compiled step on an H100); in real arithmetic it fuses into the neighbouring kernels.
    """
    if use_real or not torch.is_tensor(freqs_cis) or not freqs_cis.is_complex():
        return _ORIGINAL_ROPE(x, freqs_cis, use_real, use_real_unbind_dim)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    f = torch.view_as_real(freqs_cis).unsqueeze(1)  # [S, 1, D/2, 2]
    c, s = f[..., 0], f[..., 1]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(3).type_as(x)


_ORIGINAL_ROPE = None


@contextlib.contextmanager
def real_rope():
    """Compiled forwards: diffusers' attention applies RoPE through `rope_real` (same function, real
    arithmetic), in the module of every model family's transformer (`ModelFamily.rope_modules`: Qwen-Image's
    and Qwen-Image 2.1's each have their own copy of `apply_rotary_emb_qwen`). A module-level swap with a
    stable function, so compiled code is not re-traced; each module is restored on the way out."""
    global _ORIGINAL_ROPE
    import importlib

    from ..families import FAMILIES

    swapped = []
    for name in dict.fromkeys(m for family in FAMILIES for m in family.rope_modules):
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - other diffusers layouts
            continue
        current = getattr(module, "apply_rotary_emb_qwen", None)
        if current is None or current is rope_real:   # none here, or an outer real_rope() holds it
            continue
        _ORIGINAL_ROPE = current   # the use_real=True path; every family's copy is diffusers' same function
        module.apply_rotary_emb_qwen = rope_real
        swapped.append((module, current))
    try:
        yield
    finally:
        for module, original in swapped:
            module.apply_rotary_emb_qwen = original


class GraphedForward:
    """One plan's transformer forward recorded in a CUDA graph; each step copies its inputs in and replays.

    The first forward runs normally on a side stream (it also triggers any compilation and fills
    diffusers' RoPE caches outside the graph's memory pool); its output is that step's prediction.
    """

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rows: torch.Tensor,
                 timestep: torch.Tensor, pool):
        self.rows, self.timestep = rows.clone(), timestep.clone()
        stream = torch.cuda.Stream(device=rows.device)
        stream.wait_stream(torch.cuda.current_stream(rows.device))
        with torch.cuda.stream(stream):
            self.first_output = forward(self.rows, self.timestep)
        torch.cuda.current_stream(rows.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with _capturable_text_lengths(), torch.cuda.graph(self.graph, pool=pool):
            self.output = forward(self.rows, self.timestep)

    def __call__(self, rows: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.rows.copy_(rows)
        self.timestep.copy_(timestep)
        self.graph.replay()
        return self.output.clone()


@contextlib.contextmanager
def _capturable_text_lengths():
    """While a forward is recorded: diffusers' `compute_text_seq_len_from_mask` builds a CPU scalar
    tensor on every masked call (a host-to-device copy, which CUDA graph capture refuses). The forward
    uses only its text length and its bool mask, so an equivalent without the copy stands in."""
    try:
        from diffusers.models.transformers import transformer_qwenimage as qwen_module
    except ImportError:  # pragma: no cover - other diffusers layouts
        yield
        return
    original = getattr(qwen_module, "compute_text_seq_len_from_mask", None)
    if original is None:
        yield
        return

    def text_lengths(encoder_hidden_states, encoder_hidden_states_mask):
        seq_len = encoder_hidden_states.shape[1]
        if encoder_hidden_states_mask is None:
            return seq_len, None, None
        return seq_len, None, encoder_hidden_states_mask.to(torch.bool)

    qwen_module.compute_text_seq_len_from_mask = text_lengths
    try:
        yield
    finally:
        qwen_module.compute_text_seq_len_from_mask = original


class _ModulationLookup(torch.nn.Module):
    """Stands in for a block's `img_mod` / `txt_mod` (SiLU -> Linear of the timestep embedding): returns the
    row precomputed for the current step. The same instance is reused across calls (stable for torch.compile)."""

    def __init__(self, table: torch.Tensor, step: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("step", step, persistent=False)

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, self.step).expand(temb.shape[0], -1)


class PrecomputedModulation:
    """The blocks' modulation depends only on the timestep, which all rows of a step share. Computing it for
    all steps at once reads each block's `img_mod`/`txt_mod` weights (1/3 of the model: 13.6 GB in bf16 for
    Qwen-Image) once per chunk instead of once per step; during the chunk the blocks look their row up.
    Same function; the batched product may round differently in the last bf16 bit."""

    def __init__(self, transformer, originals, lookups, step):
        self.transformer, self.originals, self.lookups, self.step = transformer, originals, lookups, step

    @classmethod
    def enter(cls, transformer, timesteps: torch.Tensor, dtype: torch.dtype):
        blocks = getattr(transformer, "transformer_blocks", None)
        embed = getattr(transformer, "time_text_embed", None)
        if (not blocks or embed is None or getattr(transformer, "zero_cond_t", False)
                or getattr(transformer.config, "guidance_embeds", False)
                or not all(isinstance(getattr(b, "img_mod", None), torch.nn.Sequential)
                           and isinstance(getattr(b, "txt_mod", None), torch.nn.Sequential) for b in blocks)):
            return None
        device = timesteps.device
        # exactly what the forward computes per step: (t in the latents' dtype) / 1000, then time_text_embed
        t = timesteps.to(dtype) / 1000
        probe = torch.empty(0, dtype=transformer.dtype, device=device)
        temb = embed(t.to(transformer.dtype), probe)  # [steps, dim]
        cache = getattr(transformer, "_qwen_identity_mod_lookups", None)
        step = torch.zeros(1, dtype=torch.long, device=device)
        originals, lookups = [], []
        capacity = max(32, 1 << (len(timesteps) - 1).bit_length())  # fixed table shapes: no re-compile per step count
        for k, block in enumerate(blocks):
            tables = [torch.nn.functional.pad(m(temb), (0, 0, 0, capacity - len(timesteps)))
                      for m in (block.img_mod, block.txt_mod)]
            pair = []
            for j, table in enumerate(tables):
                old = cache[k][j] if cache is not None else None
                if old is not None and old.table.shape == table.shape and old.table.device == table.device:
                    old.table.copy_(table)
                    old.step = step
                    pair.append(old)
                else:
                    pair.append(_ModulationLookup(table, step))
            lookups.append(pair)
            originals.append((block.img_mod, block.txt_mod))
        transformer._qwen_identity_mod_lookups = lookups
        for block, (img, txt) in zip(blocks, lookups):
            block.img_mod, block.txt_mod = img, txt
        return cls(transformer, originals, lookups, step)

    def set_step(self, i: int) -> None:
        self.step.fill_(i)

    def exit(self) -> None:
        for block, (img, txt) in zip(self.transformer.transformer_blocks, self.originals):
            block.img_mod, block.txt_mod = img, txt


def has_offload_hooks(module: torch.nn.Module) -> bool:
    """True when accelerate (model/sequential CPU offload) or diffusers (group offload, layerwise
    casting) hooks move or cast weights during the forward: such a forward cannot be graph-recorded."""
    return any(getattr(m, "_hf_hook", None) is not None or bool(getattr(getattr(m, "_diffusers_hook", None), "hooks", None))
               for m in module.modules())  # (diffusers pipelines leave an empty hook registry behind: not a hook)


def speed_options(bundle, fast: bool) -> dict:
    """`sample()` keyword arguments for the user-facing "fast" switch: regional torch.compile plus CUDA
    graphs, the configuration measured 3.2x faster than stock diffusers on an H100 (bench/RESULTS.md).
    Only on CUDA: elsewhere compiling costs more than it saves, and graphs do not exist."""
    device = bundle.device if hasattr(bundle, "pipeline") else bundle._execution_device  # bundle or pipeline
    on_cuda = bool(fast) and torch.device(device).type == "cuda"
    return {"compile": on_cuda, "cuda_graphs": on_cuda}


def compile_transformer(transformer, backend: str = "inductor") -> bool:
    """Regional torch.compile of the transformer's repeated blocks, once (idempotent). Returns True
    if it compiled now, False if it already was."""
    if getattr(transformer, "_qwen_identity_compiled", False):
        return False
    kwargs = dict(fullgraph=True, dynamic=False, backend=backend)
    if getattr(transformer, "_repeated_blocks", None) and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(**kwargs)
    else:
        for block in getattr(transformer, "transformer_blocks", []):
            block.compile(**kwargs)
    transformer._qwen_identity_compiled = True
    return True
