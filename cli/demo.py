"""The README's main job. With no models given it builds tiny random-weight stand-ins offline, makes
a few synthetic identities and runs every stage of the chain that exists so far, then says exactly
what it ran. Pass --qwen3-vl-model / --qwen-image-model (folders or hub ids) to use real models.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_OUT = "demo_output"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default=DEFAULT_OUT, help=f"where everything is written (default: ./{DEFAULT_OUT})")
    p.add_argument("--qwen3-vl-model", default=None, help="Qwen3-VL folder or hub id (default: tiny offline stand-in)")
    p.add_argument("--qwen-image-model", default=None,
                   help="diffusers Qwen-Image folder or hub id (default: tiny offline stand-in)")
    p.add_argument("--identities", type=int, default=3, help="synthetic identities to make (default: 3)")
    p.add_argument("--base-prompt", default="a portrait photo of a person, studio lighting, 85mm")


def run(args) -> int:
    from ..core.errors import UserInputError
    from ..core.prompt_encoding import encode_prompts, load_text_encoder
    from ..tiny_models import build_tiny_models
    from ..tiny_models.dataset import make_seed_dirs

    if args.identities < 1:
        raise UserInputError("--identities must be at least 1")
    out = Path(args.out_dir)
    t0 = time.time()
    ran: list[str] = []
    stand_in = args.qwen3_vl_model is None or args.qwen_image_model is None
    if stand_in:
        print("No models given: using TINY RANDOM-WEIGHT STAND-INS built offline (their images are noise).\n"
              "For real results pass --qwen3-vl-model Qwen/Qwen3-VL-2B-Instruct --qwen-image-model Qwen/Qwen-Image "
              "(or local folders).")
        tiny = build_tiny_models(out / "tiny_models")
        ran.append(f"built tiny Qwen3-VL and Qwen-Image checkpoints in {out / 'tiny_models'}")
    qwen_image = Path(args.qwen_image_model) if args.qwen_image_model else tiny.qwen_image
    dirs = make_seed_dirs(out / "data", identities=args.identities, views=2)
    ran.append(f"wrote {len(dirs)} synthetic identities (seed_*/photo_view_*.png) in {out / 'data'}")
    text_encoder, tokenizer = load_text_encoder(qwen_image)
    emb = encode_prompts(text_encoder, tokenizer, args.base_prompt)
    ran.append(f"encoded the base prompt with Qwen-Image's text encoder: embeddings {tuple(emb.embeds.shape)}")
    print("\nRan:\n  - " + "\n  - ".join(ran))
    print("Not yet in this version: identity feature extraction, head training, and the alpha x seed sweep "
          "(they arrive with the features, training and sampling issues).")
    print(f"Done in {time.time() - t0:.1f}s; outputs in {out}")
    return 0
