"""The POC's `poc.py`: (optionally train a head, then) for every seed directory, Qwen3-VL identity
features -> residual head -> E + α·R on the base prompt -> Qwen-Image images for every α × seed ->
OUT/generations/<dir name>_alpha_grid.png (rows α, columns seeds) and <dir name>_meta.json.

The head is OUT/checkpoints/linear_head.safetensors (written by --train), or --head FILE.
Guidance is Qwen-Image's true CFG with --negative-prompt. Every file is written atomically.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..training.pipeline import DEFAULT_BASE_PROMPT, DEFAULT_QWEN3_VL, DEFAULT_QWEN_IMAGE
from .common_args import add_generation_arguments, add_head_training_arguments, add_system_arguments
from .fanout import add_fanout_arguments

DEFAULT_OUT = "outputs"
DEFAULT_ALPHAS = "0.5,1.0,1.5"
HEAD_RELPATH = Path("checkpoints") / "linear_head.safetensors"
VERSION_PACKAGES = ("torch", "transformers", "diffusers", "accelerate", "safetensors", "pillow", "numpy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..core.generation.sampling import DEFAULT_NEGATIVE_PROMPT

    g = p.add_argument_group("data")
    g.add_argument("--seed-dirs", default=None,
                   help="comma-separated seed_* folders with photo_view_*.png (globs allowed) - required "
                        "unless --seed-dirs-file is given")
    g.add_argument("--seed-dirs-file", default=None, help="a text file with one seed folder (or glob) per line")
    g.add_argument("--out-dir", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    g.add_argument("--single-view", action="store_true",
                   help="use only the first photo of each identity (the POC's simplification); default: all photos")
    g = p.add_argument_group("head")
    g.add_argument("--train", action="store_true", help="train the head first (as `qwen-identity train`), into "
                                                        "OUT/checkpoints/linear_head.safetensors")
    g.add_argument("--head", default=None, help="an existing head file to use instead (default: "
                                                "OUT/checkpoints/linear_head.safetensors)")
    add_head_training_arguments(g)
    g.add_argument("--overwrite", action="store_true", help="with --train: replace a head already in OUT")
    g = p.add_argument_group("inference")
    add_generation_arguments(g, DEFAULT_ALPHAS)
    g = p.add_argument_group("prompts")
    g.add_argument("--base-prompt", default=DEFAULT_BASE_PROMPT, help=f'default: "{DEFAULT_BASE_PROMPT}"')
    g.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT, help=f'default: "{DEFAULT_NEGATIVE_PROMPT}"')
    g = p.add_argument_group("models")
    g.add_argument("--qwen3-vl-model", default=DEFAULT_QWEN3_VL,
                   help=f"Qwen3-VL folder, models-folder name or hub id (default: {DEFAULT_QWEN3_VL})")
    g.add_argument("--qwen-image-model", default=DEFAULT_QWEN_IMAGE,
                   help=f"diffusers Qwen-Image folder or hub id (default: {DEFAULT_QWEN_IMAGE})")
    g = p.add_argument_group("system")
    add_system_arguments(g)
    g = p.add_argument_group("fan-out over several processes (see docs/modal.md)")
    add_fanout_arguments(g)


@dataclass
class SweepConfig:
    seed_dirs: list[Path]
    out_dir: Path
    alphas: list[float]
    seeds: list[int]
    steps: int = 28
    guidance: float = 4.5
    height: int = 768
    width: int = 512
    max_batch: int = 4
    fast: bool = False
    offload: str = "none"
    fp8_storage: bool = False
    strength_mode: str = "absolute"
    base_prompt: str = DEFAULT_BASE_PROMPT
    negative_prompt: str = "blurry, low quality, deformed, watermark"
    qwen3_vl_model: str = DEFAULT_QWEN3_VL
    qwen_image_model: str = DEFAULT_QWEN_IMAGE
    head: Path | None = None
    single_view: bool = False
    device: str = "auto"
    dtype: str = "auto"
    hf_token: str | None = None
    cache_dir: str | None = None
    extra_meta: dict = field(default_factory=dict)
    write_dir: Path | None = None   # where generations/ goes (a fan-out stage); default out_dir


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from ..version import __version__

    out = {"python": platform.python_version(), "qwen-identity": __version__}
    for name in VERSION_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _features_from_training_cache(cfg, seed_dirs, settings):
    """Every identity's features from `OUT/cache/features.safetensors` (written by `train`, e.g. `sweep --train`)
    when all of them are there for this model, these settings and these exact photo files; else None."""
    from ..core.files.dataset_fingerprint import file_sha256
    from ..core.errors import UserInputError
    from ..core.identity.features import load_feature_cache
    from ..training.pipeline import feature_cache_entry_key

    path = cfg.out_dir / "cache" / "features.safetensors"
    if not path.is_file():
        return None
    try:
        cached = load_feature_cache(path)
        keys = [feature_cache_entry_key(cfg.qwen3_vl_model, settings, [file_sha256(p) for p in sd.photos])
                for sd in seed_dirs]
    except (UserInputError, OSError):  # a damaged cache or an unreadable photo: extract as usual
        return None
    if not all(k in cached for k in keys):
        return None
    return [cached[k] for k in keys]


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _search(key: str):
    from ..core.runtime.model_folders import model_dirs

    return model_dirs(key)


def run_sweep(cfg: SweepConfig, say: Callable[[str], None] = print,
              warn: Callable[[str], None] | None = None) -> list[tuple[Path, Path]]:
    """Features, injection, sampling and grid for every seed dir; returns [(grid png, meta json)]."""
    from ..core.files.atomic import atomic_write, atomic_write_json
    from ..core.files.dataset_fingerprint import file_sha256
    from ..core.runtime.devices import resolve_device
    from ..core.errors import UserInputError
    from ..core.identity.features import extract_features, settings_from_meta
    from ..core.generation.grid import make_grid
    from ..core.residual.head import load_head
    from ..core.files.images import comfy_to_pil, load_image
    from ..core.residual.injection import inject_identity
    from ..core.runtime.progress import tqdm_progress
    from ..core.identity.qwen3vl import load_qwen3vl
    from ..core.generation.sampling import encode_text, load_qwen_image_pipeline, sample, speed_options
    from ..core.identity.seed_dirs import load_seed_dirs

    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    timings: dict[str, float] = {}
    seed_dirs = load_seed_dirs(cfg.seed_dirs, single_view=cfg.single_view)
    names = [d.name for d in seed_dirs]
    if len(set(names)) != len(names):
        raise UserInputError(f"two seed directories share a folder name ({', '.join(sorted(names))}); the outputs "
                             "are named after it (<name>_alpha_grid.png): rename one.")
    head_path = Path(cfg.head) if cfg.head else cfg.out_dir / HEAD_RELPATH
    if not head_path.is_file():
        raise UserInputError(f"no head at {head_path}: pass --train to train one first, or --head FILE.")
    head = load_head(head_path)
    head_sha = file_sha256(head_path)
    device = resolve_device(cfg.device)
    settings = settings_from_meta(head.meta.feature_settings or {})

    t_features = time.perf_counter()
    identities = _features_from_training_cache(cfg, seed_dirs, settings)
    if identities is not None:
        print("using the Qwen3-VL features `train` cached in OUT/cache (same model, settings and photos)",
              file=sys.stderr)
    else:
        t = time.perf_counter()
        vl = load_qwen3vl(cfg.qwen3_vl_model, search_dirs=_search("qwen3_vl"), token=cfg.hf_token,
                          cache_dir=cfg.cache_dir, device=device, dtype=cfg.dtype)
        timings["load_qwen3_vl_s"] = time.perf_counter() - t
        identities = []
        t = time.perf_counter()
        with tqdm_progress("features", unit="identity") as bar:
            for i, sd in enumerate(seed_dirs):
                feats = extract_features(vl, [load_image(p) for p in sd.photos], settings)
                feats.combined, feats.per_image = feats.combined.cpu(), feats.per_image.cpu()
                identities.append(feats)
                bar(i + 1, len(seed_dirs))
        del vl
        _release_memory()
    timings["features_s"] = time.perf_counter() - t_features

    t = time.perf_counter()
    bundle = load_qwen_image_pipeline(cfg.qwen_image_model, device=device, dtype=cfg.dtype,
                                      search_dirs=_search("diffusers"), token=cfg.hf_token, cache_dir=cfg.cache_dir,
                                      offload=cfg.offload, fp8_storage=cfg.fp8_storage)
    timings["load_qwen_image_s"] = time.perf_counter() - t
    positive = encode_text(bundle, cfg.base_prompt)
    negative = encode_text(bundle, cfg.negative_prompt)
    gen_dir = (cfg.write_dir or cfg.out_dir) / "generations"
    written = []
    for sd, feats in zip(seed_dirs, identities):
        cond, warnings = inject_identity(positive, head, feats, cfg.alphas, mode=cfg.strength_mode)
        for w in warnings:
            warn(w)
        t = time.perf_counter()
        with tqdm_progress(f"{sd.name}", unit="step") as bar:
            result = sample(bundle, cond, negative, cfg.seeds, steps=cfg.steps, cfg=cfg.guidance, width=cfg.width,
                            height=cfg.height, max_batch=cfg.max_batch, progress=bar,
                            **speed_options(bundle, cfg.fast))
        sampling_s = time.perf_counter() - t
        grid = make_grid(comfy_to_pil(result.images), cfg.alphas, cfg.seeds)
        png, meta_path = gen_dir / f"{sd.name}_alpha_grid.png", gen_dir / f"{sd.name}_meta.json"
        meta = {
            "identity": sd.name, "seed_dir": str(sd.path), "photos": [p.name for p in sd.photos],
            "prompt": cfg.base_prompt, "negative_prompt": cfg.negative_prompt, "alphas": cfg.alphas,
            "seeds": cfg.seeds, "steps": cfg.steps, "guidance": cfg.guidance, "guidance_kind": "true_cfg",
            "height": cfg.height, "width": cfg.width, "max_batch": cfg.max_batch,
            "strength_mode": cfg.strength_mode, "qwen3_vl_model": cfg.qwen3_vl_model,
            "qwen_image_model": cfg.qwen_image_model, "head": str(head_path), "head_sha256": head_sha,
            "head_meta": {"feature_dim": head.meta.feature_dim, "tokens": head.meta.tokens,
                          "hidden_size": head.meta.hidden_size, "target": head.meta.target,
                          "base_prompt": head.meta.base_prompt, "feature_settings": head.meta.feature_settings},
            "features": {k: v for k, v in feats.meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
            "device": str(bundle.device), "dtype": str(bundle.dtype).replace("torch.", ""),
            "timings": {**{k: round(v, 3) for k, v in timings.items()}, "sampling_s": round(sampling_s, 3),
                        "seconds_per_image": round(sampling_s / len(result.cells), 3)},
            "versions": package_versions(), "grid": grid.meta, **cfg.extra_meta,
        }
        atomic_write(png, lambda tmp: grid.image.save(tmp, format="PNG"))
        atomic_write_json(meta_path, meta)
        say(f"{sd.name}: {png} ({len(cfg.alphas)} α × {len(cfg.seeds)} seeds, {sampling_s:.1f}s)")
        written.append((png, meta_path))
    return written


def config_from_args(args) -> SweepConfig:
    import os

    from ..core.errors import UserInputError
    from ..core.residual.injection import parse_alphas
    from ..core.generation.sampling import check_size, parse_seeds
    from ..core.identity.seed_dirs import parse_seed_dir_args

    if not args.seed_dirs and not args.seed_dirs_file:
        raise UserInputError("--seed-dirs is required: pass DIR[,DIR...] (globs allowed) or --seed-dirs-file.")
    alphas, seeds = parse_alphas(args.alphas), parse_seeds(args.gen_seeds)
    check_size(args.width, args.height)
    if args.steps < 1:
        raise UserInputError(f"--steps must be at least 1 (got {args.steps}).")
    if args.max_batch < 1:
        raise UserInputError(f"--max-batch must be at least 1 (got {args.max_batch}).")
    if args.train and args.head:
        raise UserInputError("--train writes OUT/checkpoints/linear_head.safetensors; do not also pass --head.")
    if not args.base_prompt.strip():
        raise UserInputError("--base-prompt is empty.")
    return SweepConfig(seed_dirs=parse_seed_dir_args(args.seed_dirs, args.seed_dirs_file), out_dir=Path(args.out_dir),
                       alphas=alphas, seeds=seeds, steps=args.steps, guidance=args.guidance, height=args.height,
                       width=args.width, max_batch=args.max_batch, fast=args.fast, offload=args.offload,
                       fp8_storage=args.fp8_storage, strength_mode=args.strength_mode,
                       base_prompt=args.base_prompt, negative_prompt=args.negative_prompt,
                       qwen3_vl_model=args.qwen3_vl_model, qwen_image_model=args.qwen_image_model,
                       head=Path(args.head) if args.head else None, single_view=args.single_view,
                       device=args.device, dtype=args.dtype,
                       hf_token=args.hf_token or os.environ.get("HUGGINGFACE_TOKEN") or os.environ.get("HF_TOKEN"),
                       cache_dir=args.cache_dir or os.environ.get("HF_HUB_CACHE"))


def train_first(cfg: SweepConfig, epochs: int, batch_size: int, lr: float, target: str, tokens: int,
                overwrite: bool, say: Callable[[str], None] = print) -> dict:
    """--train: the training pipeline of `qwen-identity train`, writing OUT/checkpoints/linear_head.safetensors."""
    import os

    from ..core.runtime.progress import tqdm_progress
    from ..training.loop import LoopConfig
    from ..training.pipeline import TrainConfig, run_training

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, as `train` sets it
    loop = LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr)
    tcfg = TrainConfig(seed_dirs=cfg.seed_dirs, out_dir=cfg.out_dir, loop=loop, qwen3_vl_model=cfg.qwen3_vl_model,
                       qwen_image_model=cfg.qwen_image_model, base_prompt=cfg.base_prompt, target=target,
                       tokens=tokens, single_view=cfg.single_view, device=cfg.device, dtype=cfg.dtype,
                       hf_token=cfg.hf_token, cache_dir=cfg.cache_dir, overwrite=overwrite, distributed="off")
    metrics = run_training(tcfg, say=say,
                           progress=lambda name: tqdm_progress(name, unit="step" if name == "training" else "item"))
    _release_memory()
    return metrics


def run(args) -> int:
    from dataclasses import replace

    from ..core.errors import UserInputError
    from ..core.files.out_dir_lock import OutDirLock
    from .fanout import plan, run_fanned

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    fan = plan(args)
    if fan is not None:   # one chunk of the identities per process, merged into OUT (cli/fanout.py)
        if args.train and (fan.rank != 0 or fan.wait_for_others):
            raise UserInputError("--train runs once, with --chunk 0/N, before the other chunks (they then use "
                                 "OUT/checkpoints/linear_head.safetensors); under accelerate launch train the head "
                                 "first (`qwen-identity train` or `sweep --train` in one process), then fan out.")
        if args.train:   # chunk 0 trains into OUT (as one process would), then runs its chunk
            with OutDirLock(cfg.out_dir, allow_nested=True):
                train_first(cfg, args.epochs, args.batch_size, args.lr, args.target, args.tokens, args.overwrite)
        head = cfg.head or cfg.out_dir / HEAD_RELPATH   # the path the one-process run records in the meta
        return run_fanned(args, "sweep", cfg.seed_dirs, cfg.out_dir,
                          lambda subset, stage: run_sweep(replace(cfg, seed_dirs=subset, head=head, write_dir=stage)),
                          the_plan=fan)
    with OutDirLock(cfg.out_dir, allow_nested=True):  # training and sampling are one writer: nobody slips in between
        if args.train:
            train_first(cfg, args.epochs, args.batch_size, args.lr, args.target, args.tokens, args.overwrite)
        written = run_sweep(cfg)
    print(f"done in {time.perf_counter() - t0:.1f}s: {len(written)} grid(s) in {cfg.out_dir / 'generations'}")
    return 0
