"""The POC's `poc.py`: (optionally train a head, then) for every seed directory, Qwen3-VL identity
features -> residual head -> E + α·R on the base prompt -> Qwen-Image images for every α × seed ->
OUT/generations/<dir name>_alpha_grid.png (rows α, columns seeds) and <dir name>_meta.json, and
OUT/generations/meta.json (the run: settings once, every identity's files).

The head is OUT/checkpoints/<OUT name>_head.safetensors (written by --train, on ALL given identities unless
--val-fraction holds some out), or --head FILE. Guidance is Qwen-Image's true CFG with --negative-prompt.
Every file is written atomically. The loop itself is `core.pipeline.run`; this module parses arguments.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
import time
from pathlib import Path
from typing import Callable

from ..core.errors import UserInputError
from ..core.files.out_dir_lock import OutDirLock
from ..core.generation.sampling import check_size, parse_seeds
from ..core.identity.seed_dirs import load_seed_dirs, parse_seed_dir_args
from ..core.pipeline.defaults import (DEFAULT_ALPHAS, DEFAULT_BASE_PROMPT, DEFAULT_NEGATIVE_PROMPT, DEFAULT_QWEN3_VL,
                                      DEFAULT_QWEN_IMAGE)
from ..core.pipeline.run import REFERENCE_MODES, RunSettings, merge_results, release_memory, run_identities
from ..core.residual import model_card as cards
from ..core.residual.injection import parse_alphas
from ..core.runtime.progress import tqdm_progress
from ..training.loop import LoopConfig
from ..training.pipeline import TrainConfig, run_training
from .common_args import (add_crop_arguments, add_generation_arguments, add_head_training_arguments,
                          add_system_arguments, crop_settings, finite_float)
from .fanout import add_fanout_arguments

DEFAULT_OUT = "outputs"


def run_head(out_dir: Path, train: bool) -> Path:
    """The head of the run in OUT: where --train writes it, else the one there (an older run's
    linear_head.safetensors too)."""
    return cards.head_path(out_dir) if train else (cards.find_head(out_dir) or cards.head_path(out_dir))


def add_arguments(p: argparse.ArgumentParser) -> None:
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
                                                        "OUT/checkpoints/<OUT name>_head.safetensors")
    g.add_argument("--head", default=None, help="an existing head file to use instead (default: "
                                                "OUT/checkpoints/<OUT name>_head.safetensors)")
    add_head_training_arguments(g)
    g.add_argument("--overwrite", action="store_true", help="with --train: replace a head already in OUT")
    g.add_argument("--val-fraction", type=finite_float, default=0.0,
                   help="with --train: share of identities held out of training for validation (default: 0 = train "
                        "on every identity the sweep draws)")
    add_crop_arguments(g)
    g = p.add_argument_group("inference")
    add_generation_arguments(g, DEFAULT_ALPHAS)
    g.add_argument("--references", choices=REFERENCE_MODES, default="off",
                   help="compare: also pass each identity's photos to Qwen-Image 2.1 as its own reference images "
                        "and add grid rows for the same seeds: references only, head only (per α), both (per α). "
                        "Qwen-Image 2.1 only (default: off)")
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
    """A sweep: which identities, where to, and the run settings shared by all of them."""

    seed_dirs: list[Path]
    out_dir: Path
    settings: RunSettings


def config_from_args(args) -> SweepConfig:
    if not args.seed_dirs and not args.seed_dirs_file:
        raise UserInputError("--seed-dirs is required: pass DIR[,DIR...] (globs allowed) or --seed-dirs-file.")
    alphas, seeds = parse_alphas(args.alphas), parse_seeds(args.gen_seeds)
    check_size(args.width, args.height)
    if args.steps < 1:
        raise UserInputError(f"--steps must be at least 1 (got {args.steps}).")
    if args.max_batch < 1:
        raise UserInputError(f"--max-batch must be at least 1 (got {args.max_batch}).")
    if args.train and args.head:
        raise UserInputError("--train writes OUT/checkpoints/<OUT name>_head.safetensors; do not also pass --head.")
    if not args.base_prompt.strip():
        raise UserInputError("--base-prompt is empty.")
    out_dir = Path(args.out_dir)
    settings = RunSettings(
        head=Path(args.head) if args.head else run_head(out_dir, args.train), alphas=alphas, seeds=seeds, steps=args.steps,
        guidance=args.guidance, height=args.height, width=args.width, max_batch=args.max_batch, fast=args.fast,
        offload=args.offload, fp8_storage=args.fp8_storage, strength_mode=args.strength_mode,
        base_prompt=args.base_prompt, negative_prompt=args.negative_prompt, qwen3_vl_model=args.qwen3_vl_model,
        qwen_image_model=args.qwen_image_model, single_view=args.single_view, device=args.device, dtype=args.dtype,
        hf_token=args.hf_token, cache_dir=args.cache_dir, references=args.references)
    return SweepConfig(parse_seed_dir_args(args.seed_dirs, args.seed_dirs_file), out_dir, settings)


def train_first(cfg: SweepConfig, epochs: int, batch_size: int, lr: float, target: str, tokens: int,
                overwrite: bool, say: Callable[[str], None] = print, val_fraction: float = 0.0,
                feature_settings: dict | None = None) -> dict:
    """--train: the training pipeline of `qwen-identity train`, writing OUT/checkpoints/<OUT name>_head.safetensors.
    By default on every identity the sweep draws (`val_fraction` 0): the head's metadata and every grid's
    meta.json name the identities it was trained on. `feature_settings`: FeatureSettings fields (the crop)."""
    s = cfg.settings
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, as `train` sets it
    loop = LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr)
    tcfg = TrainConfig(seed_dirs=cfg.seed_dirs, out_dir=cfg.out_dir, loop=loop, qwen3_vl_model=s.qwen3_vl_model,
                       qwen_image_model=s.qwen_image_model, base_prompt=s.base_prompt, target=target,
                       tokens=tokens, single_view=s.single_view, val_fraction=val_fraction, device=s.device,
                       dtype=s.dtype, hf_token=s.hf_token, cache_dir=s.cache_dir, overwrite=overwrite,
                       distributed="off", feature_settings=dict(feature_settings or {}))
    metrics = run_training(tcfg, say=say,
                           progress=lambda name: tqdm_progress(name, unit="step" if name == "training" else "item"))
    release_memory()
    return metrics


def run_sweep(cfg: SweepConfig, say: Callable[[str], None] = print,
              write_dir: Path | None = None) -> list[tuple[Path, Path]]:
    """Every identity through `core.pipeline.run_identities`, then `merge_results`; [(grid png, meta json)].
    `write_dir`: a fan-out chunk's stage (generations/ goes there; cli/fanout.py merges it into OUT)."""
    seed_dirs = load_seed_dirs(cfg.seed_dirs, single_view=cfg.settings.single_view)
    results = run_identities(seed_dirs, cfg.settings, cfg.out_dir, say=say, write_dir=write_dir)
    merge_results(write_dir or cfg.out_dir, results, cfg.settings)
    return [(Path(r.grid), Path(r.meta)) for r in results]


def combine_run_meta(out_dir: Path) -> Callable[[list[Path], Path], None]:
    """Combiner of the chunks' generations/meta.json (core/fanout.py): one run index, as `merge_results` writes it
    in one process: the shared run settings once, every identity (sorted) with its files' paths in OUT."""
    import json

    gen_dir = out_dir / "generations"

    def combine(copies: list[Path], tmp: Path) -> None:
        docs = [json.loads(c.read_text(encoding="utf-8")) for c in copies]
        for c, d in zip(copies, docs):
            if d["run"] != docs[0]["run"]:
                raise UserInputError(f"{c} was made with other settings than {copies[0]}: rerun every chunk with the "
                                     "same arguments.")
        identities = []
        for d in docs:
            for r in d["identities"]:
                identities.append(dict(r, grid=str(gen_dir / Path(r["grid"]).name),
                                       meta=str(gen_dir / Path(r["meta"]).name)))
        merged = dict(docs[0], identities=sorted(identities, key=lambda r: r["identity"]))
        tmp.write_text(json.dumps(merged, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")

    return combine


def run(args) -> int:
    from .fanout import plan, run_fanned

    cfg = config_from_args(args)
    if args.train and not 0.0 <= args.val_fraction < 1.0:
        raise UserInputError(f"--val-fraction must be in [0, 1) (got {args.val_fraction}).")
    t0 = time.perf_counter()
    fan = plan(args)
    if fan is not None:   # one chunk of the identities per process, merged into OUT (cli/fanout.py)
        if args.train and (fan.rank != 0 or fan.wait_for_others):
            raise UserInputError("--train runs once, with --chunk 0/N, before the other chunks (they then use "
                                 "OUT/checkpoints/<OUT name>_head.safetensors); under accelerate launch train the head "
                                 "first (`qwen-identity train` or `sweep --train` in one process), then fan out.")
        if args.train:   # chunk 0 trains into OUT (as one process would), then runs its chunk
            with OutDirLock(cfg.out_dir, allow_nested=True):
                train_first(cfg, args.epochs, args.batch_size, args.lr, args.target, args.tokens, args.overwrite,
                            val_fraction=args.val_fraction, feature_settings=crop_settings(args))
        return run_fanned(args, "sweep", cfg.seed_dirs, cfg.out_dir,
                          lambda subset, stage: run_sweep(SweepConfig(subset, cfg.out_dir, cfg.settings),
                                                          write_dir=stage),
                          combiners={"generations/meta.json": combine_run_meta(cfg.out_dir)}, the_plan=fan)
    with OutDirLock(cfg.out_dir, allow_nested=True):  # training and sampling are one writer: nobody slips in between
        if args.train:
            train_first(cfg, args.epochs, args.batch_size, args.lr, args.target, args.tokens, args.overwrite,
                        val_fraction=args.val_fraction, feature_settings=crop_settings(args))
        written = run_sweep(cfg)
    print(f"done in {time.perf_counter() - t0:.1f}s: {len(written)} grid(s) in {cfg.out_dir / 'generations'}")
    return 0
