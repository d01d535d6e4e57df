"""True CFG as diffusers' `QwenImagePipeline` does it: the guided prediction rescaled, token by token, to the
norm of the conditional one.

    combined = uncond + scale * (cond - uncond)
    out      = combined * ‖cond‖ / ‖combined‖          (norms over each token's features)

Plain CFG at Qwen-Image's usual scale 4.5 inflates the velocity (its norm grows with the scale); the rescale
keeps each token's magnitude where the conditional prediction put it and only turns its direction. The
diffusers path (`core/generation/sampling.py`) applies `true_cfg_tokens` to its packed [B, L, C·4]
predictions. ComfyUI's latents are spatial ([B, C, (T,) H, W]) with Qwen-Image's tokens being 2x2 patches of
all C channels, so `true_cfg_spatial` takes the norm over exactly the features diffusers packs into a token;
the node layer hands it to ComfyUI's sampler CFG hook. The norm rescale is scale invariant, so it gives the
same result on velocities or on ComfyUI's `x - denoised` (σ times the velocity).
"""

from __future__ import annotations

import torch

PATCH = 2   # Qwen-Image packs 2x2 latent pixels of every channel into one token


def true_cfg_tokens(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """diffusers' formula on token-major predictions [..., L, F] (norm over the last dimension)."""
    combined = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / combined_norm)


def _token_norm(x: torch.Tensor, patch: int) -> torch.Tensor:
    """‖token‖ for every 2x2 patch of a [B, C, (T,) H, W] tensor, broadcast back to its shape."""
    *lead, h, w = x.shape
    if h % patch or w % patch:   # ComfyUI pads to the patch size; sizes here are multiples of 16 anyway
        raise ValueError(f"latent size {h}x{w} is not a multiple of the {patch}x{patch} patch")
    b, c = lead[0], lead[1]
    mid = lead[2:]
    v = x.reshape(b, c, *mid, h // patch, patch, w // patch, patch)
    sq = v.float().pow(2)
    dims = [1, 2 + len(mid) + 1, 2 + len(mid) + 3]            # channels and both patch axes
    norm = sq.sum(dim=dims, keepdim=True).sqrt()
    return norm.expand_as(v).reshape(x.shape)


def true_cfg_spatial(cond: torch.Tensor, uncond: torch.Tensor, scale: float, patch: int = PATCH) -> torch.Tensor:
    """`true_cfg_tokens` on spatial latents [B, C, (T,) H, W]: a token is one patch x patch square of all channels."""
    combined = uncond + scale * (cond - uncond)
    ratio = _token_norm(cond, patch) / _token_norm(combined, patch)
    return (combined.float() * ratio).to(combined.dtype)
