"""Flags several subcommands share (one definition, one help text): the system group (device, dtype, hub
token and cache) and the Qwen-Image speed/memory flags of `sweep` and `eval`."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """argparse type: a finite float (NaN and inf are refused with a clear message)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return v


def add_head_training_arguments(group: argparse._ArgumentGroup) -> None:
    """The POC's training flags (train, and sweep --train), with its defaults."""
    group.add_argument("--epochs", type=int, default=3, help="total epochs (default: 3)")
    group.add_argument("--batch-size", type=int, default=2, help="photos per step (default: 2)")
    group.add_argument("--lr", type=finite_float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    group.add_argument("--target", choices=("caption", "zero"), default="caption",
                       help="caption: regress onto the person's description inside the base prompt (default; learns "
                            "only what a caption can say); zero: trains nothing (the seed's objective: a zero-initialised "
                            "head, zero targets and zero gradients leave every weight at zero), a check of the machinery "
                            "only. `train --objective` supersedes this and adds denoise")
    group.add_argument("--tokens", type=int, default=1, help="K identity slots of the head (default: 1)")


def add_system_arguments(group: argparse._ArgumentGroup, dtype_note: str = "") -> None:
    from ..core.runtime.devices import DEVICE_CHOICES, DTYPE_CHOICES

    group.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="default: auto (cuda, then mps, then cpu)")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="model precision (default: auto = bf16 on GPUs that have it, fp32 on CPU)" + dtype_note)
    group.add_argument("--hf-token", default=None, help="Hugging Face token (default: $HUGGINGFACE_TOKEN or $HF_TOKEN)")
    group.add_argument("--cache-dir", default=None, help="Hugging Face cache (default: $HF_HUB_CACHE)")


def add_generation_arguments(group: argparse._ArgumentGroup, default_alphas: str, alphas_note: str = "") -> None:
    """The α × seed sweep and its sampling settings (the POC's defaults), then the speed/memory flags."""
    from ..core.residual.injection import DEFAULT_MODE, MODES
    from ..core.generation.sampling import DEFAULT_MAX_BATCH, DEFAULT_SEEDS

    group.add_argument("--alphas", default=default_alphas,
                       help=f'comma-separated α values{alphas_note} (default: "{default_alphas}")')
    group.add_argument("--gen-seeds", default=DEFAULT_SEEDS,
                       help=f'comma-separated generation seeds (default: "{DEFAULT_SEEDS}")')
    group.add_argument("--steps", type=int, default=28, help="denoising steps (default: 28)")
    group.add_argument("--guidance", type=finite_float, default=4.5,
                       help="true classifier-free guidance scale with the negative prompt (default: 4.5; <= 1: off)")
    group.add_argument("--height", type=int, default=768, help="image height, a multiple of 16 (default: 768)")
    group.add_argument("--width", type=int, default=512, help="image width, a multiple of 16 (default: 512)")
    group.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                       help=f"images denoised together (default: {DEFAULT_MAX_BATCH}); lower it on out-of-memory")
    add_qwen_image_runtime_arguments(group)
    group.add_argument("--strength-mode", choices=MODES, default=DEFAULT_MODE,
                       help=f"how α scales the residual (default: {DEFAULT_MODE}; see docs/nodes.md, 'Strength (α) semantics')")


def add_qwen_image_runtime_arguments(group: argparse._ArgumentGroup) -> None:
    from ..core.generation.sampling import OFFLOAD_CHOICES

    group.add_argument("--fast", action="store_true",
                       help="on a CUDA GPU: compile the transformer blocks and replay CUDA graphs: one 768x512 "
                            "28-step image took 2.93-3.02 s vs 7.5-9.4 s for stock diffusers, 2.5-3.2x faster, "
                            "on an H100 80GB (bench/RESULTS.md runs 3-5; the first call compiles, 15-22 s); "
                            "ignored elsewhere")
    group.add_argument("--offload", choices=OFFLOAD_CHOICES, default="none",
                       help="none (default: all on the GPU), model_cpu_offload, group (fits 24 GB, exact) or "
                            "sequential (least VRAM, slowest); CUDA only")
    group.add_argument("--fp8-storage", action="store_true",
                       help="keep the transformer's weights in fp8, computing in --dtype: half the memory, some "
                            "precision lost")


def qwen_image_load_kwargs(args) -> dict:
    return {"offload": args.offload, "fp8_storage": args.fp8_storage}


def add_crop_arguments(group: argparse._ArgumentGroup, head_default: bool = False) -> None:
    """--crop and --crop-fallback: which part of each photo Qwen3-VL sees (core/identity/face_crop.py).
    `head_default`: commands that use a trained head (eval) default to the crop the head was trained with."""
    from ..core.identity.face_crop import CROP_FALLBACKS, CROPS, DEFAULT_CROP, DEFAULT_CROP_FALLBACK

    if head_default:
        group.add_argument("--crop", choices=CROPS, default=None,
                           help="which part of each photo Qwen3-VL sees (default: the crop the head was trained with; "
                                "another one is warned about): face, center or full")
    else:
        group.add_argument("--crop", choices=CROPS, default=DEFAULT_CROP,
                           help=f"which part of each photo Qwen3-VL sees (default: {DEFAULT_CROP}): face = the face found "
                                "by dlib's detector, turned so the eyes are level, a square twice the face box; "
                                "center = the centre square; full = the whole photo (letterboxed). The head records it")
    default = "the head's" if head_default else DEFAULT_CROP_FALLBACK
    group.add_argument("--crop-fallback", choices=CROP_FALLBACKS, default=None if head_default else DEFAULT_CROP_FALLBACK,
                       help=f"crop face only: a photo without a face (default: {default}; error = stop and name "
                            "it; center or full = crop that photo that way, with a note)")


def crop_settings(args) -> dict:
    """The crop fields of FeatureSettings from --crop / --crop-fallback."""
    return {"crop": args.crop, "crop_fallback": args.crop_fallback}
