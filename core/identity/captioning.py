"""Qwen3-VL writes a person's description from their photos, with one fixed instruction.

Used by the `caption` training target when a seed directory has no `caption.txt`. Decoding is greedy
(deterministic), newline tokens are forbidden (a description is one line inside a prompt), and the
reply is cleaned to one line. An empty reply is retried once with blank and special tokens forbidden
and at least 4 new tokens; still empty is an error asking for a caption.txt. The instruction asks for what Qwen-Image can draw and what identifies
a person; it is fixed so that heads trained on generated captions are comparable.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image

from ..errors import UserInputError

CAPTION_INSTRUCTION = (
    "These photos all show the same person. Describe this person in one sentence for an image generator: "
    "apparent age, gender, face shape, skin tone, eye colour, hair (colour, length, style), facial hair, "
    "glasses or other distinctive features. Do not describe the background, the lighting or the clothing. "
    "Answer with the description only."
)
MAX_CAPTION_PHOTOS = 4       # more views add little to a description and cost image tokens
DEFAULT_MAX_NEW_TOKENS = 77  # one sentence


def clean_caption(text: str) -> str:
    """One line, collapsed whitespace, no surrounding quotes."""
    return " ".join(str(text).split()).strip().strip('"').strip()


_BANNED: dict[tuple[int, bool], list[list[int]]] = {}


def _banned_token_ids(tokenizer, strict: bool = False) -> list[list[int]]:
    """Tokens containing a newline; with `strict` also whitespace-only and special tokens (except end of turn)."""
    key = (id(tokenizer), strict)
    if key not in _BANNED:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
        _BANNED[key] = [[i] for i, s in enumerate(texts)
                        if "\n" in s or "\r" in s or (strict and (not s.strip() or i in special))]
    return _BANNED[key]


@torch.no_grad()
def write_caption(model, processor, photos: Sequence[Image.Image], instruction: str = CAPTION_INSTRUCTION,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_photos: int = MAX_CAPTION_PHOTOS,
                  name: str = "identity") -> str:
    """Generate a one-line description of the person in `photos` (greedy decoding)."""
    photos = list(photos)[:max_photos]
    if not photos:
        raise UserInputError(f"{name}: no photos to describe.")
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in photos),
                                             {"type": "text", "text": instruction}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    device = next(model.parameters()).device
    inputs = processor(text=[text], images=photos, return_tensors="pt").to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    tokenizer = getattr(processor, "tokenizer", processor)
    caption = ""
    # A second, stricter pass only when the first reply is empty (a degenerate model that answers with
    # special or blank tokens); a real model's first reply is kept as it is.
    for strict in (False, True):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=min(4, max_new_tokens) if strict else None,
                             bad_words_ids=_banned_token_ids(tokenizer, strict) or None,
                             pad_token_id=tokenizer.pad_token_id)
        caption = clean_caption(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        if caption:
            break
    if not caption:
        raise UserInputError(f"Qwen3-VL wrote an empty description for {name}; write one yourself in its "
                             "caption.txt (one line), or use --target zero.")
    return caption


def caption_many(model, processor, groups: Sequence[tuple[str, Sequence[Image.Image]]],
                 progress: Callable[[int, int], None] | None = None, **kw) -> list[str]:
    """write_caption for several (name, photos) groups, reporting progress."""
    out = []
    for i, (name, photos) in enumerate(groups):
        out.append(write_caption(model, processor, photos, name=name, **kw))
        if progress:
            progress(i + 1, len(groups))
    return out
