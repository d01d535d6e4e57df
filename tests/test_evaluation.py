"""The α-sweep evaluation over a stand-in generator, the Qwen3-VL measures on the tiny model, the plot."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_identity.core.measurement import evaluation as ev
from qwen_identity.core.measurement import face_similarity as fs
from qwen_identity.core.errors import UserInputError
from qwen_identity.core.identity.features import FeatureSettings
from real_faces import astronaut, astronaut_variants, cat, grace_hopper

SMALL = FeatureSettings(resolution="pixel_budget", crop="full", max_pixels=64 * 64)


@pytest.fixture(scope="module")
def bundle(tiny_qwen3vl_dir):
    from qwen_identity.core.identity.qwen3vl import load_qwen3vl

    return load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def embedder():
    return fs.FaceEmbedder()


def fake_generate(calls):
    """α = 0: Grace Hopper (not the reference person); α > 0: the astronaut, varied by seed; seed 3: a cat."""
    variants = list(astronaut_variants().values())

    def generate(alpha, seeds):
        calls.append((alpha, list(seeds)))
        out = []
        for s in seeds:
            if s == 3:
                out.append(cat())
            elif alpha == 0:
                out.append(grace_hopper())
            else:
                out.append(variants[s % len(variants)])
        return out

    return generate


def test_sweep_face_measures_and_baseline(embedder):
    calls, prog = [], []
    res = ev.evaluate_alpha_sweep(fake_generate(calls), [1.0, 0.5], [0, 1, 3], [astronaut()], "a photo",
                                  ev.Scorers(face=embedder), progress=lambda d, t: prog.append((d, t)))
    assert res.alphas == [0.0, 0.5, 1.0] and [c[0] for c in calls] == [0.0, 0.5, 1.0]
    assert all(c[1] == [0, 1, 3] for c in calls)
    assert prog[0] == (0, 4) and prog[-1] == (4, 4) and len(prog) == 5
    base, mid, top = res.rows
    assert base["baseline"] and not top["baseline"]
    # the baseline shows another person; α > 0 the reference person; the cat is counted, not scored
    assert base["summary"]["face_distance"] > 0.6 and base["summary"]["same_person_rate"] == 0
    assert top["summary"]["face_distance"] < 0.6 and top["summary"]["same_person_rate"] == 1
    assert all(r["summary"]["images_with_face"] == 2 for r in res.rows)
    assert top["face"]["per_image"][2]["has_face"] is False
    # diversity: two identical Hopper images -> 0; two different astronaut variants -> > 0
    assert base["summary"]["face_diversity"] == pytest.approx(0, abs=1e-6)
    assert top["summary"]["face_diversity"] > 0
    j = res.to_json()
    assert j["baseline_alpha"] == 0.0 and j["references"] == {"photos": 1, "with_face": 1}
    d = {x["alpha"]: x for x in j["vs_baseline"]}
    assert d[0.0]["face_distance_vs_baseline"] == 0
    assert d[1.0]["face_distance_vs_baseline"] == pytest.approx(
        top["summary"]["face_distance"] - base["summary"]["face_distance"], abs=2e-4)
    assert d[1.0]["qwen3vl_cosine_vs_baseline"] is None
    assert res.curve("face_distance") == [r["summary"]["face_distance"] for r in res.rows]
    assert set(res.images) == {0.0, 0.5, 1.0} and len(res.images[1.0]) == 3
    notes = ev.cell_notes_for(res)
    assert len(notes) == 9 and notes[2] == "no face" and notes[0].startswith("d=0.")
    assert float(notes[0][2:]) > 0.6 and float(notes[-2][2:]) < 0.6


def test_sweep_with_qwen3vl_measures(bundle):
    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]

    def generate(alpha, seeds):  # α = 1 returns the reference photos themselves: cosine must be highest
        if alpha == 1.0:
            return refs[: len(seeds)]
        return [Image.fromarray(np.random.default_rng(100 + s).integers(0, 256, (64, 64, 3), dtype=np.uint8))
                for s in seeds]

    embed = ev.qwen3vl_embedder(bundle, SMALL)
    scores = []

    def prompt_scorer(images, prompt):
        s = ev.qwen3vl_prompt_scores(bundle, images, prompt, max_pixels=64 * 64)
        scores.append(s)
        return s

    res = ev.evaluate_alpha_sweep(generate, [1.0], [0, 1], refs, "a portrait photo of a person",
                                  ev.Scorers(image_features=embed, prompt=prompt_scorer), keep_images=False)
    assert res.images == {}
    base, top = res.rows
    ref_vec = torch.nn.functional.normalize(embed(refs).mean(0), dim=0)
    expected = [float(v) for v in embed(refs) @ ref_vec]
    assert top["qwen3vl_cosine"] == pytest.approx(expected, abs=1e-4)
    assert top["summary"]["qwen3vl_cosine"] > base["summary"]["qwen3vl_cosine"]
    assert "face" not in top and "face_distance" not in top["summary"]
    assert all(len(row[ev.PROMPT_PROXY_NAME]) == 2 for row in res.rows)
    assert top[ev.PROMPT_PROXY_NAME] == pytest.approx(scores[1], abs=1e-4)
    assert 0 <= top["summary"]["qwen3vl_diversity"] <= 2


def test_prompt_proxy_is_p_yes_normalised_over_yes_and_no(bundle, monkeypatch):
    """Planted answer log-likelihoods log P(Yes) = -1, log P(No) = -2 give P(yes) / (P(yes) + P(no)) =
    1 / (1 + e^-1) = 0.7311 (VQAScore's unnormalised P("Yes") would be e^-1 = 0.3679); the measure is named
    for what it is."""
    import math

    planted = {"Yes": -1.0, "No": -2.0}
    monkeypatch.setattr(ev, "_answer_logprob", lambda model, processor, prefix, answer, image: planted[answer])
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    (p,) = ev.qwen3vl_prompt_scores(bundle, [image], "a red square", max_pixels=64 * 64)
    assert p == pytest.approx(1 / (1 + math.exp(-1.0)), abs=1e-6)
    assert ev.PROMPT_PROXY_NAME == "qwen3vl_p_yes_normalised" and "vqa" not in ev.PROMPT_PROXY_NAME.lower()


def test_answer_logprob_obeys_the_chain_rule(bundle):
    """log P("Yes") = log P(first token) + log P(second token | first): catches off-by-one positions."""
    tok = bundle.processor.tokenizer
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}]
    prefix = bundle.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok("Yes", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2, "the tiny tokenizer splits 'Yes'; the test relies on that"
    first, rest = tok.decode(ids[:1]), tok.decode(ids[1:])
    whole = ev._answer_logprob(bundle.model, bundle.processor, prefix, "Yes", image)
    parts = (ev._answer_logprob(bundle.model, bundle.processor, prefix, first, image)
             + ev._answer_logprob(bundle.model, bundle.processor, prefix + first, rest, image))
    assert whole < 0 and whole == pytest.approx(parts, abs=1e-4)


def test_prompt_scores_are_symmetric_in_the_answers(bundle):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    p = ev.qwen3vl_prompt_scores(bundle, [image], "a cat", max_pixels=64 * 64)[0]
    q = ev.qwen3vl_prompt_scores(bundle, [image], "a cat", answers=("No", "Yes"), max_pixels=64 * 64)[0]
    assert p + q == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserInputError, match="non-empty prompt"):
        ev.qwen3vl_prompt_scores(bundle, [image], "  ")


def test_cosine_helpers():
    ref = torch.tensor([1.0, 0.0])
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert ev.cosine_to_reference(ref, feats) == pytest.approx([1.0, 0.0, -1.0])
    assert ev.mean_pairwise_cosine_distance(feats) == pytest.approx((1 + 2 + 1) / 3)
    assert ev.mean_pairwise_cosine_distance(feats[:1]) is None
    with pytest.raises(UserInputError, match="widths differ"):
        ev.cosine_to_reference(torch.ones(3), feats)


def test_bad_sweep_inputs(embedder):
    gen = fake_generate([])
    with pytest.raises(UserInputError, match="seed"):
        ev.evaluate_alpha_sweep(gen, [1.0], [], [astronaut()], "p", ev.Scorers(face=embedder))
    with pytest.raises(UserInputError, match="reference"):
        ev.evaluate_alpha_sweep(gen, [1.0], [0], [], "p", ev.Scorers(face=embedder))
    with pytest.raises(UserInputError, match="finite"):
        ev.alphas_with_baseline([1.0, math.nan])
    assert ev.alphas_with_baseline([2, 0.5, 2.0]) == [0.0, 0.5, 2.0]
    with pytest.raises(RuntimeError, match="returned 1 images for 2 seeds"):
        ev.evaluate_alpha_sweep(lambda a, s: [astronaut()], [1.0], [0, 1], [astronaut()], "p", ev.Scorers())


@pytest.fixture(scope="module")
def two_identities(embedder):
    gen = fake_generate([])
    a = ev.evaluate_alpha_sweep(gen, [0.5, 1.0], [0, 1], [astronaut()], "p", ev.Scorers(face=embedder))
    b = ev.evaluate_alpha_sweep(gen, [0.5, 1.0], [0, 1], [grace_hopper()], "p", ev.Scorers(face=embedder))
    return {"seed_astronaut": a, "seed_hopper": b}


@pytest.mark.parametrize("backend", ["pil", "matplotlib"])
def test_plot_identity_vs_alpha(two_identities, tmp_path, backend):
    curves = two_identities
    out = ev.plot_identity_vs_alpha(curves, tmp_path / "plot.png", backend=backend)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width >= 400 and im.height >= 300
        colors = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    if backend == "pil":  # each identity's curve is drawn in its palette colour
        assert ev.PALETTE[0] in colors and ev.PALETTE[1] in colors
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_panels_follow_the_measures(two_identities, tmp_path):
    curves = copy.deepcopy(two_identities)
    one = ev.plot_identity_vs_alpha(curves, tmp_path / "one.png", backend="pil")
    for e in curves.values():   # add a Qwen3-VL cosine: a second panel appears
        for k, row in enumerate(e.rows):
            row["summary"]["qwen3vl_cosine"] = 0.5 + 0.1 * k
    two = ev.plot_identity_vs_alpha(curves, tmp_path / "two.png", backend="pil")
    with Image.open(one) as a, Image.open(two) as b:
        assert b.width == 2 * a.width
    with pytest.raises(UserInputError, match="nothing to plot"):
        ev.plot_identity_vs_alpha({}, tmp_path / "x.png")
    with pytest.raises(UserInputError, match="backend"):
        ev.plot_identity_vs_alpha(curves, tmp_path / "x.png", backend="svg")


def test_sample_alpha_images_batches_alphas_and_shares_the_baseline(tiny_qwenimage_dir, tiny_qwen3vl_dir):
    from qwen_identity.core.generation import sampling
    from qwen_identity.core.residual.head import HeadMeta, ResidualHead
    from qwen_identity.core.files.images import comfy_to_pil

    bundle = sampling.load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", dtype="fp32")
    pos = sampling.encode_text(bundle, "a portrait photo of a person")
    neg = sampling.encode_text(bundle, "blurry")
    h = pos[0][0].shape[-1]
    torch.manual_seed(0)
    head = ResidualHead(8, 2, h, meta=HeadMeta(feature_dim=8, tokens=2, hidden_size=h))
    with torch.no_grad():
        head.proj.weight.normal_(0, 2.0)
    from qwen_identity.core.identity.features import IdentityFeatures

    v = torch.nn.functional.normalize(torch.randn(8), dim=0)
    identity = IdentityFeatures(per_image=v[None], combined=v, weights=None, meta={"feature_dim": 8})
    kw = dict(steps=2, cfg=4.5, width=32, height=32)
    images, warnings = ev.sample_alpha_images(bundle, head, identity, pos, neg, [1.5], [5, 6], **kw)
    assert sorted(images) == [0.0, 1.5] and all(len(v) == 2 for v in images.values()) and warnings == []
    alone = comfy_to_pil(sampling.sample(bundle, pos, neg, seeds=[5, 6], **kw).images)
    assert [np.asarray(a).tobytes() for a in alone] == [np.asarray(b).tobytes() for b in images[0.0]]
    assert np.asarray(images[1.5][0]).tobytes() != np.asarray(images[0.0][0]).tobytes()
    shared, _ = ev.sample_alpha_images(bundle, head, identity, pos, neg, [1.5], [5, 6], baseline=alone, **kw)
    assert shared[0.0] == alone
    assert [np.asarray(a).tobytes() for a in shared[1.5]] == [np.asarray(b).tobytes() for b in images[1.5]]
    with pytest.raises(UserInputError, match="baseline has 1 images for 2 seeds"):
        ev.sample_alpha_images(bundle, head, identity, pos, neg, [1.5], [5, 6], baseline=alone[:1], **kw)
    # one prompt only: a batch of two would put 2 × seeds images in every α row
    two = sampling.encode_text(bundle, ["a portrait photo of a person", "a cat"])
    with pytest.raises(UserInputError, match="2 prompts"):
        ev.sample_alpha_images(bundle, head, identity, two, neg, [1.5], [5, 6], **kw)


def test_prompt_proxy_closes_a_thinking_prefix(bundle, monkeypatch):
    seen = []
    real = ev._answer_logprob
    monkeypatch.setattr(ev, "_answer_logprob", lambda m, p, prefix, a, im: seen.append(prefix) or real(m, p, prefix, a, im))
    template = bundle.processor.apply_chat_template
    monkeypatch.setattr(bundle.processor, "apply_chat_template", lambda *a, **kw: template(*a, **kw) + "<think>\n")
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (p,) = ev.qwen3vl_prompt_scores(bundle, [image], "a cat", max_pixels=64 * 64)
    assert len(seen) == 2 and all(s.endswith("<think>\n\n</think>\n\n") for s in seen)
