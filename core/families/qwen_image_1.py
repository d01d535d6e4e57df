"""Qwen-Image 1.x (Qwen-Image, Qwen-Image-2512, Qwen-Image-Edit): the family adapter.

Every Qwen-Image 1.x specific constant and call lives here:
- text: Qwen2.5-VL-7B (H = 3584), diffusers' `QwenImagePipeline._get_qwen_prompt_embeds` (its chat
  template, the 34-token prefix dropped, the last hidden state, right padding);
- latents: the Wan-2.1 VAE (`AutoencoderKLQwenImage`, 16 channels at 1/8, normalised with the config's
  latents_mean/std), packed into tokens of 2x2 latent pixels (`QwenImagePipeline._pack_latents`:
  feature = channel * 4 + dy * 2 + dx) with img_shapes (1, h/2, w/2);
- the transformer (`QwenImageTransformer2DModel`, dual-stream MMDiT): timestep σ (the model scales by
  1000 itself), the text mask dropped when nothing is padded;
- ComfyUI: latent format `Wan21`; the pipeline `QwenImagePipeline`; user defaults as the pack's own
  sampler uses them (512x768, 28 steps, true CFG 4.5).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserInputError
from .base import FamilyDefaults, ModelFamily, single_frame


def pack_latents(latents: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """latents [B, C, H, W] or [B, C, 1, H, W] (the VAE's layout) -> packed [B, (H/2)(W/2), 4C] and
    img_shapes [(1, H/2, W/2)] * B, exactly as QwenImagePipeline._pack_latents."""
    latents = single_frame(latents)
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even (got {h}x{w})")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4), [(1, h // 2, w // 2)] * b


def unpack_latents(packed: torch.Tensor, img_shape: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of pack_latents for one shape: [B, N, 4C] -> [B, C, H, W]."""
    _, gh, gw = img_shape
    b, n, c4 = packed.shape
    c = c4 // 4
    x = packed.view(b, gh, gw, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, gh * 2, gw * 2)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


class QwenImage1(ModelFamily):
    name = "qwen-image"
    title = "Qwen-Image / Qwen-Image-Edit"
    text_width = 3584
    text_encoder_id = "Qwen/Qwen2.5-VL-7B-Instruct"
    text_encoder_classes = ("Qwen2_5_VLForConditionalGeneration",)
    pipeline_classes = ("QwenImagePipeline",)  # the text-to-image pipeline the diffusers path samples with
    transformer_classes = ("QwenImageTransformer2DModel",)
    vae_classes = ("AutoencoderKLQwenImage",)
    comfy_latent_formats = ("Wan21",)
    # the dual-stream MMDiT's text stream (2.1 is single-stream and has no txt_mlp)
    state_dict_markers = ("transformer_blocks.0.txt_mlp.net.0.proj.weight", "txt_norm.weight")
    comfy_text_width_keys = ("diffusion_model.txt_norm.weight",)
    rope_modules = ("diffusers.models.transformers.transformer_qwenimage",)
    latent_channels = 16
    vae_scale_factor = 8
    patch_size = 2
    size_multiple = 16      # VAE factor 8 × the transformer's 2x2 patches
    defaults = FamilyDefaults(width=512, height=768, steps=28, cfg=4.5)

    def describe_width(self) -> str:
        return "Qwen-Image / Qwen-Image-Edit (Qwen2.5-VL-7B text encoder, H=3584)"

    # ------------------------------------------------------------------ prompts
    def load_text_encoder(self, folder: Path, device, dtype):
        import transformers

        from ..runtime.model_sources import read_config

        root = Path(folder)
        index = read_config(root)
        try:
            te_cls = getattr(transformers, index["text_encoder"][1])
            tok_cls = getattr(transformers, index["tokenizer"][1])
        except (KeyError, TypeError, AttributeError, IndexError):
            raise UserInputError(f"{root} is not a Qwen-Image diffusers folder: model_index.json names no usable "
                                 "text_encoder/tokenizer (expected Qwen2_5_VLForConditionalGeneration / Qwen2Tokenizer).") from None
        try:
            text_encoder = te_cls.from_pretrained(root / "text_encoder", dtype=dtype,
                                                  use_safetensors=True).to(device).eval()  # no pickles
            tokenizer = tok_cls.from_pretrained(root / "tokenizer")
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserInputError(f"cannot load the Qwen-Image text encoder from {root} ({type(e).__name__}: {first[:300]}); "
                                 "the folder is incomplete or damaged (its weights must be safetensors).") from None
        return text_encoder, tokenizer

    def encode_prompts(self, text_encoder, tokenizer, prompts: list[str], device, max_sequence_length: int):
        from diffusers import QwenImagePipeline

        from ..generation.prompt_encoding import PromptEmbeds

        pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                                 transformer=None)
        embeds, mask = pipe._get_qwen_prompt_embeds(prompts, device)
        embeds, mask = embeds[:, :max_sequence_length], mask[:, :max_sequence_length]
        return PromptEmbeds(embeds=embeds, mask=mask.to(torch.long))

    # ------------------------------------------------------------------ VAE and latents (ModelFamily's, RGB)
    def pack_latents(self, latents):
        return pack_latents(latents)

    def unpack_latents(self, packed, img_shape):
        return unpack_latents(packed, img_shape)

    # ------------------------------------------------------------------ transformer
    def transformer_text_width(self, config: dict[str, Any]) -> int:
        return int(config.get("joint_attention_dim", -1))

    def predict_velocity(self, transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                         prompt_embeds_mask: torch.Tensor | None, img_shapes: Sequence[tuple[int, int, int]],
                         compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The transformer's velocity [B, N, 4C] in its compute dtype (`compute_dtype`, default
        `compute_dtype_of(transformer)`). An all-ones mask is dropped (attention_mask_or_none). Passes
        `txt_seq_lens` to diffusers versions whose forward still takes it (before 0.36); 0.42 derives the
        text length from the mask."""
        from ..denoising.flow_matching import attention_mask_or_none, compute_dtype_of

        dtype = compute_dtype or compute_dtype_of(transformer)
        kwargs = dict(hidden_states=x_t.to(dtype), timestep=sigmas.to(device=x_t.device, dtype=dtype),
                      encoder_hidden_states=prompt_embeds.to(dtype), img_shapes=list(img_shapes), return_dict=False)
        mask = attention_mask_or_none(prompt_embeds_mask)
        if mask is not None:
            kwargs["encoder_hidden_states_mask"] = mask.to(device=x_t.device)
        if _accepts(transformer.forward, "txt_seq_lens"):
            lens = (mask.sum(1).tolist() if mask is not None else [prompt_embeds.shape[1]] * prompt_embeds.shape[0])
            kwargs["txt_seq_lens"] = [int(v) for v in lens]
        return transformer(**kwargs)[0]

    # ------------------------------------------------------------------ pipeline (ModelFamily.load_pipeline)
    def sample(self, bundle, positive, negative, **options):
        from ..generation.sampling import sample_qwen_image_1

        return sample_qwen_image_1(bundle, positive, negative, **options)


QWEN_IMAGE_1 = QwenImage1()
