"""`qwen-identity tune PHOTO_DIR --out HEAD` on the tiny models (CPU): the head, metrics and plot it writes,
the head in LoadResidualHead, InjectResidual, `sweep` and `eval` unchanged, photos at their aspect, and the
bad inputs: no photos, an unreadable photo (skipped with a warning), very different sizes, a photo
without a face (warned, unweighted), an init head of another width or family, steps <= 0, an interrupt
mid-run (the best head so far, nothing half-written), inputs never changed."""

import hashlib
import json
import os
import signal
import shutil

import pytest
import torch
from PIL import Image

from qwen_identity.cli import main

FAST = ["--resolution", "48x48", "--steps", "4", "--eval-every", "2", "--device", "cpu", "--crop", "center",
        "--lr", "1e-2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def photos(tmp_path):
    """Four photos of one 'person' (the tiny models' synthetic faces), one of them wide."""
    from qwen_identity.tiny_models.dataset import identity_photo

    d = tmp_path / "me"
    d.mkdir()
    for v in range(3):
        identity_photo(0, v, (56, 52)).save(d / f"img_{v}.png")
    identity_photo(0, 3, (120, 52)).save(d / "img_wide.jpg")
    return d


@pytest.fixture
def tune(tiny_models, run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))   # the default --work-dir

    def run(photo_dir, out, *args):
        argv = ["tune", str(photo_dir), "--out", str(out), "--qwen3-vl-model", str(tiny_models.qwen3vl),
                "--qwen-image-model", str(tiny_models.qwen_image), *FAST, *args]
        return run_cli(argv)

    return run


def tree_hashes(d):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_tune_writes_a_personal_head_that_every_command_loads(tune, photos, tmp_path, tiny_models, capsys):
    from qwen_identity.core.residual.head import load_head

    before = tree_hashes(photos)
    out = tmp_path / "heads" / "me_head.safetensors"
    code, stdout, err = tune(photos, out)
    assert code == 0, err
    assert tree_hashes(photos) == before                      # inputs untouched
    head = load_head(out)
    m = head.meta
    assert m.target == "personal" and m.training_args["objective"] == "personal" and m.family == "qwen-image"
    assert m.dataset_fingerprint and m.base_prompt == "a photo of a person" and m.hidden_size == 32
    assert m.training_args["steps"] == 4 and m.training_args["init_head"] is None
    assert m.training_args["crop"] == "center" and m.feature_settings.get("crop") == "center"
    assert len(m.training_args["buckets"]) == 2               # the wide photo trains at its own aspect
    assert m.metrics["held_out_loss"] is not None and len(m.metrics["held_out_photos"]) == 1
    assert "text_token_rms" in m.metrics
    metrics = json.loads(out.with_name("me_head.metrics.json").read_text())
    assert len(metrics["loss_history"]) == 4 and metrics["best_step"] in (0, 2, 4)
    assert metrics["photo_fingerprint"] == m.dataset_fingerprint
    assert out.with_name("me_head.loss.png").is_file()
    card = out.with_name("me_head.md").read_text()
    assert "personal" in card and "held-out photo" in card and m.card["objective"] == "personal"
    assert not list(out.parent.rglob("*.tmp"))
    assert "held-out loss" in stdout

    # LoadResidualHead and InjectResidual take it as any head
    from qwen_identity.core.identity.features import IdentityFeatures
    from qwen_identity.core.residual.injection import inject_identity
    from qwen_identity.nodes.head_nodes import LoadResidualHead

    loaded, summary = LoadResidualHead().load("(none)", head_path=str(out))
    assert "target=personal" in summary
    v = torch.nn.functional.normalize(torch.randn(loaded.feature_dim), dim=0)
    feats = IdentityFeatures(per_image=v[None], combined=v, weights=None,
                             meta={"feature_dim": loaded.feature_dim, **loaded.meta.feature_settings})
    cond, _ = inject_identity([[torch.randn(1, 5, 32), {"pooled_output": None}]], loaded, feats, [1.0])
    assert cond[0][0].shape == (1, 5, 32)

    # eval's held-out denoising gain and sweep's grid take it unchanged
    from qwen_identity.tiny_models.dataset import make_seed_dirs

    others = make_seed_dirs(tmp_path / "others", identities=2, views=2, size=(56, 52), first_seed=300)
    code = main(["eval", "--head", str(out), "--seed-dirs", ",".join(map(str, others)), "--denoise-gain-only",
                 "--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model", str(tiny_models.qwen_image),
                 "--device", "cpu", "--gain-pairs", "2", "--out-dir", str(tmp_path / "ev")])
    assert code == 0, capsys.readouterr().err
    code = main(["sweep", "--seed-dirs", str(others[0]), "--head", str(out), "--out-dir", str(tmp_path / "sw"),
                 "--alphas", "0,1", "--gen-seeds", "1", "--qwen3-vl-model", str(tiny_models.qwen3vl),
                 "--qwen-image-model", str(tiny_models.qwen_image), "--device", "cpu", "--steps", "2",
                 "--width", "32", "--height", "32"])
    assert code == 0, capsys.readouterr().err
    assert list((tmp_path / "sw").rglob("*alpha_grid.png"))


def test_same_inputs_same_head_and_caches_are_reused(tune, photos, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert tune(photos, a)[0] == 0
    code, _, err = tune(photos, b)
    assert code == 0, err
    assert "extracting" not in err and "encoding" not in err     # features and latents came from the caches
    assert list((tmp_path / "user_cache" / "qwen-identity" / "tune" / "cache").iterdir())
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["a.safetensors", "b.safetensors"]
    from safetensors.torch import load_file

    assert all(torch.equal(x, y) for x, y in zip(load_file(a).values(), load_file(b).values()))


def test_init_head_is_recorded_and_mismatches_are_refused(tune, photos, tmp_path):
    from qwen_identity.core.residual.head import HeadMeta, ResidualHead, load_head, save_head

    first = tmp_path / "first.safetensors"
    assert tune(photos, first)[0] == 0
    code, _, err = tune(photos, tmp_path / "second.safetensors", "--init-head", str(first), "--pull-back", "0.1")
    assert code == 0, err
    args = load_head(tmp_path / "second.safetensors").meta.training_args
    assert args["init_head"]["name"] == "first.safetensors" and len(args["init_head"]["sha256"]) == 64

    wide = ResidualHead(load_head(first).feature_dim, 1, 48)
    save_head(wide, tmp_path / "wide.safetensors")
    code, _, err = tune(photos, tmp_path / "x.safetensors", "--init-head", str(tmp_path / "wide.safetensors"))
    assert code == 2 and "H=48" in err and not (tmp_path / "x.safetensors").exists()
    narrow = ResidualHead(7, 1, 32)
    save_head(narrow, tmp_path / "narrow.safetensors")
    code, _, err = tune(photos, tmp_path / "x.safetensors", "--init-head", str(tmp_path / "narrow.safetensors"))
    assert code == 2 and "D=7" in err and not (tmp_path / "x.safetensors").exists()
    other = load_head(first)
    other.meta = HeadMeta(**{**other.meta.__dict__, "family": "qwen-image-2.1"})
    save_head(other, tmp_path / "other_family.safetensors")
    code, _, err = tune(photos, tmp_path / "x.safetensors", "--init-head", str(tmp_path / "other_family.safetensors"))
    assert code == 2 and "qwen-image-2.1" in err and not (tmp_path / "x.safetensors").exists()


def test_no_photos_unreadable_photos_and_steps(tune, photos, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    code, _, err = tune(empty, tmp_path / "h.safetensors")
    assert code == 2 and "no photos in" in err
    code, _, err = tune(tmp_path / "missing", tmp_path / "h.safetensors")
    assert code == 2 and "not a folder" in err

    (photos / "broken.png").write_bytes(b"not a png at all")
    before = tree_hashes(photos)
    code, _, err = tune(photos, tmp_path / "h.safetensors")
    assert code == 0, err
    assert "skipping unreadable photo" in err and "broken.png" in err
    assert load_photos_count(tmp_path / "h.safetensors") == 4
    assert tree_hashes(photos) == before

    for steps in ("0", "-3"):
        code, _, err = tune(photos, tmp_path / f"s{steps}.safetensors", "--steps", steps)
        assert code == 2 and "steps must be" in err and not (tmp_path / f"s{steps}.safetensors").exists()
    code, _, err = tune(photos, tmp_path / "h.safetensors")
    assert code == 2 and "--overwrite" in err                  # an existing head is not replaced silently
    code, _, err = tune(photos, tmp_path / "h.txt")
    assert code == 2 and ".safetensors" in err


def load_photos_count(path):
    from qwen_identity.core.residual.head import load_head

    return load_head(path).meta.training_args["photos"]


def test_very_different_sizes_train_at_their_aspects_and_too_small_is_named(tune, tmp_path):
    from qwen_identity.tiny_models.dataset import identity_photo

    d = tmp_path / "sizes"
    d.mkdir()
    for v, size in enumerate([(56, 52), (200, 60), (36, 120), (400, 400)]):
        identity_photo(0, v, size).save(d / f"p{v}.png")
    code, _, err = tune(d, tmp_path / "h.safetensors")
    assert code == 0, err
    from qwen_identity.core.residual.head import load_head

    assert len(load_head(tmp_path / "h.safetensors").meta.training_args["buckets"]) == 3
    identity_photo(0, 9, (12, 12)).save(d / "tiny.png")
    code, _, err = tune(d, tmp_path / "h2.safetensors")
    assert code == 2 and "tiny.png" in err and "--allow-upscale" in err and "--resolution" in err
    assert tune(d, tmp_path / "h3.safetensors", "--allow-upscale")[0] == 0


def test_one_photo_uses_its_mirror_and_no_face_is_warned(tune, tmp_path):
    from qwen_identity.tiny_models.dataset import identity_photo

    d = tmp_path / "one"
    d.mkdir()
    identity_photo(0, 0, (56, 52)).save(d / "only.png")
    code, _, err = tune(d, tmp_path / "h.safetensors")
    assert code == 0, err
    assert "mirror image" in err and "no face found in only.png" in err  # synthetic photo: no face, unweighted
    m = json.loads((tmp_path / "h.metrics.json").read_text())
    assert m["held_out_photos"] == [] and m["photos"] == 2


def test_interrupt_keeps_the_best_head_and_writes_nothing_half(tune, photos, tmp_path, monkeypatch):
    from qwen_identity.training import personal

    real = personal.tune_head

    def interrupted_at_step_3(*a, progress=None, **kw):
        def tick(step, total, loss):
            progress(step, total, loss)
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)     # a real Ctrl-C, handled by the CLI

        return real(*a, progress=tick, **kw)

    monkeypatch.setattr(personal, "tune_head", interrupted_at_step_3)
    out = tmp_path / "h.safetensors"
    code, _, err = tune(photos, out, "--steps", "50")
    assert code == 130, err
    assert "best head so far" in err
    m = json.loads(out.with_name("h.metrics.json").read_text())
    assert m["interrupted"] and m["steps_done"] == 3 and m["best_step"] in (0, 2, 3)
    assert out.is_file() and not list(tmp_path.rglob("*.tmp"))


def test_the_same_command_tunes_a_qwen_image_21_head(tune, photos, tmp_path, tiny_models, tiny_qwenimage21_dir, capsys):
    """A second model family needs nothing of tuning but its adapter: the tiny 2.1 model tunes, and the head
    records its family."""
    from qwen_identity.core.residual.head import load_head

    out = tmp_path / "h21.safetensors"
    code = main(["tune", str(photos), "--out", str(out), "--qwen3-vl-model", str(tiny_models.qwen3vl),
                 "--qwen-image-model", str(tiny_qwenimage21_dir), *FAST])
    assert code == 0, capsys.readouterr().err
    head = load_head(out)
    assert head.meta.family == "qwen-image-2.1" and head.meta.target == "personal"
    assert head.meta.metrics["held_out_loss"] is not None


@pytest.mark.parametrize("family", ["qwen-image", "qwen-image-2.1"])
def test_fp8_storage_tunes_like_the_plain_run(family, photos, tmp_path, tiny_models, run_cli, monkeypatch, request):
    """--fp8-storage --gradient-checkpointing (the 24 GB settings) on both families: the transformer the loop
    runs through holds fp8 weights as the family's loader stored them, the head records it, and it learns in
    the plain run's direction (same caches, same init)."""
    from qwen_identity.core.residual.head import load_head
    from qwen_identity.training import denoise_pipeline

    model = tiny_models.qwen_image if family == "qwen-image" else request.getfixturevalue("tiny_qwenimage21_dir")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))

    def tune(out, *args):
        return run_cli(["tune", str(photos), "--out", str(out), "--qwen3-vl-model", str(tiny_models.qwen3vl),
                        "--qwen-image-model", str(model), *FAST, *args])

    code, _, err = tune(tmp_path / "plain.safetensors")
    assert code == 0, err
    stored = []
    real_prepare = denoise_pipeline.prepare_transformer
    monkeypatch.setattr(denoise_pipeline, "prepare_transformer",
                        lambda tr, *a, **kw: stored.append({p.dtype for p in tr.parameters()}) or real_prepare(tr, *a, **kw))
    code, _, err = tune(tmp_path / "fp8.safetensors", "--fp8-storage", "--gradient-checkpointing")
    assert code == 0, err
    assert stored == [{torch.float8_e4m3fn, torch.float32}]
    plain, fp8 = load_head(tmp_path / "plain.safetensors"), load_head(tmp_path / "fp8.safetensors")
    assert fp8.meta.family == family and fp8.meta.target == "personal"
    args = fp8.meta.training_args
    assert args["fp8_storage"] is True and args["gradient_checkpointing"] is True
    assert plain.meta.training_args["fp8_storage"] is False
    assert fp8.meta.metrics["held_out_loss"] is not None
    # the best head may be the initial (zero) one after 4 steps: compare the training losses, step by step
    history = [json.loads((tmp_path / f"{n}.metrics.json").read_text())["loss_history"] for n in ("plain", "fp8")]
    assert len(history[0]) == len(history[1]) == 4 and history[0] != history[1]   # fp8 weights: other numbers
    assert all(abs(a - b) <= 0.05 * abs(a) for a, b in zip(*history)), history
