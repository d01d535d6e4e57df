"""Qwen3-VL writes a one-line description (the tiny random model writes gibberish, but it must work)."""

import pytest

from qwen_identity.core.identity.captioning import clean_caption, write_caption
from qwen_identity.core.errors import UserInputError
from qwen_identity.tiny_models.dataset import identity_photo


@pytest.fixture(scope="module")
def tiny_vl(tiny_qwen3vl_dir):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3vl_dir).eval(), AutoProcessor.from_pretrained(tiny_qwen3vl_dir)


def test_tiny_model_writes_a_deterministic_one_line_caption(tiny_vl):
    model, processor = tiny_vl
    photos = [identity_photo(0, v, (64, 64)) for v in range(2)]
    a = write_caption(model, processor, photos, max_new_tokens=12)
    b = write_caption(model, processor, photos, max_new_tokens=12)
    assert a and a == b and "\n" not in a and a == clean_caption(a)


def test_no_photos_is_an_error(tiny_vl):
    with pytest.raises(UserInputError, match="no photos"):
        write_caption(*tiny_vl, [], name="seed_1")


def test_clean_caption():
    assert clean_caption('  "A man\n with  a beard"  ') == "A man with a beard"
