"""Atomic writes, image decoding/conversion, seed-dir discovery, the head checkpoint, devices."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_identity.core.files.atomic import atomic_write, atomic_write_json
from qwen_identity.core.errors import ModelMismatchError, UserInputError
from qwen_identity.core.residual.head import HeadMeta, ResidualHead, load_head, save_head
from qwen_identity.core.files.images import comfy_to_pil, load_image, pil_to_comfy, to_rgb
from qwen_identity.core.identity.seed_dirs import load_seed_dir, parse_seed_dir_args


# --- atomic writes -----------------------------------------------------------------------------
def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"v": 1})

    def boom(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["out.json"]  # no temp file left behind


def test_atomic_write_into_a_file_parent_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserInputError, match="is a file"):
        atomic_write_json(tmp_path / "f" / "out.json", {})


# --- images ------------------------------------------------------------------------------------
def test_comfy_round_trip_is_exact(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    comfy = torch.from_numpy(np.asarray(Image.open(tmp_path / "a.png")).astype(np.float32) / 255.0)[None]
    assert np.array_equal(np.asarray(comfy_to_pil(comfy)[0]), arr)
    assert torch.equal(pil_to_comfy([load_image(tmp_path / "a.png")]), comfy)


@pytest.mark.parametrize("mode", ["L", "1", "RGBA", "LA", "P", "I;16", "I", "F", "CMYK"])
def test_modes_become_rgb(mode):
    im = Image.new("RGB", (8, 6), (10, 200, 30)).convert(mode)
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == (8, 6)


def test_sixteen_bit_is_scaled_not_clipped():
    im = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(im)).max() == 255
    im = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))
    assert np.asarray(to_rgb(im))[0, 0, 0] == 128


def test_transparency_composites_on_white():
    im = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_rgb(im))[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_bad_photos_are_clear_errors(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(UserInputError, match="cannot decode.*zero.png"):
        load_image(tmp_path / "zero.png")
    with pytest.raises(UserInputError, match="not found"):
        load_image(tmp_path / "missing.png")
    good = tmp_path / "t.png"
    Image.new("RGB", (64, 64)).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:40])
    before = (tmp_path / "trunc.png").read_bytes()
    with pytest.raises(UserInputError, match="trunc.png"):
        load_image(tmp_path / "trunc.png")
    assert (tmp_path / "trunc.png").read_bytes() == before


def test_nan_and_empty_image_batches():
    with pytest.raises(UserInputError, match="NaN"):
        comfy_to_pil(torch.full((1, 4, 4, 3), float("nan")))
    with pytest.raises(UserInputError, match="empty"):
        comfy_to_pil(torch.zeros(0, 4, 4, 3))


# --- seed dirs ---------------------------------------------------------------------------------
def test_seed_dirs_parse_glob_and_file(make_dataset, tmp_path):
    dirs = make_dataset(identities=3)
    assert parse_seed_dir_args(",".join(map(str, dirs))) == dirs
    assert parse_seed_dir_args(str(dirs[0].parent / "seed_*")) == dirs
    listing = tmp_path / "list.txt"
    listing.write_text("# identities\n" + "\n".join(map(str, dirs[:2])) + "\n")
    assert parse_seed_dir_args(seed_dirs_file=str(listing)) == dirs[:2]


def test_seed_dir_errors(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_seed_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no photo_view"):
        load_seed_dir(tmp_path / "empty")
    with pytest.raises(UserInputError, match="matches no folder"):
        parse_seed_dir_args(str(tmp_path / "seed_*"))


def test_photos_sorted_naturally(tmp_path):
    for i in (10, 2, 1):
        Image.new("RGB", (4, 4)).save(tmp_path / f"photo_view_{i}.png")
    assert [p.name for p in load_seed_dir(tmp_path).photos] == ["photo_view_1.png", "photo_view_2.png",
                                                               "photo_view_10.png"]


# --- head --------------------------------------------------------------------------------------
def test_untrained_head_outputs_zero_and_round_trips(tmp_path):
    head = ResidualHead(8, 3, 5)
    assert torch.count_nonzero(head(torch.randn(2, 8))) == 0
    with torch.no_grad():
        head.proj.weight.normal_()
        head.scale.fill_(0.5)
    head.meta.base_prompt = "a portrait"
    path = save_head(head, tmp_path / "h.safetensors")
    loaded = load_head(path)
    f = torch.randn(4, 8)
    assert torch.equal(loaded(f), head(f)) and loaded(f).shape == (4, 3, 5)
    assert loaded.meta.base_prompt == "a portrait" and loaded.meta.hidden_size == 5


def test_head_rejects_wrong_feature_width():
    with pytest.raises(ModelMismatchError, match="D=4.*D=8"):
        ResidualHead(8, 1, 5)(torch.randn(1, 4))


def test_bad_head_files(tmp_path):
    import pickle

    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserInputError, match="not a readable safetensors"):
        load_head(tmp_path / "pickle.safetensors")
    head = ResidualHead(4, 1, 2)
    path = save_head(head, tmp_path / "ok.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserInputError):
        load_head(tmp_path / "trunc.safetensors")
    from safetensors.torch import save_file

    save_file({"proj.weight": torch.zeros(2, 4), "proj.bias": torch.zeros(2), "scale": torch.tensor([float("nan")])},
              str(tmp_path / "nan.safetensors"), metadata={"qwen_identity": HeadMeta(4, 1, 2).to_json()})
    with pytest.raises(UserInputError, match="NaN"):
        load_head(tmp_path / "nan.safetensors")
    save_file({"proj.weight": torch.zeros(2, 4)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserInputError, match="not a Qwen identity head"):
        load_head(tmp_path / "other.safetensors")
    meta = json.loads(HeadMeta(4, 1, 2).to_json())
    meta["tokens"] = 10**9
    save_file({"x": torch.zeros(1)}, str(tmp_path / "absurd.safetensors"), metadata={"qwen_identity": json.dumps(meta)})
    with pytest.raises(UserInputError, match="absurd"):
        load_head(tmp_path / "absurd.safetensors")


# --- devices -----------------------------------------------------------------------------------
def test_device_and_dtype_resolution():
    from qwen_identity.core.runtime.devices import resolve_device, resolve_dtype

    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserInputError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="no CUDA"):
            resolve_device("cuda")
