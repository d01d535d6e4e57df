"""`qwen-identity eval` end to end on the tiny random-weight models (their images are noise: no faces),
with one identity whose photo is a real face (scikit-image's astronaut)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from qwen_identity.cli import main
from real_faces import astronaut

SIZE = ["--height", "32", "--width", "32", "--steps", "2", "--device", "cpu", "--dtype", "fp32"]


def _head(path, d=64, h=32):
    from qwen_identity.core.residual.head import HeadMeta, ResidualHead, save_head

    torch.manual_seed(0)
    meta = HeadMeta(feature_dim=d, tokens=2, hidden_size=h, qwen3_vl_model="tiny",
                    feature_settings={"source": "merger_pooled", "resolution": "pixel_budget", "max_pixels": 64 * 64})
    head = ResidualHead(d, 2, h, meta=meta)
    with torch.no_grad():
        head.proj.weight.normal_(0, 2.0)
    return save_head(head, path)


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    from qwen_identity.tiny_models.dataset import make_seed_dirs

    root = tmp_path_factory.mktemp("eval")
    dirs = make_seed_dirs(root / "data", identities=1, views=1)
    face_dir = root / "data" / "seed_astronaut"
    face_dir.mkdir()
    astronaut().save(face_dir / "photo_view_0.png")
    return {"dirs": [dirs[0], face_dir], "head": _head(root / "head.safetensors"), "root": root,
            "models": ["--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model", str(tiny_models.qwen_image)]}


def test_eval_end_to_end(setup, monkeypatch, capsys):
    from qwen_identity.core.generation import sampling

    calls = []
    real_sample = sampling.sample

    def counting(bundle, positive, *a, **kw):
        calls.append((kw.get("seeds"), positive[0][0].shape[0]))
        return real_sample(bundle, positive, *a, **kw)

    monkeypatch.setattr(sampling, "sample", counting)
    out = setup["root"] / "out"
    rc = main(["eval", "--seed-dirs", ",".join(map(str, setup["dirs"])), "--head", str(setup["head"]),
               *setup["models"], "--alphas", "1.5", "--gen-seeds", "7,8", "--out-dir", str(out), *SIZE])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    # the α = 0 baseline is sampled once, on its own, and shared; then one batched call per identity
    # (its own call: each identity's batch is the same however the identities are split over processes)
    assert calls == [([7, 8], 1), ([7, 8], 1), ([7, 8], 1)]
    report = json.loads((out / "eval.json").read_text())
    assert set(report["identities"]) == {setup["dirs"][0].name, "seed_astronaut"}
    assert report["alphas"] == [0.0, 1.5] and report["seeds"] == [7, 8]
    assert report["feature_settings"]["resolution"] == "pixel_budget"
    for name, res in report["identities"].items():
        assert [r["alpha"] for r in res["rows"]] == [0.0, 1.5] and res["rows"][0]["baseline"] is True
        for row in res["rows"]:
            s = row["summary"]
            assert s["images_with_face"] == 0 and s["face_distance"] is None   # tiny models paint noise
            assert len(row["qwen3vl_cosine"]) == 2 and -1 <= s["qwen3vl_cosine"] <= 1
            assert len(row["qwen3vl_p_yes_normalised"]) == 2
            assert s["qwen3vl_diversity"] >= 0
        with Image.open(res["grid"]) as g:
            assert g.width > 64 and g.height > 64
    astro = report["identities"]["seed_astronaut"]
    assert astro["references"] == {"photos": 1, "with_face": 1}
    # the baseline images are the same for both identities, their cosines differ only by the references
    a0 = report["identities"][setup["dirs"][0].name]["rows"][0]
    assert a0["qwen3vl_p_yes_normalised"] == astro["rows"][0]["qwen3vl_p_yes_normalised"]
    with Image.open(out / "identity_vs_alpha.png") as plot:
        assert plot.format == "PNG"
    assert "seed_astronaut" in stdout and "wrote" in stdout


def test_eval_without_optional_measures(setup, capsys):
    out = setup["root"] / "out2"
    rc = main(["eval", "--seed-dirs", str(setup["dirs"][1]), "--head", str(setup["head"]), *setup["models"],
               "--alphas", "1", "--gen-seeds", "3", "--no-qwen3vl-cosine", "--no-prompt-proxy", "--guidance", "1",
               "--plot-backend", "pil", "--out-dir", str(out), *SIZE])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "eval.json").read_text())
    row = report["identities"]["seed_astronaut"]["rows"][1]
    assert "qwen3vl_cosine" not in row and "qwen3vl_p_yes_normalised" not in row and "face" in row
    assert report["negative_prompt"] is None and report["measures"]["qwen3vl_cosine"] is None


@pytest.mark.parametrize("extra,msg", [
    (["--alphas", "1,x"], "cannot read 'x'"),
    (["--gen-seeds", ""], "seed list is empty"),
    (["--width", "40"], "multiple of 16"),
    (["--steps", "0"], "--steps"),
    (["--threshold", "-1"], "--threshold"),
])
def test_bad_arguments_exit_2_before_models_load(setup, capsys, extra, msg):
    rc = main(["eval", "--seed-dirs", str(setup["dirs"][1]), "--head", str(setup["head"]),
               "--qwen3-vl-model", "/nonexistent", "--qwen-image-model", "/nonexistent", *SIZE, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_missing_inputs_and_mismatched_head(setup, capsys, tmp_path):
    rc = main(["eval", "--seed-dirs", str(tmp_path / "nope"), "--head", str(setup["head"]), *setup["models"], *SIZE])
    assert rc == 2 and "seed directory not found" in capsys.readouterr().err
    rc = main(["eval", "--seed-dirs", str(setup["dirs"][1]), "--head", str(tmp_path / "h.safetensors"),
               *setup["models"], *SIZE])
    assert rc == 2 and "head file not found" in capsys.readouterr().err
    wrong_h = _head(tmp_path / "wide.safetensors", h=48)
    rc = main(["eval", "--seed-dirs", str(setup["dirs"][1]), "--head", str(wrong_h), *setup["models"],
               "--alphas", "1", "--gen-seeds", "1", "--out-dir", str(tmp_path / "o"), *SIZE])
    err = capsys.readouterr().err
    assert rc == 2 and "H=48" in err
    assert not (tmp_path / "o" / "eval.json").exists()
