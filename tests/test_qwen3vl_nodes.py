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


# ---- features cached per (photos, model, settings) --------------------------------------------------

def _count_forwards(bundle):
    """Calls of the vision tower (every feature source runs it)."""
    calls = []
    visual = next(m for name, m in bundle.model.named_modules() if name.endswith("visual"))
    handle = visual.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def test_requeue_with_the_same_photos_model_and_settings_does_not_run_the_model(loaded):
    from qwen_identity.nodes.feature_cache import FEATURE_CACHE

    FEATURE_CACHE.clear()
    photos = torch.rand(2, 40, 40, 3, generator=torch.Generator().manual_seed(7))
    calls, handle = _count_forwards(loaded)
    try:
        first, view = ExtractIdentityFeatures().extract(loaded, photos, resolution="pixel_budget", crop="center")
        assert len(calls) > 0
        n = len(calls)
        # a re-queue: a new tensor with the same pixels (LoadImage reads the file again)
        again, view2 = ExtractIdentityFeatures().extract(loaded, photos.clone(), resolution="pixel_budget", crop="center")
        assert len(calls) == n and torch.equal(again.combined, first.combined) and torch.equal(view2, view)
        # anything that changes the features runs the model again: settings, weights, pixels
        ExtractIdentityFeatures().extract(loaded, photos, resolution="center_crop_448", crop="center")
        assert len(calls) > n
        n = len(calls)
        ExtractIdentityFeatures().extract(loaded, photos, resolution="pixel_budget", weights="1,0.5", crop="center")
        assert len(calls) > n
        n = len(calls)
        ExtractIdentityFeatures().extract(loaded, photos, resolution="pixel_budget", crop="full")
        assert len(calls) > n
        n = len(calls)
        changed = photos.clone()
        changed[0, 0, 0, 0] = 1.0 - changed[0, 0, 0, 0]
        ExtractIdentityFeatures().extract(loaded, changed, resolution="pixel_budget", crop="center")
        assert len(calls) > n
    finally:
        handle.remove()


def test_cache_key_names_the_model_and_its_precision(loaded):
    from dataclasses import replace

    from qwen_identity.nodes.feature_cache import FEATURE_CACHE

    photos = torch.rand(1, 16, 16, 3)
    base = FEATURE_CACHE.key(loaded, photos, settings={"a": 1})
    assert base == FEATURE_CACHE.key(replace(loaded), photos.clone(), settings={"a": 1})
    assert base != FEATURE_CACHE.key(replace(loaded, dtype=torch.bfloat16), photos, settings={"a": 1})
    assert base != FEATURE_CACHE.key(replace(loaded, path=None, model_id="other"), photos, settings={"a": 1})
    assert base != FEATURE_CACHE.key(loaded, photos, settings={"a": 2})
    assert FEATURE_CACHE.key(loaded, "not a tensor", settings={}) is None


# ---- under a real ComfyUI's model management (in this process, CPU) ----------------------------------

@pytest.fixture()
def comfy_mm():
    from comfyui_harness.env import import_comfy_in_process, require_comfyui

    require_comfyui()
    import_comfy_in_process()
    import comfy.model_management as mm

    from qwen_identity.nodes.feature_cache import FEATURE_CACHE

    FEATURE_CACHE.clear()
    mm.unload_all_models()
    yield mm
    mm.unload_all_models()
    FEATURE_CACHE.clear()


@pytest.mark.comfyui
@pytest.mark.parametrize("keep_loaded", [True, False])
def test_qwen3vl_is_one_of_comfyuis_managed_models(comfy_mm, tiny_qwen3vl_dir, keep_loaded):
    """LoadQwen3VL hands the model to ComfyUI (a ModelPatcher); extraction loads it with load_models_gpu;
    keep_loaded leaves it among ComfyUI's loaded models, where Unload models / free_memory evict it."""
    import comfy.model_patcher

    from qwen_identity.nodes.comfy_runtime import is_loaded_by_comfyui

    mm = comfy_mm
    (bundle,) = LoadQwen3VL().load(NO_FOLDER, str(tiny_qwen3vl_dir), dtype="fp32", keep_loaded=keep_loaded)
    patcher = bundle.host_handle
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
    assert bundle.device == mm.text_encoder_device() and patcher.load_device == bundle.device
    assert patcher.model_size() > 0 and not is_loaded_by_comfyui(bundle)   # loaded into RAM, not yet used

    photos = torch.rand(2, 40, 40, 3, generator=torch.Generator().manual_seed(3))
    feats, _ = ExtractIdentityFeatures().extract(bundle, photos, resolution="pixel_budget", crop="full")
    assert is_loaded_by_comfyui(bundle) is keep_loaded
    assert (patcher in mm.loaded_models()) is keep_loaded

    # what "Unload models" (and the memory estimate before sampling, through free_memory) does
    mm.unload_all_models()
    assert not is_loaded_by_comfyui(bundle)

    # the next extraction asks ComfyUI again, and the model runs the same
    from qwen_identity.nodes.feature_cache import FEATURE_CACHE

    FEATURE_CACHE.clear()
    again, _ = ExtractIdentityFeatures().extract(bundle, photos, resolution="pixel_budget", crop="full")
    assert torch.equal(again.combined, feats.combined)
    assert is_loaded_by_comfyui(bundle) is keep_loaded
    from qwen_identity.core.files.images import comfy_to_pil

    reference = extract_features(bundle, comfy_to_pil(photos), FeatureSettings(resolution="pixel_budget", crop="full"))
    assert torch.allclose(reference.combined, feats.combined, atol=1e-5)


@pytest.mark.comfyui
def test_comfyuis_memory_estimate_frees_the_qwen3vl(comfy_mm, tiny_qwen3vl_dir):
    """A sampler's load_models_gpu/free_memory asking for more than is free unloads the kept model."""
    from qwen_identity.nodes.comfy_runtime import is_loaded_by_comfyui

    mm = comfy_mm
    (bundle,) = LoadQwen3VL().load(NO_FOLDER, str(tiny_qwen3vl_dir), dtype="fp32", keep_loaded=True)
    ExtractIdentityFeatures().extract(bundle, torch.rand(1, 32, 32, 3), resolution="pixel_budget", crop="full")
    assert is_loaded_by_comfyui(bundle)
    mm.free_memory(1e30, bundle.device)
    assert not is_loaded_by_comfyui(bundle)
