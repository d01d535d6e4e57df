"""The node chain without ComfyUI: LoadQwen3VL -> ExtractIdentityFeatures -> LoadResidualHead ->
InjectResidual -> QwenImageSampleFromEmbeds -> AlphaGrid, on the tiny models; plus the nodes' contracts."""

import json
import shutil
import types

import numpy as np
import pytest
import torch

from qwen_identity.core.errors import ModelMismatchError, UserInputError
from qwen_identity.nodes.grid_nodes import AlphaGrid
from qwen_identity.nodes.inject_nodes import InjectResidual, QwenImageTextEncodeDiffusers
from qwen_identity.nodes.sampling_nodes import NO_FOLDER, LoadQwenImageDiffusers, QwenImageSampleFromEmbeds

OUR_NODES = (InjectResidual, QwenImageTextEncodeDiffusers, LoadQwenImageDiffusers, QwenImageSampleFromEmbeds,
             AlphaGrid)


def test_contracts_and_registration():
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    for cls in OUR_NODES:
        assert NODE_CLASS_MAPPINGS[cls.__name__] is cls and cls.__name__ in NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY == "Qwen Identity" and cls.DESCRIPTION
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        for group in cls.INPUT_TYPES().values():
            for name, (kind, opts) in group.items():
                assert opts.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
    req = QwenImageSampleFromEmbeds.INPUT_TYPES()["required"]
    assert (req["steps"][1]["default"], req["cfg"][1]["default"], req["width"][1]["default"],
            req["height"][1]["default"], req["seeds"][1]["default"]) == (28, 4.5, 512, 768, "1234,5678,9999")


@pytest.fixture(scope="module")
def pipeline(tiny_qwenimage_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_qwenimage_dir, root / "diffusers" / "Tiny-Qwen-Image")
    mp = pytest.MonkeyPatch()
    mp.setenv("QWEN_IDENTITY_MODELS_DIR", str(root))
    assert LoadQwenImageDiffusers.INPUT_TYPES()["required"]["model"][0] == ["Tiny-Qwen-Image"]
    (bundle,) = LoadQwenImageDiffusers().load("Tiny-Qwen-Image", "", dtype="fp32", device="cpu")
    mp.undo()
    return bundle


def test_loader_needs_a_model(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_IDENTITY_MODELS_DIR", str(tmp_path))
    assert LoadQwenImageDiffusers.INPUT_TYPES()["required"]["model"][0] == [NO_FOLDER]
    with pytest.raises(UserInputError, match="no Qwen-Image pipeline chosen"):
        LoadQwenImageDiffusers().load(NO_FOLDER, "", device="cpu")
    (tmp_path / "diffusers").mkdir()
    for bad in ("../other", "/etc", "../../x"):  # dropdown values from a shared workflow stay inside
        with pytest.raises(UserInputError, match="outside|absolute path"):
            LoadQwenImageDiffusers().load(bad, "", device="cpu")


def test_node_chain(pipeline, tiny_qwen3vl_dir, make_dataset, tmp_path):
    from qwen_identity.core.residual.head import HeadMeta, ResidualHead, save_head
    from qwen_identity.core.files.images import load_image, pil_to_comfy
    from qwen_identity.nodes.head_nodes import LoadResidualHead
    from qwen_identity.nodes.qwen3vl_nodes import NO_FOLDER as NO_VL, ExtractIdentityFeatures, LoadQwen3VL

    (vl,) = LoadQwen3VL().load(NO_VL, str(tiny_qwen3vl_dir), dtype="fp32", device="cpu")
    seed_dir = make_dataset(identities=1, views=2)[0]
    photos = pil_to_comfy([load_image(p) for p in sorted(seed_dir.glob("photo_view_*.png"))])
    features, _preview = ExtractIdentityFeatures().extract(vl, photos, crop="center")
    d = features.combined.shape[-1]
    torch.manual_seed(0)
    head = ResidualHead(d, 2, 32, meta=HeadMeta(feature_dim=d, tokens=2, hidden_size=32))
    with torch.no_grad():
        head.proj.weight.normal_(0, 2.0)
    save_head(head, tmp_path / "head.safetensors")
    loaded_head, summary = LoadResidualHead().load("", str(tmp_path / "head.safetensors"))
    assert "K=2" in summary

    (pos,) = QwenImageTextEncodeDiffusers().encode(pipeline, "a portrait photo of a person")
    (neg,) = QwenImageTextEncodeDiffusers().encode(pipeline, "blurry, low quality, deformed, watermark")
    cond, alphas = InjectResidual().inject(pos, loaded_head, features, alphas="0, 1.5", start_at=0.0, end_at=1.0)
    assert alphas == "0,1.5" and cond[0][0].shape[0] == 2
    images, seeds = QwenImageSampleFromEmbeds().sample(cond, neg, seeds="1234,99", steps=2, cfg=4.5, width=32,
                                                       height=32, max_batch=4, pipeline=pipeline)
    assert seeds == "1234,99" and images.shape == (4, 32, 32, 3)
    base, _ = QwenImageSampleFromEmbeds().sample(pos, neg, seeds="1234,99", steps=2, width=32, height=32,
                                                 max_batch=4, pipeline=pipeline)
    assert torch.allclose(images[:2], base, atol=1e-5)  # α = 0 row is the base prompt's images
    assert not torch.allclose(images[2:], base, atol=1e-3)  # α = 1.5 differs
    grid, meta_json = AlphaGrid().grid(images, alphas, seeds)
    meta = json.loads(meta_json)
    assert grid.shape[0] == 1 and (grid.shape[2], grid.shape[1]) == tuple(meta["grid_size"])
    assert meta["alphas"] == [0.0, 1.5] and meta["seeds"] == [1234, 99]
    c = meta["cells"][3]  # α = 1.5, seed 99 is image 3
    cell = grid[0, c["y"]:c["y"] + 32, c["x"]:c["x"] + 32]
    assert np.abs(cell.numpy() - images[3].numpy()).max() <= 0.5 / 255 + 1e-6

    # one strength instead of a list; a window; the negative side
    cond1, a1 = InjectResidual().inject(pos, loaded_head, features, strength=0.7, start_at=0.25, end_at=1.0)
    assert a1 == "0.7" and [x.get("start_percent") for _, x in cond1] == [0.25, 0.0]
    neg_push, _ = InjectResidual().inject(neg, loaded_head, features, strength=1.0)
    assert not torch.equal(neg_push[0][0], neg[0][0])

    with pytest.raises(ModelMismatchError, match="H=3584"):
        InjectResidual().inject([[torch.zeros(1, 4, 3584), {"pooled_output": None}]], loaded_head, features)
    with pytest.raises(UserInputError, match="empty item"):
        InjectResidual().inject(pos, loaded_head, features, alphas="1,,2")
    with pytest.raises(UserInputError, match="needs 2 α × 2 seeds = 4 images but got 2"):
        AlphaGrid().grid(images[:2], alphas, seeds)
    with pytest.raises(UserInputError, match="cell_notes has 1 lines for 4 images"):
        AlphaGrid().grid(images, alphas, seeds, cell_notes="only one")


@pytest.mark.parametrize("kw,match", [
    (dict(width=500), "width=500 is not a multiple of 16"),
    (dict(seeds=" "), "seed list is empty"),
    (dict(seeds="1;x"), "cannot read .x."),
])
def test_sample_node_bad_inputs(pipeline, kw, match):
    cond = [[torch.zeros(1, 4, 32), {"pooled_output": None}]]
    args = dict(seeds="1", steps=1, width=32, height=32, pipeline=pipeline) | kw
    with pytest.raises(UserInputError, match=match):
        QwenImageSampleFromEmbeds().sample(cond, cond, **args)


def test_sample_node_paths(pipeline):
    cond = [[torch.zeros(1, 4, 32), {"pooled_output": None}]]
    with pytest.raises(UserInputError, match="nothing to sample with"):
        QwenImageSampleFromEmbeds().sample(cond, cond, seeds="1", steps=1, width=32, height=32)
    with pytest.raises(UserInputError, match="not both"):
        QwenImageSampleFromEmbeds().sample(cond, cond, seeds="1", steps=1, width=32, height=32, pipeline=pipeline,
                                           model=object(), vae=object())
    with pytest.raises(UserInputError, match="LoadQwenImageDiffusers"):
        QwenImageSampleFromEmbeds().sample(cond, cond, seeds="1", steps=1, width=32, height=32, pipeline=object())


def test_sample_node_progress_and_cancel_inside_comfyui(pipeline, monkeypatch):
    cond = [[torch.randn(1, 4, 32), {"pooled_output": None}]]
    from fake_comfy import InterruptProcessingException, install_fake_comfy

    calls = install_fake_comfy(monkeypatch)
    QwenImageSampleFromEmbeds().sample(cond, cond, seeds="1,2", steps=3, width=32, height=32, max_batch=1,
                                       pipeline=pipeline)
    assert [c for c in calls if c[0] == "update"] == [("update", d, 6) for d in range(1, 7)]  # 2 cells x 3 steps
    assert sum(c == ("interrupt_check",) for c in calls) >= 6  # before every step
    calls = install_fake_comfy(monkeypatch, interrupt_at=3)
    with pytest.raises(InterruptProcessingException):
        QwenImageSampleFromEmbeds().sample(cond, cond, seeds="1", steps=5, width=32, height=32, pipeline=pipeline)
    assert 1 <= len([c for c in calls if c[0] == "update"]) < 5  # stopped early, at a step boundary


def test_sample_node_delegates_native_model_and_vae(monkeypatch):
    """MODEL + VAE go to nodes/native_sampling.sample_native with the node's arguments (its own tests run it
    against a real ComfyUI); without that module the node says the native path is unavailable."""
    import sys
    import types

    cond = [[torch.zeros(2, 4, 32), {"pooled_output": None}]]
    got = {}

    def sample_native(model, vae, positive, negative, seeds, steps, cfg, width, height, sampler_name, scheduler,
                      progress=None, max_batch=None):
        got.update(model=model, vae=vae, seeds=seeds, steps=steps, cfg=cfg, size=(width, height),
                   sampler=(sampler_name, scheduler), max_batch=max_batch)
        return torch.zeros(len(seeds) * 2, height, width, 3)

    fake = types.ModuleType("qwen_identity.nodes.native_sampling")
    fake.sample_native = sample_native
    monkeypatch.setitem(sys.modules, "qwen_identity.nodes.native_sampling", fake)
    images, seeds = QwenImageSampleFromEmbeds().sample(cond, cond, seeds="5,6", steps=7, cfg=3.0, width=32,
                                                       height=48, max_batch=2, model="M", vae="V",
                                                       sampler_name="euler", scheduler="simple")
    assert images.shape == (4, 48, 32, 3) and seeds == "5,6"
    assert got == dict(model="M", vae="V", seeds=[5, 6], steps=7, cfg=3.0, size=(32, 48),
                       sampler=("euler", "simple"), max_batch=2)
    QwenImageSampleFromEmbeds().sample(cond, cond, seeds="5", steps=1, width=32, height=32, model="M", vae="V")
    assert got["max_batch"] is None   # the default, 0 = auto: ComfyUI's memory estimate decides
    with pytest.raises(UserInputError, match="max_batch=-1: use 0 \\(auto\\)"):
        QwenImageSampleFromEmbeds().sample(cond, cond, seeds="5", steps=1, width=32, height=32, max_batch=-1,
                                           model="M", vae="V")
    monkeypatch.setitem(sys.modules, "qwen_identity.nodes.native_sampling", None)  # import fails
    with pytest.raises(UserInputError, match="native MODEL \\+ VAE path is not available"):
        QwenImageSampleFromEmbeds().sample(cond, cond, seeds="5", steps=1, width=32, height=32, model="M", vae="V")


def test_max_batch_auto_is_four_on_the_diffusers_path(monkeypatch):
    from qwen_identity.core.generation import acceleration, sampling
    from qwen_identity.core.generation.sampling import DEFAULT_MAX_BATCH, QwenImageBundle

    got = {}

    def fake_sample(bundle, positive, negative, seeds, **kw):
        got.update(kw)
        return types.SimpleNamespace(images=torch.zeros(1, 32, 32, 3))
    monkeypatch.setattr(sampling, "sample", fake_sample)
    monkeypatch.setattr(acceleration, "speed_options", lambda bundle, fast: {})
    bundle = QwenImageBundle.__new__(QwenImageBundle)
    cond = [[torch.zeros(1, 4, 32), {"pooled_output": None}]]
    QwenImageSampleFromEmbeds().sample(cond, cond, seeds="5", steps=2, width=32, height=32, pipeline=bundle)
    assert got["max_batch"] == DEFAULT_MAX_BATCH == 4
    QwenImageSampleFromEmbeds().sample(cond, cond, seeds="5", steps=2, width=32, height=32, max_batch=7,
                                       pipeline=bundle)
    assert got["max_batch"] == 7
