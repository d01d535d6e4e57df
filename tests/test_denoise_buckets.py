"""Aspect buckets in `qwen-identity train --objective denoise` (tiny models, CPU): photos of three aspects
train at three buckets, no batch mixes shapes, the buckets and photos per bucket are in metrics.json and the
head, one latent cache per bucket, the same seed gives the same head (another seed another one),
`--aspect-buckets off` trains everything at one resolution as before, and --resume refuses a changed setting."""

import json
import shutil

import pytest
import torch

from qwen_identity.core.residual.model_card import head_path

BASE = ["--objective", "denoise", "--train-resolution", "48x48", "--batch-size", "2", "--lr", "1e-2",
        "--device", "cpu", "--val-fraction", "0.25", "--gain-pairs", "2", "--crop", "center"]
SQUARE, WIDE, TALL = (48, 48), (96, 48), (48, 96)   # buckets at 48x48 pixels: 48x48, 64x32, 32x64
BUCKET_OF = {SQUARE: "48x48", WIDE: "64x32", TALL: "32x64"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def people(tmp_path):
    """4 people x 2 photos; photo sizes cycle through square, wide, tall so that whoever is held out, the
    training photos cover all three buckets (3 square, 3 wide, 2 tall in all)."""
    from qwen_identity.tiny_models.dataset import identity_photo

    sizes = [SQUARE, WIDE, TALL]
    dirs = []
    for i in range(4):
        d = tmp_path / "data" / f"seed_{100 + i}"
        d.mkdir(parents=True)
        for v in range(2):
            identity_photo(i, v, sizes[(i + v) % 3]).save(d / f"photo_view_{v}.png")
        dirs.append(d)
    return ",".join(map(str, dirs))


@pytest.fixture
def train(tiny_models, run_cli):
    def run(*args, out, epochs=2):
        argv = ["train", "--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model",
                str(tiny_models.qwen_image), "--epochs", str(epochs), *BASE, "--out-dir", str(out), *args]
        return run_cli(argv)

    return run


@pytest.fixture
def batch_shapes(monkeypatch):
    """The latent shapes of every training micro-batch (one set per call of step_loss)."""
    from qwen_identity.training import denoise

    seen, real = [], denoise.step_loss

    def spy(head, transformer, data, samples, *a, **kw):
        seen.append({data.shape_of(i) for i in samples})
        return real(head, transformer, data, samples, *a, **kw)

    monkeypatch.setattr(denoise, "step_loss", spy)
    return seen


def test_each_photo_trains_at_its_bucket_and_no_batch_mixes_shapes(train, people, tmp_path, batch_shapes):
    from qwen_identity.core.residual.head import load_head

    code, _, err = train("--seed-dirs", people, out=tmp_path / "a")
    assert code == 0, err
    assert batch_shapes and all(len(s) == 1 for s in batch_shapes)          # a batch never mixes shapes
    # 48x48, 64x32 (wide), 32x64 (tall): (1, rows, cols) token grids of the tiny VAE (4x) and 2x2 packing
    assert set().union(*batch_shapes) == {(1, 6, 6), (1, 4, 8), (1, 8, 4)}
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    info = metrics["aspect_buckets"]
    assert {"48x48", "64x32", "32x64"} <= set(info["buckets"]) and len(info["buckets"]) >= 3
    assert info["photos_per_bucket"] == {"32x64": 2, "48x48": 3, "64x32": 3}
    assert sum(info["train_photos_per_bucket"].values()) == metrics["train_photos"] == 6
    assert metrics["held_out_gain"]["photos"] == 2  # the held-out person, each photo at its own bucket
    args = load_head(head_path(tmp_path / "a")).meta.training_args
    assert args["aspect_buckets"] == "on" and args["buckets"] == info["buckets"]
    assert args["photos_per_bucket"] == info["photos_per_bucket"]
    caches = [p.name for p in (tmp_path / "a" / "cache").iterdir() if p.name.startswith("latents-")]
    assert len(caches) == 3  # one latent cache per bucket, keyed on its resolution
    assert "VAE at 64x32" in err and "VAE at 32x64" in err and "VAE at 48x48" in err


def test_same_seed_same_head_another_seed_another(train, people, tmp_path):
    assert train("--seed-dirs", people, out=tmp_path / "a")[0] == 0
    for name in ("b", "c"):
        shutil.copytree(tmp_path / "a" / "cache", tmp_path / name / "cache")
    assert train("--seed-dirs", people, out=tmp_path / "b")[0] == 0
    assert train("--seed-dirs", people, "--seed", "7", out=tmp_path / "c")[0] == 0
    head = lambda d: head_path(d).read_bytes()  # noqa: E731
    assert head(tmp_path / "a") == head(tmp_path / "b")
    assert head(tmp_path / "a") != head(tmp_path / "c")


def test_resume_with_buckets_equals_uninterrupted(train, people, tmp_path, monkeypatch):
    from qwen_identity.training import denoise_pipeline

    assert train("--seed-dirs", people, out=tmp_path / "a", epochs=2)[0] == 0
    stop = json.loads((tmp_path / "a" / "metrics.json").read_text())["step"] // 2 + 1  # inside epoch 2
    real = denoise_pipeline.train_denoise
    monkeypatch.setattr(denoise_pipeline, "train_denoise", lambda *a, **kw: real(*a, **{**kw, "stop_after_step": stop}))
    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "c" / "cache")
    code, _, err = train("--seed-dirs", people, "--checkpoint-every", "1", out=tmp_path / "c", epochs=2)
    assert code == 0, err
    monkeypatch.setattr(denoise_pipeline, "train_denoise", real)
    code, _, err = train("--seed-dirs", people, "--checkpoint-every", "1", "--resume", out=tmp_path / "c", epochs=2)
    assert code == 0 and f"resuming after optimizer step {stop}" in err, err
    assert head_path(tmp_path / "a").read_bytes() == head_path(tmp_path / "c").read_bytes()


def test_off_trains_every_photo_at_one_resolution_and_resume_refuses_a_change(train, people, tmp_path, batch_shapes):
    from qwen_identity.core.residual.head import load_head

    code, _, err = train("--seed-dirs", people, "--aspect-buckets", "off", out=tmp_path / "a")
    assert code == 0, err
    assert set().union(*batch_shapes) == {(1, 6, 6)}  # all centre-cropped to 48x48
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    args = load_head(head_path(tmp_path / "a")).meta.training_args
    assert "aspect_buckets" not in metrics and "buckets" not in args and "aspect_buckets" not in args
    assert len([p for p in (tmp_path / "a" / "cache").iterdir() if p.name.startswith("latents-")]) == 1
    code, _, err = train("--seed-dirs", people, "--resume", out=tmp_path / "a", epochs=3)
    assert code == 2 and "aspect_buckets" in err and "differ" in err, err


def test_photo_losses_per_bucket_equal_each_bucket_alone(monkeypatch):
    """The held-out losses of photos of two shapes, measured together, equal each shape measured alone
    with the same photo ids: (σ, ε) are fixed per photo, not per batch, and a batch holds one shape."""
    from qwen_identity.core.measurement import identity_gain

    def fake_loss(transformer, x0, eps, sig, cond, mask, img_shapes, token_weights=None):
        assert len(set(img_shapes)) == 1 and x0.shape[1] == img_shapes[0][1] * img_shapes[0][2]
        x_t = (1 - sig.view(-1, 1, 1)) * x0 + sig.view(-1, 1, 1) * eps
        return (x_t - cond.mean(1, keepdim=True)).pow(2).mean(dim=(1, 2))

    monkeypatch.setattr(identity_gain, "flow_matching_loss", fake_loss)
    torch.manual_seed(0)
    a, b = torch.randn(3, 6, 8), torch.randn(2, 8, 8)  # shapes (1, 2, 3) and (1, 2, 4)
    latents = [a[0], b[0], a[1], b[1], a[2]]
    shapes = [(1, 2, 3), (1, 2, 4), (1, 2, 3), (1, 2, 4), (1, 2, 3)]
    embeds, mask = torch.randn(5, 4, 8), torch.ones(5, 4, dtype=torch.long)
    res = torch.randn(5, 1, 8)
    run = identity_gain.photo_losses
    both = run(None, latents, shapes, embeds, mask, [None, res], 1.0, pairs=2, batch_size=2)
    ia, ib = [0, 2, 4], [1, 3]
    alone_a = run(None, a, (1, 2, 3), embeds[ia], mask[ia], [None, res[ia]], 1.0, pairs=2, photo_ids=ia)
    alone_b = run(None, b, (1, 2, 4), embeds[ib], mask[ib], [None, res[ib]], 1.0, pairs=2, photo_ids=ib)
    assert torch.allclose(both[:, ia], alone_a) and torch.allclose(both[:, ib], alone_b)
    assert not torch.allclose(both[0], both[1])  # the residual matters (the check could fail)
