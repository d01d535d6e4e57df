"""nodes/tune_nodes.py: TrainIdentityHead.

Without ComfyUI: the node's definition (tooltips), photo sizes, save names, the loss-curve image.
In a real ComfyUI in this process (COMFYUI_DIR) on the random one-layer, full-width native Qwen-Image, a
random Wan VAE and the pack's tiny Qwen3-VL, at 64x64 pixels and a few steps (CPU):
- the node's head lowers its held-out photo's denoising loss below the prompt alone;
- it equals the head `core.tuning.tune_head` gives for the same photos, features and prompt through the
  diffusers transformer holding the same weights and the Qwen-Image family's Denoiser (what
  `qwen-identity tune` runs), within HEAD_RTOL;
- the saved file is the returned head, in models/identity_heads/, with no temporary file left;
- Cancel mid-run keeps the best head so far (saved whole) and ends the prompt as ComfyUI's interrupt does;
- bad inputs: no photos, steps 0, a save name with a path, a MODEL that is not Qwen-Image, an init head of
  another width, a conditioning of another width - each a clear error, nothing written.
"""

from __future__ import annotations

import pytest
import torch

from qwen_identity.core.errors import ModelMismatchError, UserInputError
from qwen_identity.core.residual.head import ResidualHead, load_head
from qwen_identity.core.runtime.model_folders import set_folder_lookup
from qwen_identity.nodes import tune_nodes as tn

from comfyui_harness.env import import_comfy_in_process, require_comfyui
from comfyui_harness.stand_ins import NotQwenModel

H = 3584
RESOLUTION = "64x64"
STEPS = 4
LR = 3e-2
# The node and the reference share photos, features, prompt and seed; only the transformer call differs
# (ComfyUI's module vs diffusers', float32, velocities equal to ~1e-6 relative): a few Adam steps keep
# the heads within this relative distance.
HEAD_RTOL = 1e-3


# ---- without ComfyUI ---------------------------------------------------------------------------

def test_every_input_has_a_tooltip_and_the_outputs_are_named():
    spec = tn.TrainIdentityHead.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (_, opts) in spec[section].items():
            assert opts.get("tooltip"), f"{name} has no tooltip"
    assert set(spec["required"]) >= {"model", "vae", "conditioning", "photos", "qwen3vl", "steps", "learning_rate",
                                     "tokens", "seed", "resolution", "gradient_checkpointing"}
    assert set(spec["optional"]) == {"init_head", "save_name", "crop", "crop_fallback"}
    assert tn.TrainIdentityHead.RETURN_TYPES == ("QWEN_IDENTITY_HEAD", "IMAGE")
    assert tn.TrainIdentityHead.CATEGORY == "Qwen Identity"
    assert not hasattr(tn.TrainIdentityHead, "IS_CHANGED")   # a re-queue with the same inputs is cached


def test_photos_keep_their_aspect_in_the_nearest_bucket():
    from PIL import Image

    res = tn.parse_resolution("64x64")
    out = tn.photos_in_buckets([Image.new("RGB", (64, 128)), Image.new("RGB", (300, 150)),
                                Image.new("RGB", (20, 20))], res)
    sizes = [im.size for im in out]
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 for w, h in sizes)
    assert sizes[0][0] < sizes[0][1] and sizes[1][0] > sizes[1][1] and sizes[2] == (64, 64)   # small: upscaled
    assert tn.parse_resolution("768x512") == tn.Resolution(768, 512)
    for bad in ("big", "100x64", "0x0"):
        with pytest.raises(UserInputError, match="resolution.*WIDTHxHEIGHT"):
            tn.parse_resolution(bad)


def test_face_map_marks_the_box_at_the_latent_size():
    m = tn.face_map((16, 8, 48, 40), (64, 48), (6, 8))
    assert m.shape == (1, 6, 8) and m.sum() == 4 * 4 and m[0, 1:5, 2:6].all()
    assert tn.face_map((-1.0, -1.0, -1.0, -1.0), (64, 48), (6, 8)) is None and tn.face_map(None, (8, 8), (1, 1)) is None


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "/abs/head", "..", "c:head"])
def test_a_save_name_with_a_path_is_refused(name):
    with pytest.raises(UserInputError, match="plain file name"):
        tn.head_file_for(name)


def test_save_name_goes_into_the_heads_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_IDENTITY_MODELS_DIR", str(tmp_path))
    assert tn.head_file_for("") is None and tn.head_file_for("  ") is None
    assert tn.head_file_for("anna") == tmp_path / "identity_heads" / "anna.safetensors"
    assert tn.head_file_for("anna.safetensors") == tmp_path / "identity_heads" / "anna.safetensors"


def test_loss_curve_is_an_image_that_shows_the_losses():
    img = tn.loss_curve_image([1.0, 0.8, 0.7, float("nan"), 0.5], [{"step": 0, "held_out_loss": 0.9},
                                                                    {"step": 5, "held_out_loss": 0.6}])
    assert img.shape == (1, 400, 640, 3) and 0 <= img.min() and img.max() <= 1
    blank = tn.loss_curve_image([], [])
    assert (img != blank).float().mean() > 0.002     # lines were drawn


# ---- in a real ComfyUI -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comfy_parts(tiny_qwen3vl_dir):
    require_comfyui()
    import_comfy_in_process()
    import comfy.sd
    import comfy.utils

    from comfyui_harness.tiny_native import build_native_models
    from qwen_identity.nodes.qwen3vl_nodes import LoadQwen3VL
    from qwen_identity.core.runtime.model_folders import NO_FOLDER

    files = build_native_models(text_encoder=False)
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(files.transformer))
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files.vae)))
        (vl,) = LoadQwen3VL().load(NO_FOLDER, str(tiny_qwen3vl_dir), dtype="fp32", device="cpu")
    yield model, vae, vl, files


def _photos(n=3, size=(64, 80)):
    from qwen_identity.core.files.images import pil_to_comfy
    from qwen_identity.tiny_models.dataset import identity_photo

    return pil_to_comfy([identity_photo(0, v, size) for v in range(n)])


def _cond(width=H, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, seq, width, generator=g) * 4, {"pooled_output": None}]]


def _train(parts, **kw):
    model, vae, vl, _ = parts
    args = dict(model=model, vae=vae, conditioning=_cond(), photos=_photos(), qwen3vl=vl, steps=STEPS,
                learning_rate=LR, tokens=2, seed=0, resolution=RESOLUTION, gradient_checkpointing=False,
                crop="center")
    args.update(kw)
    with torch.inference_mode():            # as ComfyUI runs nodes
        return tn.TrainIdentityHead().train(**args)


@pytest.fixture
def heads_dir(tmp_path):
    class Lookup:
        def folder_paths(self, key):
            return [tmp_path / "identity_heads"] if key == "identity_heads" else None

        def file_names(self, key):
            return None

    set_folder_lookup(Lookup())
    yield tmp_path / "identity_heads"
    set_folder_lookup(None)


def test_node_head_lowers_held_out_loss_and_equals_the_diffusers_path(comfy_parts, heads_dir):
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import load_file

    from qwen_identity.core.families import family_named
    from qwen_identity.core.tuning import PersonalData, TuneOptions, tune_head
    from qwen_identity.core.identity.features import FeatureSettings
    from qwen_identity.core.files.images import comfy_to_pil
    from qwen_identity.nodes.comfy_training import conditioning_embeds, encode_photos

    model, vae, vl, files = comfy_parts
    head, curve = _train(comfy_parts, save_name="person")
    m = head.meta.metrics
    assert head.tokens == 2 and head.hidden_size == H and head.meta.target == "personal"
    assert m["held_out_photos"] and m["steps_done"] == STEPS
    assert m["held_out_loss"] < m["held_out_loss_none"], m      # the held-out photo's loss dropped
    assert curve.shape == (1, 400, 640, 3)
    saved = heads_dir / "person.safetensors"
    assert saved.is_file() and [p.name for p in heads_dir.iterdir()] == ["person.safetensors"]
    loaded = load_head(saved)
    assert torch.equal(loaded.proj.weight, head.proj.weight)

    # the reference: the same inputs through core tune_head and the diffusers transformer of the same weights
    pil = comfy_to_pil(_photos())
    names = [f"photo {i + 1}" for i in range(3)]
    features, _ = tn.photo_features(vl, pil, FeatureSettings(crop="center"), names)
    crops = tn.photos_in_buckets(pil, tn.parse_resolution(RESOLUTION))
    with torch.inference_mode():
        latents = [encode_photos(vae, model, tn.pixels_of(im))[0] for im in crops]
    e, mask = conditioning_embeds(_cond())
    data = PersonalData(latents=[x.clone() for x in latents], features=features.clone(), embeds=[e] * 3,
                        masks=[mask] * 3, face_maps=tn.face_maps_of(crops, latents), names=names)
    t = QwenImageTransformer2DModel(num_layers=1)    # rope tables are buffers computed at init: not on meta
    t.load_state_dict({k: v.float() for k, v in load_file(str(files.transformer)).items()}, assign=True)
    t.eval().requires_grad_(False)
    ref = tune_head(data, family_named("qwen-image").denoiser(t), TuneOptions(steps=STEPS, lr=LR, tokens=2, seed=0,
                                                             face_weight=tn.FACE_WEIGHT))
    assert ref.metrics["held_out_photos"] == m["held_out_photos"]
    for name, p in head.state_dict().items():
        q = ref.head.state_dict()[name]
        assert float((p - q).norm() / q.norm().clamp_min(1e-12)) < HEAD_RTOL, name
    assert abs(ref.metrics["held_out_loss"] - m["held_out_loss"]) < 1e-3 * m["held_out_loss"]
    print(f"held-out loss {m['held_out_loss_none']:.6g} -> {m['held_out_loss']:.6g} (node), "
          f"{ref.metrics['held_out_loss']:.6g} (diffusers); head distance "
          + ", ".join(f"{k} {float((v - ref.head.state_dict()[k]).norm() / ref.head.state_dict()[k].norm()):.2e}"
                      for k, v in head.state_dict().items()))


def test_one_photo_trains_with_its_mirror_image(comfy_parts):
    head, _ = _train(comfy_parts, photos=_photos(1), steps=2)
    assert head.meta.metrics["photos"] == 2 and head.meta.metrics["held_out_photos"] == []


def test_cancel_keeps_the_best_head_so_far_and_ends_the_prompt(comfy_parts, heads_dir, monkeypatch):
    import comfy.model_management as mm

    calls = []

    def cancel_after_three(step, total, loss):
        calls.append(step)
        if step == 3:
            mm.interrupt_current_processing(True)

    class Bar:
        def __init__(self, total):
            pass

        def update_absolute(self, value, total=None):
            cancel_after_three(value, total, None)

    import comfy.utils

    monkeypatch.setattr(comfy.utils, "ProgressBar", Bar)     # the Cancel button pressed during step 3
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(comfy_parts, save_name="cut", steps=20)
    finally:
        mm.interrupt_current_processing(False)
    assert calls == [1, 2, 3]                               # stopped after the step that saw the Cancel
    saved = heads_dir / "cut.safetensors"
    head = load_head(saved)                                 # whole, loadable
    assert head.meta.metrics["interrupted"] and head.meta.metrics["steps_done"] == 3
    assert [p.name for p in heads_dir.iterdir()] == ["cut.safetensors"]


def test_bad_inputs_say_the_fix_and_write_nothing(comfy_parts, heads_dir):
    import comfy.model_management as mm

    empty = torch.zeros(0, 64, 64, 3)
    cases = [
        (dict(photos=empty), UserInputError, "empty"),
        (dict(steps=0), UserInputError, "steps must be at least 1"),
        (dict(save_name="../elsewhere"), UserInputError, "plain file name"),
        (dict(model=NotQwenModel()), ModelMismatchError, "not Qwen-Image"),
        (dict(conditioning=_cond(width=64)), ModelMismatchError, "64 wide.*3584 wide"),
        (dict(init_head=ResidualHead(comfy_parts[2].feature_dim, 1, 64)), ModelMismatchError,
         "64 wide.*3584 wide"),
        (dict(init_head=ResidualHead(comfy_parts[2].feature_dim + 8, 1, H)), ModelMismatchError,
         "width"),
        (dict(init_head="head"), UserInputError, "LoadResidualHead"),
        (dict(qwen3vl=None), UserInputError, "LoadQwen3VL"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            _train(comfy_parts, save_name=kw.pop("save_name", "never"), **kw)
    assert not heads_dir.exists() or list(heads_dir.iterdir()) == []
    assert not mm.processing_interrupted()
