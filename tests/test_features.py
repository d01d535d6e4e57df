"""Identity features on the tiny Qwen3-VL: shapes, norms, averaging, determinism, resolution, cache."""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hyp_settings, strategies as st
from PIL import Image

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.identity.features import (FeatureSettings, IdentityFeatures, combine_features, extract_features,
                                         load_feature_cache, parse_weights, prepare_images, save_feature_cache,
                                         settings_from_meta)

BUDGET = FeatureSettings(resolution="pixel_budget", crop="full", max_pixels=96 * 96)  # small images keep the suite fast


@pytest.fixture(scope="module")
def bundle(tiny_qwen3vl_dir):
    from qwen_identity.core.identity.qwen3vl import load_qwen3vl

    return load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu", dtype="fp32")


def photo(seed, size=(96, 64)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def photos():
    return [photo(i, (64 + 16 * i, 96)) for i in range(3)]


@pytest.mark.parametrize("source", ["merger_pooled", "llm_hidden"])
def test_shapes_unit_norm_and_meta(bundle, photos, source):
    s = FeatureSettings(source=source, resolution="pixel_budget", crop="full", max_pixels=96 * 96)
    f = extract_features(bundle, photos, s, batch_size=2)
    assert f.per_image.shape == (3, bundle.feature_dim) and f.combined.shape == (bundle.feature_dim,)
    assert f.per_image.dtype == f.combined.dtype == torch.float32
    assert torch.allclose(f.per_image.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert math.isclose(float(f.combined.norm()), 1.0, abs_tol=1e-5)
    assert f.weights is None
    assert f.meta["model_id"] == bundle.model_id and f.meta["feature_dim"] == bundle.feature_dim
    assert f.meta["source"] == source and f.meta["n_images"] == 3 and f.meta["pack_version"]
    assert f.meta["layer"] == (-1 if source == "llm_hidden" else None)
    assert settings_from_meta(f.meta).to_meta() == s.to_meta()


def test_center_crop_default_sees_448(bundle):
    f = extract_features(bundle, [photo(7, (64, 80))], FeatureSettings(crop="center"))
    assert f.meta["resolution"] == "center_crop_448" and f.meta["max_pixels"] == 448 * 448
    assert f.meta["source"] == "merger_pooled"
    assert FeatureSettings().crop == "face"  # the default crop (tests/test_face_crop.py)


def test_combined_is_normalised_mean_and_weights_are_honoured(bundle, photos):
    f = extract_features(bundle, photos, BUDGET)
    mean = f.per_image.mean(0)
    assert torch.allclose(f.combined, mean / mean.norm(), atol=1e-6)
    only_first = extract_features(bundle, photos, BUDGET, weights="1,0,0")
    assert torch.allclose(only_first.combined, f.per_image[0], atol=1e-6)
    w = extract_features(bundle, photos, BUDGET, weights=[2, 1, 0.5])
    manual = (2 * f.per_image[0] + f.per_image[1] + 0.5 * f.per_image[2]) / 3.5
    assert torch.allclose(w.combined, manual / manual.norm(), atol=1e-6)
    assert w.weights.tolist() == [2.0, 1.0, 0.5]
    assert not torch.allclose(w.combined, f.combined, atol=1e-4)  # the weights changed the result


def test_views_of_one_identity_are_closer_than_other_identities(bundle, make_dataset):
    from qwen_identity.core.files.images import load_image

    dirs = make_dataset(identities=2, views=2)
    feats = [extract_features(bundle, [load_image(p) for p in sorted(d.glob("*.png"))], BUDGET) for d in dirs]
    same = float(feats[0].per_image[0] @ feats[0].per_image[1])
    other = float(feats[0].per_image[0] @ feats[1].per_image[0])
    assert same > other


@pytest.mark.parametrize("source", ["merger_pooled", "llm_hidden"])
def test_deterministic_bitwise_on_cpu(bundle, photos, source):
    s = FeatureSettings(source=source, resolution="pixel_budget", crop="full", max_pixels=96 * 96)
    a = extract_features(bundle, photos, s, batch_size=2)
    b = extract_features(bundle, photos, s, batch_size=2)
    assert torch.equal(a.per_image, b.per_image) and torch.equal(a.combined, b.combined)


@pytest.mark.parametrize("source", ["merger_pooled", "llm_hidden"])
def test_batch_size_does_not_change_features(bundle, photos, source):
    s = FeatureSettings(source=source, resolution="pixel_budget", crop="full", max_pixels=96 * 96)
    one = extract_features(bundle, photos, s, batch_size=1)
    three = extract_features(bundle, photos, s, batch_size=3)
    assert torch.allclose(one.per_image, three.per_image, atol=1e-5)


def test_llm_layer_zero_is_the_merger_output(bundle, photos):
    """Layer 0 of the LLM is its input embeddings, where the image tokens ARE the merger output:
    this pins down that the LLM source reads exactly the image-token positions."""
    pooled = extract_features(bundle, photos, BUDGET)
    layer0 = extract_features(bundle, photos, FeatureSettings(source="llm_hidden", layer=0, resolution="pixel_budget", crop="full",
                                                              max_pixels=96 * 96))
    last = extract_features(bundle, photos, FeatureSettings(source="llm_hidden", resolution="pixel_budget", crop="full",
                                                            max_pixels=96 * 96))
    assert torch.allclose(pooled.per_image, layer0.per_image, atol=1e-5)
    assert not torch.allclose(pooled.per_image, last.per_image, atol=1e-3)


def test_layer_out_of_range(bundle, photos):
    with pytest.raises(UserInputError, match=r"layer 99 does not exist.*3 hidden states"):
        extract_features(bundle, photos[:1], FeatureSettings(source="llm_hidden", layer=99, resolution="pixel_budget", crop="full",
                                                             max_pixels=64 * 64))


def test_progress_is_reported_per_batch(bundle, photos):
    calls = []
    extract_features(bundle, photos, BUDGET, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 3), (2, 3), (3, 3)]


# --- what the model sees -----------------------------------------------------------------------
def test_pixel_budget_bounds_a_huge_photo():
    big = Image.new("RGB", (4000, 3000), (120, 30, 200))
    (out,) = prepare_images([big], FeatureSettings(resolution="pixel_budget", crop="full"))
    w, h = out.size
    assert w * h <= 448 * 448 and w % 32 == 0 and h % 32 == 0
    assert abs(w / h - 4 / 3) < 0.1
    (crop,) = prepare_images([big], FeatureSettings(crop="center"))
    assert crop.size == (448, 448)


@hyp_settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 5000), h=st.integers(1, 5000), budget=st.integers(32 * 32, 1024 * 1024))
def test_pixel_budget_property(w, h, budget):
    from qwen_identity.core.identity.features import _budget_size

    bw, bh = _budget_size(w, h, budget, 32)
    assert bw % 32 == 0 and bh % 32 == 0 and bw >= 32 and bh >= 32
    assert bw * bh <= budget
    if w * h <= budget and w % 32 == 0 and h % 32 == 0:
        assert (bw, bh) == (w, h)  # already fits: untouched


def test_one_pixel_image_works(bundle):
    tiny = Image.new("RGB", (1, 1), (200, 10, 10))
    assert prepare_images([tiny], FeatureSettings(resolution="pixel_budget", crop="full"))[0].size == (32, 32)
    assert prepare_images([tiny], FeatureSettings(crop="center"))[0].size == (448, 448)
    f = extract_features(bundle, [tiny], FeatureSettings(resolution="pixel_budget", crop="full"))
    assert torch.isfinite(f.combined).all() and math.isclose(float(f.combined.norm()), 1.0, abs_tol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_other_modes_are_converted(mode):
    im = Image.new("RGB", (40, 50), (10, 200, 30)).convert(mode)
    (out,) = prepare_images([im], FeatureSettings(resolution="pixel_budget", crop="full", max_pixels=64 * 64))
    assert out.mode == "RGB" and out.size[0] % 32 == 0 and out.size[1] % 32 == 0


# --- bad input ---------------------------------------------------------------------------------
def test_empty_batch(bundle):
    with pytest.raises(UserInputError, match="no images"):
        extract_features(bundle, [])
    with pytest.raises(UserInputError, match="no images"):
        prepare_images([])


@pytest.mark.parametrize("weights, match", [("1,2", "2 weights given for 3"), ("1,x,1", "not comma-separated"),
                                            ([1, -1, 1], "not negative"), ("0,0,0", "sum to zero"),
                                            ([1, float("nan"), 1], "finite")])
def test_bad_weights(weights, match):
    with pytest.raises(UserInputError, match=match):
        parse_weights(weights, 3)
    assert parse_weights("  ", 3) is None and parse_weights(None, 3) is None


@pytest.mark.parametrize("kw, match", [({"source": "clip"}, "feature source"), ({"resolution": "huge"}, "resolution"),
                                       ({"resolution": "pixel_budget", "max_pixels": 100}, "max_pixels"),
                                       ({"layer": 1.5}, "layer")])
def test_bad_settings(kw, match):
    with pytest.raises(UserInputError, match=match):
        FeatureSettings(**kw)


def test_views_that_cancel_out_are_an_error():
    v = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    with pytest.raises(UserInputError, match="all zeros"):
        combine_features(v)


# --- the feature cache -------------------------------------------------------------------------
def test_cache_round_trip(bundle, photos, tmp_path):
    a = extract_features(bundle, photos, BUDGET, extra_meta={"photos": ["a.png", "b.png", "c.png"]})
    b = extract_features(bundle, photos[:2], BUDGET, weights="1,3")
    path = tmp_path / "cache" / "features.safetensors"
    save_feature_cache(path, {"/data/seed_1": a, "seed 2 (odd.key)": b})
    assert os.listdir(path.parent) == ["features.safetensors"]  # no temp file left
    back = load_feature_cache(path)
    assert list(back) == ["/data/seed_1", "seed 2 (odd.key)"]
    for orig, got in zip((a, b), back.values()):
        assert torch.equal(orig.per_image, got.per_image) and torch.equal(orig.combined, got.combined)
        assert got.meta == orig.meta
    assert back["/data/seed_1"].weights is None and back["seed 2 (odd.key)"].weights.tolist() == [1.0, 3.0]


def test_cache_bad_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserInputError, match="not found"):
        load_feature_cache(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04 pickle-ish junk")
    with pytest.raises(UserInputError, match="not a readable safetensors"):
        load_feature_cache(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserInputError, match="not a Qwen identity feature cache"):
        load_feature_cache(tmp_path / "other.safetensors")
    with pytest.raises(UserInputError, match="no identity features"):
        save_feature_cache(tmp_path / "empty.safetensors", {})


def test_cache_with_nan_is_refused(tmp_path):
    f = IdentityFeatures(per_image=torch.full((1, 4), float("nan")), combined=torch.zeros(4), weights=None, meta={})
    save_feature_cache(tmp_path / "nan.safetensors", {"k": f})
    with pytest.raises(UserInputError, match="NaN"):
        load_feature_cache(tmp_path / "nan.safetensors")
