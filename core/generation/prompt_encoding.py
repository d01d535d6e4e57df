"""Qwen-Image prompt encoding with a diffusers text encoder, in the layout ComfyUI uses.

The real work is the model family's (core/families/): for Qwen-Image 1.x diffusers' own
`QwenImagePipeline.encode_prompt` (Qwen-Image's chat template, the 34-token prefix dropped, the last
hidden state, right padding), so embeddings equal what the stock pipeline and ComfyUI's
`CLIPTextEncode` produce. Unlike diffusers, a mask is always returned.

Long prompts are cut to `MAX_PROMPT_TOKENS` = 512 text tokens, as the stock `QwenImagePipeline.__call__`
does by default (its `encode_prompt` alone would keep 1024), so the diffusers path, the training
targets and the stock pipeline see the same text. (ComfyUI's own CLIPTextEncode, used on the native
path, does not cut at 512.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserInputError

MAX_PROMPT_TOKENS = 512  # QwenImagePipeline.__call__'s max_sequence_length default (tests check it)


@dataclass
class PromptEmbeds:
    embeds: torch.Tensor  # [B, S, H]
    mask: torch.Tensor    # [B, S] long, 1 = real token (right-padded)

    @property
    def hidden_size(self) -> int:
        return int(self.embeds.shape[-1])


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: str | list[str], device: torch.device | str | None = None,
                   max_sequence_length: int = MAX_PROMPT_TOKENS) -> PromptEmbeds:
    """Encode prompts exactly as the stock pipeline of the text encoder's model family does (for
    Qwen-Image 1.x diffusers' QwenImagePipeline.__call__; core/families/); always return a mask."""
    from ..families import detect_family

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserInputError("no prompt to encode")
    device = torch.device(device) if device is not None else next(text_encoder.parameters()).device
    family = detect_family(text_encoder, "text encoder")
    return family.encode_prompts(text_encoder, tokenizer, prompts, device, max_sequence_length)


def load_text_encoder(pipeline_dir: str | os.PathLike, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32):
    """(text_encoder, tokenizer or processor) from a diffusers folder, as its model family loads it."""
    from ..families import QWEN_IMAGE_1, detect_family

    root = Path(pipeline_dir)
    try:
        family = detect_family(root, "Qwen-Image folder")
    except UserInputError:
        family = QWEN_IMAGE_1   # its loader says what the folder lacks
    return family.load_text_encoder(root, device, dtype)
