"""nodes/comfy_training.py: the Denoiser contract over ComfyUI's own Qwen-Image MODEL.

Against a real ComfyUI in this process (COMFYUI_DIR): the random one-layer, full-width native Qwen-Image
file of tests/comfyui_harness/tiny_native.py, loaded by ComfyUI under torch.inference_mode as its
UNETLoader does, and the SAME weights in diffusers' QwenImageTransformer2DModel:
- the ComfyUI denoiser's velocity and its gradient into the prompt embeddings equal the diffusers
  transformer's (the stock flow-matching call: packing, img_shapes, timestep σ), float32 on the CPU;
- no weight gets a gradient; gradient checkpointing gives the same gradient;
- the MODEL passed in is unchanged afterwards: patches, options, wrappers, weight functions, requires_grad
  flags, train/eval modes, weights, `in_training`, and a KSampler image before and after;
- a MODEL that is not Qwen-Image is refused naming what it is.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qwen_identity.core.errors import ModelMismatchError, UserInputError
from qwen_identity.nodes import comfy_training as ct

from comfyui_harness.env import import_comfy_in_process, require_comfyui
from comfyui_harness.stand_ins import NotQwenModel

H = 3584
VELOCITY_RTOL = 1e-4      # float32, the same weights; what differs is the order of float operations


@pytest.fixture(scope="module")
def comfy_model():
    """(MODEL, VAE) loaded the way ComfyUI's loaders run: inside torch.inference_mode."""
    require_comfyui()
    import_comfy_in_process()
    import comfy.sd
    import comfy.utils

    from comfyui_harness.tiny_native import build_native_models

    files = build_native_models(text_encoder=False)
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(files.transformer))
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files.vae)))
    yield model, vae, files
    del model, vae


@pytest.fixture(scope="module")
def diffusers_transformer(comfy_model):
    """diffusers' Qwen-Image transformer with the native file's weights (same key names), float32."""
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import load_file

    _, _, files = comfy_model
    t = QwenImageTransformer2DModel(num_layers=1)    # rope tables are buffers computed at init: not on meta
    sd = {k: v.float() for k, v in load_file(str(files.transformer)).items()}
    t.load_state_dict(sd, strict=True, assign=True)
    return t.eval().requires_grad_(False)


def diffusers_velocity(transformer, x_t, sigma, embeds, mask):
    """The Qwen-Image family's Denoiser over the diffusers transformer (what `qwen-identity tune` uses)."""
    from qwen_identity.core.families import family_named

    return family_named("qwen-image").denoiser(transformer)(x_t, sigma, embeds, mask)


def _inputs(seed=0, batch=2, seq=9, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, size, size, generator=g)
    sigma = torch.tensor([0.3, 0.85][:batch])
    embeds = torch.randn(batch, seq, H, generator=g) * 4
    return x, sigma, embeds


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def test_velocity_and_gradient_equal_the_diffusers_transformer(comfy_model, diffusers_transformer):
    model, _, _ = comfy_model
    x, sigma, embeds = _inputs()
    e1 = embeds.clone().requires_grad_(True)
    ref = diffusers_velocity(diffusers_transformer, x, sigma, e1, None)
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    (ref * probe).sum().backward()
    e2 = embeds.clone().requires_grad_(True)
    with ct.training_denoiser(model, latent_shape=(16, 8, 8), batch=2) as den:
        assert den.dtype == torch.float32 and den.device.type == "cpu"
        v = den(x, sigma, e2, None)
        (v * probe).sum().backward()
        weight_grads = [n for n, p in den.base.named_parameters() if p.grad is not None]
    assert v.shape == x.shape
    assert ref.abs().mean() > 1e-4                     # a velocity, not zeros: the comparison means something
    assert _rel(v, ref) < VELOCITY_RTOL, _rel(v, ref)
    assert e2.grad is not None and e2.grad.abs().sum() > 0
    assert _rel(e2.grad, e1.grad) < VELOCITY_RTOL, _rel(e2.grad, e1.grad)
    assert weight_grads == []                          # frozen: no weight received a gradient
    # the prompt matters (the comparison is not blind to the context), and so does σ
    with ct.training_denoiser(model) as den:
        with torch.no_grad():
            other = den(x, sigma, embeds.flip(1), None)
            other_sigma = den(x, sigma.flip(0), embeds, None)
    assert _rel(other, ref) > 1e-3 and _rel(other_sigma, ref) > 1e-3


def test_gradient_checkpointing_gives_the_same_gradient(comfy_model):
    model, _, _ = comfy_model
    x, sigma, embeds = _inputs(seed=1, batch=1)
    grads = []
    for gc in (False, True):
        e = embeds.clone().requires_grad_(True)
        with ct.training_denoiser(model, gradient_checkpointing=gc) as den:
            den(x, sigma, e, None).pow(2).sum().backward()
        grads.append(e.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def _snapshot(model):
    base = model.model
    return {
        "patches": {k: list(v) for k, v in model.patches.items()},
        "patches_uuid": model.patches_uuid,
        "object_patches": dict(model.object_patches),
        "model_options": repr(model.model_options),
        "wrappers": repr(getattr(model, "wrappers", None)),
        "callbacks": repr(getattr(model, "callbacks", None)),
        "weight_wrapper_patches": repr(getattr(model, "weight_wrapper_patches", None)),
        "requires_grad": [p.requires_grad for p in base.parameters()],
        "training": [m.training for m in base.modules()],
        "weight_functions": [(len(getattr(m, "weight_function", [])), len(getattr(m, "bias_function", [])))
                             for m in base.modules()],
        "weights": {k: v.detach().double().sum().item() for k, v in base.state_dict().items()},
    }


def _ksampler_image(model, vae, seed=3):
    import comfy.sample

    g = torch.Generator().manual_seed(7)
    pos = [[torch.randn(1, 6, H, generator=g), {"pooled_output": None}]]
    neg = [[torch.randn(1, 6, H, generator=g), {"pooled_output": None}]]
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 16, 4, 4))
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        samples = comfy.sample.sample(model, noise, 1, 2.0, "euler", "simple", pos, neg, latent, denoise=1.0,
                                      disable_pbar=True, seed=seed)
    return samples.float().clone()


def test_the_model_passed_in_is_unchanged(comfy_model):
    import comfy.model_management as mm

    model, vae, _ = comfy_model
    before = _snapshot(model)
    image_before = _ksampler_image(model, vae)
    flag_before = getattr(mm, "in_training", None)
    x, sigma, embeds = _inputs(seed=2, batch=1)
    e = embeds.requires_grad_(True)
    seen_flag = []
    with ct.training_denoiser(model, gradient_checkpointing=True) as den:
        seen_flag.append(getattr(mm, "in_training", None))
        den(x, sigma, e, None).pow(2).mean().backward()
    assert _snapshot(model) == before
    assert getattr(mm, "in_training", None) == flag_before
    if hasattr(mm, "in_training"):               # ComfyUI versions with the flag: set while training
        assert seen_flag == [True]
    assert torch.equal(_ksampler_image(model, vae), image_before)


def test_an_exception_inside_still_restores_the_model(comfy_model):
    model, _, _ = comfy_model
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ct.training_denoiser(model):
            raise RuntimeError("boom")
    assert _snapshot(model) == before


def test_encode_photos_is_the_samplers_latent_space(comfy_model):
    """The VAE's raw latent through the model's latent format, as KSampler's process_latent_in does."""
    model, vae, _ = comfy_model
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    lat = ct.encode_photos(vae, model, pixels)
    assert lat.shape == (2, 16, 4, 6) and lat.dtype == torch.float32
    fmt = model.get_model_object("latent_format")
    for i in range(2):       # each photo alone (the Wan VAE would read a batch as video frames)
        with torch.no_grad():
            raw = vae.encode(pixels[i:i + 1].movedim(1, -1)).float()
        assert torch.allclose(lat[i:i + 1], fmt.process_in(raw)[:, :, 0], atol=1e-6)
        assert not torch.allclose(lat[i:i + 1], raw[:, :, 0], atol=1e-3)    # the normalisation did something


def test_a_model_that_is_not_qwen_image_is_refused(comfy_model):
    with pytest.raises(ModelMismatchError, match="SD15Model model \\(latent format SD15\\), not Qwen-Image.*UNETLoader"):
        ct.check_qwen_image_model(NotQwenModel())
    with pytest.raises(UserInputError, match="not a ComfyUI diffusion model"):
        ct.check_qwen_image_model("model")
    with pytest.raises(ModelMismatchError, match="not Qwen-Image"):
        with ct.training_denoiser(NotQwenModel()):
            pass


def test_conditioning_embeds_reads_the_first_prompt_and_its_mask():
    cond = [[torch.randn(2, 5, 8), {"pooled_output": None, "attention_mask": torch.tensor([[1, 1, 1, 0, 0],
                                                                                         [1, 1, 1, 1, 1]])}]]
    e, m = ct.conditioning_embeds(cond)
    assert torch.equal(e, cond[0][0][0]) and m.tolist() == [1, 1, 1, 0, 0]
    e, m = ct.conditioning_embeds([[torch.randn(1, 4, 8), {"pooled_output": None}]])
    assert m.tolist() == [1, 1, 1, 1]
    for bad in ([], [[torch.randn(1, 4, 8)]], [["text", {}]]):
        with pytest.raises(UserInputError, match="conditioning"):
            ct.conditioning_embeds(bad)
    with pytest.raises(UserInputError, match="shape"):
        ct.conditioning_embeds([[torch.randn(4, 8), {}]])
