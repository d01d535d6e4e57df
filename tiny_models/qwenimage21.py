"""Tiny random-weight Qwen-Image 2.1 diffusers pipeline (`QwenImage21Pipeline`: single-stream
transformer, 16x VAE with RGBA in/out, Qwen3-VL text encoder + Qwen3VLProcessor, scheduler), saved in
the hub's `model_index.json` layout.

Mirrors diffusers' own QwenImage21 test components: the VAE keeps the 16x spatial compression the
pipeline hard-codes (five `dim_mult` stages), the transformer takes the VAE's latents unpatched
(in_channels = z_dim), one merged vision token covers 32 pixels (patch 16, merge 2). The text width
H = 48 stands in for 4096 (distinct from the tiny 1.x text width 32 and the tiny Qwen3-VL feature
width 64, so a mix-up is caught); z_dim = 8 stands in for 64. The processor's chat template is the
pack's Qwen3-VL template (system turn as `<|im_start|>system\\n...<|im_end|>\\n`, which is what the
pipeline counts to drop the system turn).
"""

from __future__ import annotations

import torch

from .qwen3vl import IMAGE_PROCESSOR_KW
from .qwenimage import SCHEDULER_CONFIG
from .tokenizer import special_ids

TEXT_HIDDEN = 48
Z_DIM = 8


def build_processor(tokenizer):
    """The tiny Qwen3-VL processor with a small minimum image size (32x32 px instead of 256x256), so a
    reference image keeps the size the pipeline gives it and its vision slots match its VAE latents (one
    slot per 32x32 px) at tiny sizes too, as diffusers' own 2.1 test components do."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_kw = {**IMAGE_PROCESSOR_KW, "size": {"shortest_edge": 32 * 32, "longest_edge": 16777216}}
    video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824}, patch_size=16,
                                            temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                                            image_std=[0.5, 0.5, 0.5])
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**image_kw), tokenizer=tokenizer,
                            video_processor=video_processor, chat_template=tokenizer.chat_template)


def build_components(tokenizer, num_layers: int = 2, seed: int = 0, text_hidden: int = TEXT_HIDDEN) -> dict:
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(patch_size=1, in_channels=Z_DIM, out_channels=Z_DIM,
                                                num_layers=num_layers, attention_head_dim=16, num_attention_heads=2,
                                                context_in_dim=text_hidden, mlp_ratio=2, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage21(base_dim=4, decoder_base_dim=4, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1, 1],
                                   num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True, True],
                                   latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM)
    ids = special_ids(tokenizer)
    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=((len(tokenizer) + 63) // 64) * 64, hidden_size=text_hidden,
                         intermediate_size=2 * text_hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=16,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=text_hidden,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    text_encoder = Qwen3VLForConditionalGeneration(config).eval()
    # a random final norm weight (a fresh one is all ones, which would hide a post-norm read)
    text_model = getattr(text_encoder.model, "language_model", text_encoder.model)
    with torch.no_grad():
        text_model.norm.weight.copy_(torch.linspace(0.5, 2.0, text_model.norm.weight.numel()))
    return dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                text_encoder=text_encoder, processor=build_processor(tokenizer))


def save_tiny_qwenimage21(out_dir, tokenizer, seed: int = 0) -> None:
    from diffusers import QwenImage21Pipeline

    QwenImage21Pipeline(**build_components(tokenizer, seed=seed)).save_pretrained(out_dir)
