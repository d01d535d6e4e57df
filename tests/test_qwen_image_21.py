"""Qwen-Image 2.1 as a model family (core/families/qwen_image_21.py) on the tiny 2.1 pipeline: detection,
prompt encoding equal to diffusers' QwenImage21Pipeline, the Denoiser, and the diffusers sampling path
equal to the stock pipeline (true CFG as stock, KV cache on)."""

import pytest
import torch

from qwen_identity.core.errors import ModelMismatchError, UserInputError
from qwen_identity.core.families import QWEN_IMAGE_1, QWEN_IMAGE_21, detect_family

PROMPTS = ["a portrait photo of a person, studio lighting", "a man"]


@pytest.fixture(scope="module")
def pipe21(tiny_qwenimage21_dir):
    from qwen_identity.core.generation.sampling import load_qwen_image_pipeline

    return load_qwen_image_pipeline(str(tiny_qwenimage21_dir), device="cpu", dtype="fp32")


def test_the_tiny_21_pipeline_is_detected_as_21(tiny_qwenimage21_dir, pipe21):
    from safetensors import safe_open

    assert detect_family(tiny_qwenimage21_dir) is QWEN_IMAGE_21
    assert detect_family(tiny_qwenimage21_dir / "transformer") is QWEN_IMAGE_21
    with safe_open(tiny_qwenimage21_dir / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert detect_family(keys) is QWEN_IMAGE_21
    assert detect_family(["model.diffusion_model." + k for k in keys]) is QWEN_IMAGE_21
    assert detect_family("QwenImage21") is QWEN_IMAGE_21
    p = pipe21.pipeline
    for part in (p, p.transformer, p.vae, p.text_encoder):
        assert detect_family(part) is QWEN_IMAGE_21
    assert type(p).__name__ == "QwenImage21Pipeline"


def test_prompt_encoding_equals_the_stock_pipeline(pipe21):
    from qwen_identity.core.generation.prompt_encoding import encode_prompts

    p = pipe21.pipeline
    ours = encode_prompts(p.text_encoder, p.processor, PROMPTS)
    embeds, mask, slots = p.encode_prompt(PROMPTS, device="cpu")
    assert torch.equal(ours.embeds, embeds)
    assert mask is not None and torch.equal(ours.mask, mask.long())
    assert ours.mask.dtype == torch.long and ours.mask[0].all() and not ours.mask[1].all()
    assert not bool(slots.any())                               # text only: no image slots
    one = encode_prompts(p.text_encoder, p.processor, PROMPTS[0])
    stock_one, stock_mask, _ = p.encode_prompt(PROMPTS[0], device="cpu")
    assert torch.equal(one.embeds, stock_one) and stock_mask is None and bool(one.mask.all())
    assert one.hidden_size == p.transformer.config.context_in_dim
    # the conditioning is read before the text encoder's final norm (its weight is not all ones here)
    text_model = getattr(p.text_encoder.model, "language_model", p.text_encoder.model)
    seen = {}
    h = text_model.layers[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("v", o[0] if isinstance(o, tuple) else o))
    try:
        encode_prompts(p.text_encoder, p.processor, PROMPTS[0])
    finally:
        h.remove()
    drop = p._drop_idx
    assert torch.allclose(one.embeds[0], seen["v"][0, drop:], atol=1e-6)


def test_a_bare_tokenizer_is_refused_with_the_fix(pipe21):
    p = pipe21.pipeline
    with pytest.raises(UserInputError, match="processor"):
        QWEN_IMAGE_21.encode_prompts(p.text_encoder, p.processor.tokenizer, ["x"], "cpu", 512)


def test_sampling_equals_the_stock_pipeline(pipe21):
    """Images within 1e-5 of QwenImage21Pipeline.__call__ (RGB of its RGBA output), with true CFG and KV
    cache as stock, for each seed alone and for the seeds batched."""
    from qwen_identity.core.generation import sampling

    p = pipe21.pipeline
    pos = sampling.encode_text(pipe21, PROMPTS[0])
    neg = sampling.encode_text(pipe21, "blurry")
    res = sampling.sample(pipe21, pos, neg, seeds=[1234, 5], steps=3, cfg=3.0, width=64, height=32, max_batch=2)
    assert res.images.shape == (2, 32, 64, 3) and res.cells == [(0, 1234), (0, 5)]
    for k, seed in enumerate((1234, 5)):
        stock = p(prompt=PROMPTS[0], negative_prompt="blurry", true_cfg_scale=3.0, num_inference_steps=3,
                  height=32, width=64, generator=torch.Generator().manual_seed(seed), output_type="pt").images
        assert stock.shape == (1, 4, 32, 64)
        diff = (res.images[k] - stock[0, :3].permute(1, 2, 0)).abs().max()
        assert float(diff) < 1e-5, float(diff)
    # no CFG: the negative is not used (stock default true_cfg_scale 1)
    plain = sampling.sample(pipe21, pos, neg, seeds=[7], steps=2, cfg=1.0, width=32, height=32)
    stock = p(prompt=PROMPTS[0], num_inference_steps=2, height=32, width=32,
              generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert float((plain.images[0] - stock[0, :3].permute(1, 2, 0)).abs().max()) < 1e-5


def test_sampling_with_a_residual_changes_the_image_and_alpha_zero_does_not(pipe21):
    from qwen_identity.core.generation import sampling
    from qwen_identity.core.residual.conditioning import make_conditioning
    from qwen_identity.core.generation.prompt_encoding import PromptEmbeds

    pos = sampling.encode_text(pipe21, PROMPTS[0])
    e, extra = pos[0]
    r = torch.randn(1, 1, e.shape[-1], generator=torch.Generator().manual_seed(0))
    m = torch.ones(2, e.shape[1], dtype=torch.long)
    batch = make_conditioning(PromptEmbeds(torch.cat([e, e + 0.5 * r]), m))
    res = sampling.sample(pipe21, batch, None, seeds=[3], steps=2, cfg=1.0, width=32, height=32)
    alone = sampling.sample(pipe21, pos, None, seeds=[3], steps=2, cfg=1.0, width=32, height=32)
    assert torch.allclose(res.images[0], alone.images[0], atol=1e-6)
    assert float((res.images[1] - res.images[0]).abs().max()) > 1e-4


def test_sampling_refuses_1x_conditioning_and_bad_sizes(pipe21, tiny_text_encoder):
    from qwen_identity.core.generation import sampling
    from qwen_identity.core.generation.prompt_encoding import encode_prompts
    from qwen_identity.core.residual.conditioning import make_conditioning

    old = make_conditioning(encode_prompts(*tiny_text_encoder, "a man"))       # H = 32 (the tiny 1.x)
    with pytest.raises(UserInputError, match="H=32"):
        sampling.sample(pipe21, old, None, seeds=[1], steps=2, cfg=1.0, width=32, height=32)
    pos = sampling.encode_text(pipe21, "a man")
    with pytest.raises(UserInputError, match="multiple of 32"):
        sampling.sample(pipe21, pos, None, seeds=[1], steps=2, cfg=1.0, width=48, height=32)


def test_denoiser_equals_the_training_step_and_grads_reach_the_embeddings(pipe21):
    from qwen_identity.core.denoising.flow_matching import freeze_transformer, predict_velocity

    p = pipe21.pipeline
    tr = freeze_transformer(p.transformer)
    c = tr.config.in_channels
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, c, 4, 2, generator=g)
    sigma = torch.tensor([0.2, 0.9])
    enc = sampling_embeds(pipe21)
    embeds = enc.embeds.detach().clone().requires_grad_(True)
    v = QWEN_IMAGE_21.denoiser(tr)(x_t, sigma, embeds, enc.mask)
    assert v.shape == x_t.shape
    packed, shapes = QWEN_IMAGE_21.pack_latents(x_t)
    assert packed.shape == (2, 8, c) and shapes[0] == (1, 4, 2)
    ref = predict_velocity(tr, packed, sigma, embeds, enc.mask, shapes).float()
    assert torch.equal(v, QWEN_IMAGE_21.unpack_latents(ref, shapes[0]))
    # the same call the stock pipeline makes at a step (text, then the target's slots; last tokens)
    stock = tr(hidden_states=packed, timestep=sigma, encoder_hidden_states=embeds, img_shapes=[[shapes[0]]] * 2,
               img_mask=torch.cat([torch.zeros(2, embeds.shape[1], dtype=torch.bool),
                                   torch.ones(2, 2, dtype=torch.bool)], 1),
               encoder_hidden_states_mask=enc.mask, return_dict=False)[0][:, -8:]
    assert torch.allclose(ref, stock, atol=1e-6)
    v.pow(2).mean().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(q.grad is None for q in tr.parameters())
    with pytest.raises(ValueError, match="even"):
        QWEN_IMAGE_21.pack_latents(torch.zeros(1, c, 3, 2))


def sampling_embeds(bundle):
    from qwen_identity.core.generation.prompt_encoding import encode_prompts

    return encode_prompts(bundle.pipeline.text_encoder, bundle.pipeline.processor, PROMPTS)


def test_encode_images_round_trip_shapes(pipe21):
    vae = pipe21.pipeline.vae
    pixels = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    lat = QWEN_IMAGE_21.encode_images(vae, pixels)
    assert lat.shape == (2, vae.config.z_dim, 4, 2)            # 1/16
    back = QWEN_IMAGE_21.decode_latents(vae, lat)
    assert back.shape == (2, 3, 64, 32)
    # the pipeline's own condition-image encoding of an opaque RGBA photo (argmax, normalised)
    rgba = torch.cat([pixels * 2 - 1, torch.ones(2, 1, 64, 32)], 1)[:, :, None]
    stock = pipe21.pipeline._encode_vae_image(rgba, None)[:, :, 0]
    assert torch.allclose(lat, stock, atol=1e-5)


def test_heads_of_the_other_family_are_refused():
    from qwen_identity.core.residual.head import HeadMeta, ResidualHead, check_head_family, head_family

    old = ResidualHead(4, 1, 3584)
    new = ResidualHead(4, 1, 4096)
    assert head_family(old) is QWEN_IMAGE_1 and head_family(new) is QWEN_IMAGE_21
    with pytest.raises(ModelMismatchError, match="Qwen-Image / Qwen-Image-Edit.*Qwen-Image 2.1"):
        check_head_family(old, QWEN_IMAGE_21)
    tiny21 = ResidualHead(4, 1, 48, meta=HeadMeta(4, 1, 48, family="qwen-image-2.1"))
    with pytest.raises(ModelMismatchError, match="'qwen-image-2.1'.*'qwen-image'"):
        check_head_family(tiny21, QWEN_IMAGE_1)
    check_head_family(tiny21, QWEN_IMAGE_21)


def test_reference_images_sample_like_the_stock_pipeline(pipe21):
    """The person's photo as 2.1's own reference image: conditioning from encode_text(references=) and the
    sampler equal QwenImage21Pipeline(image=...) at the same seed, CFG on (the negative reads the image too)."""
    import numpy as np
    from PIL import Image

    from qwen_identity.core.families.qwen_image_21 import REFERENCES_KEY
    from qwen_identity.core.generation import sampling

    p = pipe21.pipeline
    photo = Image.fromarray((np.random.default_rng(0).random((300, 260, 3)) * 255).astype(np.uint8))
    pos = sampling.encode_text(pipe21, PROMPTS[0], references=[photo], reference_resolution=256)
    neg = sampling.encode_text(pipe21, "blurry", references=[photo], reference_resolution=256)
    refs = pos[0][1][REFERENCES_KEY]
    assert int(refs["slots"].sum()) * 4 == refs["tokens"].shape[1]        # one slot per 2x2 latent tokens
    res = sampling.sample(pipe21, pos, neg, seeds=[11], steps=2, cfg=2.5, width=32, height=32)
    stock = p(prompt=PROMPTS[0], image=[photo], negative_prompt="blurry", true_cfg_scale=2.5, num_inference_steps=2,
              height=32, width=32, output_resolution=256, generator=torch.Generator().manual_seed(11),
              output_type="pt").images
    assert float((res.images[0] - stock[0, :3].permute(1, 2, 0)).abs().max()) < 1e-5
    plain = sampling.sample(pipe21, sampling.encode_text(pipe21, PROMPTS[0]), None, seeds=[11], steps=2, cfg=1.0,
                            width=32, height=32)
    with_ref = sampling.sample(pipe21, pos, None, seeds=[11], steps=2, cfg=1.0, width=32, height=32)
    assert float((plain.images[0] - with_ref.images[0]).abs().max()) > 1e-4   # the reference is used


def test_reference_images_are_refused_on_1x(tiny_qwenimage_dir):
    from PIL import Image

    from qwen_identity.core.generation import sampling

    bundle = sampling.load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", dtype="fp32")
    with pytest.raises(UserInputError, match="takes no reference images"):
        sampling.encode_text(bundle, "a man", references=[Image.new("RGB", (32, 32))])
