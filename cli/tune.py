"""Tune a personal identity head on one person's photos: PHOTO_DIR (3 to 20 photos of ONE person) -> a head
file that LoadResidualHead, InjectResidual, `sweep` and `eval` take like any other head.

The head learns through the frozen Qwen-Image transformer (the denoise objective) what the person's photos
share; with 3 or more photos one is held out and the head of the step with the lowest held-out denoising
loss is kept. Start from a universal head with --init-head for a faster start. Writes HEAD and, beside it,
its model card HEAD-stem.md, HEAD-stem.metrics.json and HEAD-stem.loss.png (see docs/personalize.md).
Ctrl-C stops after the current step and keeps the best head so far.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from pathlib import Path

from ..core.pipeline.defaults import DEFAULT_QWEN3_VL, DEFAULT_QWEN_IMAGE
from ..core.runtime.progress import tqdm_progress
from .common_args import add_crop_arguments, add_system_arguments, crop_settings, finite_float


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..core.tuning import SCHEDULES
    from ..training.personal import DEFAULT_FACE_WEIGHT, DEFAULT_PROMPT, DEFAULT_RESOLUTION

    p.add_argument("photo_dir", metavar="PHOTO_DIR", help="folder with the person's photos (jpg, png, webp, ...)")
    p.add_argument("--out", required=True, metavar="HEAD.safetensors", help="the head file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    g = p.add_argument_group("tuning")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    g.add_argument("--lr", type=finite_float, default=1e-3, help="Adam learning rate after warm-up (default: 1e-3)")
    g.add_argument("--schedule", choices=SCHEDULES, default="warmup_cosine",
                   help="learning-rate schedule: warmup_cosine (5%% linear warm-up, then cosine to 0; default) or "
                        "constant")
    g.add_argument("--init-head", default=None, metavar="HEAD.safetensors",
                   help="start from this head (a universal head of the same model family and Qwen3-VL) instead of zero")
    g.add_argument("--pull-back", type=finite_float, default=0.0,
                   help="with --init-head: weight of a penalty keeping the residual near the init head's "
                        "(relative squared distance; default: 0 = off)")
    g.add_argument("--tokens", type=int, default=None,
                   help="K identity slots of the head (default: the init head's, else 1)")
    g.add_argument("--alpha-train", type=finite_float, default=1.0,
                   help="strength the residual is added with while tuning (default: 1.0)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="photos per step, all of one aspect bucket (default: 1)")
    g.add_argument("--resolution", default=DEFAULT_RESOLUTION, metavar="WxH",
                   help=f"pixel budget of the training images (default: {DEFAULT_RESOLUTION}); each photo is trained at "
                        "the aspect nearest its own with about W*H pixels, not squashed")
    g.add_argument("--allow-upscale", action="store_true",
                   help="accept photos smaller than their training size (upscaled: blurrier); default: refuse")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help=f'the prompt the person is tuned under (default: "{DEFAULT_PROMPT}")')
    g.add_argument("--face-weight", type=finite_float, default=DEFAULT_FACE_WEIGHT,
                   help=f"loss weight inside the face box found by dlib (1 outside; default: {DEFAULT_FACE_WEIGHT}; "
                        "0 = off); a photo without a face trains unweighted, with a warning")
    g.add_argument("--face-detector", choices=("hog", "cnn"), default="hog", help="dlib face detector (default: hog)")
    g.add_argument("--held-out", default="auto",
                   help="auto (default: one photo is held out when there are 3 or more), none, or a photo's file name")
    g.add_argument("--eval-every", type=int, default=0,
                   help="steps between held-out evaluations (default: 0 = steps/20)")
    g.add_argument("--impostor-dir", default=None, metavar="DIR",
                   help="photos of other people: report how much the head helps them too (the impostor gain)")
    g.add_argument("--work-dir", default=None,
                   help="caches of features, latents and the prompt (default: ~/.cache/qwen-identity/tune, or under $XDG_CACHE_HOME)")
    g = p.add_argument_group("models")
    g.add_argument("--qwen3-vl-model", default=DEFAULT_QWEN3_VL,
                   help=f"Qwen3-VL folder, models-folder name or hub id for the features (default: {DEFAULT_QWEN3_VL})")
    g.add_argument("--qwen-image-model", default=DEFAULT_QWEN_IMAGE,
                   help=f"diffusers Qwen-Image folder or hub id: VAE, text encoder and transformer (default: {DEFAULT_QWEN_IMAGE})")
    add_crop_arguments(g)
    g = p.add_argument_group("speed and memory")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward: much less memory, about 1.5x slower")
    g.add_argument("--fp8-storage", action="store_true",
                   help="keep the transformer's weights in fp8, computing in --dtype: half the weight memory "
                        "(for 24 GB cards); not with --compile")
    g.add_argument("--compile", action="store_true",
                   help="regional torch.compile of the transformer blocks (CUDA only; the first steps compile)")
    g = p.add_argument_group("system")
    add_system_arguments(g, dtype_note="; the head tunes in fp32")


@contextlib.contextmanager
def stop_on_ctrl_c(say):
    """During tuning, the first Ctrl-C asks the loop to stop after the current step (the best head so far is
    written); a second one aborts at once (nothing is written). Yields the `should_stop` callable."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag.set()
        say("\ninterrupt: stopping after this step and keeping the best head so far (Ctrl-C again to abort)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def run_config(args):
    from ..core.tuning import TuneOptions
    from ..training.personal import PersonalRun
    from ..training.pipeline import TrainConfig

    options = TuneOptions(steps=args.steps, lr=args.lr, schedule=args.schedule, tokens=args.tokens,
                          alpha_train=args.alpha_train, pull_back=args.pull_back, face_weight=args.face_weight,
                          seed=args.seed, held_out=args.held_out, batch_size=args.batch_size,
                          eval_every=args.eval_every)
    train = TrainConfig(seed_dirs=[], out_dir=Path("."), qwen3_vl_model=args.qwen3_vl_model,
                        qwen_image_model=args.qwen_image_model, feature_settings=crop_settings(args),
                        device=args.device, dtype=args.dtype,
                        hf_token=args.hf_token or os.environ.get("HUGGINGFACE_TOKEN"),
                        cache_dir=args.cache_dir or os.environ.get("HF_HUB_CACHE"), distributed="off")
    return PersonalRun(photo_dir=Path(args.photo_dir), out=Path(args.out), options=options, train=train,
                       resolution=args.resolution, prompt=args.prompt,
                       init_head=Path(args.init_head) if args.init_head else None,
                       impostor_dir=Path(args.impostor_dir) if args.impostor_dir else None,
                       allow_upscale=args.allow_upscale, face_detector=args.face_detector,
                       gradient_checkpointing=args.gradient_checkpointing, fp8_storage=args.fp8_storage,
                       compile=args.compile, work_dir=Path(args.work_dir) if args.work_dir else None,
                       overwrite=args.overwrite)


def run(args) -> int:
    import sys

    from ..training.personal import run_personal_tuning, validate

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cfg = run_config(args)
    validate(cfg)
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    bars = lambda name: tqdm_progress(name, unit="step" if name == "tuning" else "item")  # noqa: E731
    with stop_on_ctrl_c(say) as should_stop:
        m = run_personal_tuning(cfg, progress=bars, say=say, should_stop=should_stop)
    held = (f"; held-out loss {m['held_out_loss']:.5g} (prompt alone {m['held_out_loss_none']:.5g}, own gain "
            f"{100 * m['own_gain_relative']:.2f} %) at step {m['best_step']}" if m.get("held_out_loss") is not None
            else "; no held-out photo (fewer than 3 photos)")
    imp = (f"; impostor gain {100 * m['impostor_gain_relative']:.2f} %" if m.get("impostor_gain") is not None else "")
    print(f"head: {cfg.out}\n{m['steps_done']} of {m['steps']} steps{held}{imp}; metrics in {cfg.metrics_path()}")
    if m.get("interrupted"):
        print("interrupted: the best head so far was written.", file=sys.stderr)
        return 130
    return 0
