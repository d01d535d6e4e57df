"""Qwen-Image speed and memory flags shared by `sweep` and `eval` (one definition, one help text)."""

from __future__ import annotations

import argparse


def add_qwen_image_runtime_arguments(group: argparse._ArgumentGroup) -> None:
    from ..core.sampling import OFFLOAD_CHOICES

    group.add_argument("--fast", action="store_true",
                       help="on a CUDA GPU: compile the transformer blocks and replay CUDA graphs (3.2x faster than "
                            "stock diffusers for one image on an H100; ignored elsewhere)")
    group.add_argument("--offload", choices=OFFLOAD_CHOICES, default="none",
                       help="none (default: all on the GPU), model_cpu_offload, group (fits 24 GB, exact) or "
                            "sequential (least VRAM, slowest); CUDA only")
    group.add_argument("--fp8-storage", action="store_true",
                       help="keep the transformer's weights in fp8, computing in --dtype: half the memory, some "
                            "precision lost")


def qwen_image_load_kwargs(args) -> dict:
    return {"offload": args.offload, "fp8_storage": args.fp8_storage}
