"""2.1's reference images beside the head (core/generation/reference_rows.py) through the node chain on the
tiny 2.1 pipeline: QwenImageTextEncodeDiffusers -> InjectResidual -> QwenImageSampleFromEmbeds with
reference_images and reference_rows -> AlphaGrid, each row group equal to sampling it on its own."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.files.images import pil_to_comfy
from qwen_identity.core.generation import sampling
from qwen_identity.core.residual.head import HeadMeta, ResidualHead
from qwen_identity.nodes.grid_nodes import AlphaGrid
from qwen_identity.nodes.inject_nodes import InjectResidual, QwenImageTextEncodeDiffusers
from qwen_identity.nodes.sampling_nodes import QwenImageSampleFromEmbeds

ARGS = dict(seeds="3,4", steps=2, cfg=1.0, width=32, height=32)
PROMPT = "a portrait photo of a person"


class _Features:
    def __init__(self, d):
        self.combined = torch.randn(d, generator=torch.Generator().manual_seed(1))
        self.meta = {}


@pytest.fixture(scope="module")
def pipe21(tiny_qwenimage21_dir):
    return sampling.load_qwen_image_pipeline(str(tiny_qwenimage21_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def chain(pipe21):
    (pos,) = QwenImageTextEncodeDiffusers().encode(pipe21, PROMPT)
    (neg,) = QwenImageTextEncodeDiffusers().encode(pipe21, "blurry")
    h = pos[0][0].shape[-1]
    torch.manual_seed(0)
    head = ResidualHead(8, 2, h, meta=HeadMeta(feature_dim=8, tokens=2, hidden_size=h, family="qwen-image-2.1"))
    with torch.no_grad():
        head.proj.weight.normal_(0, 2.0)
    cond, alphas = InjectResidual().inject(pos, head, _Features(8), alphas="0,1.5")
    photo = Image.fromarray((np.random.default_rng(0).random((40, 36, 3)) * 255).astype(np.uint8))
    return cond, neg, alphas, photo, head


def test_compare_rows_equal_each_group_sampled_alone(pipe21, chain):
    cond, neg, alphas, photo, head = chain
    node = QwenImageSampleFromEmbeds()
    images, seeds = node.sample(cond, neg, pipeline=pipe21, reference_images=pil_to_comfy([photo]),
                                reference_rows="compare", **ARGS)
    assert images.shape[0] == (1 + 2 + 2) * 2 and seeds == "3,4"
    head_only, _ = node.sample(cond, neg, pipeline=pipe21, **ARGS)
    ref_pos = sampling.encode_text(pipe21, PROMPT, references=[photo])
    refs_only = sampling.sample(pipe21, ref_pos, None, seeds=[3, 4], steps=2, cfg=1.0, width=32, height=32).images
    close = lambda a, b: float((a - b).abs().max()) < 1e-5   # noqa: E731
    assert close(images[0:2], refs_only)                  # row 1: references only
    assert close(images[2:6], head_only)                  # rows 2-3: the head at α 0 and 1.5, no references
    assert close(images[6:8], refs_only)                  # both at α=0: the residual adds nothing
    assert not close(images[8:10], refs_only)             # both at α=1.5: the head is used with the references
    assert not close(images[8:10], head_only[2:4])        # ... and the references with the head
    grid, meta = AlphaGrid().grid(images, alphas, seeds, rows="compare")
    assert all(f'"{t}, seed 3"' in meta for t in ("references only", "head α=0", "both α=1.5"))
    with pytest.raises(UserInputError):                   # the α layout does not fit these rows
        AlphaGrid().grid(images, alphas, seeds)


def test_single_row_groups(pipe21, chain):
    cond, neg, _, photo, _ = chain
    node = QwenImageSampleFromEmbeds()
    refs = pil_to_comfy([photo])
    only_refs, _ = node.sample(cond, neg, pipeline=pipe21, reference_images=refs, reference_rows="references only",
                               **ARGS)
    both, _ = node.sample(cond, neg, pipeline=pipe21, reference_images=refs, reference_rows="both", **ARGS)
    head, _ = node.sample(cond, neg, pipeline=pipe21, reference_images=refs, reference_rows="head only", **ARGS)
    plain, _ = node.sample(cond, neg, pipeline=pipe21, **ARGS)
    assert only_refs.shape[0] == 2 and both.shape[0] == 4 and torch.equal(head, plain)
    assert float((both[0:2] - only_refs).abs().max()) < 1e-5


def test_refusals(pipe21, chain, tiny_qwenimage_dir):
    cond, neg, _, photo, head = chain
    refs = pil_to_comfy([photo])
    node = QwenImageSampleFromEmbeds()
    bare = sampling.encode_text(pipe21, PROMPT)        # no prompt text recorded (as ComfyUI's own text encoders)
    with pytest.raises(UserInputError, match="QwenImageTextEncodeDiffusers"):
        node.sample(bare, neg, pipeline=pipe21, reference_images=refs, reference_rows="references only", **ARGS)
    (pos,) = QwenImageTextEncodeDiffusers().encode(pipe21, PROMPT)
    with pytest.raises(UserInputError, match="InjectResidual"):   # compare needs the head's residual
        node.sample(pos, neg, pipeline=pipe21, reference_images=refs, **ARGS)
    with pytest.raises(UserInputError, match="diffusers path only"):
        node.sample(cond, neg, model=object(), vae=object(), reference_images=refs, **ARGS)

    pipe1 = sampling.load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", dtype="fp32")
    (pos1,) = QwenImageTextEncodeDiffusers().encode(pipe1, PROMPT)
    with pytest.raises(UserInputError, match="takes no reference images"):
        node.sample(pos1, pos1, pipeline=pipe1, reference_images=refs, reference_rows="references only", **ARGS)
