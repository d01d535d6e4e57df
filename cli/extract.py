"""Extract Qwen3-VL identity features for seed directories into one .safetensors file.

For each seed directory (one identity: its photo_view_*.png, natural-sorted) the file holds the
per-image features [N, D], the combined identity vector [D] and the metadata (model, D, feature
source, layer, resolution, crop, seed dir, photos used). Entries are keyed like every feature cache of the
pack (`core.pipeline.cache_keys.feature_key`: the photos' sha256, model, settings, dtype), so
`qwen-identity train --features FILE` reuses exactly the entries that match its own run.
An unreadable photo is skipped with a warning naming it; a directory with no readable photo is an
error naming the directory. The output is written atomically; input files are only read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import contextlib

from ..core.errors import UserInputError
from ..core.files.images import load_image
from ..core.files.out_dir_lock import OutDirLock
from ..core.identity.features import (DEFAULT_MAX_PIXELS, DEFAULT_RESOLUTION, DEFAULT_SOURCE, FEATURE_SOURCES, RESOLUTIONS,
                                      FeatureSettings, extract_features, save_feature_cache)
from ..core.identity.qwen3vl import load_qwen3vl
from ..core.identity.seed_dirs import load_seed_dirs, parse_seed_dir_args
from ..core.pipeline.cache_keys import feature_key, photo_hashes
from ..core.runtime.devices import DEVICE_CHOICES, DTYPE_CHOICES, resolve_device, resolve_dtype
from ..core.runtime.model_folders import model_dirs
from ..core.runtime.progress import offset_progress, tqdm_progress
from .common_args import add_crop_arguments, crop_settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed-dirs", default=None, help="comma-separated seed_* folders (globs allowed, e.g. '/data/seed_*')")
    p.add_argument("--seed-dirs-file", default=None, help="a text file with one seed folder per line (# comments)")
    p.add_argument("--qwen3-vl-model", required=True, help="Qwen3-VL folder, name in $QWEN_IDENTITY_MODELS_DIR/qwen3_vl, "
                   "or hub id (e.g. Qwen/Qwen3-VL-2B-Instruct)")
    p.add_argument("--out", required=True, help="output file (.safetensors); replaced atomically")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="default: auto (cuda, then mps, then cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="default: auto (bf16 on GPU, fp32 on CPU)")
    p.add_argument("--feature-source", default=DEFAULT_SOURCE, choices=FEATURE_SOURCES,
                   help=f"default: {DEFAULT_SOURCE} (see docs/nodes.md, 'Feature sources and resolution policies')")
    p.add_argument("--layer", type=int, default=-1, help="llm_hidden only: hidden-state index (default: -1 = last)")
    p.add_argument("--resolution", default=DEFAULT_RESOLUTION, choices=RESOLUTIONS, help=f"default: {DEFAULT_RESOLUTION}")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"pixel_budget only: most pixels per photo (default: {DEFAULT_MAX_PIXELS} = 448x448)")
    add_crop_arguments(p)
    p.add_argument("--batch-size", type=int, default=8, help="photos per forward pass (default: 8)")
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                   help="default: sdpa")
    p.add_argument("--hf-token", default=None, help="hub token (default: $HUGGINGFACE_TOKEN or $HF_TOKEN)")
    p.add_argument("--cache-dir", default=None, help="hub cache folder (default: $HF_HUB_CACHE)")


def _warn(message: str) -> None:
    print(f"qwen-identity extract: warning: {message}", file=sys.stderr)


def readable_photos(seed_dir) -> tuple[list[Path], list[Path]]:
    """(readable, skipped) photos of a seed dir; a dir with no readable photo is a UserInputError."""
    good, skipped = [], []
    for p in seed_dir.photos:
        try:
            load_image(p)
            good.append(p)
        except UserInputError as e:
            _warn(f"skipping unreadable photo {p}: {e}")
            skipped.append(p)
    if not good:
        raise UserInputError(f"seed directory {seed_dir.path} has no readable photo (all {len(skipped)} "
                             "photo_view_*.png failed to decode): re-save them as PNG.")
    return good, skipped


def run(args) -> int:
    with contextlib.ExitStack() as stack:  # holds the out-dir lock that _run takes once the inputs are checked
        return _run(args, stack)


def _run(args, stack) -> int:
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserInputError(f"--out {out} must end in .safetensors (the feature cache is a safetensors file).")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {args.batch_size}.")
    settings = FeatureSettings(source=args.feature_source, layer=args.layer, resolution=args.resolution,
                               max_pixels=args.max_pixels, **crop_settings(args))
    seed_dirs = load_seed_dirs(parse_seed_dir_args(args.seed_dirs, args.seed_dirs_file))
    plan = [(d, *readable_photos(d)) for d in seed_dirs]  # fail fast, before the model loads
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    search = model_dirs("qwen3_vl")
    keys = [feature_key(args.qwen3_vl_model, settings, photo_hashes(good), dtype, search) for _, good, _ in plan]
    stack.enter_context(OutDirLock(out.parent))  # one writer per output folder (as train, sweep and eval)

    bundle = load_qwen3vl(args.qwen3_vl_model, search_dirs=search, download_dir=search[0] if search else None,
                          token=args.hf_token, cache_dir=args.cache_dir, device=args.device, dtype=args.dtype,
                          attn_implementation=args.attn_implementation)
    print(f"Qwen3-VL {bundle.model_id} (D={bundle.feature_dim}) on {bundle.device}; {len(plan)} identities; "
          f"source {settings.source}, resolution {settings.resolution}, crop {settings.crop}", file=sys.stderr)
    total = sum(len(good) for _, good, _ in plan)
    items = {}
    done = 0
    with tqdm_progress("extract") as bar:
        for key, (seed_dir, good, skipped) in zip(keys, plan):
            images = [load_image(p) for p in good]
            items[key] = extract_features(
                bundle, images, settings, batch_size=args.batch_size, progress=offset_progress(bar, done, total),
                names=[str(p) for p in good],
                extra_meta={"seed_dir": str(seed_dir.path), "name": seed_dir.name,
                            "photos": [p.name for p in good], "skipped": [p.name for p in skipped]})
            done += len(good)
    save_feature_cache(out, items)
    n_skipped = sum(len(s) for _, _, s in plan)
    print(f"wrote {out}: {len(items)} identities, {total} photos ({n_skipped} skipped), D={bundle.feature_dim}")
    return 0
