"""Train a residual head: Qwen3-VL features of each person's photos -> the caption (or zero) residual
on Qwen-Image's prompt embeddings. Writes OUT/checkpoints/linear_head.safetensors (load it with the
LoadResidualHead node), OUT/metrics.json and OUT/loss_curve.png. Runs the same under
`accelerate launch` across GPUs (sharded extraction, data-parallel training).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..core.errors import UserInputError
from ..core.identity.features import DEFAULT_MAX_PIXELS, DEFAULT_RESOLUTION, DEFAULT_SOURCE, FEATURE_SOURCES, RESOLUTIONS
from ..core.identity.seed_dirs import parse_seed_dir_args
from ..core.pipeline.defaults import DEFAULT_BASE_PROMPT, DEFAULT_QWEN3_VL, DEFAULT_QWEN_IMAGE
from ..core.runtime.progress import tqdm_progress
from ..training.loop import LoopConfig
from ..training.pipeline import TrainConfig, run_training
from .common_args import add_head_training_arguments, add_system_arguments, finite_float

DEFAULT_OUT = "train_output"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--seed-dirs", default=None,
                   help="comma-separated seed_* folders with photo_view_*.png (each may be a glob, e.g. '/data/seed_*')")
    g.add_argument("--seed-dirs-file", default=None, help="a text file with one seed folder (or glob) per line")
    g.add_argument("--single-view", action="store_true", help="use only the first photo of each identity (POC parity)")
    g.add_argument("--val-fraction", type=finite_float, default=0.2,
                   help="share of identities held out for validation, split by identity (default: 0.2)")
    g.add_argument("--out-dir", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    g = p.add_argument_group("training")
    add_head_training_arguments(g)
    g.add_argument("--mse-weight", type=finite_float, default=1.0, help="weight of the MSE term (default: 1.0)")
    g.add_argument("--cos-weight", type=finite_float, default=1.0, help="weight of the 1-cosine term (default: 1.0)")
    g.add_argument("--seed", type=int, default=123, help="seed of every random choice (default: 123)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/train_state.safetensors")
    g.add_argument("--overwrite", action="store_true", help="start over even if OUT already holds a trained head")
    g = p.add_argument_group("models")
    g.add_argument("--qwen3-vl-model", default=DEFAULT_QWEN3_VL,
                   help=f"Qwen3-VL folder, models-folder name or hub id for features and captions (default: {DEFAULT_QWEN3_VL})")
    g.add_argument("--qwen-image-model", default=DEFAULT_QWEN_IMAGE,
                   help=f"diffusers Qwen-Image folder or hub id; only its text encoder is used (default: {DEFAULT_QWEN_IMAGE})")
    g.add_argument("--base-prompt", default=DEFAULT_BASE_PROMPT, help=f'default: "{DEFAULT_BASE_PROMPT}"')
    g.add_argument("--feature-source", choices=FEATURE_SOURCES, default=DEFAULT_SOURCE,
                   help=f"Qwen3-VL feature source (default: {DEFAULT_SOURCE})")
    g.add_argument("--features", default=None, metavar="FILE.safetensors",
                   help="take features from this `qwen-identity extract` output where model, settings and photos match")
    g.add_argument("--layer", type=int, default=-1, help="llm_hidden only: hidden-state index (default: -1 = last)")
    g.add_argument("--resolution", choices=RESOLUTIONS, default=DEFAULT_RESOLUTION,
                   help=f"how photos are sized for Qwen3-VL (default: {DEFAULT_RESOLUTION})")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"pixel_budget only: most pixels per photo (default: {DEFAULT_MAX_PIXELS} = 448x448)")
    g = p.add_argument_group("system")
    add_system_arguments(g, dtype_note="; the head trains in fp32")


def config_from_args(args):
    if not args.seed_dirs and not args.seed_dirs_file:
        raise UserInputError("no seed directories given: pass --seed-dirs DIR[,DIR...] (globs allowed) or --seed-dirs-file.")
    loop = LoopConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      mse_weight=args.mse_weight, cos_weight=args.cos_weight)
    loop.validate()
    return TrainConfig(seed_dirs=parse_seed_dir_args(args.seed_dirs, args.seed_dirs_file), out_dir=Path(args.out_dir),
                       loop=loop, qwen3_vl_model=args.qwen3_vl_model, qwen_image_model=args.qwen_image_model,
                       base_prompt=args.base_prompt, target=args.target, tokens=args.tokens,
                       single_view=args.single_view, val_fraction=args.val_fraction,
                       feature_settings={"source": args.feature_source, "layer": args.layer,
                                         "resolution": args.resolution, "max_pixels": args.max_pixels},
                       features_file=Path(args.features) if args.features else None,
                       device=args.device, dtype=args.dtype,
                       hf_token=args.hf_token or os.environ.get("HUGGINGFACE_TOKEN"),
                       cache_dir=args.cache_dir or os.environ.get("HF_HUB_CACHE"),
                       resume=args.resume, overwrite=args.overwrite)


def run(args) -> int:
    # deterministic cuBLAS on CUDA (must be set before the first CUDA matmul); harmless elsewhere
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cfg = config_from_args(args)
    metrics = run_training(cfg, progress=lambda name: tqdm_progress(name, unit="step" if name == "training" else "item"))
    out = Path(cfg.out_dir)
    if metrics:
        val = metrics.get("val_loss")
        print(f"head: {out / 'checkpoints' / 'linear_head.safetensors'}\n"
              f"train loss {metrics['train_loss']:.6g}" + (f", validation loss {val:.6g}" if val is not None else "")
              + f"; metrics in {out / 'metrics.json'}, curve in {out / 'loss_curve.png'}")
    return 0
