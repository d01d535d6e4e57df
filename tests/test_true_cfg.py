"""core/generation/true_cfg.py: the native path's spatial true CFG equals diffusers' token formula."""

import pytest
import torch

from qwen_identity.core.generation.true_cfg import true_cfg_spatial, true_cfg_tokens


def _pack(x):
    """diffusers' QwenImagePipeline._pack_latents: [B, C, H, W] -> [B, H/2*W/2, C*4]."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    b, c, h, w = x.shape
    return QwenImagePipeline._pack_latents(x, b, c, h, w)


def test_spatial_true_cfg_is_diffusers_formula_on_packed_tokens():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 16, 6, 8, generator=g), torch.randn(2, 16, 6, 8, generator=g)
    for scale in (1.0, 4.5):
        got = true_cfg_spatial(cond, uncond, scale)
        ref = true_cfg_tokens(_pack(cond), _pack(uncond), scale)   # the diffusers path's formula
        assert torch.allclose(_pack(got), ref, atol=1e-5)
    # the rescale really acts: plain CFG differs, and each token keeps the conditional norm
    plain = uncond + 4.5 * (cond - uncond)
    out = true_cfg_spatial(cond, uncond, 4.5)
    assert (out - plain).abs().max() > 0.5
    assert torch.allclose(_pack(out).norm(dim=-1), _pack(cond).norm(dim=-1), atol=1e-4)


def test_spatial_true_cfg_takes_comfyuis_5d_latents_and_is_scale_invariant():
    """ComfyUI hands x - denoised = σ·v ([B, C, 1, H, W] for Qwen-Image): the result is σ times the velocity's."""
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 16, 1, 4, 4, generator=g), torch.randn(1, 16, 1, 4, 4, generator=g)
    v = true_cfg_spatial(cond, uncond, 3.0)
    assert v.shape == cond.shape
    assert torch.allclose(true_cfg_spatial(0.37 * cond, 0.37 * uncond, 3.0), 0.37 * v, atol=1e-5)
    assert torch.allclose(v[:, :, 0], true_cfg_spatial(cond[:, :, 0], uncond[:, :, 0], 3.0), atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        true_cfg_spatial(torch.randn(1, 16, 3, 4), torch.randn(1, 16, 3, 4), 2.0)
