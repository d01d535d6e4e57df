"""`qwen-identity train` on the tiny models: seed dirs -> checkpoint -> LoadResidualHead -> residual; caches,
byte-identical reruns, resume, and every bad input (exit code 2, one line, nothing lost)."""

import errno
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from qwen_identity.cli import main
from qwen_identity.core.residual.model_card import head_path


@pytest.fixture
def train(tiny_models, capsys):
    def run(*args, out=None, epochs=2, target="zero", extra=()):
        argv = ["train", "--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model", str(tiny_models.qwen_image),
                "--epochs", str(epochs), "--target", target, "--device", "cpu",
                "--crop", "center", *args, *extra]   # the synthetic photos have no face
        if out is not None:
            argv += ["--out-dir", str(out)]
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _listing(dirs):
    return {p: p.stat().st_mtime_ns for d in dirs for p in sorted(d.rglob("*"))}


def test_seed_dirs_to_checkpoint_to_node_to_residual(train, make_dataset, tmp_path, monkeypatch):
    from qwen_identity.core.identity.features import load_feature_cache
    from qwen_identity.core.residual.head import check_head_features, check_head_hidden
    from qwen_identity.nodes.head_nodes import LoadResidualHead

    dirs = make_dataset(identities=3, views=2, size=(64, 64), captions={0: "a man with short brown hair"})
    before = _listing(dirs)
    out = tmp_path / "out"
    code, stdout, err = train("--seed-dirs", ",".join(map(str, dirs)), "--tokens", "2", out=out, target="caption")
    assert code == 0, err
    assert _listing(dirs) == before  # inputs untouched, no caption written there
    captions = sorted(p.name for p in (out / "captions").iterdir())
    assert captions == ["seed_101.txt", "seed_102.txt"]  # seed_100 has caption.txt
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and len(metrics["history"]["train_loss"]) == 2
    assert metrics["train_identities"] + metrics["val_identities"] == 3 and metrics["val_identities"] == 1
    assert metrics["identities"]["seed_100"]["caption"] == "a man with short brown hair"
    assert Image.open(out / "loss_curve.png").size == (640, 400)
    # the node loads it; the residual has the right shape for the features it was trained on
    monkeypatch.setenv("QWEN_IDENTITY_MODELS_DIR", str(tmp_path / "models"))
    head, summary = LoadResidualHead().load("(no heads in models/identity_heads)",
                                           head_path=str(head_path(out)))
    feats = next(iter(load_feature_cache(out / "cache" / "features.safetensors").values()))
    assert check_head_features(head, feats) == []
    check_head_hidden(head, 32)
    assert head(feats.combined).shape == (1, 2, 32)
    m = head.meta
    assert (m.feature_dim, m.tokens, m.hidden_size, m.target) == (64, 2, 32, "caption")
    assert m.qwen3_vl_model == "tiny-qwen3-vl" and m.text_encoder_model == "tiny-qwen-image/text_encoder"
    assert m.length_policy == "segment-mean-v1" and len(m.dataset_fingerprint) == 64 and m.pack_version
    assert m.feature_settings["source"] == "merger_pooled" and m.training_args["lr"] == 1e-3
    assert m.metrics["epochs"] == 2 and "train_loss" in m.metrics and "D=64" in summary
    from qwen_identity.core.residual.injection import reference_rms

    assert reference_rms(m) > 0  # ρ for InjectResidual's relative strength mode travels with the head

    # a rerun finds everything cached: no model is loaded at all
    def no_load(*a, **k):
        raise AssertionError("a model was loaded although the caches were complete")

    monkeypatch.setattr("qwen_identity.core.identity.qwen3vl.load_qwen3vl", no_load)
    monkeypatch.setattr("qwen_identity.core.generation.prompt_encoding.load_text_encoder", no_load)
    code, _, err = train("--seed-dirs", ",".join(map(str, dirs)), "--tokens", "2", "--overwrite", out=out,
                         target="caption")
    assert code == 0, err


def _weights(path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items()}


def test_reruns_are_byte_identical_and_resume_matches(train, make_dataset, tmp_path):
    """On the caption target, whose gradients move the weights (the zero target's do not, so a resume that
    restored nothing would still match): reruns are byte-identical, and 1 epoch + --resume to 3 equals 3."""
    captions = {0: "a woman with red hair", 1: "a bald man with a beard"}
    dirs = ",".join(map(str, make_dataset(identities=2, views=2, size=(64, 64), captions=captions)))
    caption = dict(target="caption", extra=("--val-fraction", "0"))
    heads = []
    for name in ("a", "b"):
        code, _, err = train("--seed-dirs", dirs, "--epochs", "3", out=tmp_path / name, **caption)
        assert code == 0, err
        heads.append(head_path(tmp_path / name).read_bytes())
    assert heads[0] == heads[1]
    code, _, err = train("--seed-dirs", dirs, "--epochs", "3", "--lr", "2e-3", out=tmp_path / "c", **caption)
    assert head_path(tmp_path / "c").read_bytes() != heads[0]
    # 1 epoch, then --resume to 3 == 3 straight; epochs 2 and 3 moved the weights, so equality means the
    # optimizer state and random stream were restored
    assert train("--seed-dirs", dirs, "--epochs", "1", out=tmp_path / "r", **caption)[0] == 0
    after_one = _weights(head_path(tmp_path / "r"))
    three = _weights(head_path(tmp_path / "a"))
    assert any((after_one[k] - three[k]).abs().max() > 1e-4 for k in three)
    code, _, err = train("--seed-dirs", dirs, "--epochs", "3", "--resume", out=tmp_path / "r", **caption)
    assert code == 0 and "resuming after epoch 1" in err
    assert head_path(tmp_path / "r").read_bytes() == heads[0]
    # resuming with other settings is refused, and nothing to do is not an error
    code, _, err = train("--seed-dirs", dirs, "--epochs", "4", "--lr", "5e-3", "--resume", out=tmp_path / "r", **caption)
    assert code == 2 and "lr" in err
    code, _, err = train("--seed-dirs", dirs, "--epochs", "3", "--resume", out=tmp_path / "r", **caption)
    assert code == 0 and "nothing to do" in err
    # an existing head is not replaced silently
    code, _, err = train("--seed-dirs", dirs, out=tmp_path / "r", **caption)
    assert code == 2 and "--resume" in err and "--overwrite" in err


def test_unreadable_photo_is_skipped_with_a_warning(train, make_dataset, tmp_path):
    dirs = make_dataset(identities=2, views=2, size=(64, 64))
    (dirs[1] / "photo_view_5.png").write_bytes(b"\x89PNG broken")
    code, _, err = train("--seed-dirs", ",".join(map(str, dirs)), "--epochs", "1", out=tmp_path / "o")
    assert code == 0, err
    assert "skipping unreadable photo" in err and "photo_view_5.png" in err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["identities"]["seed_101"]["photos"] == 2


def test_full_disk_keeps_the_previous_checkpoint(train, make_dataset, tmp_path, monkeypatch):
    dirs = ",".join(map(str, make_dataset(identities=2, views=2, size=(64, 64))))
    out = tmp_path / "o"
    assert train("--seed-dirs", dirs, "--epochs", "1", out=out)[0] == 0
    head_file, state_file = head_path(out), out / "checkpoints" / "train_state.safetensors"
    saved = head_file.read_bytes(), state_file.read_bytes()
    import qwen_identity.core.files.atomic as atomic

    real = atomic.atomic_path

    def full_disk(path):
        if str(path).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(atomic, "atomic_path", full_disk)
    code, _, err = train("--seed-dirs", dirs, "--epochs", "2", "--resume", out=out)
    assert code == 2 and "disk is full" in err and "Traceback" not in err
    assert (head_file.read_bytes(), state_file.read_bytes()) == saved


def _bad_photo_dir(tmp_path):
    d = tmp_path / "seed_bad"
    d.mkdir()
    (d / "photo_view_0.png").write_bytes(b"not a png")
    return d


@pytest.mark.parametrize("case,args,message", [
    ("missing", ["--seed-dirs", "{tmp}/nope"], "not found"),
    ("no photos", ["--seed-dirs", "{empty}"], "no photo_view"),
    ("no identities", ["--seed-dirs", "{bad}"], "no usable identities"),
    ("epochs 0", ["--seed-dirs", "{good}", "--epochs", "0"], "--epochs must be at least 1"),
    ("negative lr", ["--seed-dirs", "{good}", "--lr=-1e-3"], "--lr must be a positive number"),
    ("out-dir is a file", ["--seed-dirs", "{good}", "--out-dir", "{file}"], "is a file"),
    ("no seed dirs", [], "no seed directories"),
    ("tokens 0", ["--seed-dirs", "{good}", "--tokens", "0"], "--tokens"),
    ("resume nothing", ["--seed-dirs", "{good}", "--resume"], "no training state"),
])
def test_bad_input_is_exit_2_with_one_line(train, make_dataset, tmp_path, case, args, message):
    good = make_dataset(identities=1, views=1, size=(32, 32))[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("keep me")
    subs = {"tmp": tmp_path, "empty": tmp_path / "empty", "bad": _bad_photo_dir(tmp_path), "good": good,
            "file": tmp_path / "file"}
    args = [a.format(**subs) for a in args]
    if "--out-dir" not in args:
        args += ["--out-dir", str(tmp_path / "out")]
    code, _, err = train(*args, epochs=1 if "--epochs" not in args else 1, extra=())
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "keep me"
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_cli_subprocess_exit_code(cli_env, tmp_path):
    out = subprocess.run([sys.executable, "-m", "qwen_identity.cli", "train", "--seed-dirs", str(tmp_path / "nope"),
                          "--out-dir", str(tmp_path / "o")], env=cli_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "seed directory not found" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_features_from_qwen_identity_extract_are_reused(train, make_dataset, tiny_models, tmp_path, monkeypatch):
    dirs = make_dataset(identities=2, views=2, size=(64, 64))
    feats = tmp_path / "features.safetensors"
    assert main(["extract", "--seed-dirs", ",".join(map(str, dirs)), "--qwen3-vl-model", str(tiny_models.qwen3vl),
                 "--out", str(feats), "--device", "cpu", "--crop", "center"]) == 0

    def no_load(*a, **k):
        raise AssertionError("Qwen3-VL was loaded although the extract file had every identity")

    monkeypatch.setattr("qwen_identity.core.identity.qwen3vl.load_qwen3vl", no_load)
    code, _, err = train("--seed-dirs", ",".join(map(str, dirs)), "--features", str(feats), "--epochs", "1",
                         out=tmp_path / "o")
    assert code == 0, err
    assert "using features of 2 identities" in err
    # other settings: the file is not used, the features are extracted again
    monkeypatch.undo()
    code, _, err = train("--seed-dirs", ",".join(map(str, dirs)), "--features", str(feats), "--epochs", "1",
                         "--resolution", "pixel_budget", out=tmp_path / "p")
    assert code == 0, err
    assert "no entry for these photos with this model, these settings and this dtype" in err
    assert "using features of 0 identities" in err


def test_zero_target_trains_nothing_and_help_says_so(train, make_dataset, tmp_path, capsys):
    """The seed's zero target: a zero-initialised head, zero targets, zero gradients: the weights stay zero
    after training, and `--help` says so instead of offering it as an objective."""
    from qwen_identity.cli import build_parser

    dirs = ",".join(map(str, make_dataset(identities=2, views=1, size=(64, 64))))
    code, _, err = train("--seed-dirs", dirs, "--epochs", "2", "--lr", "1e-1", out=tmp_path / "z")
    assert code == 0, err
    w = _weights(head_path(tmp_path / "z"))
    assert all(float(v.abs().max()) == 0.0 for k, v in w.items() if k.startswith("proj"))
    for command in ("train", "sweep"):
        help_text = " ".join(_help(build_parser(), command).split())
        assert "zero: trains nothing" in help_text, help_text


def _help(parser, command) -> str:
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()
