"""Face similarity on real photographs shipped by PyPI packages (see tests/real_faces.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwen_identity.core.measurement import face_similarity as fs
from qwen_identity.core.errors import UserInputError
from real_faces import astronaut, astronaut_variants, cat, grace_hopper


@pytest.fixture(scope="module")
def embedder():
    return fs.FaceEmbedder()


@pytest.fixture(scope="module")
def astro(embedder):
    return embedder.analyze(astronaut())


def test_astronaut_face_found_where_it_is(astro):
    assert astro.has_face and astro.embedding.shape == (128,)
    assert len(astro.faces) == 1
    left, top, right, bottom = astro.faces[0].box
    # Eileen Collins' face sits in the upper middle of the 512x512 portrait.
    assert 150 < left < right < 300 and 60 < top < bottom < 200
    assert astro.size == (512, 512)


@pytest.mark.parametrize("variant", ["flipped", "cropped", "resized"])
def test_same_person_transformed_is_same(embedder, astro, variant):
    other = embedder.analyze(astronaut_variants()[variant])
    d = fs.face_distance(astro, other)
    assert d is not None and d < fs.THRESHOLD, (variant, d)
    assert fs.same_person(d) is True


def test_resized_boxes_are_in_original_pixels(embedder, astro):
    # detection on a 2x smaller copy (max_side) must report boxes in the original image's pixels
    small_side = fs.FaceEmbedder(max_side=256).analyze(astronaut())
    assert small_side.has_face
    for a, b in zip(small_side.faces[0].box, astro.faces[0].box):
        assert abs(a - b) <= 12
    assert fs.face_distance(small_side, astro) < fs.THRESHOLD


def test_different_person_is_different(embedder, astro):
    hopper = embedder.analyze(grace_hopper())
    assert hopper.has_face
    d = fs.face_distance(astro, hopper)
    assert d > fs.THRESHOLD, d
    assert fs.same_person(d) is False
    # and the same person is closer than the other person, for every variant
    for im in astronaut_variants().values():
        r = embedder.analyze(im)
        assert fs.face_distance(r, astro) < fs.face_distance(r, hopper)


def test_image_without_face_is_a_result_not_an_error(embedder, astro):
    for im in (cat(), Image.new("RGB", (64, 48), (128, 128, 128)), Image.new("L", (5, 5))):
        r = embedder.analyze(im)
        assert not r.has_face and r.faces == [] and r.embedding is None
        assert r.to_json()["faces_found"] == 0
        assert fs.face_distance(r, astro) is None and fs.same_person(None) is None


def test_largest_face_is_used(embedder):
    a = astronaut()
    hopper = grace_hopper()
    canvas = Image.new("RGB", (1100, 620), (255, 255, 255))
    canvas.paste(a, (0, 0))          # the astronaut's face is ~90 px wide
    canvas.paste(hopper, (560, 0))   # Grace Hopper's is ~215 px wide
    r = embedder.analyze(canvas)
    assert len(r.faces) >= 2
    assert r.faces[0].box[0] >= 560 and r.faces[0].area == max(f.area for f in r.faces)
    assert any(150 < f.box[0] < 200 and 60 < f.box[1] < 110 for f in r.faces[1:])   # the astronaut's face
    assert fs.face_distance(r, embedder.analyze(hopper)) < 0.3


def test_order_faces_prefers_large_confident_over_large_weak():
    big_weak = ((0, 0, 200, 200), 0.1)
    mid_clear = ((300, 0, 400, 100), 1.5)
    small_clear = ((500, 0, 560, 60), 1.2)
    assert fs.order_faces([big_weak, small_clear, mid_clear]) == [mid_clear, small_clear, big_weak]
    assert fs.order_faces([small_clear]) == [small_clear]
    assert fs.order_faces([]) == []
    # when all are similarly confident, size decides
    assert fs.order_faces([((0, 0, 50, 50), 1.0), ((0, 0, 90, 90), 0.8)])[0] == ((0, 0, 90, 90), 0.8)


def test_score_against_references(embedder, astro):
    refs = [astro, embedder.analyze(astronaut_variants()["flipped"])]
    scored = [embedder.analyze(im) for im in (astronaut_variants()["cropped"], grace_hopper(), cat())]
    s = fs.score_against_references(scored, refs)
    assert s["images_with_face"] == 2 and s["references_with_face"] == 2
    same, other, none = s["per_image"]
    assert same["same_person"] is True and other["same_person"] is False
    assert none["has_face"] is False and none["distance"] is None and none["same_person"] is None
    assert same["min_distance"] <= same["distance"]
    assert s["mean_distance"] == pytest.approx((same["distance"] + other["distance"]) / 2)
    assert s["same_person_rate"] == 0.5
    nothing = fs.score_against_references(scored, [embedder.analyze(cat())])
    assert nothing["mean_distance"] is None and "no face found in any reference" in nothing["note"]


def test_mean_pairwise_distance(embedder, astro):
    hopper = embedder.analyze(grace_hopper())
    none = embedder.analyze(cat())
    assert fs.mean_pairwise_distance([astro]) is None
    assert fs.mean_pairwise_distance([astro, none]) is None
    d = fs.mean_pairwise_distance([astro, hopper, none])
    assert d == pytest.approx(fs.face_distance(astro, hopper))
    variants = [embedder.analyze(im) for im in astronaut_variants().values()]
    assert fs.mean_pairwise_distance(variants) < fs.mean_pairwise_distance(variants + [hopper])


def test_cnn_detector_finds_the_face():
    face_crop = astronaut().crop((130, 40, 330, 240))   # ~90 px face; the CNN detector is slow on CPU
    r = fs.FaceEmbedder(detector="cnn").analyze(face_crop)
    assert r.has_face and len(r.faces) == 1
    assert fs.face_distance(r, fs.FaceEmbedder().analyze(astronaut())) < fs.THRESHOLD


def test_bad_settings_are_user_errors():
    with pytest.raises(UserInputError, match="detector"):
        fs.FaceEmbedder(detector="mtcnn")
    with pytest.raises(UserInputError, match="max_side"):
        fs.FaceEmbedder(max_side=10)


def test_missing_packages_give_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(UserInputError, match=r"pip install .*\[eval\]"):
        fs.models_dir()


def test_model_files_found_without_pkg_resources():
    folder = fs.models_dir()
    assert (folder / "dlib_face_recognition_resnet_model_v1.dat").stat().st_size > 10_000_000
