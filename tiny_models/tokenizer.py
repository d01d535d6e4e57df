"""A Qwen2-style byte-level BPE tokenizer trained offline.

Same pre-tokenizer and special tokens (in the real order) as the Qwen2.5-VL / Qwen3-VL tokenizer;
its corpus contains Qwen-Image's prompt template, so the template prefix is 34 tokens like the real
one (diffusers' `prompt_template_encode_start_idx`).
"""

from __future__ import annotations

import json

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

QWENIMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

_CORPUS = [
    QWENIMAGE_TEMPLATE.format(""),
    "You are a helpful assistant.",
    "Describe this image. Describe the person in this photo: face, hair, eyes, skin, age, clothing.",
    "A portrait photo of a person with short brown hair, smiling, studio lighting, 85mm, high quality.",
    "A woman with long black hair wearing a red dress standing in a park at sunset.",
    "A man with a beard and glasses, wearing a blue shirt, looking at the camera.",
    "blurry, low quality, deformed, watermark. bad quality, low resolution.",
    "system user assistant Picture 1: Picture 2: 0123456789",
]

# A simplified Qwen3-VL chat template: no default system prompt, the image placeholder
# <|vision_start|><|image_pad|><|vision_end|> that the processor expands to N image tokens.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _train_bpe(vocab_size: int):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    texts = [t.replace("<|im_start|>", " ").replace("<|im_end|>", " ") for t in _CORPUS]
    tok.train_from_iterator(texts * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_tokenizer(vocab_size: int = 1000):
    """A transformers `Qwen2Tokenizer` (the class both Qwen2.5-VL and Qwen3-VL use)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(vocab_size)
    next_id = max(vocab.values()) + 1
    for t in QWEN_SPECIAL_TOKENS:
        vocab[t] = next_id
        next_id += 1
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               extra_special_tokens=QWEN_SPECIAL_TOKENS, model_max_length=32768,
                               clean_up_tokenization_spaces=False, split_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def special_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
