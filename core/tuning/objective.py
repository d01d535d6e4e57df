"""The flow-matching loss through a Denoiser (the model-family contract), per sample.

x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0 (Qwen-Image's rectified flow, as in
core/denoising/flow_matching.py, whose σ sampling and SD3 loss weighting are used as they are); the
Denoiser packs, scales the timestep and calls the transformer. The loss of a sample is the weighted mean
over the latent of (v̂ − v)², with per-position weights from a face map: 1 outside the face, face_weight
inside (a weighted mean, so the weights change where the loss looks, not its scale).
"""

from __future__ import annotations

import torch


def position_weights(face_maps: list[torch.Tensor | None] | None, shape: tuple[int, int], face_weight: float,
                     device) -> torch.Tensor | None:
    """[B, 1, h, w] weights 1 + (face_weight − 1)·map, or None when weighting is off or no photo has a map."""
    if not face_weight or face_maps is None or all(m is None for m in face_maps):
        return None
    h, w = shape
    out = []
    for m in face_maps:
        base = torch.zeros(1, h, w) if m is None else m.float().reshape(1, h, w).clamp(0, 1)
        out.append(1.0 + (face_weight - 1.0) * base)
    return torch.stack(out).to(device)


def denoiser_losses(denoiser, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor,
                    mask: torch.Tensor | None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss [B] float32. x0, noise [B, C, h, w]; sigmas [B]; embeds [B, S, H] (may carry a
    gradient); mask [B, S] or None; weights [B, 1, h, w] or None."""
    s = sigmas.to(device=x0.device, dtype=torch.float32).view(-1, 1, 1, 1)
    x0, eps = x0.float(), noise.float()
    x_t = (1.0 - s) * x0 + s * eps
    v = denoiser(x_t, sigmas.to(device=x0.device, dtype=torch.float32), embeds, mask).float()
    err = (v - (eps - x0)).pow(2).mean(1, keepdim=True)          # [B, 1, h, w]
    if weights is None:
        return err.flatten(1).mean(1)
    w = weights.to(err)
    return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)
