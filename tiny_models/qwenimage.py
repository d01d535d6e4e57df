"""Tiny random-weight Qwen-Image diffusers pipeline (transformer, VAE, Qwen2.5-VL text encoder,
scheduler with the real config, tokenizer), saved in the hub's `model_index.json` layout.

Mirrors diffusers' own QwenImage test components; the text width H = 32 stands in for 3584.
"""

from __future__ import annotations

import torch

from .tokenizer import special_ids

TEXT_HIDDEN = 32

# Qwen/Qwen-Image scheduler/scheduler_config.json
SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                        max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                        stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                        use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)


def build_components(tokenizer, num_layers: int = 2, seed: int = 0, text_hidden: int = TEXT_HIDDEN) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers,
                                              attention_head_dim=16, num_attention_heads=3,
                                              joint_attention_dim=text_hidden, guidance_embeds=False,
                                              axes_dims_rope=(8, 4, 4))
    torch.manual_seed(seed)
    z_dim = 4
    vae = AutoencoderKLQwenImage(base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * z_dim,
                                 latents_std=[1.0] * z_dim)
    ids = special_ids(tokenizer)
    torch.manual_seed(seed)
    te_config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=((len(tokenizer) + 63) // 64) * 64, hidden_size=text_hidden,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 2, 4]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=text_hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(te_config).eval()
    return dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                text_encoder=text_encoder, tokenizer=tokenizer)


def save_tiny_qwenimage(out_dir, tokenizer, seed: int = 0) -> None:
    from diffusers import QwenImagePipeline

    QwenImagePipeline(**build_components(tokenizer, seed=seed)).save_pretrained(out_dir)
