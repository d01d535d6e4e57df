"""What a head learns to output for an identity: the `caption` and `zero` targets, in K slots.

- `caption` (default): the person's description is put inside the base prompt by `compose_prompt`
  (base prompt, a comma and a space, then the description with its whitespace collapsed and a final
  full stop removed). Both prompts are encoded with Qwen-Image's text encoder (`encode_prompts`, the
  exact embeddings the pipeline and ComfyUI use) and brought onto K slots with the length policy:
  target = pool_to_slots(E_caption, K) - pool_to_slots(E_base, K). Adding its expansion to the base
  prompt's embeddings at alpha = 1 therefore moves the pooled base prompt exactly onto the pooled
  caption prompt (the policy's pool(expand(R)) == R), whatever the two prompts' lengths.
- `zero` (the POC's): the target is a zero residual. The head starts at zero, so its output, the loss
  and every gradient are zero: training changes no weight at all (`--help` says so). Useful only for
  checking the machinery, never as an objective.

Padding never enters a target: pooling uses only the tokens the mask marks as real, so every slot of
a target is a valid slot (the loss mask marks them all valid; it exists for slots a future target
may leave empty).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserInputError
from .length_policy import pool_to_slots
from ..generation.prompt_encoding import encode_prompts

TARGET_KINDS = ("caption", "zero")


@dataclass
class Targets:
    residuals: torch.Tensor  # [N, K, H] float32
    mask: torch.Tensor       # [N, K] bool, True = the slot takes part in the loss
    prompts: list[str]       # the prompts whose embeddings were the goal (the base prompt for `zero`)
    text_token_rms: float | None = None  # ρ: mean RMS of the base prompt's valid tokens (InjectResidual's relative mode)


def compose_prompt(base_prompt: str, caption: str) -> str:
    """`"<base prompt>, <caption>"`: the caption's whitespace collapsed and one trailing '.' dropped."""
    caption = " ".join(str(caption).split()).rstrip(".").strip()
    base = str(base_prompt).strip().rstrip(",").rstrip()
    if not caption:
        return base
    return f"{base}, {caption}" if base else caption


@torch.no_grad()
def encode_pooled(text_encoder, tokenizer, prompts: list[str], k: int, batch_size: int = 8) -> torch.Tensor:
    """prompts -> [N, K, H] float32: encoded as Qwen-Image does, pooled onto K slots by the length policy."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = encode_prompts(text_encoder, tokenizer, prompts[i:i + batch_size])
        out.append(pool_to_slots(enc.embeds.float().cpu(), enc.mask.cpu(), k))
    return torch.cat(out)


def caption_targets(text_encoder, tokenizer, base_prompt: str, captions: list[str], k: int) -> Targets:
    """target_i = pool(E(compose(base, caption_i)), K) - pool(E(base), K)."""
    if k < 1:
        raise UserInputError(f"--tokens must be at least 1 (got {k}).")
    if not base_prompt.strip():
        raise UserInputError("the base prompt is empty: pass --base-prompt with the prompt the head will be used with.")
    prompts = [compose_prompt(base_prompt, c) for c in captions]
    with torch.no_grad():
        enc = encode_prompts(text_encoder, tokenizer, [base_prompt])
    embeds, mask = enc.embeds.float().cpu(), enc.mask.cpu()
    base = pool_to_slots(embeds, mask, k)                               # [1, K, H]
    valid = embeds[mask.bool()]                                          # [S_valid, H]
    rho = float(valid.pow(2).mean(-1).sqrt().mean())
    goal = encode_pooled(text_encoder, tokenizer, prompts, k)            # [N, K, H]
    residuals = (goal - base).contiguous()
    return Targets(residuals, torch.ones(residuals.shape[:2], dtype=torch.bool), prompts, text_token_rms=rho)


def zero_targets(n: int, k: int, hidden_size: int, base_prompt: str = "") -> Targets:
    if k < 1:
        raise UserInputError(f"--tokens must be at least 1 (got {k}).")
    return Targets(torch.zeros(n, k, hidden_size), torch.ones(n, k, dtype=torch.bool), [base_prompt] * n)


def text_hidden_size(text_encoder) -> int:
    """H of a Qwen-Image text encoder (3584 for Qwen2.5-VL-7B)."""
    cfg = text_encoder.config
    cfg = getattr(cfg, "text_config", cfg)
    return int(cfg.hidden_size)
