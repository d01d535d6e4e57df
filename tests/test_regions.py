"""Two people in one picture without ComfyUI: the regions TwoPersonRegions builds (splits, masks, resize
notes, bad masks), the CONDITIONING it writes (ComfyUI's ConditioningSetMask keys), and the diffusers
path's per-pixel blend of masked entries (core/generation/sampling.py on the tiny pipeline).
The same composition inside a real ComfyUI: tests/test_regional_native.py."""

from __future__ import annotations

import logging

import pytest
import torch

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.generation import regions as rg
from qwen_identity.core.generation import sampling
from qwen_identity.nodes.region_nodes import TwoPersonRegions

W, H = 128, 64          # latent 16 x 8


def _cond(seed: int, batch: int = 1, seq: int = 5, width: int = 16, **extra):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, seq, width, generator=g), {"pooled_output": None, **extra}]]


# ---- regions ---------------------------------------------------------------------------------------

def test_left_right_and_top_bottom_splits_cover_the_picture_once():
    r = rg.build_regions("left/right", W, H, 0.5)
    assert r.a.shape == (8, 16) and not r.notes
    assert torch.equal(r.a[:, :8], torch.ones(8, 8)) and torch.equal(r.a[:, 8:], torch.zeros(8, 8))
    assert torch.equal(r.a + r.b, torch.ones(8, 16))
    t = rg.build_regions("top/bottom", W, H, 0.25)
    assert torch.equal(t.a[:2], torch.ones(2, 16)) and torch.equal(t.a[2:], torch.zeros(6, 16))
    # a split between latent pixels (0.3 x 128 = 38.4 px): the shared latent column is the mixed share
    m = rg.build_regions("left/right", W, H, 0.3)
    assert float(m.a[0, 4]) == pytest.approx(6 / 8) and float(m.a[0, 3]) == 1 and float(m.a[0, 5]) == 0


def test_image_size_and_latent_size_masks_are_used_as_drawn_other_sizes_are_resized_with_a_note():
    img = torch.zeros(1, H, W)
    img[:, :, :40] = 1                       # 40 px = 5 latent pixels
    r = rg.build_regions("mask", W, H, mask=img)
    assert not r.notes and torch.equal(r.a[:, :5], torch.ones(8, 5)) and float(r.a[:, 5:].sum()) == 0
    lat = torch.zeros(8, 16)
    lat[:, :5] = 1
    assert torch.equal(rg.build_regions("mask", W, H, mask=lat).a, r.a)
    odd = torch.zeros(1, 30, 100)             # drawn for another picture (and aspect ratio)
    odd[:, :, :50] = 1
    r2 = rg.build_regions("mask", W, H, mask=odd)
    assert len(r2.notes) == 1
    assert "100x30" in r2.notes[0] and f"{W}x{H}" in r2.notes[0] and "resized to 16x8" in r2.notes[0]
    assert "aspect ratio" in r2.notes[0]
    assert r2.a.shape == (8, 16) and float(r2.a[:, :7].min()) > 0.99 and float(r2.a[:, 9:].max()) < 0.01


def test_node_logs_the_resize_note_and_returns_the_regions_as_used(caplog):
    a, b = _cond(1), _cond(2)
    odd = torch.zeros(1, 32, 32)
    odd[:, :, :16] = 1
    with caplog.at_level(logging.WARNING):
        cond, region_a, region_b = TwoPersonRegions().combine(a, b, "mask", 0.5, W, H, 0, mask=odd)
    assert any("TwoPersonRegions" in m and "resized" in m for m in caplog.messages)
    assert region_a.shape == (1, H, W) and torch.allclose(region_a + region_b, torch.ones(1, H, W))
    assert torch.equal(region_a[0, ::8, ::8], cond[0][1]["mask"][0])  # 8x8 blocks of the latent mask


@pytest.mark.parametrize("kw, match", [
    (dict(layout="mask", mask=torch.zeros(1, H, W)), "person A's region is empty"),
    (dict(layout="mask", mask=torch.ones(1, H, W)), "person B's region is empty"),
    (dict(layout="mask", mask=torch.zeros(1, H, W).index_fill_(2, torch.tensor([3, 4]), 1.0)),
     "person A's region is empty after shrinking the mask to the latent size"),  # a 2-px stripe: < half a block
    (dict(layout="mask"), "layout 'mask' needs a MASK"),
    (dict(layout="left/right", mask=torch.ones(1, H, W)), "layout is 'left/right', which ignores it"),
    (dict(layout="mask", mask=torch.ones(2, H, W) * 0.5), r"shape \[2, 64, 128\]: give ONE mask"),
    (dict(layout="mask", mask=torch.full((1, H, W), 2.0)), "holds values 2..2; a MASK holds 0..1"),
    (dict(layout="mask", mask=torch.full((1, H, W), float("nan"))), "NaN"),
    (dict(layout="mask", mask="not a mask"), "not a MASK tensor"),
    (dict(layout="diagonal"), "unknown layout 'diagonal'"),
    (dict(layout="left/right", split=1.0), "split=1.0 must be between 0 and 1"),
    (dict(layout="left/right", width=100), "width=100 must be a positive multiple of 16"),
])
def test_bad_regions_say_the_fix(kw, match):
    args = dict(layout="left/right", width=W, height=H, split=0.5) | kw
    with pytest.raises(UserInputError, match=match):
        rg.build_regions(args.pop("layout"), args.pop("width"), args.pop("height"), **args)


def test_two_masks_overlap_is_a_weighted_average_and_uncovered_pixels_are_an_error():
    a = torch.zeros(1, H, W)
    a[..., :80] = 1                           # latent columns 0-9
    b = torch.zeros(1, H, W)
    b[..., 48:] = 0.5                         # latent columns 6-15 at half weight
    r = rg.build_regions("mask", W, H, mask=a, mask_b=b)
    assert len(r.notes) == 1 and "overlap on 25%" in r.notes[0]  # columns 6-9 of 16
    assert float(r.a[0, 7]) == 1 and float(r.b[0, 7]) == 0.5       # A's share there: 1 / 1.5
    hole = b.clone()
    hole[..., 80:96] = 0                      # columns 10-11 in neither mask
    with pytest.raises(UserInputError, match="12% of the picture is in neither mask nor mask_b.*predicts zero"):
        rg.build_regions("mask", W, H, mask=a, mask_b=hole)


def test_feather_turns_the_border_into_a_ramp_that_still_sums_to_one():
    r = rg.build_regions("left/right", W, H, 0.5, feather=32)   # 4 latent pixels
    row = r.a[0]
    assert torch.all(row[1:] <= row[:-1]) and float(row[0]) == 1 and float(row[-1]) == 0
    assert 2 <= int(((row > 0) & (row < 1)).sum()) <= 4
    assert torch.allclose(r.a + r.b, torch.ones_like(r.a))
    assert torch.equal(rg.build_regions("left/right", W, H, 0.5, feather=8).a, rg.build_regions("left/right", W, H).a)


def test_conditioning_carries_comfyuis_own_mask_keys_and_inputs_are_untouched():
    a = _cond(1, batch=3, start_percent=0.0, end_percent=0.6) + _cond(3)   # an α list + a step window
    b = _cond(2)
    before = [dict(e[1]) for e in a + b]
    cond, _, _ = TwoPersonRegions().combine(a, b, "left/right", 0.5, W, H, 0)
    assert len(cond) == 3 and cond[0][0] is a[0][0] and cond[2][0] is b[0][0]
    regions = rg.build_regions("left/right", W, H, 0.5)
    for entry, weights in zip(cond, (regions.a, regions.a, regions.b)):
        # exactly what ComfyUI's ConditioningSetMask(mask, set_cond_area="default", strength=1.0) writes
        assert entry[1]["set_area_to_bounds"] is False and entry[1]["mask_strength"] == 1.0
        assert entry[1]["mask"].shape == (1, 8, 16) and torch.equal(entry[1]["mask"][0], weights)
    assert cond[0][1]["end_percent"] == 0.6 and cond[0][1]["pooled_output"] is None
    assert [dict(e[1]) for e in a + b] == before
    with pytest.raises(UserInputError, match="conditioning_b already carries a region"):
        TwoPersonRegions().combine(a, cond, "left/right", 0.5, W, H, 0)
    with pytest.raises(UserInputError, match="conditioning_a is empty"):
        TwoPersonRegions().combine([], b, "left/right", 0.5, W, H, 0)


def test_packed_weights_follow_diffusers_latent_packing():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    g = torch.Generator().manual_seed(0)
    region = torch.rand(6, 8, generator=g)
    latent = region[None, None, None].expand(1, 1, 4, 6, 8)          # every channel carries the region
    packed = QwenImagePipeline._pack_latents(latent, 1, 4, 6, 8)[0]
    assert torch.equal(rg.packed_weights(region, 4), packed)


def test_mask_notes_and_entry_region_read_masks_back():
    m = torch.zeros(1, 40, 40)
    assert rg.mask_notes([[torch.zeros(1, 2, 3), {"mask": m}]], 8, 16, "positive")[0].startswith(
        "a positive conditioning mask is 40x40 but the image is 128x64")
    assert rg.mask_notes([[torch.zeros(1, 2, 3), {"mask": torch.zeros(1, 64, 128)}]], 8, 16, "positive") == []
    w = rg.entry_region({"mask": torch.ones(1, 8, 16), "mask_strength": 0.5}, 8, 16, "x")
    assert torch.equal(w, torch.full((8, 16), 0.5))
    assert rg.entry_region({"pooled_output": None}, 8, 16, "x") is None
    with pytest.raises(UserInputError, match="mask bounds"):
        rg.entry_region({"mask": torch.ones(1, 8, 16), "set_area_to_bounds": True}, 8, 16, "x")


# ---- the diffusers path ----------------------------------------------------------------------------

TW, TH = 32, 48     # the tiny pipeline: VAE factor 4 -> latent 12 x 8, packed 6 x 4 tokens


@pytest.fixture(scope="module")
def bundle(tiny_qwenimage_dir):
    return sampling.load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def people(bundle):
    a = sampling.encode_text(bundle, "a portrait photo of a woman with red hair")
    b = sampling.encode_text(bundle, "an old man with a grey beard, oil painting")
    neg = sampling.encode_text(bundle, sampling.DEFAULT_NEGATIVE_PROMPT)
    return a, b, neg


def _first_velocity(bundle, monkeypatch, positive, negative, seed=3, cfg=4.5):
    """The velocity our loop hands the scheduler at the first step (after CFG)."""
    seen = []
    cls = type(bundle.pipeline.scheduler)
    original = cls.step

    def step(self, model_output, *args, **kwargs):
        seen.append(model_output.detach().clone())
        return original(self, model_output, *args, **kwargs)

    monkeypatch.setattr(cls, "step", step)
    res = sampling.sample(bundle, positive, negative, seeds=[seed], steps=2, cfg=cfg, width=TW, height=TH,
                          return_latents=True, decode=False)
    monkeypatch.setattr(cls, "step", original)
    return seen[0][0], res.latents[0]


def _masked(cond, weights):
    return rg.masked_conditioning(cond, weights, "c")


def test_diffusers_path_each_region_gets_its_own_persons_prediction(bundle, people, monkeypatch):
    a, b, neg = people
    left = torch.zeros(12, 8)
    left[:, :4] = 1                                         # packed token columns 0-1 are A's
    pair = _masked(a, left) + _masked(b, 1 - left)
    v_pair, lat_pair = _first_velocity(bundle, monkeypatch, pair, neg)
    v_a, lat_a = _first_velocity(bundle, monkeypatch, a, neg)
    v_b, _ = _first_velocity(bundle, monkeypatch, b, neg)
    tok_a = rg.packed_weights(left, 4)[:, 0] == 1
    assert int(tok_a.sum()) == 12                           # 6 rows x 2 token columns
    assert (v_a - v_b).abs()[tok_a].mean() > 0.01           # the people differ there 1000x the tolerance below
    assert torch.allclose(v_pair[tok_a], v_a[tok_a], atol=1e-5), (v_pair[tok_a] - v_a[tok_a]).abs().max()
    assert torch.allclose(v_pair[~tok_a], v_b[~tok_a], atol=1e-5)
    # a full-frame mask for A (B weighted zero everywhere) reproduces the single-person result
    full = _masked(a, torch.ones(12, 8)) + _masked(b, torch.zeros(12, 8))
    _, lat_full = _first_velocity(bundle, monkeypatch, full, neg)
    assert torch.allclose(lat_full, lat_a, atol=1e-5) and not torch.allclose(lat_pair, lat_a, atol=1e-3)


def test_diffusers_path_refuses_uncovered_pixels_and_mask_bounds(bundle, people):
    a, b, neg = people
    left = torch.zeros(12, 8)
    left[:, :4] = 1
    with pytest.raises(UserInputError, match="region masks leave 50% of the picture uncovered"):
        sampling.sample(bundle, _masked(a, left), neg, seeds=[1], steps=2, width=TW, height=TH, decode=False)
    bounds = [[a[0][0], {**a[0][1], "mask": left[None], "set_area_to_bounds": True}]]
    with pytest.raises(UserInputError, match="mask bounds"):
        sampling.sample(bundle, bounds, neg, seeds=[1], steps=2, width=TW, height=TH, decode=False)
