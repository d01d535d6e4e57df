"""ScoreIdentity on real photographs (IMAGE tensors as ComfyUI's LoadImage makes them), without ComfyUI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.files.images import pil_to_comfy
from qwen_identity.nodes.eval_nodes import NO_FACE_MEAN, ScoreIdentity
from real_faces import astronaut, astronaut_variants, cat, grace_hopper


def batch(*images, size=(512, 512)):
    return pil_to_comfy([im.resize(size, Image.Resampling.LANCZOS) for im in images])


def test_every_input_has_a_tooltip_and_registration():
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    spec = ScoreIdentity.INPUT_TYPES()
    for group in spec.values():
        for name, (kind, opts) in group.items():
            assert opts.get("tooltip"), name
    assert ScoreIdentity.CATEGORY == "Qwen Identity" and ScoreIdentity.DESCRIPTION
    assert len(ScoreIdentity.OUTPUT_TOOLTIPS) == len(ScoreIdentity.RETURN_TYPES) == 3
    assert NODE_CLASS_MAPPINGS["ScoreIdentity"] is ScoreIdentity


def test_scores_same_other_and_no_face():
    images = batch(astronaut_variants()["flipped"], grace_hopper(), cat())
    scores, mean, notes = ScoreIdentity().score(images, batch(astronaut()))
    res = json.loads(scores)
    same, other, none = res["face"]["per_image"]
    assert same["same_person"] is True and other["same_person"] is False and none["has_face"] is False
    assert mean == pytest.approx((same["distance"] + other["distance"]) / 2, abs=1e-4)
    lines = notes.split("\n")
    assert len(lines) == 3 and lines[2] == "no face"
    assert float(lines[0][2:]) < 0.6 < float(lines[1][2:])
    assert res["references"] == {"photos": 1, "with_face": 1} and "qwen3vl_cosine" not in res


def test_no_face_anywhere_gives_sentinel_mean():
    scores, mean, notes = ScoreIdentity().score(batch(cat()), batch(astronaut()))
    assert mean == NO_FACE_MEAN and notes == "no face"
    assert json.loads(scores)["face"]["note"] == "no face found in any scored image"
    scores, mean, _ = ScoreIdentity().score(batch(astronaut()), batch(cat()))
    assert mean == NO_FACE_MEAN and "no face found in any reference" in json.loads(scores)["face"]["note"]


def test_threshold_changes_the_verdict_not_the_distance():
    images, ref = batch(grace_hopper()), batch(astronaut())
    strict = json.loads(ScoreIdentity().score(images, ref)[0])
    loose = json.loads(ScoreIdentity().score(images, ref, threshold=1.0)[0])
    assert strict["face"]["per_image"][0]["distance"] == loose["face"]["per_image"][0]["distance"]
    assert strict["face"]["per_image"][0]["same_person"] is False and loose["face"]["per_image"][0]["same_person"] is True
    with pytest.raises(UserInputError, match="threshold"):
        ScoreIdentity().score(images, ref, threshold=float("nan"))


def test_with_qwen3vl_adds_cosine(tiny_qwen3vl_dir):
    from qwen_identity.nodes.qwen3vl_nodes import NO_FOLDER, LoadQwen3VL

    (bundle,) = LoadQwen3VL().load(NO_FOLDER, str(tiny_qwen3vl_dir), dtype="fp32", device="cpu")
    ref = batch(astronaut(), size=(64, 64))
    images = torch.cat([ref, batch(cat(), size=(64, 64))])
    res = json.loads(ScoreIdentity().score(images, ref, qwen3vl=bundle)[0])
    cos = res["qwen3vl_cosine"]
    assert cos[0] == pytest.approx(1.0, abs=1e-4) and cos[1] < cos[0]
    assert "cos=1.00" in ScoreIdentity().score(images, ref, qwen3vl=bundle)[2].split("\n")[0]
    with pytest.raises(UserInputError, match="LoadQwen3VL"):
        ScoreIdentity().score(images, ref, qwen3vl=object())


def test_bad_image_input():
    with pytest.raises(UserInputError, match="IMAGE"):
        ScoreIdentity().score(torch.zeros(1, 8, 8, 2), batch(astronaut()))
    nan = torch.full((1, 16, 16, 3), float("nan"))
    with pytest.raises(UserInputError, match="NaN"):
        ScoreIdentity().score(nan, batch(astronaut()))


def test_alpha_grid_writes_each_cells_score_under_it():
    from qwen_identity.nodes.grid_nodes import AlphaGrid

    images = batch(astronaut_variants()["flipped"], grace_hopper(), cat(), astronaut_variants()["cropped"],
                   size=(384, 384))
    ref = batch(astronaut())
    plain_img, _ = AlphaGrid().grid(images, "0,1", "1,2")
    grid_img, meta = AlphaGrid().grid(images, "0,1", "1,2", reference=ref)
    meta = json.loads(meta)
    notes = [c["note"] for c in meta["cells"]]
    assert notes[2] == "no face" and notes == meta["cell_scores"]
    d = [float(n[2:]) for n in (notes[0], notes[1], notes[3])]
    assert d[0] < 0.6 < d[1] and d[2] < 0.6
    assert meta["identity_scores"]["images_with_face"] == 3
    assert grid_img.shape[1] > plain_img.shape[1]           # a note band under each row of cells
    _, meta2 = AlphaGrid().grid(images, "0,1", "1,2", cell_notes="a\nb\nc\nd", reference=ref)
    assert [c["note"] for c in json.loads(meta2)["cells"]] == [f"{x} {n}" for x, n in zip("abcd", notes)]
