"""Prompt encoding equals diffusers' QwenImagePipeline.encode_prompt, and always returns a mask."""

import torch


def test_matches_diffusers_encode_prompt(tiny_qwenimage_dir, tiny_text_encoder):
    from diffusers import QwenImagePipeline

    from qwen_identity.core.generation.prompt_encoding import encode_prompts

    te, tok = tiny_text_encoder
    prompts = ["a portrait photo of a person, studio lighting, 85mm", "a man"]
    ours = encode_prompts(te, tok, prompts)
    pipe = QwenImagePipeline.from_pretrained(tiny_qwenimage_dir)
    ref, ref_mask = pipe.encode_prompt(prompt=prompts, device="cpu")
    assert torch.equal(ours.embeds, ref)
    assert torch.equal(ours.mask, ref_mask.long())
    assert ours.mask[1].sum() < ours.mask[0].sum()  # the shorter prompt is right-padded


def test_sequence_length_is_prompt_tokens_plus_5(tiny_text_encoder):
    from qwen_identity.core.generation.prompt_encoding import encode_prompts

    te, tok = tiny_text_encoder
    prompt = "a portrait photo of a person"
    n = len(tok(prompt).input_ids)
    suffix = len(tok("<|im_end|>\n<|im_start|>assistant\n").input_ids)  # 5 with the real tokenizer
    out = encode_prompts(te, tok, prompt)
    assert out.embeds.shape[1] == n + suffix  # the template prefix is dropped, the suffix stays
    assert bool(out.mask.all())


def test_conditioning_layout(tiny_text_encoder):
    from qwen_identity.core.residual.conditioning import entry_mask, make_conditioning
    from qwen_identity.core.generation.prompt_encoding import encode_prompts

    te, tok = tiny_text_encoder
    single = make_conditioning(encode_prompts(te, tok, "a person"))
    assert len(single) == 1 and single[0][1] == {"pooled_output": None}  # no mask when nothing is padded
    padded = make_conditioning(encode_prompts(te, tok, ["a person", "a person with long red hair and a hat"]))
    assert "attention_mask" in padded[0][1]
    assert torch.equal(entry_mask(*padded[0]), padded[0][1]["attention_mask"])
    assert bool(entry_mask(*single[0]).all())


def test_long_prompts_are_cut_where_stock_pipeline_call_cuts_them(tiny_qwenimage_dir):
    """A prompt longer than 512 tokens: the text the stock `QwenImagePipeline.__call__` hands its transformer
    (its default max_sequence_length, 512, not encode_prompt's 1024) is exactly what `encode_text` returns."""
    import inspect

    from diffusers import QwenImagePipeline

    from qwen_identity.core.generation import sampling

    assert inspect.signature(QwenImagePipeline.__call__).parameters["max_sequence_length"].default == 512
    bundle = sampling.load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", dtype="fp32")
    pipe = bundle.pipeline
    prompt = "a portrait photo of a person, " + " ".join(f"detail{i}" for i in range(400))
    assert len(pipe.tokenizer(prompt).input_ids) > 600
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    try:
        pipe(prompt=prompt, num_inference_steps=2, height=32, width=32, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    ours = sampling.encode_text(bundle, prompt)[0][0]
    assert seen[0].shape[1] == 512
    assert ours.shape == seen[0].shape and torch.allclose(ours, seen[0], atol=1e-6)
