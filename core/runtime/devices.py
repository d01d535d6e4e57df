"""Device and dtype choices shared by loaders, the CLI and the nodes."""

from __future__ import annotations

import torch

from ..errors import UserInputError

DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an explicit device that is absent is an error that says so."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise UserInputError(f"unknown device {name!r}: use one of {', '.join(DEVICE_CHOICES)}.")
    if base == "cuda" and not torch.cuda.is_available():
        raise UserInputError("device 'cuda' was asked for but no CUDA GPU is visible to torch: use --device cpu "
                             "(or auto), or install a CUDA build of torch.")
    if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserInputError("device 'mps' was asked for but Apple MPS is not available: use --device cpu or auto.")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on CUDA GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    if isinstance(name, torch.dtype):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise UserInputError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_CHOICES)}.")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
