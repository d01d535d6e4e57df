"""The learning claims' runs on the planted world (tests/planted_identity.py), measured once per test
session and shared by tests/test_denoise_identity.py (which asserts the margins) and
tests/test_docs_claims.py (which checks the numbers the docs quote against these).

Per seed (0, 1, 2: the world's patterns, feature map, transformer, people and training order all change):
- `product`: the denoise objective as the product trains it (`training.denoise.train_denoise`: the residual
  from the person's OTHER photos), measured on held-out people with `training.denoise.head_gain`;
- `shuffled`: the same training after the person <-> photo pairs were permuted;
- `random`: a random head with the product head's parameter norms;
- `leaky`: a deliberately leaky variant trained on the photo's OWN features; `leaky_advantage` and
  `product_advantage`: how much each profits from seeing the photo it denoises (`own_photo_advantage`);
- `caption`: the caption objective as the product trains it: targets from the tiny Qwen-Image text
  encoder (`core.residual.training_targets.caption_targets` of the base prompt and each person's caption),
  stacked per photo (`training.pipeline._stack`) and fitted by `training.loop.train_head` with the CLI's
  loss and learning rate; measured the way `eval --denoise-gain` measures a caption head (conditioned on
  the base prompt).
"""

from __future__ import annotations

import torch

from planted_identity import (D, H, PlantedWorld, PlantSettings, random_head_like, own_photo_advantage,
                              train_product_head)

SEEDS = (0, 1, 2)
SETTINGS = PlantSettings(photo=1.0)
TRAIN_PEOPLE, HELD_OUT_PEOPLE, VIEWS = 24, 12, 3
TRAINING = dict(epochs=10, batch_size=12, lr=5e-2)   # the denoise head's training (Adam, 60 steps)
CAPTION_EPOCHS = 20                                  # the README example's --epochs
TEMPLATE = "a photo of a person"                     # the denoise objective's default --caption-template

_RUNS: dict[str, list[dict]] = {}


def _encode(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    from qwen_identity.core.generation.prompt_encoding import encode_prompts

    return encode_prompts(text_encoder, tokenizer, [prompt]).embeds[0].float().detach()


def _gain(head, transformer, data) -> dict:
    from qwen_identity.training.denoise import head_gain

    g = head_gain(head, transformer, data, 1.0)
    out = dict(g["overall"])
    out["people_with_positive_identity_gain"] = sum(p["identity_gain"] > 0 for p in g["per_person"].values())
    return out


def _caption_arm(seed: int, world, transformer, train, held, text_encoder, tokenizer) -> dict:
    from qwen_identity.core.pipeline.defaults import DEFAULT_BASE_PROMPT
    from qwen_identity.core.residual.head import ResidualHead
    from qwen_identity.core.residual.training_targets import caption_targets
    from qwen_identity.training.loop import LoopConfig, evaluate, train_head
    from qwen_identity.training.pipeline import _stack

    def stacked(cohort):
        t = caption_targets(text_encoder, tokenizer, DEFAULT_BASE_PROMPT, cohort.captions(), 1)
        return _stack(list(range(len(cohort.features))), cohort.features, t)

    tr_data, val_data = stacked(train), stacked(held)
    cfg = LoopConfig(epochs=CAPTION_EPOCHS, seed=seed)   # CLI defaults otherwise: batch 2, lr 1e-3, MSE + cosine
    head = ResidualHead(D, 1, H)
    hist = train_head(head, tr_data, val_data, cfg)
    base = _encode(text_encoder, tokenizer, DEFAULT_BASE_PROMPT)
    return {**_gain(head, transformer, held.data(embeds=base)),
            "val_loss": hist.val_loss[-1], "val_loss_untrained": evaluate(ResidualHead(D, 1, H), val_data, cfg, "cpu"),
            "captions": len(set(train.captions()) | set(held.captions()))}


def run_seed(seed: int, text_encoder, tokenizer) -> dict:
    world = PlantedWorld(seed, SETTINGS, embeds=_encode(text_encoder, tokenizer, TEMPLATE))
    transformer = world.transformer()
    train, held = world.people(TRAIN_PEOPLE, VIEWS, seed=1), world.people(HELD_OUT_PEOPLE, VIEWS, seed=2)
    held_data = held.data()
    product = train_product_head(train.data(), transformer, seed, **TRAINING)
    shuffled = train_product_head(train.shuffled_data(seed), transformer, seed, **TRAINING)
    leaky = train_product_head(train.leaky_data(), transformer, seed, **TRAINING)
    return {"seed": seed,
            "product": _gain(product, transformer, held_data),
            "shuffled": _gain(shuffled, transformer, held_data),
            "random": _gain(random_head_like(product, seed), transformer, held_data),
            "leaky_advantage": own_photo_advantage(leaky, transformer, held_data),
            "product_advantage": own_photo_advantage(product, transformer, held_data),
            "caption": _caption_arm(seed, world, transformer, train, held, text_encoder, tokenizer)}


def measured(text_encoder, tokenizer) -> list[dict]:
    """The runs of every seed (computed on the first call of the session, then reused)."""
    if "runs" not in _RUNS:
        n = torch.get_num_threads()
        torch.set_num_threads(1)   # the tiny steps are too small for threads
        try:
            _RUNS["runs"] = [run_seed(s, text_encoder, tokenizer) for s in SEEDS]
        finally:
            torch.set_num_threads(n)
    return _RUNS["runs"]
