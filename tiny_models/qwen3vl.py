"""Tiny random-weight Qwen3-VL (`Qwen3VLForConditionalGeneration` + `Qwen3VLProcessor`).

Same classes, processor settings (patch 16, merge 2, mean/std 0.5) and token ids as the real
checkpoints; only the widths and depths are small (text width D = 64).
"""

from __future__ import annotations

import torch

from .tokenizer import special_ids

# Real Qwen3-VL preprocessor_config.json values (patch 16, merge 2 -> 32 px per LLM token).
IMAGE_PROCESSOR_KW = dict(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
                          temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
TEXT_HIDDEN = 64


def build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824}, patch_size=16,
                                            temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                                            image_std=[0.5, 0.5, 0.5])
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**IMAGE_PROCESSOR_KW), tokenizer=tokenizer,
                            video_processor=video_processor, chat_template=tokenizer.chat_template)


def build_config(tokenizer, text_hidden: int = TEXT_HIDDEN, vision_hidden: int = 32):
    """A small Qwen3VLConfig whose token ids match `tokenizer` (merger width == text width, as in the real ones)."""
    from transformers import Qwen3VLConfig

    ids = special_ids(tokenizer)
    return Qwen3VLConfig(
        text_config=dict(vocab_size=((len(tokenizer) + 63) // 64) * 64, hidden_size=text_hidden,
                         intermediate_size=2 * text_hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                           patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=text_hidden,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def save_tiny_qwen3vl(out_dir, tokenizer, seed: int = 0) -> None:
    """Write model + processor to `out_dir` as `save_pretrained` lays out a hub checkpoint."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(build_config(tokenizer)).eval()
    model.save_pretrained(out_dir)
    build_processor(tokenizer).save_pretrained(out_dir)
