"""One flow-matching step as Qwen-Image itself is trained, with gradients only into the conditioning.

The recipe is diffusers' `examples/dreambooth/train_dreambooth_lora_qwen_image.py` (rectified flow):
- σ per sample from a timestep density (`compute_density_for_timestep_sampling`: logit-normal by
  default, or "mode", or uniform), read off the scheduler's 1000-entry training table
  (σ_i = (1000 - i) / 1000 for Qwen-Image's config: shift 1.0, dynamic shifting applied only at
  inference), optionally shifted (`shift` > 1 moves σ towards noise, as SD3's static shift does);
- x_t = (1 - σ)·x0 + σ·ε, target velocity v = ε - x0, the transformer is called with timestep σ
  (the pipeline passes t / 1000 = σ; the model scales by 1000 itself) on packed latents
  (2x2 patches -> tokens, `QwenImagePipeline._pack_latents`) with `img_shapes` (how a model family packs
  and calls its transformer is its adapter's business: core/families/);
- loss = mean over the latent of (prediction - v)², times the SD3 loss weighting of σ
  (`compute_loss_weighting_for_sd3`: "none", "sigma_sqrt" or "cosmap"; 1 for the densities).

What differs from LoRA training: the transformer is frozen (requires_grad False, eval mode), so the
only leaf that needs a gradient is the conditioning (prompt embeddings E + α·R, R from the head);
backward computes input gradients through every block and no weight gradients. Optional gradient
checkpointing (diffusers' own per-block checkpointing) trades a recompute of the forward for memory.
`token_weights` weight the latent tokens (e.g. a face box mapped onto the packed grid, PhotoMaker's
masked loss); the loss is their weighted mean, so the weights' scale does not change the loss scale.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# Qwen-Image 1.x's 2x2 packing, importable here as before (the 1.x family adapter owns it)
from ..families.qwen_image_1 import pack_latents, unpack_latents  # noqa: F401

WEIGHTINGS = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none")
NUM_TRAIN_TIMESTEPS = 1000


def training_sigmas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The scheduler's training table (FlowMatchEulerDiscreteScheduler with shift 1.0): σ = t / T for
    t = T, T-1, ..., 1, descending, as `noise_scheduler_copy.sigmas[:-1]` in the diffusers script."""
    t = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float32).flip(0)
    return t / num_train_timesteps


def shift_sigmas(sigmas: torch.Tensor, shift: float = 1.0, mu: float | None = None) -> torch.Tensor:
    """Static shift σ' = sσ / (1 + (s-1)σ) (SD3), or with `mu` Qwen-Image's exponential time shift
    σ' = e^μ / (e^μ + 1/σ - 1) (the inference schedule's dynamic shifting). shift 1 and mu None: unchanged."""
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 8192,
                     base_shift: float = 0.5, max_shift: float = 0.9) -> float:
    """μ for an image of `image_seq_len` packed tokens (diffusers' `calculate_shift` with Qwen-Image's config)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def density_u(batch: int, generator: torch.Generator | None, weighting: str = "logit_normal",
              logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """u in [0, 1] per sample (diffusers' compute_density_for_timestep_sampling), drawn on the CPU from
    `generator` so a seed gives the same σ everywhere."""
    if weighting == "logit_normal":
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch,), generator=generator)
        return torch.sigmoid(u)
    u = torch.rand(batch, generator=generator)
    if weighting == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(batch: int, generator: torch.Generator | None, weighting: str = "logit_normal",
                  logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                  shift: float = 1.0, mu: float | None = None,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """σ [B] float32 in (0, 1]: u from the density, index = floor(u·T) into the training table, then the
    optional shift. Densities other than logit_normal/mode draw uniformly (their weighting acts in the loss)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}")
    u = density_u(batch, generator, weighting, logit_mean, logit_std, mode_scale)
    table = training_sigmas(num_train_timesteps)
    idx = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    return shift_sigmas(table[idx], shift, mu).float()


def loss_weighting(sigmas: torch.Tensor, weighting: str = "logit_normal") -> torch.Tensor:
    """SD3's compute_loss_weighting_for_sd3: sigma_sqrt -> σ^-2, cosmap -> 2 / (π(1 - 2σ + 2σ²)), else 1."""
    if weighting == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if weighting == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas ** 2
        return (2 / (math.pi * bot)).float()
    return torch.ones_like(sigmas, dtype=torch.float32)


def freeze_transformer(transformer: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """No weight gradients, eval mode (no dropout), optional per-block gradient checkpointing."""
    transformer.requires_grad_(False)
    transformer.eval()
    if gradient_checkpointing:
        if hasattr(transformer, "enable_gradient_checkpointing"):
            transformer.enable_gradient_checkpointing()
    elif getattr(transformer, "gradient_checkpointing", False) and hasattr(transformer, "disable_gradient_checkpointing"):
        transformer.disable_gradient_checkpointing()
    return transformer


_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                if hasattr(torch, n))


def compute_dtype_of(transformer) -> torch.dtype:
    """The dtype the transformer computes in. Usually its parameters' dtype; under diffusers' layerwise
    casting (fp8 storage) the weights are stored in float8 and cast per layer to the hook's compute dtype,
    so the first parameter's dtype would be float8 and inputs cast to it fail ("mat1 and mat2 must have
    the same dtype"): read the hook's compute dtype then, else the first non-float8 floating parameter."""
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None and hasattr(registry, "get_hook") else None
        if hook is not None and getattr(hook, "compute_dtype", None) is not None:
            return hook.compute_dtype
    for p in transformer.parameters():
        if p.is_floating_point() and p.dtype not in _FLOAT8:
            return p.dtype
    return torch.float32


def attention_mask_or_none(mask: torch.Tensor | None) -> torch.Tensor | None:
    """None when every prompt is unpadded (all ones), else the mask. diffusers' encode_prompt does the same
    (prompt_embeds_mask None when all ones): an all-ones mask switches Qwen-Image's attention to the masked
    path, measured 6 % slower at 768x512 batch 10 on an H200 (bench/RESULTS.md, "Denoise training step"),
    for the same result."""
    if mask is None or bool(mask.bool().all()):
        return None
    return mask


def predict_velocity(transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                     prompt_embeds_mask: torch.Tensor | None, img_shapes: Sequence[tuple[int, int, int]],
                     compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The transformer's velocity on packed tokens, called the way its model family calls it
    (`core.families`: the family is read off the transformer; `ModelFamily.predict_velocity`)."""
    from ..families import detect_family

    return detect_family(transformer, "transformer").predict_velocity(
        transformer, x_t, sigmas, prompt_embeds, prompt_embeds_mask, img_shapes, compute_dtype)


def flow_matching_loss(transformer, x0_packed: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                       prompt_embeds: torch.Tensor, prompt_embeds_mask: torch.Tensor | None,
                       img_shapes: Sequence[tuple[int, int, int]], weights: torch.Tensor | None = None,
                       token_weights: torch.Tensor | None = None,
                       compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-sample loss [B] (float32): weights_b · Σ_n w_bn · mean_c (v̂ - (ε - x0))²_bnc / Σ_n w_bn.

    x0_packed, noise [B, N, 4C]; sigmas [B]; prompt_embeds [B, S, H] (the only input that should carry a
    gradient); prompt_embeds_mask [B, S] (1 = real token) or None; weights [B] (SD3 weighting) or None;
    token_weights [B, N] (≥ 0) or None."""
    s = sigmas.to(device=x0_packed.device, dtype=torch.float32).view(-1, 1, 1)
    x0, eps = x0_packed.float(), noise.float()
    x_t = (1.0 - s) * x0 + s * eps
    target = eps - x0
    pred = predict_velocity(transformer, x_t, sigmas, prompt_embeds, prompt_embeds_mask, img_shapes,
                            compute_dtype).float()
    err = (pred - target).pow(2).mean(-1)  # [B, N]
    if token_weights is None:
        per = err.mean(1)
    else:
        tw = token_weights.to(device=err.device, dtype=torch.float32)
        per = (err * tw).sum(1) / tw.sum(1).clamp_min(1e-12)
    if weights is not None:
        per = per * weights.to(device=per.device, dtype=torch.float32)
    return per


def condition_with_residual(prompt_embeds: torch.Tensor, prompt_embeds_mask: torch.Tensor, residual: torch.Tensor,
                            alpha: float | torch.Tensor = 1.0) -> torch.Tensor:
    """E + α·r with r the head's residual [B, K, H] spread over each prompt's valid tokens by the length
    policy (padding unchanged): exactly what InjectResidual's absolute mode adds, but differentiable in R."""
    from ..residual.length_policy import expand_to_tokens

    r = expand_to_tokens(residual.float(), prompt_embeds_mask.to(residual.device))
    if isinstance(alpha, torch.Tensor) and alpha.ndim == 1:
        alpha = alpha.view(-1, 1, 1).to(r)
    return (prompt_embeds.float() + alpha * r)
