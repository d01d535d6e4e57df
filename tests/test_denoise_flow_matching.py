"""The flow-matching step (core/denoising/flow_matching.py) against diffusers' own pieces, on a tiny
Qwen-Image transformer: packing equals QwenImagePipeline._pack_latents, σ follows the training table
and density, and gradients reach the conditioning only (the transformer stays frozen)."""

import math

import pytest
import torch

from qwen_identity.core.denoising.flow_matching import (condition_with_residual, flow_matching_loss,
                                                        freeze_transformer, loss_weighting, pack_latents,
                                                        sample_sigmas, shift_sigmas, unpack_latents)

H = 32


def tiny_transformer(seed=0, layers=1):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=layers,
                                       attention_head_dim=16, num_attention_heads=3, joint_attention_dim=H,
                                       guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def test_pack_matches_the_pipeline_and_unpacks():
    from diffusers import QwenImagePipeline

    x = torch.randn(2, 4, 1, 8, 6)
    packed, shapes = pack_latents(x)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(x[:, :, 0], 2, 4, 8, 6))
    assert shapes == [(1, 4, 3)] * 2
    assert torch.equal(unpack_latents(packed, shapes[0]), x[:, :, 0])
    with pytest.raises(ValueError):
        pack_latents(torch.randn(1, 4, 7, 6))


def test_sigmas_follow_the_table_density_and_shift():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(4000, g)
    assert s.min() >= 1e-3 and s.max() <= 1.0
    # the table is discrete in steps of 1/1000
    assert torch.allclose(s * 1000, (s * 1000).round(), atol=1e-3)
    # logit-normal(0, 1) is symmetric about 0.5: the median within 0.03 of 0.5 (4000 draws: sd ~0.01)
    assert abs(float(s.median()) - 0.5) < 0.03
    # the same generator state gives the same σ (reruns are identical)
    assert torch.equal(sample_sigmas(8, torch.Generator().manual_seed(3)), sample_sigmas(8, torch.Generator().manual_seed(3)))
    # shift 3 moves σ = 0.5 to 0.75 (SD3's static shift)
    assert float(shift_sigmas(torch.tensor([0.5]), 3.0)) == pytest.approx(0.75)
    assert float(shift_sigmas(torch.tensor([0.5]), mu=math.log(3.0))) == pytest.approx(0.75)
    assert torch.equal(loss_weighting(s[:5], "logit_normal"), torch.ones(5))
    assert float(loss_weighting(torch.tensor([0.5]), "sigma_sqrt")) == pytest.approx(4.0)


def test_loss_gradients_reach_the_conditioning_only():
    tr = freeze_transformer(tiny_transformer(), gradient_checkpointing=True)
    g = torch.Generator().manual_seed(1)
    x0, shapes = pack_latents(torch.randn(2, 4, 8, 8, generator=g))
    eps = torch.randn(x0.shape, generator=g)
    sig = sample_sigmas(2, g)
    embeds = torch.randn(2, 5, H, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    residual = torch.zeros(2, 1, H, requires_grad=True)
    cond = condition_with_residual(embeds, mask, residual, 1.0)
    loss = flow_matching_loss(tr, x0, eps, sig, cond, mask, shapes)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert residual.grad is not None and residual.grad.abs().sum() > 0
    assert all(p.grad is None for p in tr.parameters())
    # token weights: uniform weights give the plain mean; weighting one token changes it
    with torch.no_grad():
        plain = flow_matching_loss(tr, x0, eps, sig, cond, mask, shapes)
        same = flow_matching_loss(tr, x0, eps, sig, cond, mask, shapes, token_weights=torch.full(x0.shape[:2], 3.0))
        one = torch.zeros(x0.shape[:2])
        one[:, 0] = 1
        first = flow_matching_loss(tr, x0, eps, sig, cond, mask, shapes, token_weights=one)
    assert torch.allclose(plain, same, rtol=1e-5)
    assert not torch.allclose(plain, first)


def test_padding_tokens_get_no_residual():
    embeds = torch.zeros(1, 4, H)
    mask = torch.tensor([[1, 1, 0, 0]])
    out = condition_with_residual(embeds, mask, torch.ones(1, 1, H), 2.0)
    assert torch.equal(out[0, :2], torch.full((2, H), 2.0)) and torch.equal(out[0, 2:], torch.zeros(2, H))
