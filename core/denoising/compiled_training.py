"""Regional torch.compile for the denoise training step (`qwen-identity train --objective denoise --compile`).

The same compilation as the sampler's (`core/generation/sampling.compile_transformer`: each repeated
transformer block compiled once, fullgraph, static shapes) and as bench/bench_train_step.py's compiled
configuration, which took 768x512 batch 10 on an H200 from 7.7 to 10.5 samples/s (51 % MFU;
bench/RESULTS.md, "Denoise training step").

Compiled blocks need RoPE in real arithmetic (the sampler's `_real_rope` swap of diffusers'
`apply_rotary_emb_qwen`). The swap must stay active through the backward too, not just the forward:
with gradient checkpointing the blocks run again during the backward, and a different RoPE function
there (another graph, other saved tensors) fails checkpoint's check ("Recomputed values ... have
different metadata"). So training runs entirely inside `training_rope()`.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserInputError
from ..generation.acceleration import compile_transformer, real_rope as _real_rope

BACKENDS = ("inductor", "aot_eager", "eager")


def compile_for_training(transformer, device: torch.device | str, backend: str = "inductor") -> bool:
    """Compile the transformer's blocks with `backend`. inductor (the fast one) is CUDA only here: on any
    other device it is refused with the fix; "aot_eager"/"eager" run anywhere (tests use them on the CPU
    to exercise the same path). Returns True if it compiled now (False: already compiled)."""
    check_compile(device, backend)
    return compile_transformer(transformer, backend=backend)


def check_compile(device: torch.device | str, backend: str = "inductor") -> None:
    """Refuse an unknown backend, and inductor off CUDA, before any model loads."""
    if backend not in BACKENDS:
        raise UserInputError(f"compile backend must be one of {', '.join(BACKENDS)} (got {backend!r}).")
    if backend == "inductor" and torch.device(device).type != "cuda":
        raise UserInputError(f"--compile needs a CUDA GPU (training runs on {torch.device(device)}): it compiles "
                             "the transformer blocks with Triton kernels. Leave --compile off on this machine.")


def training_rope(enabled: bool = True):
    """The context the whole training (forwards, backwards, held-out gain) of a compiled transformer runs in;
    a no-op context when `enabled` is False."""
    return _real_rope() if enabled else contextlib.nullcontext()
