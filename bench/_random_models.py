"""Random-weight models for the benchmarks: speed does not depend on the values, only on the shapes.

Shared by bench_qwen_image.py (diffusers and transformers models) and comfy_stage.py (ComfyUI's own classes).
"""

from __future__ import annotations

import contextlib

import torch


def init_random_(module: torch.nn.Module, seed: int, std: float = 0.02):
    """Small normal weights, zero biases, unit norm weights: finite activations through any depth."""
    gen_device = next(module.parameters()).device
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                if "norm" in name.lower() and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)
    return module


@contextlib.contextmanager
def default_dtype_device(dtype, device):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)
