"""Qwen-Image prompt encoding with a diffusers text encoder, in the layout ComfyUI uses.

The real work is diffusers' own `QwenImagePipeline.encode_prompt` (Qwen-Image's chat template, the
34-token prefix dropped, the last hidden state, right padding), so embeddings equal what the stock
pipeline and ComfyUI's `CLIPTextEncode` produce. Unlike diffusers, a mask is always returned.

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


def _encoder_pipeline(text_encoder, tokenizer):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None)


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: str | list[str], device: torch.device | str | None = None,
                   max_sequence_length: int = MAX_PROMPT_TOKENS) -> PromptEmbeds:
    """Encode prompts exactly as diffusers' QwenImagePipeline.__call__ does; always return a mask."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserInputError("no prompt to encode")
    device = torch.device(device) if device is not None else next(text_encoder.parameters()).device
    pipe = _encoder_pipeline(text_encoder, tokenizer)
    embeds, mask = pipe._get_qwen_prompt_embeds(prompts, device)
    embeds, mask = embeds[:, :max_sequence_length], mask[:, :max_sequence_length]
    return PromptEmbeds(embeds=embeds, mask=mask.to(torch.long))


def load_text_encoder(pipeline_dir: str | os.PathLike, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32):
    """(text_encoder, tokenizer) from a diffusers Qwen-Image folder, by the classes model_index.json names."""
    import transformers

    from ..runtime.model_sources import read_config

    root = Path(pipeline_dir)
    index = read_config(root)
    try:
        te_cls = getattr(transformers, index["text_encoder"][1])
        tok_cls = getattr(transformers, index["tokenizer"][1])
    except (KeyError, TypeError, AttributeError, IndexError):
        raise UserInputError(f"{root} is not a Qwen-Image diffusers folder: model_index.json names no usable "
                             "text_encoder/tokenizer (expected Qwen2_5_VLForConditionalGeneration / Qwen2Tokenizer).") from None
    try:
        text_encoder = te_cls.from_pretrained(root / "text_encoder", dtype=dtype,
                                              use_safetensors=True).to(device).eval()  # no pickles
        tokenizer = tok_cls.from_pretrained(root / "tokenizer")
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserInputError(f"cannot load the Qwen-Image text encoder from {root} ({type(e).__name__}: {first[:300]}); "
                             "the folder is incomplete or damaged (its weights must be safetensors).") from None
    return text_encoder, tokenizer
