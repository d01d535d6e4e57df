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


@pytest.mark.parametrize("which", ["qwen-image", "qwen-image-2.1"])
def test_fp8_storage_load_equals_loading_then_casting(which, tiny_qwenimage_dir, tiny_qwenimage21_dir, tmp_path):
    """Loading with fp8 storage reads the weights one tensor at a time into an empty model that already has
    layerwise casting (so the bf16 model is never whole on the device); it must give exactly the model that
    `from_pretrained` then `enable_layerwise_casting` gives: names, dtypes, values and the forward pass.
    Checked with the index of a sharded folder too (the real checkpoints are sharded)."""
    import shutil

    import diffusers
    from safetensors.torch import load_file, save_file

    from qwen_identity.core.families import detect_family

    folder = tiny_qwenimage_dir if which == "qwen-image" else tiny_qwenimage21_dir
    family = detect_family(folder, "test")
    cls = getattr(diffusers, family.transformer_classes[0])
    ref = cls.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16, use_safetensors=True)
    ref.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)

    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded, ignore=shutil.ignore_patterns("diffusion_pytorch_model*.safetensors*"),
                    symlinks=True)
    sd = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    keys = sorted(sd)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: sd[k] for k in part}, str(sharded / "transformer" / name))
    (sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}))

    for source in (folder, sharded):
        got = family.load_transformer(source, "cpu", torch.bfloat16, torch.float8_e4m3fn)
        want = dict(ref.named_parameters())
        have = dict(got.named_parameters())
        assert list(have) == list(want)
        assert {p.dtype for p in have.values()} == {torch.float8_e4m3fn, torch.bfloat16}
        for name, p in want.items():
            assert have[name].dtype == p.dtype and torch.equal(have[name].float(), p.float()), name
        assert not any(p.is_meta for p in got.parameters()) and not any(b.is_meta for b in got.buffers())
        g = torch.Generator().manual_seed(0)
        latents, sigmas, embeds, mask = _denoiser_inputs(family, got, g)
        torch.testing.assert_close(family.denoiser(got)(latents, sigmas, embeds, mask),
                                   family.denoiser(ref)(latents, sigmas, embeds, mask), rtol=0, atol=0)


def test_fp8_storage_load_names_a_foreign_or_missing_weight(tiny_qwenimage_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from qwen_identity.core.families import detect_family

    family = detect_family(tiny_qwenimage_dir, "test")
    for case in ("foreign", "missing"):
        broken = tmp_path / case
        shutil.copytree(tiny_qwenimage_dir, broken, symlinks=True)
        f = broken / "transformer" / "diffusion_pytorch_model.safetensors"
        sd = load_file(str(f))
        if case == "foreign":
            sd["not_a_layer.weight"] = torch.zeros(2)
        else:
            sd.pop(sorted(sd)[0])
        f.unlink()
        save_file(sd, str(f))
        with pytest.raises(ValueError, match="not_a_layer" if case == "foreign" else "missing"):
            family.load_transformer(broken, "cpu", torch.bfloat16, torch.float8_e4m3fn)


def _denoiser_inputs(family, transformer, g):
    """x_t [1, C, 4, 4], σ, prompt embeddings and mask in the shapes `transformer` (of `family`) takes."""
    cfg = transformer.config
    channels = cfg.in_channels // family.patch_size ** 2
    width = family.transformer_text_width(dict(cfg))
    return (torch.randn(1, channels, 4, 4, generator=g), torch.tensor([0.6]),
            torch.randn(1, 5, width, generator=g), torch.ones(1, 5, dtype=torch.long))
