"""Qwen-Image 2.1: the family adapter.

What differs from 1.x (diffusers 0.42.1's `QwenImage21Pipeline`, `QwenImage21Transformer2DModel`,
`AutoencoderKLQwenImage21`):
- text: Qwen3-VL-8B (H = 4096) through a `Qwen3VLProcessor`; the prompt goes into a raw chat template
  with the system turn "Comprehend and analyze the provided prompt.", left-padded; the conditioning is
  the last decoder layer's output WITHOUT the final norm (the pipeline neutralises the norm with a
  hook), the system turn's tokens dropped, right-padded again. No 512-token cut (the stock pipeline has
  none). The real work is the pipeline's own `_get_qwen_prompt_embeds`, so embeddings and masks equal
  the stock ones;
- latents: 64 channels at 1/16 (tiny models: fewer), the VAE reads and writes RGBA (an RGB photo gets an
  opaque alpha channel; decoded images keep RGB), normalised with the config's latents_mean/std;
  tokens are the latent pixels themselves (patch 1: [B, C, h, w] -> [B, h·w, C], img_shapes (1, h, w));
  each slot of the joint sequence stands for 2x2 latent tokens, so h and w must be even (image sides
  multiples of 32);
- the transformer is single-stream and block-causal: the text and the target image's slots share one
  sequence (`img_mask` marks the slots), the output's last h·w tokens are the velocity; with
  `causal_condition` the text is modulated at t = 0, so its keys/values are the same at every step and
  the stock pipeline caches them (KV cache) after the first step;
- ComfyUI (0.38): latent format `QwenImage21`; state dicts have `txt_in.text_norm.weight`;
- defaults as the stock `__call__`: 1024x1024, 40 steps, true CFG off (scale 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserInputError
from .base import FamilyDefaults, ModelFamily, single_frame


REFERENCES_KEY = "qwen_image_21_references"   # in a CONDITIONING entry's dict: the reference images
MAX_REFERENCES = 10                             # the model card's limit


def pack_latents(latents: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """[B, C, h, w] or [B, C, 1, h, w] -> tokens [B, h·w, C] (QwenImage21Pipeline._pack_latents: a plain
    spatial flatten) and img_shapes [(1, h, w)] * B."""
    latents = single_frame(latents)
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even for Qwen-Image 2.1 (got {h}x{w}): image sides "
                         "must be multiples of 32")
    return latents.reshape(b, c, h * w).transpose(1, 2), [(1, h, w)] * b


def unpack_latents(packed: torch.Tensor, img_shape: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of pack_latents for one shape: [B, h·w, C] -> [B, C, h, w]."""
    _, h, w = img_shape
    b, n, c = packed.shape
    return packed.transpose(1, 2).reshape(b, c, h, w)


def target_slot_mask(batch: int, text_len: int, tokens: int, device) -> torch.Tensor:
    """img_mask [B, S + tokens/4]: False on the S text positions, True on the target image's slots (one per
    2x2 latent tokens), as the stock pipeline appends them for a text-only prompt."""
    mask = torch.zeros(batch, text_len + tokens // 4, dtype=torch.bool, device=device)
    mask[:, text_len:] = True
    return mask


def _to_rgba(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, ...] in [-1, 1] -> [B, 4, ...] with an opaque alpha (1.0), as the pipeline's RGBA photos."""
    if x.shape[1] == 4:
        return x
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)


class QwenImage21(ModelFamily):
    name = "qwen-image-2.1"
    title = "Qwen-Image 2.1"
    text_width = 4096
    text_encoder_id = "Qwen/Qwen3-VL-8B-Instruct"
    text_encoder_classes = ("Qwen3VLForConditionalGeneration",)
    pipeline_classes = ("QwenImage21Pipeline",)
    transformer_classes = ("QwenImage21Transformer2DModel",)
    vae_classes = ("AutoencoderKLQwenImage21",)
    comfy_latent_formats = ("QwenImage21",)
    state_dict_markers = ("txt_in.text_norm.weight",)
    comfy_text_width_keys = ("diffusion_model.txt_in.text_norm.weight",)
    rope_modules = ("diffusers.models.transformers.transformer_qwenimage21",)
    latent_channels = 64
    vae_scale_factor = 16
    patch_size = 1
    size_multiple = 32      # 16x VAE, and each slot of the joint sequence covers 2x2 latent tokens
    defaults = FamilyDefaults(width=1024, height=1024, steps=40, cfg=1.0)

    def describe_width(self) -> str:
        return "Qwen-Image 2.1 (Qwen3-VL-8B text encoder, H=4096)"

    # ------------------------------------------------------------------ prompts
    def load_text_encoder(self, folder: Path, device, dtype):
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

        root = Path(folder)
        try:
            text_encoder = Qwen3VLForConditionalGeneration.from_pretrained(
                root / "text_encoder", dtype=dtype, use_safetensors=True).to(device).eval()  # no pickles
            processor = Qwen3VLProcessor.from_pretrained(root / "processor")
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserInputError(f"cannot load the Qwen-Image 2.1 text encoder from {root} ({type(e).__name__}: "
                                 f"{first[:300]}); the folder is incomplete or damaged (it needs text_encoder/ and "
                                 "processor/, weights as safetensors).") from None
        return text_encoder, processor

    def encoder_pipeline(self, text_encoder, processor):
        """The stock pipeline with only its text stack (what `encode_prompts` runs)."""
        from diffusers import QwenImage21Pipeline

        if not hasattr(processor, "apply_chat_template") or not hasattr(processor, "image_processor"):
            raise UserInputError("Qwen-Image 2.1 encodes prompts with its Qwen3-VL processor (the folder's "
                                 "processor/), not a bare tokenizer: load the text encoder with load_text_encoder.")
        return QwenImage21Pipeline(scheduler=None, vae=None, text_encoder=text_encoder, processor=processor,
                                   transformer=None)

    def encode_prompts(self, text_encoder, processor, prompts: list[str], device, max_sequence_length: int):
        """As QwenImage21Pipeline.encode_prompt for text-only prompts (no cut: `max_sequence_length` is not used,
        the stock pipeline has none); the mask is always returned."""
        from ..generation.prompt_encoding import PromptEmbeds

        pipe = self.encoder_pipeline(text_encoder, processor)
        embeds, mask, _image_slots = pipe._get_qwen_prompt_embeds(prompts, None, device)
        return PromptEmbeds(embeds=embeds, mask=mask.to(torch.long))

    # ------------------------------------------------------------------ VAE and latents
    def vae_input(self, x: torch.Tensor) -> torch.Tensor:
        """The VAE reads RGBA: an RGB photo gets an opaque alpha channel."""
        return _to_rgba(x)

    def vae_output_pixels(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoded images keep RGB (the alpha channel is dropped)."""
        return decoded[:, :3]

    def pack_latents(self, latents):
        return pack_latents(latents)

    def unpack_latents(self, packed, img_shape):
        return unpack_latents(packed, img_shape)

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        return 2 * (height // (self.vae_scale_factor * 2)), 2 * (width // (self.vae_scale_factor * 2))

    # ------------------------------------------------------------------ transformer
    def transformer_text_width(self, config: dict[str, Any]) -> int:
        return int(config.get("context_in_dim", -1))

    def predict_velocity(self, transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                         prompt_embeds_mask: torch.Tensor | None, img_shapes: Sequence[tuple[int, int, int]],
                         compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Velocity [B, h·w, C] for tokens x_t [B, h·w, C] (one image size per batch, as the transformer
        requires): the target's slots appended to the text, timestep σ, the output's last h·w tokens. An
        all-ones mask is dropped (the pipeline passes None then)."""
        from ..denoising.flow_matching import attention_mask_or_none, compute_dtype_of

        shapes = [tuple(s) for s in img_shapes]
        if len(set(shapes)) > 1:
            raise ValueError(f"one image size per Qwen-Image 2.1 batch (got {sorted(set(shapes))})")
        dtype = compute_dtype or compute_dtype_of(transformer)
        b, n, _ = x_t.shape
        mask = attention_mask_or_none(prompt_embeds_mask)
        out = transformer(hidden_states=x_t.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype),
                          timestep=sigmas.to(device=x_t.device, dtype=dtype), img_shapes=[[s] for s in shapes],
                          img_mask=target_slot_mask(b, prompt_embeds.shape[1], n, x_t.device),
                          encoder_hidden_states_mask=None if mask is None else mask.to(device=x_t.device),
                          return_dict=False)[0]
        return out[:, -n:]

    # ------------------------------------------------------------------ pipeline
    def pipeline_text_stack(self, pipe):
        return pipe.text_encoder, pipe.processor

    @torch.no_grad()
    def encode_references(self, pipe, prompts, images: list, device, resolution: int) -> list:
        """CONDITIONING for `prompts` read together with reference `images` (PIL), as QwenImage21Pipeline.__call__
        prepares `image=`: each image resized to about resolution² pixels at its aspect (sides multiples of 32),
        shown to the text encoder (RGBA composited over white) and encoded by the VAE. The entry's extra dict
        carries them under REFERENCES_KEY (slots [S] bool, tokens [1, N, C], shapes) for the sampler; like the
        stock pipeline, one set of images serves every prompt of the batch."""
        from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions

        from ..generation.prompt_encoding import PromptEmbeds
        from ..residual.conditioning import make_conditioning

        if len(images) > MAX_REFERENCES:
            raise UserInputError(f"{len(images)} reference images: Qwen-Image 2.1 takes at most {MAX_REFERENCES}.")
        text_pipe = self.encoder_pipeline(pipe.text_encoder, pipe.processor)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        shown, tokens, shapes = [], [], []
        for img in images:
            img = img if img.mode == "RGBA" else img.convert("RGBA")
            w, h, _ = calculate_dimensions(resolution * resolution, img.size[0] / img.size[1])
            shown.append(text_pipe.image_processor.resize(img, width=w, height=h))
            pixels = text_pipe.image_processor.preprocess(img, width=w, height=h).unsqueeze(2)
            lat = self.encode_vae_input(pipe.vae, pixels.to(dtype=pipe.text_encoder.dtype))  # [1, C, h, w]
            packed, shape = pack_latents(lat)
            tokens.append(packed)
            shapes.append(shape[0])
        embeds, mask, slots = text_pipe._get_qwen_prompt_embeds(prompts, shown, device)
        if bool((slots != slots[:1]).any()):
            raise UserInputError("prompts read with reference images must share one layout: encode them one at a time.")
        # The transformer replaces the text positions of the image slots by the reference latents and reads the
        # mask only at text positions; the CONDITIONING's mask leaves the slots out, so InjectResidual spreads the
        # head's residual over the prompt's own tokens (the sampler puts the slots back: stock attention).
        text_mask = mask.long().clone()
        text_mask[:, slots[0].bool()] = 0
        cond = make_conditioning(PromptEmbeds(embeds.cpu(), text_mask.cpu()))
        cond[0][1][REFERENCES_KEY] = {"slots": slots[0].bool().cpu(), "tokens": torch.cat(tokens, dim=1),
                                      "shapes": shapes}
        return cond

    def sample(self, bundle, positive, negative, **options):
        from ..generation.sampling_qwen_image_21 import sample_qwen_image_21

        return sample_qwen_image_21(bundle, positive, negative, **options)


QWEN_IMAGE_21 = QwenImage21()
