"""Train a residual head: Qwen3-VL features of each person's photos -> a residual on Qwen-Image's prompt
embeddings, by one of three objectives (--objective; see docs/denoise-training.md):
- caption: regress onto the caption's embedding difference (learns what a description can say);
- zero: the POC's placeholder (a zero-initialised head with zero targets gets zero gradients: trains nothing);
- denoise: through the frozen Qwen-Image transformer's flow-matching loss (can learn a face). Writes OUT/checkpoints/<OUT name>_head.safetensors and its model card (load it with the
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
from ..core.residual.model_card import card_path, head_path
from ..training.loop import LoopConfig
from ..training.pipeline import TrainConfig, run_training
from .common_args import (add_crop_arguments, add_head_training_arguments, add_system_arguments, crop_settings,
                          finite_float)

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
    add_denoise_arguments(p)
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
    add_crop_arguments(g)
    g = p.add_argument_group("system")
    add_system_arguments(g, dtype_note="; the head trains in fp32")


OBJECTIVE_HELP = (
    "what the head learns. caption (default): regress its residual onto the embedding difference between the "
    "person's caption inside the base prompt and the base prompt - it can learn only what a caption can say (hair, "
    "glasses, age), never a face; cheap (text encoder only). zero: the POC's placeholder - a zero-initialised head "
    "with zero targets gets zero gradients, so it trains nothing (a machinery check). denoise: train through the "
    "frozen Qwen-Image transformer's flow-matching loss on the person's other photos - can learn what the "
    "generator needs to draw this person (identity), at the cost of a transformer forward+backward per photo "
    "(a GPU). Overrides --target.")


def add_denoise_arguments(p: argparse.ArgumentParser) -> None:
    from ..core.denoising.flow_matching import WEIGHTINGS
    from ..training.denoise_pipeline import ASPECT_BUCKETS, CAPTION_SOURCES, DEFAULT_TEMPLATE, SINGLE_PHOTO

    g = p.add_argument_group("objective")
    g.add_argument("--objective", choices=("caption", "zero", "denoise"), default=None, help=OBJECTIVE_HELP)
    g = p.add_argument_group("denoise objective (--objective denoise; docs/denoise-training.md)")
    g.add_argument("--train-resolution", default="512x512",
                   help="WIDTHxHEIGHT (multiples of 16) photos are scaled and centre-cropped to (default: 512x512)")
    g.add_argument("--aspect-buckets", choices=ASPECT_BUCKETS, default="on",
                   help="on (default): each photo trains at the aspect bucket nearest its shape, with about the pixel count "
                        "of --train-resolution (batches hold one bucket); off: every photo scaled and centre-cropped to "
                        "--train-resolution")
    g.add_argument("--allow-upscale", action="store_true",
                   help="accept photos smaller than --train-resolution (upscaled: blurrier targets); default: refuse")
    g.add_argument("--caption-source", choices=CAPTION_SOURCES, default="template",
                   help="the prompt each photo is conditioned on: template (--caption-template, default) or caption "
                        "(caption.txt, else a Qwen3-VL caption)")
    g.add_argument("--caption-template", default=DEFAULT_TEMPLATE, help=f'default: "{DEFAULT_TEMPLATE}"')
    g.add_argument("--alpha-train", type=finite_float, default=1.0,
                   help="α the residual is added with during training (default: 1.0)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches of --batch-size per optimizer step (default: 1)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward: much less memory (41 vs 73 GiB), ~1.5x slower "
                        "(issue 12's H200 probe at 768x512, batch 4)")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="logit_normal",
                   help="σ density / loss weighting, as diffusers' Qwen-Image training (default: logit_normal)")
    g.add_argument("--logit-mean", type=finite_float, default=0.0, help="logit_normal mean (default: 0)")
    g.add_argument("--logit-std", type=finite_float, default=1.0, help="logit_normal std (default: 1)")
    g.add_argument("--mode-scale", type=finite_float, default=1.29, help="'mode' density scale (default: 1.29)")
    g.add_argument("--shift", type=finite_float, default=1.0,
                   help="static σ shift s: σ' = sσ/(1+(s-1)σ); > 1 favours noisier steps (default: 1 = none)")
    g.add_argument("--face-weight", type=finite_float, default=0.0,
                   help="weight of latent tokens inside the photo's dlib face box (others 1); 0 = off (default). "
                        "A photo without a detected face is an error when on")
    g.add_argument("--face-detector", choices=("hog", "cnn"), default="hog", help="dlib face detector (default: hog)")
    g.add_argument("--reg-weight", type=finite_float, default=0.0,
                   help="weight of the residual magnitude regulariser mean(R^2) (default: 0)")
    g.add_argument("--single-photo", choices=SINGLE_PHOTO, default="refuse",
                   help="a person with one photo: refuse (default) or flip (the mirrored photo is the second view)")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="also checkpoint every N optimizer steps inside an epoch (default: 0 = at epoch ends)")
    g.add_argument("--gain-pairs", type=int, default=4,
                   help="fixed (σ, ε) pairs per held-out photo for the held-out denoising gain (default: 4)")
    g.add_argument("--compile", action="store_true",
                   help="regional torch.compile of the transformer blocks (CUDA only; the first two steps compile, ~20 s on an "
                        "H200): 768x512 batch 10 on an H200 went from 7.7 to 10.5 samples/s (bench/RESULTS.md)")
    g.add_argument("--offload", choices=("none", "model_cpu_offload", "group", "sequential"), default="none",
                   help="refused with --objective denoise (backpropagation through offloading is not verified)")
    g.add_argument("--fp8-storage", action="store_true",
                   help="keep the transformer's weights in fp8 (diffusers layerwise casting), computing in --dtype: "
                        "half the weight memory (for 24 GB cards), gradients within ~6-8 %% of bf16 storage; not with --compile")


DENOISE_ONLY = ("train_resolution", "allow_upscale", "caption_source", "caption_template", "alpha_train", "grad_accum",
                "gradient_checkpointing", "weighting", "logit_mean", "logit_std", "mode_scale", "shift", "face_weight",
                "face_detector", "reg_weight", "single_photo", "checkpoint_every", "gain_pairs", "offload",
                "fp8_storage", "compile")


def objective_of(args) -> str:
    return args.objective or args.target


def check_objective_flags(args, parser_defaults: dict) -> None:
    """Flags of the denoise objective given with another objective are an error, not silently ignored."""
    from ..core.errors import UserInputError

    if objective_of(args) == "denoise":
        return
    given = [f"--{d.replace('_', '-')}" for d in DENOISE_ONLY if getattr(args, d, None) != parser_defaults.get(d)]
    if given:
        raise UserInputError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --objective denoise only "
                             f"(this run trains --objective {objective_of(args)}): add --objective denoise or drop "
                             f"{'it' if len(given) == 1 else 'them'}.")


def denoise_options_from_args(args):
    from ..training.denoise import DenoiseLoopConfig
    from ..training.denoise_pipeline import DenoiseOptions

    loop = DenoiseLoopConfig(epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                             seed=args.seed, alpha_train=args.alpha_train, weighting=args.weighting,
                             logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale,
                             shift=args.shift, reg_weight=args.reg_weight, checkpoint_every=args.checkpoint_every)
    opts = DenoiseOptions(loop=loop, resolution=args.train_resolution, aspect_buckets=args.aspect_buckets,
                          caption_source=args.caption_source,
                          template=args.caption_template, face_weight=args.face_weight,
                          face_detector=args.face_detector, single_photo=args.single_photo,
                          allow_upscale=args.allow_upscale, gradient_checkpointing=args.gradient_checkpointing,
                          gain_pairs=args.gain_pairs, offload=args.offload, fp8_storage=args.fp8_storage,
                          compile=args.compile)
    opts.validate()
    return opts


def config_from_args(args):
    if not args.seed_dirs and not args.seed_dirs_file:
        raise UserInputError("no seed directories given: pass --seed-dirs DIR[,DIR...] (globs allowed) or --seed-dirs-file.")
    loop = LoopConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      mse_weight=args.mse_weight, cos_weight=args.cos_weight)
    loop.validate()
    return TrainConfig(seed_dirs=parse_seed_dir_args(args.seed_dirs, args.seed_dirs_file), out_dir=Path(args.out_dir),
                       loop=loop, qwen3_vl_model=args.qwen3_vl_model, qwen_image_model=args.qwen_image_model,
                       base_prompt=args.base_prompt,
                       target=objective_of(args) if objective_of(args) != "denoise" else "caption", tokens=args.tokens,
                       single_view=args.single_view, val_fraction=args.val_fraction,
                       feature_settings={"source": args.feature_source, "layer": args.layer,
                                         "resolution": args.resolution, "max_pixels": args.max_pixels,
                                         **crop_settings(args)},
                       features_file=Path(args.features) if args.features else None,
                       device=args.device, dtype=args.dtype,
                       hf_token=args.hf_token or os.environ.get("HUGGINGFACE_TOKEN"),
                       cache_dir=args.cache_dir or os.environ.get("HF_HUB_CACHE"),
                       resume=args.resume, overwrite=args.overwrite)


def run(args) -> int:
    # deterministic cuBLAS on CUDA (must be set before the first CUDA matmul); harmless elsewhere
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    parser = argparse.ArgumentParser(add_help=False)
    add_denoise_arguments(parser)
    check_objective_flags(args, {a.dest: a.default for a in parser._actions})
    cfg = config_from_args(args)
    bars = lambda name: tqdm_progress(name, unit="step" if name == "training" else "item")  # noqa: E731
    if objective_of(args) == "denoise":
        from ..training.denoise_pipeline import run_denoise_training

        metrics = run_denoise_training(cfg, denoise_options_from_args(args), progress=bars)
        out = Path(cfg.out_dir)
        if metrics:
            g = metrics.get("held_out_gain")
            print(f"head: {head_path(out)} (model card: {card_path(head_path(out))})\ntrain loss {metrics['train_loss']:.6g}"
                  + (f"; held-out identity gain {g['identity_gain']:.4g} (own {g['own_gain']:.4g}, impostor "
                     f"{g['impostor_gain']:.4g})" if g else "") + f"; metrics in {out / 'metrics.json'}")
        return 0
    metrics = run_training(cfg, progress=bars)
    out = Path(cfg.out_dir)
    if metrics:
        val = metrics.get("val_loss")
        print(f"head: {head_path(out)} (model card: {card_path(head_path(out))})\n"
              f"train loss {metrics['train_loss']:.6g}" + (f", validation loss {val:.6g}" if val is not None else "")
              + f"; metrics in {out / 'metrics.json'}, curve in {out / 'loss_curve.png'}")
    return 0
