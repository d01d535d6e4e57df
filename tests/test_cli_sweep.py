"""`qwen-identity sweep` on the tiny models: --train, grid + meta per seed dir, α = 0 equals the base
image exactly, bad input exits 2 with one line."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_identity.cli import main
from qwen_identity.core.residual.model_card import head_path

SMALL = ["--device", "cpu", "--steps", "2", "--width", "32", "--height", "32"]


def hashes(dirs):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """One `sweep --train` run shared by the tests below."""
    from qwen_identity.tiny_models.dataset import make_seed_dirs

    root = tmp_path_factory.mktemp("sweep")
    dirs = make_seed_dirs(root / "data", identities=2, views=2, captions={0: "a red-haired woman", 1: "a bald man"})
    before = hashes(dirs)
    out = root / "out"
    rc = main(["sweep", "--seed-dirs", ",".join(map(str, dirs)), "--out-dir", str(out), "--train", "--crop", "center", "--epochs", "2",
               "--lr", "1e-2", "--alphas", "0,1.5", "--gen-seeds", "1234,7", "--qwen3-vl-model", str(tiny_models.qwen3vl),
               "--qwen-image-model", str(tiny_models.qwen_image), *SMALL])
    assert rc == 0
    assert hashes(dirs) == before  # inputs untouched
    return dirs, out


def test_sweep_train_writes_head_grids_and_meta(trained, tiny_models):
    from qwen_identity.core.files.dataset_fingerprint import file_sha256

    dirs, out = trained
    head = head_path(out)
    assert head.is_file()
    for d in dirs:
        png, meta_path = out / "generations" / f"{d.name}_alpha_grid.png", out / "generations" / f"{d.name}_meta.json"
        meta = json.loads(meta_path.read_text())
        assert meta["alphas"] == [0.0, 1.5] and meta["seeds"] == [1234, 7]
        assert (meta["steps"], meta["guidance"], meta["width"], meta["height"]) == (2, 4.5, 32, 32)
        assert meta["prompt"] == "a portrait photo of a person, studio lighting, 85mm"
        assert meta["negative_prompt"] == "blurry, low quality, deformed, watermark"
        assert meta["head_sha256"] == file_sha256(head)
        assert meta["qwen_image_model"] == str(tiny_models.qwen_image)
        assert {"torch", "transformers", "diffusers", "python"} <= set(meta["versions"])
        assert meta["timings"]["sampling_s"] > 0 and "features_s" in meta["timings"]
        img = Image.open(png)
        assert img.size == tuple(meta["grid"]["grid_size"])
        assert len(meta["grid"]["cells"]) == 4
    assert not list(out.rglob("*.tmp"))  # atomic writes leave nothing behind
    # the run's index (the merge step), before later tests sweep single identities into this out-dir
    run = json.loads((out / "generations" / "meta.json").read_text())
    names = [d.name for d in dirs]
    assert [i["identity"] for i in run["identities"]] == names and run["head_meta"]["trained_on"] == names
    assert run["run"]["alphas"] == [0.0, 1.5] and "hf_token" not in run["run"]


def test_alpha_zero_row_is_the_base_image(trained, tiny_models):
    """Through the CLI with --max-batch 1: the α = 0 cells equal the base prompt sampled directly, byte for byte."""
    from qwen_identity.core.generation import sampling

    dirs, out = trained
    rc = main(["sweep", "--seed-dirs", str(dirs[0]), "--out-dir", str(out), "--alphas", "0,1", "--gen-seeds", "5",
               "--max-batch", "1", "--qwen3-vl-model", str(tiny_models.qwen3vl),
               "--qwen-image-model", str(tiny_models.qwen_image), *SMALL])
    assert rc == 0
    meta = json.loads((out / "generations" / f"{dirs[0].name}_meta.json").read_text())
    grid = np.asarray(Image.open(out / "generations" / f"{dirs[0].name}_alpha_grid.png"))
    cells = {(c["alpha"], c["seed"]): grid[c["y"]:c["y"] + 32, c["x"]:c["x"] + 32] for c in meta["grid"]["cells"]}
    bundle = sampling.load_qwen_image_pipeline(str(tiny_models.qwen_image), device="cpu", dtype="fp32")
    base = sampling.sample(bundle, sampling.encode_text(bundle, meta["prompt"]),
                           sampling.encode_text(bundle, meta["negative_prompt"]), [5], steps=2, width=32, height=32,
                           max_batch=1).images[0]
    expected = (base.numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(cells[(0.0, 5)], expected)
    assert not np.array_equal(cells[(1.0, 5)], expected)


@pytest.mark.parametrize("args,match", [
    (["--alphas", ""], "alphas list is empty"),
    (["--alphas", "0.5,x"], "cannot read 'x'"),
    (["--gen-seeds", "12,abc"], "cannot read 'abc' in the seed list"),
    (["--width", "500"], "width=500 is not a multiple of 16"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--train", "--head", "h.safetensors"], "do not also pass --head"),
])
def test_bad_input_exits_2_with_one_line(args, match, make_dataset, tmp_path, capsys):
    import re

    d = make_dataset(identities=1, views=1)[0]
    rc = main(["sweep", "--seed-dirs", str(d), "--out-dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "o").exists()  # nothing written, no model loaded


def test_missing_head_and_seed_dirs(make_dataset, tmp_path, capsys):
    d = make_dataset(identities=1, views=1)[0]
    assert main(["sweep", "--seed-dirs", str(d), "--out-dir", str(tmp_path / "o")]) == 2
    assert "no head at" in capsys.readouterr().err
    assert main(["sweep", "--out-dir", str(tmp_path / "o")]) == 2
    assert "--seed-dirs is required" in capsys.readouterr().err


def test_sweep_reuses_the_features_train_cached(trained, tiny_models, tmp_path, monkeypatch):
    """`sweep` in an out-dir where `train` cached the features loads no Qwen3-VL, and the grid equals the one
    made from freshly extracted features (another out-dir, same head)."""
    dirs, out = trained
    common = ["--seed-dirs", str(dirs[1]), "--alphas", "0,1.5", "--gen-seeds", "1234,7",
              "--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model", str(tiny_models.qwen_image), *SMALL]
    head = head_path(out)
    fresh = tmp_path / "fresh"
    assert main(["sweep", *common, "--out-dir", str(fresh), "--head", str(head)]) == 0  # extracts

    def no_load(*a, **k):
        raise AssertionError("Qwen3-VL was loaded although train had cached every feature")

    monkeypatch.setattr("qwen_identity.core.identity.qwen3vl.load_qwen3vl", no_load)
    assert main(["sweep", *common, "--out-dir", str(out)]) == 0
    name = f"{dirs[1].name}_alpha_grid.png"
    assert (out / "generations" / name).read_bytes() == (fresh / "generations" / name).read_bytes()


def test_sweep_train_trains_on_every_identity_it_draws(trained):
    """`sweep --train` on the seed's two-identity example trains on both (no validation split by default), and
    the head's metadata, every grid's meta and the run's generations/meta.json name them."""
    from qwen_identity.core.residual.head import load_head

    dirs, out = trained
    names = [d.name for d in dirs]
    head = load_head(head_path(out))
    assert head.meta.metrics["train_identity_names"] == names and head.meta.metrics["val_identity_names"] == []
    for d in dirs:
        meta = json.loads((out / "generations" / f"{d.name}_meta.json").read_text())
        assert meta["head_meta"]["trained_on"] == names
