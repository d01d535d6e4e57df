"""The feature crop (core/identity/face_crop.py): the face found, aligned and squared on real photographs;
photos without a face named in one error or cropped by the chosen fallback; several faces; the centre and
full crops; what features and heads record, and the warning when a head meets features of another crop."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.identity import face_crop
from qwen_identity.core.identity.face_crop import NoFaceError, crop_region, eye_centres, legacy_crop
from qwen_identity.core.identity.features import (FeatureSettings, extract_features, prepare_photos,
                                                  settings_from_meta)
from qwen_identity.tiny_models.dataset import identity_photo
from real_faces import astronaut, cat, grace_hopper

pytest.importorskip("dlib")


def _eye_angle(image: Image.Image) -> float:
    """Degrees of the eye line in `image`, measured by the detector itself (independent of the crop code)."""
    faces, landmarks = face_crop._locator().locate(image)
    assert faces, "no face found in the crop"
    (lx, ly), (rx, ry) = eye_centres(landmarks)
    return math.degrees(math.atan2(ry - ly, rx - lx))


@pytest.mark.parametrize("make", [astronaut, grace_hopper], ids=["astronaut", "grace_hopper"])
def test_face_crop_of_real_photos_is_a_square_around_the_face(make):
    photo = make()
    (seen,), (info,) = prepare_photos([photo], FeatureSettings(crop="face"))
    assert seen.size == (448, 448) and info.crop == "face" and info.faces_found == 1 and info.note == ""
    left, top, right, bottom = info.box
    side = max(right - left, bottom - top)
    assert 40 <= side <= min(photo.size)
    # the face fills the middle of the crop: found again there, about 1/FACE_MARGIN of the side, centred
    faces, _ = face_crop._locator().locate(seen)
    (fl, ft, fr, fb) = faces[0].box
    assert abs((fl + fr) / 2 - 224) < 448 * 0.1 and abs((ft + fb) / 2 - 224) < 448 * 0.1
    assert 0.6 / face_crop.FACE_MARGIN < (fr - fl) / 448 < 1.5 / face_crop.FACE_MARGIN
    assert abs(_eye_angle(seen)) < 3.0


@pytest.mark.parametrize("degrees", [-20, 15])
def test_face_is_turned_so_the_eyes_are_level(degrees):
    tilted = astronaut().rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0))
    assert abs(_eye_angle(tilted)) > 10          # the plant: the eyes are not level in the photo
    square, info = crop_region(tilted, "face")
    assert abs(info.eye_angle) > 10
    assert abs(_eye_angle(square)) < 3.0         # ... and are level in the crop


def test_photos_without_a_face_are_named_in_one_error():
    photos = [astronaut(), identity_photo(0, 0, (160, 160)), cat()]
    with pytest.raises(NoFaceError, match=r"no face found in 2 of 3 photos \(b\.png, c\.png\).*crop_fallback"):
        prepare_photos(photos, FeatureSettings(crop="face"), names=["a.png", "b.png", "c.png"])
    assert issubclass(NoFaceError, UserInputError)


@pytest.mark.parametrize("fallback", ["center", "full"])
def test_fallback_crops_the_faceless_photo_that_way_with_a_note(fallback, caplog):
    synthetic = identity_photo(1, 0, (120, 160))
    seen, infos = prepare_photos([astronaut(), synthetic], FeatureSettings(crop="face", crop_fallback=fallback),
                                 names=["a.png", "b.png"])
    assert [i.crop for i in infos] == ["face", fallback]
    assert "no face found in b.png" in infos[1].note and "b.png" in caplog.text
    (expected,), _ = prepare_photos([synthetic], FeatureSettings(crop=fallback))
    assert np.array_equal(np.asarray(seen[1]), np.asarray(expected))


def test_several_faces_use_the_largest_with_a_note():
    big = astronaut().resize((768, 768), Image.Resampling.LANCZOS)          # face box about 130 px
    small = grace_hopper().resize((256, 300), Image.Resampling.LANCZOS)     # face box about 107 px
    scene = Image.new("RGB", (big.width + small.width, big.height), (200, 200, 200))
    scene.paste(big, (0, 0))
    scene.paste(small, (big.width, 0))
    _, info = crop_region(scene, "face", name="group.png")
    assert info.faces_found >= 2 and f"{info.faces_found} faces found in group.png" in info.note
    assert info.box[2] <= big.width             # the astronaut's (larger) face, on the left
    swapped = Image.new("RGB", scene.size, (200, 200, 200))                 # the larger face on the right
    swapped.paste(small, (0, 0))
    swapped.paste(big, (small.width, 0))
    assert crop_region(swapped, "face")[1].box[0] >= small.width


def test_center_crop_is_the_crop_of_before():
    photo = grace_hopper()                       # 512x600: portrait
    (seen,), (info,) = prepare_photos([photo], FeatureSettings(crop="center"))
    old = photo.resize((448, round(600 * 448 / 512)), Image.BICUBIC)
    top = (old.height - 448) // 2
    assert info.crop == "center" and np.array_equal(np.asarray(seen), np.asarray(old.crop((0, top, 448, top + 448))))


def test_full_crop_letterboxes_the_whole_photo():
    photo = Image.new("RGB", (300, 150), (255, 0, 0))
    (seen,), _ = prepare_photos([photo], FeatureSettings(crop="full"))
    assert seen.size == (448, 448)
    assert seen.getpixel((224, 224)) == (255, 0, 0) and seen.getpixel((224, 5)) == face_crop.FILL
    (budget,), _ = prepare_photos([photo], FeatureSettings(crop="full", resolution="pixel_budget", max_pixels=64 * 64))
    assert budget.size[0] > budget.size[1]       # under the pixel budget the aspect is kept
    (square,), _ = prepare_photos([photo], FeatureSettings(crop="center", resolution="pixel_budget",
                                                          max_pixels=64 * 64))
    assert square.size[0] == square.size[1]


def test_settings_record_the_crop_and_old_records_keep_theirs():
    meta = FeatureSettings().to_meta()
    assert meta["crop"] == "face" and meta["crop_fallback"] == "error"
    assert FeatureSettings(crop="center").to_meta()["crop_fallback"] is None
    assert FeatureSettings(crop="center").to_meta() != FeatureSettings(crop="full").to_meta()   # cache keys differ
    # made before the setting existed: the centre crop (default then) or the whole photo (pixel_budget)
    assert legacy_crop({"source": "merger_pooled", "resolution": "center_crop_448"}) == "center"
    assert legacy_crop({"resolution": "pixel_budget"}) == "full" and legacy_crop(None) == "center"
    assert settings_from_meta({"resolution": "center_crop_448"}).crop == "center"
    assert settings_from_meta(meta) == FeatureSettings()
    with pytest.raises(UserInputError, match="unknown crop 'eyes'"):
        FeatureSettings(crop="eyes")
    with pytest.raises(UserInputError, match="crop_fallback"):
        FeatureSettings(crop_fallback="skip")


def test_feature_cache_keys_differ_by_crop(tmp_path):
    from qwen_identity.core.pipeline.cache_keys import feature_key

    keys = {feature_key("some/model", FeatureSettings(crop=c), ["abc"], "float32") for c in ("face", "center", "full")}
    assert len(keys) == 3


def test_head_meeting_features_of_another_crop_is_warned_about():
    from qwen_identity.core.residual.head import HeadMeta, ResidualHead, check_head_features, head_summary

    def head(settings):
        return ResidualHead(8, 1, 16, meta=HeadMeta(feature_dim=8, tokens=1, hidden_size=16, feature_settings=settings))

    def feats(settings):
        return {"feature_dim": 8, **settings}

    face, center = FeatureSettings().to_meta(), FeatureSettings(crop="center").to_meta()
    old = {"source": "merger_pooled", "layer": None, "resolution": "center_crop_448", "max_pixels": 448 * 448}
    assert check_head_features(head(face), feats(face)) == []
    (warning,) = check_head_features(head(face), feats(center))
    assert "crop 'center'" in warning and "trained on crop 'face'" in warning
    assert check_head_features(head(old), feats(center)) == []    # an old head counts as the centre crop
    assert any("crop" in w for w in check_head_features(head(old), feats(face)))
    assert "photo crop: center (not recorded" in head_summary(head(old))
    assert "photo crop: face" in head_summary(head(face))


def test_missing_face_detector_says_how_to_install_or_which_crop_to_use(monkeypatch):
    from qwen_identity.core.measurement import face_similarity

    def no_dlib(*a, **k):
        raise UserInputError(face_similarity.INSTALL_HINT)

    monkeypatch.setattr(face_crop, "_EMBEDDER", None)
    monkeypatch.setattr(face_similarity, "FaceEmbedder", no_dlib)
    with pytest.raises(UserInputError, match="crop 'face' needs a face detector.*pip install.*crop 'center'"):
        crop_region(astronaut(), "face")
    monkeypatch.setattr(face_crop, "_EMBEDDER", None)   # the next use builds the real one again


@pytest.fixture(scope="module")
def bundle(tiny_qwen3vl_dir):
    from qwen_identity.core.identity.qwen3vl import load_qwen3vl

    return load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu", dtype="fp32")


def test_features_record_the_crop_and_differ_by_crop(bundle):
    photos = [astronaut(), grace_hopper()]
    face = extract_features(bundle, photos, FeatureSettings(crop="face"))
    center = extract_features(bundle, photos, FeatureSettings(crop="center"))
    assert face.meta["crop"] == "face" and center.meta["crop"] == "center"
    assert [c.crop for c in face.crops] == ["face", "face"]
    assert not torch.allclose(face.per_image, center.per_image, atol=1e-4)


def test_node_shows_the_face_crop_and_names_a_faceless_image(bundle):
    from qwen_identity.core.files.images import pil_to_comfy
    from qwen_identity.nodes.qwen3vl_nodes import ExtractIdentityFeatures

    photo = astronaut()
    feats, preview = ExtractIdentityFeatures().extract(bundle, pil_to_comfy([photo]))
    (expected,), _ = prepare_photos([photo], FeatureSettings(crop="face"))
    assert feats.meta["crop"] == "face"
    assert torch.equal(preview, pil_to_comfy([expected]))   # model_view is the face crop the model saw
    blank = pil_to_comfy([photo, identity_photo(0, 0, (512, 512))])
    with pytest.raises(NoFaceError, match=r"image 1 of the batch"):
        ExtractIdentityFeatures().extract(bundle, blank)
    feats, preview = ExtractIdentityFeatures().extract(bundle, blank, crop_fallback="center")
    assert feats.n_images == 2 and preview.shape[0] == 2


def test_cli_extract_and_train_record_the_crop(tiny_models, tmp_path, capsys):
    from qwen_identity.cli import main
    from qwen_identity.core.identity.features import load_feature_cache
    from qwen_identity.core.residual.head import load_head

    data = tmp_path / "data"
    people = {"seed_1": astronaut(), "seed_2": grace_hopper()}
    dirs = []
    for name, photo in people.items():
        (data / name).mkdir(parents=True)
        photo.save(data / name / "photo_view_0.png")
        photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / name / "photo_view_1.png")
        dirs.append(str(data / name))
    out = tmp_path / "f.safetensors"
    assert main(["extract", "--seed-dirs", ",".join(dirs), "--qwen3-vl-model", str(tiny_models.qwen3vl),
                 "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert {f.meta["crop"] for f in load_feature_cache(out).values()} == {"face"}
    run = tmp_path / "run"
    code = main(["train", "--seed-dirs", ",".join(dirs), "--qwen3-vl-model", str(tiny_models.qwen3vl),
                 "--qwen-image-model", str(tiny_models.qwen_image), "--epochs", "1", "--target", "zero",
                 "--device", "cpu", "--out-dir", str(run), "--val-fraction", "0"])
    assert code == 0, capsys.readouterr().err
    head = load_head(next((run / "checkpoints").glob("*.safetensors")))
    assert head.meta.feature_settings["crop"] == "face"
    # a seed dir with a faceless photo: exit code 2 and the photo named
    (data / "seed_3").mkdir()
    identity_photo(0, 0, (200, 200)).save(data / "seed_3" / "photo_view_0.png")
    capsys.readouterr()
    assert main(["extract", "--seed-dirs", str(data / "seed_3"), "--qwen3-vl-model", str(tiny_models.qwen3vl),
                 "--out", str(tmp_path / "g.safetensors"), "--device", "cpu"]) == 2
    assert "seed_3/photo_view_0.png" in capsys.readouterr().err


def test_eval_uses_the_heads_crop_and_warns_about_another(capsys):
    from types import SimpleNamespace

    from qwen_identity.cli.eval import eval_feature_settings
    from qwen_identity.core.residual.head import HeadMeta, ResidualHead

    head = ResidualHead(8, 1, 16, meta=HeadMeta(feature_dim=8, tokens=1, hidden_size=16,
                                                feature_settings=FeatureSettings(crop="face").to_meta()))
    assert eval_feature_settings(SimpleNamespace(crop=None, crop_fallback=None), head) == FeatureSettings()
    assert capsys.readouterr().err == ""
    s = eval_feature_settings(SimpleNamespace(crop="center", crop_fallback=None), head)
    assert s.crop == "center" and "the head was trained on crop face" in capsys.readouterr().err
    old = ResidualHead(8, 1, 16, meta=HeadMeta(feature_dim=8, tokens=1, hidden_size=16,
                                               feature_settings={"resolution": "center_crop_448"}))
    assert eval_feature_settings(SimpleNamespace(crop=None, crop_fallback=None), old).crop == "center"
