"""The README's main job, end to end: identities -> Qwen3-VL features -> a trained residual head ->
E + α·R -> Qwen-Image images for every α × seed -> one labelled grid (+ meta JSON) per identity.

With no models given it builds TINY RANDOM-WEIGHT STAND-INS of Qwen3-VL and Qwen-Image offline,
writes a few synthetic identities (with captions), trains a head for a moment (3 epochs, lr 1e-2)
and runs the POC's α × seed sweep at 64x64 px with 4 steps, so it finishes in seconds on a CPU; the
images are noise. Give both --qwen3-vl-model and --qwen-image-model (folders or hub ids) to run for
real with the POC's defaults (512x768 width x height, 28 steps, true CFG 4.5); add --seed-dirs for your own photos.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..core.errors import UserInputError
from ..core.files.out_dir_lock import OutDirLock
from ..core.generation.sampling import parse_seeds
from ..core.identity.seed_dirs import parse_seed_dir_args
from ..core.pipeline.defaults import DEFAULT_ALPHAS, DEFAULT_BASE_PROMPT
from ..core.pipeline.run import RunSettings
from ..core.residual.injection import parse_alphas
from ..tiny_models.build import FAMILIES as TINY_FAMILIES
from .sweep import SweepConfig, run_head, run_sweep, train_first

DEFAULT_OUT = "demo_output"
TINY = dict(width=64, height=64, steps=4, epochs=3, lr=1e-2, max_batch=16)
REAL = dict(width=512, height=768, steps=28, epochs=3, lr=1e-3, max_batch=4)
CAPTIONS = ["a woman with short red hair and green eyes", "a bearded man with glasses and a blue shirt",
            "an old man with white hair, smiling", "a young woman with long black hair and a hat"]


MAX_IDENTITIES = 100


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default=DEFAULT_OUT, help=f"where everything is written (default: ./{DEFAULT_OUT})")
    p.add_argument("--qwen3-vl-model", default=None, help="Qwen3-VL folder or hub id (default: tiny offline stand-in)")
    p.add_argument("--qwen-image-model", default=None,
                   help="diffusers Qwen-Image folder or hub id (default: tiny offline stand-in)")
    p.add_argument("--identities", type=int, default=3, help="synthetic identities to make, 1..100 (default: 3)")
    p.add_argument("--seed-dirs", default=None, help="your own seed_* folders instead of synthetic identities")
    p.add_argument("--base-prompt", default=DEFAULT_BASE_PROMPT, help=f'default: "{DEFAULT_BASE_PROMPT}"')
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, help=f'default: "{DEFAULT_ALPHAS}"')
    p.add_argument("--gen-seeds", default="1234,5678,9999", help='default: "1234,5678,9999"')
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "mps"), help="default: auto")
    p.add_argument("--family", default="qwen-image", choices=TINY_FAMILIES,
                   help="which Qwen-Image the tiny stand-ins are (default: qwen-image, i.e. 1.x); with real models "
                        "the family is read from --qwen-image-model")


def run(args) -> int:
    if (args.qwen3_vl_model is None) != (args.qwen_image_model is None):
        raise UserInputError("give both --qwen3-vl-model and --qwen-image-model (real models), or neither (tiny "
                             "stand-ins): a real model cannot be mixed with a stand-in.")
    if not 1 <= args.identities <= MAX_IDENTITIES:  # each one is written to disk before any model loads
        raise UserInputError(f"--identities must be between 1 and {MAX_IDENTITIES}, got {args.identities}.")
    alphas, seeds = parse_alphas(args.alphas), parse_seeds(args.gen_seeds)
    out = Path(args.out_dir)
    with OutDirLock(out, allow_nested=True):  # the whole demo (models, data, training, sweep) is one writer
        return _demo(args, out, alphas, seeds)


def _demo(args, out: Path, alphas, seeds) -> int:
    t0 = time.time()
    ran: list[str] = []
    stand_in = args.qwen3_vl_model is None
    if stand_in:
        from ..tiny_models import build_tiny_models

        print("No models given: using TINY RANDOM-WEIGHT STAND-INS of Qwen3-VL and Qwen-Image, built offline.\n"
              "Their images are NOISE; this run only shows that every stage works. For real results pass\n"
              "  --qwen3-vl-model Qwen/Qwen3-VL-2B-Instruct --qwen-image-model Qwen/Qwen-Image\n"
              "(hub ids or local folders), and --seed-dirs with your own photos.")
        tiny = build_tiny_models(out / "tiny_models", family=args.family)
        vl_model, qi_model, sizes = str(tiny.qwen3vl), str(tiny.qwen_image), TINY
        ran.append(f"built tiny Qwen3-VL and Qwen-Image ({args.family}) checkpoints in {out / 'tiny_models'}")
    else:
        vl_model, qi_model, sizes = args.qwen3_vl_model, args.qwen_image_model, REAL
    if args.seed_dirs:
        dirs = parse_seed_dir_args(args.seed_dirs)
        ran.append(f"used {len(dirs)} seed directories from --seed-dirs")
    else:
        from ..tiny_models.dataset import make_seed_dirs

        captions = {i: CAPTIONS[i % len(CAPTIONS)] for i in range(args.identities)}
        dirs = make_seed_dirs(out / "data", identities=args.identities, views=2, captions=captions)
        ran.append(f"wrote {len(dirs)} synthetic identities (seed_*/photo_view_*.png + caption.txt) in {out / 'data'}")
    cfg = SweepConfig(dirs, out, RunSettings(
        head=run_head(out, train=True), alphas=alphas, seeds=seeds, steps=sizes["steps"], height=sizes["height"],
        width=sizes["width"], max_batch=sizes["max_batch"], base_prompt=args.base_prompt, qwen3_vl_model=vl_model,
        qwen_image_model=qi_model, device=args.device, extra_meta={"demo": True, "stand_in_models": stand_in}))
    t = time.time()
    # the synthetic identities are colour patterns without faces: their features use the centre crop
    metrics = train_first(cfg, epochs=sizes["epochs"], batch_size=2, lr=sizes["lr"], target="caption", tokens=1,
                          overwrite=True, feature_settings=None if args.seed_dirs else {"crop": "center"})
    ran.append(f"trained a residual head ({sizes['epochs']} epochs, lr {sizes['lr']:g}, caption target, "
               f"train loss {metrics.get('train_loss', float('nan')):.4g}) in {time.time() - t:.1f}s -> "
               f"{run_head(out, train=True)}")
    t = time.time()
    with OutDirLock(out):
        written = run_sweep(cfg)
    ran.append(f"ran the α × seed sweep (α {args.alphas}; seeds {args.gen_seeds}; {sizes['width']}x{sizes['height']} "
               f"px, {sizes['steps']} steps, true CFG {cfg.settings.guidance}) in {time.time() - t:.1f}s: "
               + ", ".join(str(p) for p, _ in written))
    print("\nRan:\n  - " + "\n  - ".join(ran))
    if stand_in:
        print("Reminder: these were random-weight stand-ins at a tiny size; the grids show noise, not people.")
    print(f"Done in {time.time() - t0:.1f}s; outputs in {out}")
    return 0
