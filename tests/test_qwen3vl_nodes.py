"""LoadQwen3VL / ExtractIdentityFeatures run without ComfyUI; IMAGE input equals the PNG file."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.identity.features import FeatureSettings, extract_features
from qwen_identity.core.files.images import load_image
from qwen_identity.nodes.qwen3vl_nodes import NO_FOLDER, ExtractIdentityFeatures, LoadQwen3VL, pad_to_one_size


@pytest.fixture(scope="module")
def loaded(tiny_qwen3vl_dir):
    (bundle,) = LoadQwen3VL().load(NO_FOLDER, str(tiny_qwen3vl_dir), dtype="fp32", device="cpu")
    return bundle


def comfy_load_image(path):
    """What ComfyUI's LoadImage does: uint8 / 255 as float32 [1, H, W, 3]."""
    arr = np.array(Image.open(path).convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def test_every_input_has_a_tooltip():
    for cls in (LoadQwen3VL, ExtractIdentityFeatures):
        spec = cls.INPUT_TYPES()
        for group in spec.values():
            for name, (kind, opts) in group.items():
                assert opts.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
        assert cls.CATEGORY == "Qwen Identity" and cls.DESCRIPTION


def test_registered_in_the_pack():
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    assert NODE_CLASS_MAPPINGS["LoadQwen3VL"] is LoadQwen3VL
    assert NODE_CLASS_MAPPINGS["ExtractIdentityFeatures"] is ExtractIdentityFeatures


def test_dropdown_lists_models_folder(tiny_qwen3vl_dir, tmp_path, monkeypatch):
    import shutil

    (tmp_path / "qwen3_vl").mkdir()
    shutil.copytree(tiny_qwen3vl_dir, tmp_path / "qwen3_vl" / "My-Qwen3-VL")
    monkeypatch.setenv("QWEN_IDENTITY_MODELS_DIR", str(tmp_path))
    choices = LoadQwen3VL.INPUT_TYPES()["required"]["model"][0]
    assert choices == ["My-Qwen3-VL"]
    (bundle,) = LoadQwen3VL().load("My-Qwen3-VL", "", dtype="fp32", device="cpu")
    assert bundle.model_id == "My-Qwen3-VL"
    with pytest.raises(UserInputError, match="points outside"):  # a dropdown value from a foreign workflow
        LoadQwen3VL().load(f"../../{tiny_qwen3vl_dir.parent.name}/{tiny_qwen3vl_dir.name}", "", device="cpu")
    monkeypatch.setenv("QWEN_IDENTITY_MODELS_DIR", str(tmp_path / "empty"))
    assert LoadQwen3VL.INPUT_TYPES()["required"]["model"][0] == [NO_FOLDER]
    with pytest.raises(UserInputError, match="no Qwen3-VL model chosen"):
        LoadQwen3VL().load(NO_FOLDER, "  ", device="cpu")


def test_image_input_equals_png_file(loaded, tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(2):
        p = tmp_path / f"photo_view_{i}.png"
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    batch = torch.cat([comfy_load_image(p) for p in paths])
    for resolution in ("center_crop_448", "pixel_budget"):
        crop = "full" if resolution == "pixel_budget" else "center"   # random pixels: no face to crop
        feats, preview = ExtractIdentityFeatures().extract(loaded, batch, "merger_pooled", -1, resolution, 64 * 64,
                                                           crop=crop)
        direct = extract_features(loaded, [load_image(p) for p in paths],
                                  FeatureSettings(resolution=resolution, max_pixels=64 * 64, crop=crop))
        assert torch.equal(feats.per_image, direct.per_image) and torch.equal(feats.combined, direct.combined)
        assert preview.ndim == 4 and preview.shape[0] == 2 and preview.shape[-1] == 3
    assert tuple(preview.shape[1:3]) == (64, 64)  # 70x90 under a 64*64 budget -> 64x64 (what the model saw)


def test_llm_source_weights_and_preview_padding(loaded):
    images = torch.rand(3, 40, 56, 3, generator=torch.Generator().manual_seed(0))
    feats, preview = ExtractIdentityFeatures().extract(loaded, images, "llm_hidden", -2, "pixel_budget", 4096,
                                                       weights="1,0,0", crop="full")
    assert feats.meta["source"] == "llm_hidden" and feats.meta["layer"] == -2
    assert torch.allclose(feats.combined, feats.per_image[0], atol=1e-6)
    assert preview.shape == (3, 32, 64, 3)
    a, b = Image.new("RGB", (32, 64), (255, 0, 0)), Image.new("RGB", (64, 32), (0, 0, 255))
    padded = pad_to_one_size([a, b])
    assert {im.size for im in padded} == {(64, 64)}
    assert padded[0].getpixel((0, 0)) == (128, 128, 128) and padded[0].getpixel((32, 32)) == (255, 0, 0)


@pytest.mark.parametrize("images, match", [
    (torch.zeros(0, 32, 32, 3), "empty"),
    (torch.full((1, 32, 32, 3), float("nan")), "NaN"),
    (torch.zeros(2, 32, 32), "expected an IMAGE"),
])
def test_bad_image_inputs(loaded, images, match):
    with pytest.raises(UserInputError, match=match):
        ExtractIdentityFeatures().extract(loaded, images)


def test_one_pixel_image(loaded):
    feats, preview = ExtractIdentityFeatures().extract(loaded, torch.full((1, 1, 1, 3), 0.5), resolution="pixel_budget",
                                                       crop="full")
    assert preview.shape == (1, 32, 32, 3) and torch.isfinite(feats.combined).all()


def test_wrong_model_input():
    with pytest.raises(UserInputError, match="LoadQwen3VL"):
        ExtractIdentityFeatures().extract("not a model", torch.zeros(1, 8, 8, 3))


def test_comfyui_memory_cooperation(loaded, monkeypatch):
    """With ComfyUI present: progress bar + interrupt check; keep_loaded=False offloads and empties the cache."""
    from fake_comfy import install_fake_comfy

    calls = install_fake_comfy(monkeypatch)
    ExtractIdentityFeatures().extract(loaded, torch.rand(2, 32, 32, 3), resolution="pixel_budget", crop="full")
    assert ("bar", 2) in calls and ("update", 2, 2) in calls and ("interrupt_check",) in calls

    # keep_loaded=False on a (pretend) GPU: moved back to the CPU afterwards and the cache emptied.
    moves = []  # model.to is recorded, not done, so the tiny model keeps running on the CPU
    monkeypatch.setattr(loaded, "device", torch.device("meta"))  # stands in for a GPU: not the CPU
    monkeypatch.setattr(loaded, "keep_loaded", False)
    monkeypatch.setattr(loaded.model, "to", lambda dev, *a, **k: moves.append(str(dev)) or loaded.model)
    feats, _ = ExtractIdentityFeatures().extract(loaded, torch.rand(1, 32, 32, 3), resolution="pixel_budget",
                                                 crop="full")
    assert feats.n_images == 1
    assert moves == ["meta", "cpu"] and ("free_memory", "meta") in calls and ("soft_empty_cache",) in calls
