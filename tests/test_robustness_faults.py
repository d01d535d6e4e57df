"""Faults: an interrupt, a crash or a full disk in the middle of work loses nothing; the next run recovers.

- Atomic writes (hypothesis): a failure at any stage (while writing, at fsync, at the rename; an
  OSError such as ENOSPC or a KeyboardInterrupt) leaves the previous file byte-identical and no
  temporary file behind.
- `train`: Ctrl-C in the middle of epoch 2 keeps epoch 1's head and training state intact (exit 130);
  `--resume` finishes the run.
- `sweep`: Ctrl-C while the second identity samples, or a disk that fills up while its grid is
  written, keeps every grid of the previous run byte-identical (exit 130 / exit 2 with one line);
  a rerun completes with identical grids (sweeps are deterministic: a rerun is the recovery).
- Nodes (ComfyUI's Cancel button, i.e. InterruptProcessingException from the interrupt check, or any
  of the pack's errors): the loaded models stay usable, keep_loaded=False models go back to the CPU
  and the cache is emptied, and the next prompt gives exactly the result of an undisturbed run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen_identity.core.files.atomic as atomic
from qwen_identity.cli import main
from qwen_identity.core.errors import UserInputError
from qwen_identity.core.residual.head import HeadMeta, ResidualHead, load_head, save_head
from qwen_identity.training.checkpoint import load_train_state
from robustness_helpers import InterruptProcessingException, fake_comfy

SMALL = ["--device", "cpu", "--steps", "2", "--width", "32", "--height", "32"]


# ----------------------------------------------------------------------------- atomic writes
class Boom(Exception):
    pass


STAGES = ["write", "fsync", "replace"]
FAILURES = {"ENOSPC": lambda: OSError(errno.ENOSPC, "No space left on device"),
            "EIO": lambda: OSError(errno.EIO, "Input/output error"),
            "KeyboardInterrupt": KeyboardInterrupt, "crash": lambda: Boom("writer crashed")}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=st.binary(max_size=64), new=st.binary(min_size=1, max_size=4096), stage=st.sampled_from(STAGES),
       failure=st.sampled_from(sorted(FAILURES)), cut=st.floats(0, 1), kind=st.sampled_from(["bytes", "json", "head"]))
def test_a_failed_write_leaves_the_previous_file_and_no_temp(tmp_path_factory, monkeypatch, old, new, stage, failure,
                                                            cut, kind):
    folder = tmp_path_factory.mktemp("atomic")
    target = folder / ("h.safetensors" if kind == "head" else "out.bin")
    target.write_bytes(old)
    exc = FAILURES[failure]()

    def write(path):
        data = new[: int(len(new) * cut)]
        with open(path, "wb") as f:
            f.write(data)          # part of the data reached the disk, then:
        raise exc

    with monkeypatch.context() as m:
        if stage == "fsync":
            m.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(exc))
        elif stage == "replace":
            m.setattr(atomic.os, "replace", lambda a, b: (_ for _ in ()).throw(exc))
        with pytest.raises(type(exc)):
            if stage == "write":
                atomic.atomic_write(target, write)
            elif kind == "bytes":
                atomic.atomic_write_bytes(target, new)
            elif kind == "json":
                atomic.atomic_write_json(target, {"x": new.hex()})
            else:
                save_head(ResidualHead(4, 1, 2), target)
    assert target.read_bytes() == old
    assert sorted(p.name for p in folder.iterdir()) == [target.name]


# ----------------------------------------------------------------------------- train
@pytest.fixture
def run_cli(capsys):
    def run(*argv):
        code = main(list(argv))
        cap = capsys.readouterr()
        return code, cap.err
    return run


def test_train_interrupted_mid_epoch_keeps_the_last_checkpoint_and_resumes(tiny_models, make_dataset, tmp_path,
                                                                           monkeypatch, run_cli):
    import qwen_identity.training.pipeline as pipeline

    dirs = ",".join(map(str, make_dataset(identities=3, views=2, size=(48, 48))))
    out = tmp_path / "o"
    base = ["train", "--seed-dirs", dirs, "--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model",
            str(tiny_models.qwen_image), "--target", "zero", "--device", "cpu", "--out-dir", str(out), "--crop", "center"]
    code, err = run_cli(*base, "--epochs", "1")
    assert code == 0, err
    ckpt = out / "checkpoints"
    saved = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert {"o_head.safetensors", "o_head.md", "train_state.safetensors"} <= set(saved)

    real = pipeline.train_head

    def interrupted(*a, progress=None, **k):
        def prog(done, total):
            if done > total * 0.75:   # epoch 2 of 2 more epochs: in the middle of its steps
                raise KeyboardInterrupt
            if progress:
                progress(done, total)
        return real(*a, progress=prog, **k)

    monkeypatch.setattr(pipeline, "train_head", interrupted)
    code, err = run_cli(*base, "--epochs", "3", "--resume")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    # the interrupt came after epoch 2 was saved or before: either way every file is a complete checkpoint
    for p in ckpt.iterdir():
        assert not p.name.endswith(".tmp")
    head = load_head(ckpt / "o_head.safetensors")
    assert head.meta.tokens == 1
    _, epoch, _ = load_train_state(ckpt / "train_state.safetensors")
    assert epoch in (1, 2)                       # epoch 1's pair, or epoch 2's if it was saved before the interrupt
    if epoch == 1:
        assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == saved
    monkeypatch.setattr(pipeline, "train_head", real)
    code, err = run_cli(*base, "--epochs", "3", "--resume")
    assert code == 0, err
    assert load_train_state(ckpt / "train_state.safetensors")[1] == 3
    assert load_head(ckpt / "o_head.safetensors").meta.tokens == 1


# ----------------------------------------------------------------------------- sweep
def _width(folder: Path) -> int:
    cfg = json.loads((folder / "config.json").read_text())
    return int(cfg.get("text_config", cfg)["hidden_size"])


@pytest.fixture(scope="module")
def sweep_inputs(tiny_models, tmp_path_factory):
    from qwen_identity.tiny_models.dataset import make_seed_dirs

    root = tmp_path_factory.mktemp("sweep_faults")
    dirs = make_seed_dirs(root / "data", identities=2, views=1)
    d, h = _width(tiny_models.qwen3vl), _width(tiny_models.qwen_image / "text_encoder")
    torch.manual_seed(0)
    head = ResidualHead(d, 1, h, meta=HeadMeta(feature_dim=d, tokens=1, hidden_size=h))
    with torch.no_grad():
        head.proj.weight.normal_(0, 1.0)
    save_head(head, root / "head.safetensors")
    return dirs, root / "head.safetensors"


def _grids(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "generations").glob("*.png"))}


def test_sweep_interrupt_and_full_disk_keep_the_previous_grids_and_a_rerun_recovers(sweep_inputs, tiny_models,
                                                                                   tmp_path, monkeypatch, run_cli):
    import qwen_identity.core.generation.sampling as sampling

    dirs, head = sweep_inputs
    out = tmp_path / "out"
    argv = ["sweep", "--seed-dirs", ",".join(map(str, dirs)), "--out-dir", str(out), "--head", str(head),
            "--alphas", "0,1", "--gen-seeds", "3", "--qwen3-vl-model", str(tiny_models.qwen3vl),
            "--qwen-image-model", str(tiny_models.qwen_image), *SMALL]
    code, err = run_cli(*argv)
    assert code == 0, err
    first = _grids(out)
    assert len(first) == 2

    # Ctrl-C while the second identity samples
    real_sample, calls = sampling.sample, []

    def sample_then_interrupt(*a, progress=None, **k):
        calls.append(1)

        def prog(done, total):
            if len(calls) == 2:
                raise KeyboardInterrupt
            if progress:
                progress(done, total)
        return real_sample(*a, progress=prog, **k)

    monkeypatch.setattr(sampling, "sample", sample_then_interrupt)
    code, err = run_cli(*argv)
    assert code == 130 and "Traceback" not in err, err
    assert _grids(out) == first and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(sampling, "sample", real_sample)

    # the disk fills up while the second grid is being written
    real_path = atomic.atomic_path

    @contextlib.contextmanager
    def filling_disk(path):
        with real_path(path) as tmp:
            yield tmp
            if Path(path).name == f"{dirs[1].name}_alpha_grid.png":
                with open(tmp, "r+b") as f:
                    f.truncate(max(1, tmp.stat().st_size // 2))
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "atomic_path", filling_disk)
    code, err = run_cli(*argv)
    assert code == 2 and "No space left on device" in err and "rerun" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 or "internal error" not in err
    assert _grids(out) == first and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(atomic, "atomic_path", real_path)

    code, err = run_cli(*argv)   # the recovery: rerun
    assert code == 0, err
    assert _grids(out) == first
    for d in dirs:
        assert json.loads((out / "generations" / f"{d.name}_meta.json").read_text())["identity"] == d.name


# ----------------------------------------------------------------------------- nodes (ComfyUI)
@pytest.fixture(scope="module")
def bundles(tiny_qwen3vl_dir, tiny_qwenimage_dir):
    from qwen_identity.nodes.qwen3vl_nodes import NO_FOLDER, LoadQwen3VL
    from qwen_identity.nodes.sampling_nodes import LoadQwenImageDiffusers

    (vl,) = LoadQwen3VL().load(NO_FOLDER, str(tiny_qwen3vl_dir), dtype="fp32", device="cpu")
    (pipe,) = LoadQwenImageDiffusers().load("", str(tiny_qwenimage_dir), dtype="fp32", device="cpu")
    return vl, pipe


def test_cancel_in_the_middle_of_a_node_leaves_models_usable(bundles, monkeypatch):
    from qwen_identity.nodes.inject_nodes import QwenImageTextEncodeDiffusers
    from qwen_identity.nodes.qwen3vl_nodes import ExtractIdentityFeatures
    from qwen_identity.nodes.sampling_nodes import QwenImageSampleFromEmbeds

    vl, pipe = bundles
    photos = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    (pos,) = QwenImageTextEncodeDiffusers().encode(pipe, "a portrait photo of a person")
    (neg,) = QwenImageTextEncodeDiffusers().encode(pipe, "blurry")
    ref_feats, _ = ExtractIdentityFeatures().extract(vl, photos, resolution="pixel_budget", crop="full")
    ref_images, _ = QwenImageSampleFromEmbeds().sample(pos, neg, seeds="5,6", steps=3, width=32, height=32,
                                                       max_batch=1, pipeline=pipe)

    # Cancel during extraction with keep_loaded=False on a (pretend) GPU: back on the CPU, cache emptied
    log = fake_comfy(monkeypatch, interrupt_at=2)
    moves = []
    real_to = vl.model.to
    monkeypatch.setattr(vl, "device", torch.device("meta"))
    monkeypatch.setattr(vl, "keep_loaded", False)
    monkeypatch.setattr(vl.model, "to", lambda dev, *a, **k: moves.append(str(dev)) or vl.model)
    with pytest.raises(InterruptProcessingException):
        ExtractIdentityFeatures().extract(vl, photos, resolution="pixel_budget", crop="full")
    assert moves == ["meta", "cpu"] and log["soft_empty_cache"] == 1
    monkeypatch.setattr(vl.model, "to", real_to)
    monkeypatch.setattr(vl, "device", torch.device("cpu"))
    monkeypatch.setattr(vl, "keep_loaded", True)

    # Cancel during sampling (after the first of two batches)
    log = fake_comfy(monkeypatch, interrupt_at=2)
    with pytest.raises(InterruptProcessingException):
        QwenImageSampleFromEmbeds().sample(pos, neg, seeds="5,6", steps=3, width=32, height=32, max_batch=1,
                                           pipeline=pipe)

    # the next prompt runs (the model itself, not features kept from the first run) and equals the undisturbed one
    fake_comfy(monkeypatch)
    from qwen_identity.nodes.feature_cache import FEATURE_CACHE

    FEATURE_CACHE.clear()
    feats, _ = ExtractIdentityFeatures().extract(vl, photos, resolution="pixel_budget", crop="full")
    images, _ = QwenImageSampleFromEmbeds().sample(pos, neg, seeds="5,6", steps=3, width=32, height=32, max_batch=1,
                                                   pipeline=pipe)
    assert torch.equal(feats.combined, ref_feats.combined) and torch.equal(images, ref_images)


def test_every_pack_error_leaves_the_next_prompt_working(bundles, tmp_path, monkeypatch):
    """Each node's error (bad input) is a UserInputError; the same node then runs normally on good input."""
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS as N

    vl, pipe = bundles
    monkeypatch.setenv("QWEN_IDENTITY_MODELS_DIR", str(tmp_path / "models"))
    photos = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    (pos,) = N["QwenImageTextEncodeDiffusers"]().encode(pipe, "a portrait")
    feats, _ = N["ExtractIdentityFeatures"]().extract(vl, photos, crop="center")
    d, h = feats.combined.shape[-1], pos[0][0].shape[-1]
    head = ResidualHead(d, 1, h, meta=HeadMeta(feature_dim=d, tokens=1, hidden_size=h))
    save_head(head, tmp_path / "head.safetensors")
    nan_photos = photos.clone()
    nan_photos[0, 0, 0, 0] = float("nan")
    good_images, _ = N["QwenImageSampleFromEmbeds"]().sample(pos, pos, seeds="1", steps=2, width=32, height=32,
                                                             pipeline=pipe)
    cases = [
        (lambda: N["LoadResidualHead"]().load("", str(tmp_path / "missing.safetensors")),
         lambda: N["LoadResidualHead"]().load("", str(tmp_path / "head.safetensors"))),
        (lambda: N["ExtractIdentityFeatures"]().extract(vl, nan_photos),
         lambda: N["ExtractIdentityFeatures"]().extract(vl, photos, crop="center")),
        (lambda: N["InjectResidual"]().inject(pos, head, feats, alphas="1,,x"),
         lambda: N["InjectResidual"]().inject(pos, head, feats, alphas="0,1")),
        (lambda: N["InjectResidual"]().inject([[torch.zeros(1, 3, h + 1), {}]], head, feats),
         lambda: N["InjectResidual"]().inject(pos, head, feats)),
        (lambda: N["QwenImageSampleFromEmbeds"]().sample(pos, pos, seeds="1", steps=2, width=33, height=32,
                                                         pipeline=pipe),
         lambda: N["QwenImageSampleFromEmbeds"]().sample(pos, pos, seeds="1", steps=2, width=32, height=32,
                                                         pipeline=pipe)),
        (lambda: N["QwenImageSampleFromEmbeds"]().sample(pos, pos, seeds="1", steps=1, width=32, height=32,
                                                         pipeline=pipe), None),   # found here: NaN images before
        (lambda: N["AlphaGrid"]().grid(good_images, "0,1", "1"),
         lambda: N["AlphaGrid"]().grid(good_images, "0", "1")),
        (lambda: N["LoadQwen3VL"]().load("../../etc", "", device="cpu"), None),
        (lambda: N["LoadQwenImageDiffusers"]().load("", str(tmp_path / "nope"), device="cpu"), None),
    ]
    for bad, good in cases:
        with pytest.raises(UserInputError):
            bad()
        if good is not None:
            assert good() is not None
    again, _ = N["QwenImageSampleFromEmbeds"]().sample(pos, pos, seeds="1", steps=2, width=32, height=32, pipeline=pipe)
    assert torch.equal(again, good_images) and torch.isfinite(good_images).all()
    assert os.environ["QWEN_IDENTITY_MODELS_DIR"].endswith("models")
