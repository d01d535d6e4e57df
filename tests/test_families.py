"""The model-family seam (core/families/): detection from the model itself, the Qwen-Image 1.x adapter
equal to the code paths it replaced, the Denoiser contract, and heads refused by another family."""

import json

import pytest
import torch

from qwen_identity.core.errors import ModelMismatchError, UserInputError
from qwen_identity.core.families import (FAMILIES, QWEN_IMAGE_1, detect_family, family_named, family_of_width,
                                         find_family)

H = 32


def tiny_transformer(seed=0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                       attention_head_dim=16, num_attention_heads=3, joint_attention_dim=H,
                                       guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def test_registry_names_are_unique_and_found_by_name():
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names)) and "qwen-image" in names
    assert family_named("qwen-image") is QWEN_IMAGE_1
    with pytest.raises(UserInputError, match="unknown model family 'nope'"):
        family_named("nope")
    assert family_of_width(3584) is QWEN_IMAGE_1 and family_of_width(123) is None


def test_detects_qwen_image_1_from_each_kind_of_source(tiny_qwenimage_dir, tiny_text_encoder):
    assert detect_family(tiny_qwenimage_dir) is QWEN_IMAGE_1                       # model_index.json
    assert detect_family(tiny_qwenimage_dir / "transformer") is QWEN_IMAGE_1       # a transformer folder
    cfg = json.loads((tiny_qwenimage_dir / "transformer" / "config.json").read_text())
    assert detect_family(cfg) is QWEN_IMAGE_1                                      # a config dict
    tr = tiny_transformer()
    assert detect_family(tr) is QWEN_IMAGE_1                                       # a loaded transformer
    assert detect_family(tr.state_dict()) is QWEN_IMAGE_1                          # a state dict
    assert detect_family(list(tr.state_dict())) is QWEN_IMAGE_1                    # its keys
    comfy_keys = ["model.diffusion_model." + k for k in tr.state_dict()]            # ComfyUI's prefix
    assert detect_family(comfy_keys) is QWEN_IMAGE_1
    assert detect_family("Wan21") is QWEN_IMAGE_1                                  # ComfyUI latent_format
    assert detect_family(tiny_text_encoder[0]) is QWEN_IMAGE_1                     # the text encoder


def test_unknown_models_are_refused_naming_what_was_read(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelMismatchError, match="not a model family this pack knows.*QwenImagePipeline"):
        detect_family(tmp_path)
    with pytest.raises(ModelMismatchError, match="'SD3'"):
        detect_family("SD3")
    with pytest.raises(ModelMismatchError, match="state dict"):
        detect_family({"unet.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ModelMismatchError):
        detect_family(torch.nn.Linear(2, 2))
    assert find_family(torch.nn.Linear(2, 2)) is None


def test_denoiser_equals_the_training_steps_prediction():
    """family.denoiser(tr)(x_t, σ, E, mask) is the training step's velocity, unpacked, bit for bit."""
    from qwen_identity.core.denoising.flow_matching import (freeze_transformer, pack_latents, predict_velocity,
                                                            unpack_latents)

    tr = freeze_transformer(tiny_transformer())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 6, generator=g)
    eps = torch.randn(2, 4, 8, 6, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    embeds = torch.randn(2, 5, H, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    den = QWEN_IMAGE_1.denoiser(tr)
    assert den.dtype == torch.float32 and den.device.type == "cpu"
    v = den(x_t, sigma, embeds, mask)
    assert v.shape == x_t.shape and v.dtype == torch.float32
    # the training step: packed x_t as flow_matching_loss builds it, the same call
    p0, shapes = pack_latents(x0)
    pe, _ = pack_latents(eps)
    sp = sigma.view(-1, 1, 1)
    ref = predict_velocity(tr, (1 - sp) * p0 + sp * pe, sigma, embeds, mask, shapes).float()
    assert torch.equal(v, unpack_latents(ref, shapes[0]))
    # gradients reach the embeddings only
    v.pow(2).mean().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in tr.parameters())


def test_encode_images_is_the_latent_cache_encoding(tiny_qwenimage_dir):
    """encode_images(vae, pixels in 0..1) equals the training latent cache's encoding of the same photo."""
    import numpy as np
    from PIL import Image

    from qwen_identity.core.denoising.latent_cache import encode_latent

    vae = QWEN_IMAGE_1.load_vae(tiny_qwenimage_dir, "cpu", torch.float32)
    arr = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(arr)
    cached = encode_latent(vae, image)
    pixels = torch.from_numpy(arr).float().div(255).permute(2, 0, 1)[None]
    lat = QWEN_IMAGE_1.encode_images(vae, pixels)
    assert lat.shape == (1, vae.config.z_dim, *cached.shape[1:])
    assert torch.allclose(lat[0], cached, atol=1e-5)
    back = QWEN_IMAGE_1.decode_latents(vae, lat)
    assert back.shape == (1, 3, 32, 48) and 0 <= float(back.min()) and float(back.max()) <= 1


def test_a_head_of_another_family_is_refused_naming_both():
    from qwen_identity.core.families.base import FamilyDefaults, ModelFamily
    from qwen_identity.core.residual.head import HeadMeta, ResidualHead, check_head_family, head_family

    class Other(ModelFamily):
        name, title, text_width = "other-model", "Other Model", 777
        defaults = FamilyDefaults(64, 64, 2, 1.0)

    old = ResidualHead(4, 1, 3584)                       # a head from before the field: inferred from H
    assert old.meta.family == "" and head_family(old) is QWEN_IMAGE_1
    check_head_family(old, QWEN_IMAGE_1)
    with pytest.raises(ModelMismatchError, match=r"Qwen-Image / Qwen-Image-Edit \(family 'qwen-image'.*Other Model "
                                                 r"\(family 'other-model'\)"):
        check_head_family(old, Other())
    tiny = ResidualHead(4, 1, H, meta=HeadMeta(4, 1, H, family="qwen-image"))
    assert head_family(tiny) is QWEN_IMAGE_1
    assert head_family(ResidualHead(4, 1, H)) is None     # unknown width, no record: nothing to check
    check_head_family(ResidualHead(4, 1, H), Other())
