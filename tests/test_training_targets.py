"""Caption and zero targets: the caption residual moves the base prompt onto the caption prompt at alpha=1."""

import pytest
import torch

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.residual.length_policy import expand_to_tokens, pool_to_slots
from qwen_identity.core.generation.prompt_encoding import encode_prompts
from qwen_identity.core.residual.training_targets import caption_targets, compose_prompt, text_hidden_size, zero_targets

BASE = "a portrait photo of a person, studio lighting, 85mm"


def test_compose_prompt_rule():
    assert compose_prompt(BASE, "a man with short brown hair.") == BASE + ", a man with short brown hair"
    assert compose_prompt("a photo,", "  a woman\nwith  glasses ") == "a photo, a woman with glasses"
    assert compose_prompt(BASE, "   ") == BASE


@pytest.mark.parametrize("k", [1, 3, 8])
def test_caption_target_moves_base_onto_caption_at_alpha_1(tiny_text_encoder, k):
    te, tok = tiny_text_encoder
    captions = ["a man with short brown hair, smiling", "a woman with long black hair wearing a red dress"]
    targets = caption_targets(te, tok, BASE, captions, k)
    assert targets.residuals.shape == (2, k, text_hidden_size(te)) and targets.mask.all()
    base = encode_prompts(te, tok, BASE)
    for i, caption in enumerate(captions):
        goal = encode_prompts(te, tok, compose_prompt(BASE, caption))
        assert goal.embeds.shape[1] != base.embeds.shape[1]  # S differs: the policy handles it
        injected = base.embeds[0].float() + expand_to_tokens(targets.residuals[i], base.mask[0])
        moved = pool_to_slots(injected, base.mask[0], k)
        want = pool_to_slots(goal.embeds[0].float(), goal.mask[0], k)
        before = pool_to_slots(base.embeds[0].float(), base.mask[0], k)
        assert torch.allclose(moved, want, atol=1e-4), (moved - want).abs().max()
        assert (before - want).abs().max() > 1e-2  # the test could fail: the prompts really differ


def test_zero_targets_and_bad_k(tiny_text_encoder):
    t = zero_targets(3, 2, 32)
    assert t.residuals.shape == (3, 2, 32) and not t.residuals.any()
    te, tok = tiny_text_encoder
    with pytest.raises(UserInputError, match="at least 1"):
        caption_targets(te, tok, BASE, ["x"], 0)
    with pytest.raises(UserInputError, match="base prompt is empty"):
        caption_targets(te, tok, "  ", ["x"], 1)


def test_caption_targets_record_the_base_prompts_token_rms(tiny_text_encoder):
    """ρ for InjectResidual's relative mode: the mean RMS of the base prompt's valid tokens."""
    from qwen_identity.core.generation.prompt_encoding import encode_prompts
    from qwen_identity.core.residual.training_targets import caption_targets

    te, tok = tiny_text_encoder
    base = "a portrait photo of a person"
    t = caption_targets(te, tok, base, ["red hair"], 1)
    enc = encode_prompts(te, tok, base)
    expected = enc.embeds[enc.mask.bool()].float().pow(2).mean(-1).sqrt().mean()
    assert t.text_token_rms is not None and abs(t.text_token_rms - float(expected)) < 1e-5


def test_reference_rms_is_the_base_prompts_and_the_injection_doc_says_so(tiny_text_encoder):
    """ρ (relative strength mode) is the mean valid-token RMS of the BASE prompt the head was trained for,
    not of the composed training prompts; core/residual/injection.py's docstring says which."""
    from qwen_identity.core.residual import injection

    te, tok = tiny_text_encoder
    captions = ["a man with short brown hair, smiling", "a woman with long black hair wearing a red dress"]
    rho = caption_targets(te, tok, BASE, captions, 1).text_token_rms
    base = encode_prompts(te, tok, BASE)
    want = float(base.embeds[0].float().pow(2).mean(-1).sqrt()[base.mask[0].bool()].mean())
    composed = encode_prompts(te, tok, [compose_prompt(BASE, c) for c in captions])
    other = float(composed.embeds.float().pow(2).mean(-1).sqrt()[composed.mask.bool()].mean())
    assert rho == pytest.approx(want, rel=1e-5) and abs(other - want) > 1e-6 * want
    doc = " ".join(injection.__doc__.split())
    assert "valid-token RMS of the base prompt" in doc and "of its training prompts" not in doc
