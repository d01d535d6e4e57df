"""ComfyUI's CONDITIONING layout, as plain Python data (no ComfyUI import needed).

`[[embeds [B, S, H], {"pooled_output": None, "attention_mask": mask [B, S]}], ...]` - the attention
mask is present only when some prompt is padded, as ComfyUI's Qwen-Image text encoder makes it.
Entries may carry ComfyUI's own `start_percent` / `end_percent` keys (a step window).
"""

from __future__ import annotations

import torch

from ..generation.prompt_encoding import PromptEmbeds


def make_conditioning(prompt: PromptEmbeds) -> list:
    extra = {"pooled_output": None}
    if not bool(prompt.mask.bool().all()):
        extra["attention_mask"] = prompt.mask
    return [[prompt.embeds, extra]]


def entry_mask(embeds: torch.Tensor, extra: dict) -> torch.Tensor:
    """The entry's [B, S] mask (all ones when ComfyUI left it out because nothing is padded)."""
    mask = extra.get("attention_mask")
    if mask is None:
        return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return mask.to(device=embeds.device).reshape(embeds.shape[0], -1).to(torch.long)
